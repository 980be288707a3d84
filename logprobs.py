"""Sequence log-probs, log pi(y | x), and the metrics TRL logs from them.

`sequence_logps` is the one function that computes them: the reference pass, training, the step-0 check,
the packing measurement and evaluation all call it, on the batches batching.py collates.
"""

import contextlib

import torch
from torch.utils.checkpoint import checkpoint

from apo import rewards
from distributed import gather_to_all, shard_batches, unwrap
from language_model import autocast


def _token_logps(logits, labels):
    """log softmax(logits)[label] in float32, as gather - logsumexp: no [T, vocab] log-softmax tensor."""
    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


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


def sequence_logps(model, batch, chunk=512):
    """Summed log pi(completion | prompt) of every sequence of `batch`, float64, shape [sequences].

    The LM head runs only at the target positions (head_only_at), and logits become log-probs `chunk`
    positions at a time in float32; with grad enabled each chunk is recomputed in backward (checkpoint), so
    at most one chunk's float32 logits exist beyond the model's own output. Token log-probs are summed per
    sequence in float64: index_add's order is not fixed on CUDA (atomics), and float64 keeps that noise far
    below the 1e-6 nats per token the packing measurement asks for.
    """
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    with head_only_at(model, batch["targets"]):
        logits = model(**inputs, use_cache=False).logits[0]
    pieces = zip(logits.split(chunk), batch["labels"].split(chunk))
    if torch.is_grad_enabled():
        token_logps = [checkpoint(_token_logps, x, y, use_reentrant=False) for x, y in pieces]
    else:
        token_logps = [_token_logps(x, y) for x, y in pieces]
    sums = torch.zeros(batch["sequences"], dtype=torch.float64, device=logits.device)
    return sums.index_add(0, batch["sequence"], torch.cat(token_logps).double())


def pairs_logps(model, pairs, collate, batch_size, device, dtype):
    """[len(pairs), 2] summed log-probs of (chosen, rejected) under `model`, float64 on the CPU: one no-grad
    pass in eval mode with training's `collate` and log-prob code, split across processes and gathered on all."""
    batches = [list(range(i, min(i + batch_size, len(pairs)))) for i in range(0, len(pairs), batch_size)]
    indices, logps = [], []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        for batch, real in shard_batches(batches):
            computed = sequence_logps(model, collate(pairs, batch, device)).view(2, -1).T
            if real:
                indices += batch
                logps.append(computed)
    model.train(was_training)
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
