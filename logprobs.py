"""Sequence log-probs, log pi(y | x), and the metrics TRL logs from them.

`sequence_logps` is the one function that computes them: the reference pass, training, the step-0 check,
the packing measurement and evaluation all call it, on the batches batching.py collates. The LM head runs
only where a completion token is predicted, fused with the log-softmax a chunk at a time (`fused_head`), so
the [tokens, vocabulary] logits never exist whole; a model whose logits the fused head does not reproduce
(`check_fused_head`) runs its head whole at those positions instead.
"""

import contextlib
import weakref

import torch
from torch.utils.checkpoint import checkpoint

from apo import rewards
from distributed import gather_to_all, max_over_processes, shard_batches, unwrap
from language_model import autocast


def _token_logps(logits, labels):
    """log softmax(logits)[label] in float32, as gather - logsumexp: no [T, vocab] log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _by_chunk(fn, *tensors, chunk):
    """torch.cat of fn over `chunk`-row slices of `tensors`; under grad each slice is checkpointed: its
    intermediates are recomputed in the backward instead of kept."""
    pieces = zip(*(t.split(chunk) for t in tensors))
    if torch.is_grad_enabled():
        return torch.cat([checkpoint(fn, *piece, use_reentrant=False) for piece in pieces])
    return torch.cat([fn(*piece) for piece in pieces])


def logit_transform(model):
    """What the model's forward does to its LM head's output, read from its config: Gemma-2/3's soft-capping
    and Cohere's, Granite's and Falcon-H1's scales; the families train.py is tested on do nothing else.
    check_fused_head measures whether this reproduces the model's own logits."""
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


# Targets per chunk of the fused head: as many as 2 ** 24 logits (64 MiB in float32, the chunk's largest tensor;
# logsumexp's temporary and the logits' gradient come beside it), and at least the hidden size: every chunk's
# backward adds a [vocabulary, hidden] product into the head's weight gradient, which then moves no more memory
# than the chunk's own logits. SmolLM2 (49k, 576): 576 targets; a 262k vocabulary at hidden size 2,560: 2,560.
CHUNK_LOGITS = 2 ** 24


@contextlib.contextmanager
def fused_head(model, targets, labels):
    """While active, the LM head computes log-probs, not logits: from the hidden states at `targets` (rows,
    columns), a chunk of targets at a time, the head's own forward, logit_transform and _token_logps give
    the log-prob of each of `labels`. Under grad each chunk is checkpointed (recomputed in the backward), so
    no [targets, vocabulary] tensor outlives its chunk, in the forward or the backward.

    The log-probs, [targets], go to the yielded list. The head returns an empty [1, targets, 0] tensor made
    from them, which the model passes on as its logits: sequence_logps adds that output's (zero) sum, so the
    gradient flows through the head's and the model's outputs, where FSDP's hooks gather parameters for the
    backward.
    """
    rows, cols = targets
    head = unwrap(model).get_output_embeddings()
    set_on_instance = vars(head).get("forward")  # a forward someone else set on the head (accelerate's hooks)
    own_forward, transform = head.forward, logit_transform(model)
    vocabulary, hidden = head.weight.shape
    chunk = max(hidden, CHUNK_LOGITS // vocabulary)
    captured = []

    def chunk_logps(hidden, chunk_labels):
        return _token_logps(transform(own_forward(hidden)), chunk_labels)

    def forward(hidden_states):
        captured.append(_by_chunk(chunk_logps, hidden_states[rows, cols], labels, chunk=chunk))
        return captured[-1][None, :, None][..., :0].clone()  # not a view: FSDP's hooks warn on views

    head.forward = forward
    try:
        yield captured
    finally:
        if set_on_instance is None:
            del head.forward
        else:
            head.forward = set_on_instance


@contextlib.contextmanager
def head_only_at(model, targets):
    """While active, the model's LM head sees only the hidden states at `targets` (rows, columns): logits
    come out [1, len(targets), vocab], through the model's own head code (soft-capping and scaling kept)."""
    rows, cols = targets
    head = unwrap(model).get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda module, args: (args[0][rows, cols][None], *args[1:]))
    try:
        yield
    finally:
        hook.remove()


MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # the last four: flash varlen


def model_inputs(batch):
    """What of a collated batch the model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def fused_token_logps(model, batch):
    """[targets] log-probs of the batch's labels, through fused_head."""
    with fused_head(model, batch["targets"], batch["labels"]) as captured:
        empty = model(**model_inputs(batch), use_cache=False).logits
    return captured[0] + empty.sum()


