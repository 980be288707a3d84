"""Batching: which pairs go into each micro-batch, and how their sequences are laid out in rows.

A collate turns a micro-batch (a list of pair indices) into one forward's tensors: the chosen of each pair,
then the rejected. Three layouts give the same log-probs where `choose_collate` measures them exact:
- `padded`: one sequence per row, right-padded, with an attention mask; exact on every causal LM;
- `packed`: several sequences per row, position ids restarting at 0 for each, from which transformers
  masks attention within each sequence; as many rows as weigh padding against masked attention best;
- `one_row`: every sequence in one row, with flash attention's varlen arguments computed once here.
Either way a row's padding comes after its tokens, which a causal model never looks ahead to.

`choose_collate` makes the measured decisions of how a model's batches are computed: the layout, and whether
its LM head runs fused (logprobs.check_fused_head, which keeps the answer in logprobs.WHOLE_HEAD).
"""

import functools
import itertools
import math
import random
import sys

import torch

from distributed import max_over_processes, unwrap
from logprobs import WHOLE_HEAD, check_fused_head, measuring, sequence_logps


def train_batches(n, batch_size, seed, epoch):
    """One epoch of batches of pair indices, reshuffled every epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


# ----------------------------------------------------------------------------- layouts

def padded(pairs, indices, device):
    """One sequence per row, right-padded, with an attention mask."""
    sequences, prompts = _sequences(pairs, indices)
    return _layout(indices, sequences, prompts, [[n] for n in range(len(sequences))], device, mask=True)


def packed(pairs, indices, device, break_even):
    """Sequences packed into rows sized by pack_rows(break_even), position ids restarting per sequence."""
    sequences, prompts = _sequences(pairs, indices)
    return _layout(indices, sequences, prompts, pack_rows(list(map(len, sequences)), break_even), device, mask=False)


def one_row(pairs, indices, device):
    """Every sequence in one row, with the cumulative sequence lengths and the longest length that flash
    attention's varlen kernels take: given, transformers skips deriving them from position ids in every layer."""
    sequences, prompts = _sequences(pairs, indices)
    batch = _layout(indices, sequences, prompts, [list(range(len(sequences)))], device, mask=False)
    lengths = list(map(len, sequences))  # the row holds no padding: its width is their sum
    bounds = _to(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), device)
    return batch | {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                    "max_length_q": max(lengths), "max_length_k": max(lengths)}


def _sequences(pairs, indices):
    """The chosen of each pair, then the rejected, as token ids; and each one's prompt length."""
    sequences = [pairs[i]["prompt"] + pairs[i][side] for side in ("chosen", "rejected") for i in indices]
    prompts = [len(pairs[i]["prompt"]) for _ in ("chosen", "rejected") for i in indices]
    return sequences, prompts


def _layout(indices, sequences, prompts, rows, device, mask):
    """The tensors of the pairs `indices`, whose `sequences` are laid out in `rows` (lists of sequence numbers).

    Positionally, with no pad id involved: `targets` are the (row, column) positions whose next token is a
    completion token, `labels` those tokens, `sequence` which sequence each belongs to, `pairs` the pair
    indices (for their reference log-probs), `tokens` the real (unpadded) token count. With `mask` an
    attention mask covers each row's tokens; without, position ids restart at 0 for each sequence, and a
    row's padding follows as one more sequence of its own.
    """
    lengths = list(map(len, sequences))
    width = max(sum(lengths[n] for n in row) for row in rows)
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    position_ids = torch.zeros_like(input_ids)
    attention_mask = torch.zeros_like(input_ids)
    target_rows, target_cols, sequence = [], [], []
    for r, row in enumerate(rows):
        start = 0
        for n in row:
            end = start + lengths[n]
            input_ids[r, start:end] = torch.tensor(sequences[n])
            position_ids[r, start:end] = torch.arange(lengths[n])
            target_cols += range(start + prompts[n] - 1, end - 1)
            target_rows += [r] * (lengths[n] - prompts[n])
            sequence += [n] * (lengths[n] - prompts[n])
            start = end
        position_ids[r, start:] = torch.arange(width - start)
        attention_mask[r, :start] = 1
    targets = (torch.tensor(target_rows), torch.tensor(target_cols))
    batch = {"input_ids": input_ids, "labels": input_ids[targets[0], targets[1] + 1],
             "sequence": torch.tensor(sequence), "pairs": torch.tensor(indices)}
    batch |= {"attention_mask": attention_mask} if mask else {"position_ids": position_ids}
    batch = {k: _to(v, device) for k, v in batch.items()}
    return batch | {"targets": tuple(_to(t, device) for t in targets), "sequences": len(sequences),
                    "tokens": sum(lengths)}


