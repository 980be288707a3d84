"""A speed-up of logprobs.token_logps: the LM head fused with the log-softmax, a chunk of targets at a time.

The definition computes the logits of every position, [rows, width, vocabulary], and keeps those at the
targets. Here the LM head runs only at the targets, a chunk at a time, each chunk's logits reduced to their
log-probs at once and, under grad, recomputed in the backward: no [targets, vocabulary] tensor outlives its
chunk. With a 262k vocabulary that is most of a step's memory (docs/benchmarks.md).

It replaces the head's forward on the model instance while the model runs, so the head is called where the
model calls it (inside FSDP's and DDP's hooks). packing.choose_batching measures `fused_head_gap` against the
definition on every model before using it; a model whose head does more than `logit_transform` knows of
keeps the definition.
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from clair_apo.distributed import max_over_processes, unwrap
from clair_apo.logprobs import measuring, model_inputs, sum_per_sequence, token_logps

# How far the fused head's log-probs may sit from the definition's, for any one token: both round the head's
# matmul by its shape (the definition's covers every position, the fused head's a chunk of targets), about
# 1e-5 nats in float32 and 1e-2 in bf16. A soft-cap or scale the fused head misses is off by far more.
FUSED_HEAD_TOL = {"fp32": 1e-4, "bf16": 5e-2}

# Targets per chunk: as many as 2 ** 24 logits (64 MiB in float32, the chunk's largest tensor), and at least
# the hidden size, so that each chunk's [vocabulary, hidden] weight-gradient product moves no more memory than
# the chunk's own logits. SmolLM2 (49k, 576): 576 targets; a 262k vocabulary at hidden size 2,560: 2,560.
CHUNK_LOGITS = 2 ** 24


def fused_sequence_logps(model, batch):
    """logprobs.sequence_logps, through the fused head."""
    return sum_per_sequence(fused_token_logps(model, batch), batch)


def fused_token_logps(model, batch):
    """logprobs.token_logps, through the fused head. The model's output, an empty tensor (fused_head), joins
    the result with its zero sum, so the backward runs through the model's outputs, where FSDP's hooks are."""
    with fused_head(model, batch["targets"], batch["labels"]) as captured:
        empty = model(**model_inputs(batch), use_cache=False).logits
    return captured[0] + empty.sum()


def fused_head_gap(model, batch, dtype):
    """The largest gap, in nats, between any one target's log-prob through the fused head and by the
    definition, on `batch`, no grad, in eval mode, over every process."""
    with measuring(model, batch["input_ids"].device, dtype):
        gap = (fused_token_logps(model, batch) - token_logps(model, batch)).abs().max().reshape(1)
    return max_over_processes(gap).item()


def token_logps_of_logits(logits, labels):
    """log softmax(logits)[label] in float32, as gather - logsumexp: no [T, vocab] log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def by_chunk(fn, *tensors, chunk):
    """torch.cat of fn over `chunk`-row slices of `tensors`; under grad each slice is checkpointed: its
    intermediates are recomputed in the backward instead of kept."""
    pieces = zip(*(t.split(chunk) for t in tensors))
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, *piece, use_reentrant=False) for piece in pieces])
    return torch.cat([fn(*piece) for piece in pieces])


def logit_transform(model):
    """What the model's forward does to its LM head's output, read from its config: Gemma-2/3's soft-capping
    and Cohere's, Granite's and Falcon-H1's scales; the families train.py is tested on do nothing else."""
    config = unwrap(model).config.get_text_config()
    cap = getattr(config, "final_logit_softcapping", None)   # Gemma-2/3: cap * tanh(logits / cap)
    scale = getattr(config, "logit_scale", None)             # Cohere: logits * logit_scale
    divisor = getattr(config, "logits_scaling", None)        # Granite: logits / logits_scaling
    multiplier = getattr(config, "lm_head_multiplier", None)  # Falcon-H1: logits * lm_head_multiplier

    def transform(logits):
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if multiplier is not None:
            logits = logits * multiplier
        return logits
    return transform


@contextlib.contextmanager
def fused_head(model, targets, labels):
    """While active, the LM head computes log-probs, not logits: from the hidden states at `targets` (rows,
    columns), a chunk at a time, the head's own forward, logit_transform and the log-softmax give the log-prob
    of each of `labels`; they go to the yielded list, [targets]. The head returns an empty [1, targets, 0]
    tensor made from them, which the model passes on as its logits."""
    rows, cols = targets
    head = unwrap(model).get_output_embeddings()
    set_on_instance = vars(head).get("forward")  # a forward someone else set on the head (accelerate's hooks)
    own_forward, transform = head.forward, logit_transform(model)
    vocabulary, hidden = head.weight.shape
    chunk = max(hidden, CHUNK_LOGITS // vocabulary)
    captured = []

    def chunk_logps(hidden, chunk_labels):
        return token_logps_of_logits(transform(own_forward(hidden)), chunk_labels)

    def forward(hidden_states):
        captured.append(by_chunk(chunk_logps, hidden_states[rows, cols], labels, chunk=chunk))
        return captured[-1][None, :, None][..., :0].clone()  # not a view: FSDP's hooks warn on views

    head.forward = forward
    try:
        yield captured
    finally:
        if set_on_instance is None:
            del head.forward
        else:
            head.forward = set_on_instance