def whole_head_token_logps(model, batch, chunk=512):
    """[targets] log-probs of the batch's labels from the model's own logits at the targets (head_only_at): the
    [targets, vocabulary] logits, and under grad their gradient, exist whole; the log-softmax runs by chunks."""
    with head_only_at(model, batch["targets"]):
        logits = model(**model_inputs(batch), use_cache=False).logits[0]
    return _by_chunk(_token_logps, logits, batch["labels"], chunk=chunk)


# Models whose logits the fused head does not reproduce (check_fused_head): their head runs whole, at targets.
WHOLE_HEAD = weakref.WeakSet()


def sequence_logps(model, batch):
    """Summed log pi(completion | prompt) of every sequence of `batch`, float64, shape [sequences].

    Token log-probs come from fused_token_logps, or for a model in WHOLE_HEAD whole_head_token_logps, and are
    summed per sequence in float64: index_add's order is not fixed on CUDA (atomics), and float64 keeps that
    noise far below the 1e-6 nats per token the packing measurement asks for.
    """
    token_logps = (whole_head_token_logps if unwrap(model) in WHOLE_HEAD else fused_token_logps)(model, batch)
    sums = torch.zeros(batch["sequences"], dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, batch["sequence"], token_logps.double())


# How far fused_head's log-probs may sit from the model's own logits', for any one token: float32 agrees to
# rounding; bf16 rounds the head's matmul by the chunk's shape.
FUSED_HEAD_TOL = {"fp32": 1e-5, "bf16": 5e-2}


@contextlib.contextmanager
def measuring(model, device, dtype):
    """No grad, eval mode and the compute dtype's autocast, the model's mode restored after: how every pass that
    only measures log-probs runs (the reference, evaluation, the fused-head and packing checks, CHES)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, dtype):
            yield
    finally:
        model.train(was_training)


def check_fused_head(model, batch, dtype):
    """The largest gap, in nats, between any one target's log-prob from the fused head and from the model's own
    logits, on `batch`, no grad, in eval mode, over every process. Beyond FUSED_HEAD_TOL[dtype] the model goes
    into WHOLE_HEAD; within it, out of it."""
    with measuring(model, batch["input_ids"].device, dtype):
        gap = (fused_token_logps(model, batch) - whole_head_token_logps(model, batch)).abs().max().reshape(1)
    gap = max_over_processes(gap).item()
    (WHOLE_HEAD.discard if gap <= FUSED_HEAD_TOL[dtype] else WHOLE_HEAD.add)(unwrap(model))
    return gap


def pairs_logps(model, pairs, collate, batch_size, device, dtype):
    """[len(pairs), 2] summed log-probs of (chosen, rejected) under `model`, float64 on the CPU: one no-grad
    pass in eval mode with training's `collate` and log-prob code, split across processes and gathered on all."""
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    indices, logps = [], []
    with measuring(model, device, dtype):
        for batch, real in shard_batches(batches):
            computed = sequence_logps(model, collate(pairs, batch, device)).view(2, -1).T
            if real:
                indices += batch
                logps.append(computed)
    mine = torch.cat(logps).cpu().tolist() if logps else []  # one copy off the device, after the last batch
    everyone = gather_to_all(list(zip(indices, mine)))
    result = torch.zeros(len(pairs), 2, dtype=torch.float64)
    result[[i for i, _ in everyone]] = torch.tensor([value for _, value in everyone], dtype=torch.float64)
    return result


# ----------------------------------------------------------------------------- TRL's metrics

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def pair_stats(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair metric sums of a micro-batch, in METRICS order: a [len(METRICS)] tensor."""
    r_w, r_l = rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    columns = [loss.detach(), r_w, r_l, r_w - r_l, (r_w > r_l).float(), policy_chosen.detach(), policy_rejected.detach()]
    return torch.stack([c.double().sum() for c in columns])


def pair_metrics(policy, ref, loss_fn, beta):
    """METRICS as means over pairs, from [N, 2] policy and reference log-probs."""
    (pc, pr), (rc, rr) = policy.double().T, ref.double().T
    totals = pair_stats(loss_fn(pc, pr, rc, rr, beta), pc, pr, rc, rr, beta)
    return {name: value / len(policy) for name, value in zip(METRICS, totals.tolist())}