def _to(tensor, device):
    """`tensor` on `device`; to a GPU from pinned memory without blocking, so the CPU goes on collating while
    the copy runs. (transformers' mask code still syncs once per forward: its packed-sequence and padding
    checks read a value back.)"""
    device = torch.device(device)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


# ----------------------------------------------------------------------------- rows

def attention_break_even(model):
    """The row width, in tokens, at which a packed row's attention costs as much as the rest of its forward:
    2 flops per token per weight outside the embedding and the LM head (which runs at targets only), against
    4 flops per query-key pair per layer and attention channel under SDPA's dense mask, which computes every
    pair of the row (the backward doubles both). SmolLM2-135M: 3,070 tokens; Llama-3-8B: 27k."""
    shape = model_shape(model)
    return 2 * shape["block_weights"] / (4 * shape["layers"] * shape["attention_channels"])


def model_shape(model):
    """What compute counts depend on: weights outside the embedding and the LM head, layers, attention
    channels (heads x head size), and the LM head's weights."""
    inner = unwrap(model)
    config = inner.config.get_text_config()
    heads = config.num_attention_heads
    embedding, head = inner.get_input_embeddings().weight, inner.get_output_embeddings().weight
    vocabulary = {id(w): w.numel() for w in (embedding, head)}  # tied: once
    return {"block_weights": sum(p.numel() for p in inner.parameters()) - sum(vocabulary.values()),
            "layers": config.num_hidden_layers,
            "attention_channels": heads * (getattr(config, "head_dim", None) or config.hidden_size // heads),
            "head_weights": head.numel()}


def pack_rows(lengths, break_even):
    """Sequence indices per row. For k rows, sequences go longest first into the shortest row, so rows come
    out nearly equal, W tokens wide; the k kept minimises the work k * W * (1 + W / break_even): padding
    against masked attention, quadratic in W (attention_break_even)."""
    def work(k, width):
        return k * width * (1 + width / break_even)

    order = sorted(range(len(lengths)), key=lambda n: -lengths[n])
    best_cost, best_rows = math.inf, None
    for k in range(1, len(lengths) + 1):
        if work(k, lengths[order[0]]) >= best_cost:
            break  # no row is narrower than the longest sequence: more rows only cost more
        rows, filled = [[] for _ in range(k)], [0] * k
        for n in order:
            shortest = filled.index(min(filled))
            rows[shortest].append(n)
            filled[shortest] += lengths[n]
        cost = work(k, max(filled))
        if cost < best_cost:
            best_cost, best_rows = cost, [row for row in rows if row]
    return best_rows


# ----------------------------------------------------------------------------- the decision

# How far packed log-probs may sit from one sequence per row, per token, in each compute dtype: bf16 rounding
# alone reached 0.01 on SmolLM2, where float32 stays under 1e-6. A sequence whose log-prob moves at all when
# the one before it in the row changes (beyond 1e-6 per token, in either dtype) means the sequences mix.
PACKING_TOL = {"fp32": 1e-5, "bf16": 5e-2}


def choose_collate(model, pairs, indices, packing, device, dtype):
    """The collate for `model` under --packing auto|on|off, and what to print about it; both measured on the
    micro-batch `indices`, no grad, in the training's compute dtype (FSDP's bf16 mixed precision allows no
    other), the same batch on every process: first whether the fused LM head reproduces the model's logits
    (logprobs.check_fused_head, on the first pair's first 32 completion tokens a side: the model's own logits
    exist whole there), then the layout (packed_or_padded)."""
    kind = unwrap(model).config.model_type
    first = pairs[indices[0]]
    probe = {"prompt": first["prompt"], "chosen": first["chosen"][:32], "rejected": first["rejected"][:32]}
    head_gap = check_fused_head(model, padded([probe], [0], device), dtype)  # whole logits at 64 targets at most
    head = (f"LM head fused with the log-softmax (within {head_gap:.1g} nats of the model's logits on every token)"
            if unwrap(model) not in WHOLE_HEAD else
            f"LM head whole at targets: the fused head is up to {head_gap:.1g} nats from {kind}'s logits on a token")
    layout, how = packed_or_padded(model, pairs, indices, packing, device, dtype)
    return layout, f"{how}; {head}"


def packed_or_padded(model, pairs, indices, packing, device, dtype):
    """choose_collate's layout, and what to say of it.

    Packing is exact only when nothing carries from one sequence to the next in a row: attention masked per
    sequence by transformers, and no convolution or recurrent state across the row (gated-delta-net and
    Mamba-1/2 layers carry it; OPT ignores packed position ids in its mask). Rather than keep a list of
    families, it is measured: all the micro-batch's sequences packed in one row against one sequence per row,
    and that row against the same row with its first sequence's tokens reversed, which the sequences after
    it must not notice. Flash attention takes one row (varlen kernels, linear in its length); under SDPA,
    whose work is quadratic in a row's width, pack_rows weighs that against padding (attention_break_even).
    """
    kind = unwrap(model).config.model_type
    if packing == "off":
        return padded, "one padded sequence per row (--packing off)"
    gaps = packing_gaps(model, pairs, indices, device, dtype)
    measured = (f"{gaps[0]:.1g} nats per token from one sequence per row, {gaps[1]:.1g} when the sequence "
                "before changes")
    if not (gaps[0] <= PACKING_TOL[dtype] and gaps[1] <= 1e-6):
        if packing == "on":
            sys.exit(f"error: --packing on: packed sequences mix on {kind} ({measured}); use --packing auto or off")
        return padded, f"one padded sequence per row: packed sequences mix on {kind} ({measured})"
    if "flash" in (unwrap(model).config._attn_implementation or ""):
        return one_row, f"packed, one row per micro-batch: exact on {kind} ({measured})"
    break_even = attention_break_even(model)
    return (functools.partial(packed, break_even=break_even),
            f"packed, rows sized against masked attention, break-even {break_even:.0f} tokens: exact on {kind} "
            f"({measured})")


def packing_gaps(model, pairs, indices, device, dtype):
    """[packed against padded, packed against packed after its first sequence changed]: the largest
    log-prob differences per token, over every process."""
    alone = padded(pairs, indices, device)
    sequences, prompts = _sequences(pairs, indices)
    packed_row = _layout(indices, sequences, prompts, [list(range(len(sequences)))], device, mask=False)
    first = len(sequences[0])  # where the second sequence starts
    changed = dict(packed_row, input_ids=packed_row["input_ids"].clone())
    changed["input_ids"][0, :first] = changed["input_ids"][0, :first].flip(0)
    changed["labels"] = changed["input_ids"][packed_row["targets"][0], packed_row["targets"][1] + 1]
    with measuring(model, device, dtype):
        alone_logps, packed_logps, changed_logps = (sequence_logps(model, b) for b in (alone, packed_row, changed))
    tokens = torch.bincount(alone["sequence"])
    later = torch.ones_like(tokens, dtype=torch.bool)
    later[packed_row["sequence"][packed_row["targets"][1] < first]] = False
    gaps = torch.stack([((packed_logps - alone_logps).abs() / tokens).max(),
                        ((changed_logps - packed_logps).abs() / tokens)[later].max()])
    return max_over_processes(gaps)
