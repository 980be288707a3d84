"""The measurements that decide how a model's micro-batches are computed: a Batching.

Two decisions, each measured on the model rather than read from a list of families, on one micro-batch, no
grad, in the training's compute dtype, with the result agreed over every process:
- the LM head: fused_head's log-probs against the definition (logprobs.token_logps); fused where they agree;
- the layout: packed rows against one sequence per row (batching.py); packed where they agree and no
  sequence notices the one before it in its row, padded elsewhere.
"""

import functools

import torch

from clair_apo.batching import attention_break_even, layout, one_row, packed, padded, sequences_of
from clair_apo.distributed import max_over_processes, unwrap
from clair_apo.fused_head import FUSED_HEAD_TOL, fused_head_gap, fused_sequence_logps
from clair_apo.logprobs import Batching, measuring, sequence_logps
from clair_apo.models import ModelError

# How far packed log-probs may sit from one sequence per row, per token, in each compute dtype: bf16 rounds
# the two layouts' matmuls differently (docs/benchmarks.md). A sequence whose log-prob moves at all when the
# one before it in the row changes (beyond 1e-6 per token, in either dtype) means the sequences mix.
PACKING_TOL = {"fp32": 1e-5, "bf16": 5e-2}


def choose_batching(model, pairs, indices, packing, device, dtype):
    """The Batching for `model` under --packing auto|on|off, measured on the micro-batch `indices`: first the
    head (choose_head, on the first pair's first 32 completion tokens a side, where whole logits are small),
    then the layout (choose_layout) with that head."""
    first = pairs[indices[0]]
    probe = {"prompt": first["prompt"], "chosen": first["chosen"][:32], "rejected": first["rejected"][:32]}
    logps, head = choose_head(model, padded([probe], [0], device), dtype)
    if packing == "off":
        return Batching(collate=padded, sequence_logps=logps, description=f"padded (--packing off); {head}")
    collate, how = choose_layout(model, pairs, indices, logps, device, dtype)
    if packing == "on" and collate is padded:
        raise ModelError(f"--packing on refused: {how}; use --packing auto or off")
    return Batching(collate=collate, sequence_logps=logps, description=f"{how}; {head}")


def choose_head(model, probe, dtype):
    """(the log-prob function, what to say of it): fused_sequence_logps where the fused head reproduces the
    definition on `probe` within FUSED_HEAD_TOL, else the definition."""
    gap = fused_head_gap(model, probe, dtype)
    if gap <= FUSED_HEAD_TOL[dtype]:
        return fused_sequence_logps, f"LM head fused (within {gap:.1g} nats)"
    kind = unwrap(model).config.model_type
    return sequence_logps, f"LM head whole: fused is {gap:.1g} nats from {kind}'s logits"


def choose_layout(model, pairs, indices, logps, device, dtype):
    """(the collate, what to say of it). Packing is exact only when nothing carries from one sequence to the
    next in a row: attention masked per sequence by transformers, and no convolution or recurrent state across
    the row (gated-delta-net and Mamba layers carry it; OPT ignores packed position ids in its mask). Flash
    attention takes one row (varlen kernels, linear in its length); under SDPA, whose work is quadratic in a
    row's width, pack_rows weighs that against padding (attention_break_even)."""
    kind = unwrap(model).config.model_type
    gaps = packing_gaps(model, pairs, indices, logps, device, dtype)
    measured = f"{gaps[0]:.1g} nats/token from padded, {gaps[1]:.1g} across sequences"
    if not (gaps[0] <= PACKING_TOL[dtype] and gaps[1] <= 1e-6):
        return padded, f"padded: packed sequences mix on {kind} ({measured})"
    if "flash" in (unwrap(model).config._attn_implementation or ""):
        return one_row, f"packed in one row, exact on {kind} ({measured})"
    break_even = attention_break_even(model)
    return functools.partial(packed, break_even=break_even), f"packed, exact on {kind} ({measured})"


def packing_gaps(model, pairs, indices, logps, device, dtype):
    """[packed against padded, packed against packed after its first sequence changed]: the largest log-prob
    differences per token, over every process. All the micro-batch's sequences go in one row, against one
    sequence per row; then that row against the same row with its first sequence's tokens reversed, which the
    sequences after it must not notice."""
    alone = padded(pairs, indices, device)
    sequences, prompts = sequences_of(pairs, indices)
    packed_row = layout(indices, sequences, prompts, [list(range(len(sequences)))], device, mask=False)
    first = len(sequences[0])  # where the second sequence starts
    changed = dict(packed_row, input_ids=packed_row["input_ids"].clone())
    changed["input_ids"][0, :first] = changed["input_ids"][0, :first].flip(0)
    changed["labels"] = changed["input_ids"][packed_row["targets"][0], packed_row["targets"][1] + 1]
    with measuring(model, device, dtype):
        alone_logps, packed_logps, changed_logps = (logps(model, b) for b in (alone, packed_row, changed))
    tokens = torch.bincount(alone["sequence_of_target"])
    later = torch.ones_like(tokens, dtype=torch.bool)
    later[packed_row["sequence_of_target"][packed_row["targets"][1] < first]] = False
    gaps = torch.stack([((packed_logps - alone_logps).abs() / tokens).max(),
                        ((changed_logps - packed_logps).abs() / tokens)[later].max()])
    return max_over_processes(gaps)
