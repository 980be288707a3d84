"""Sequence log-probs, log pi(y | x): the one definition, and the no-grad pass that computes them for many pairs.

A collated batch (batching.py) holds sequences laid out in rows, and for every completion token its position
(`targets`: the row and column whose output predicts it), the token itself (`labels`) and the sequence it
belongs to (`sequence_of_target`). log pi(y | x) is the sum over y's tokens of the log-softmax of the logits
at those positions. `sequence_logps` computes exactly that, as the DPO reference's `_get_batch_logps` does;
fused_head.py computes the same numbers without whole logits, and packing.py checks it against this before
using it.
"""

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from clair_apo.distributed import gather_to_all, shard_batches
from clair_apo.models import autocast

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids",
                "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")  # the last four: flash varlen


def model_inputs(batch):
    """What of a collated batch the model's forward takes."""
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def sequence_logps(model, batch):
    """Summed log pi(completion | prompt) of every sequence of `batch`, float64, shape [num_sequences]."""
    return sum_per_sequence(token_logps(model, batch), batch)


def token_logps(model, batch):
    """log pi(token | the tokens before it) of every completion token of `batch`, float32, shape [targets]."""
    logits = model(**model_inputs(batch), use_cache=False).logits   # [rows, width, vocabulary]
    rows, cols = batch["targets"]                                    # where a completion token is predicted
    logps = logits[rows, cols].float().log_softmax(-1)               # [targets, vocabulary]
    return logps.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)


def sum_per_sequence(token_logps, batch):
    """[num_sequences] sums of per-target log-probs, in float64: index_add's order is not fixed on CUDA
    (atomics), and float64 keeps that noise far below the 1e-6 nats per token packing is held to."""
    sums = torch.zeros(batch["num_sequences"], dtype=torch.float64, device=token_logps.device)
    return sums.index_add(0, batch["sequence_of_target"], token_logps.double())


@dataclass(frozen=True)
class Batching:
    """How a model's micro-batches are computed: `collate(pairs, indices, device)` lays them out, and
    `sequence_logps(model, batch)` computes their log-probs (the definition above, or fused_head's where it
    reproduces it). packing.choose_batching measures which; `description` says what it chose and why."""
    collate: Callable
    sequence_logps: Callable
    description: str


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


@dataclass(frozen=True)
class LogprobPass:
    """How a no-grad pass computes many pairs' log-probs: training's Batching, pairs per forward, the device
    and the compute dtype."""
    batching: Batching
    batch_size: int
    device: torch.device
    dtype: str


def pairs_logps(model, pairs, how):
    """[len(pairs), 2] summed log-probs of (chosen, rejected) under `model`, float64 on the CPU: one no-grad
    pass in eval mode as `how` (a LogprobPass) says, split across processes and gathered on all."""
    size, batching = how.batch_size, how.batching
    batches = [list(range(i, min(i + size, len(pairs)))) for i in range(0, len(pairs), size)]
    indices, logps = [], []
    with measuring(model, how.device, how.dtype):
        for batch, real in shard_batches(batches):
            computed = batching.sequence_logps(model, batching.collate(pairs, batch, how.device)).view(2, -1).T
            if real:
                indices += batch
                logps.append(computed)
    mine = torch.cat(logps).cpu().tolist() if logps else []  # one copy off the device, after the last batch
    everyone = gather_to_all(list(zip(indices, mine)))
    result = torch.zeros(len(pairs), 2, dtype=torch.float64)
    result[[i for i, _ in everyone]] = torch.tensor([value for _, value in everyone], dtype=torch.float64)
    return result
