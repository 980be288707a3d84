"""Batching: which pairs go into each micro-batch, and how their sequences are laid out in rows.

A collate turns a micro-batch (a list of pair indices) into one forward's tensors: the chosen of each pair,
then the rejected. Three layouts:
- `padded`: one sequence per row, right-padded, with an attention mask; exact on every causal LM;
- `packed`: several sequences per row, position ids restarting at 0 for each, from which transformers
  masks attention within each sequence; as many rows as weigh padding against masked attention best;
- `one_row`: every sequence in one row, with flash attention's varlen arguments computed once here.
A row's padding comes after its tokens, which a causal model never looks ahead to. Packing gives padding's
log-probs only on models where nothing carries from one sequence to the next; packing.py measures that.
"""

import itertools
import math
import random
from dataclasses import dataclass

import torch

from clair_apo.distributed import rank, unwrap, world_size


def train_batches(n, batch_size, seed, epoch):
    """One epoch of batches of pair indices, reshuffled every epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


@dataclass(frozen=True)
class Step:
    """One optimizer step of this process: its micro-batches (lists of pair indices), and how many pairs the
    step takes on all processes together (the loss is their mean)."""
    epoch: int
    micro_batches: list
    pairs_in_step: int

    @property
    def pair_indices(self):
        return [i for micro_batch in self.micro_batches for i in micro_batch]


def plan_steps(n_pairs, args, process=None):
    """The run's optimizer steps for `process` (default: this one): each epoch reshuffled, cut into
    micro-batches of --batch-size, dealt to the processes, --grad-accum micro-batches a step; --max-steps
    caps the total."""
    process = rank() if process is None else process
    steps = []
    for epoch in range(args.epochs):
        batches = train_batches(n_pairs, args.batch_size, args.seed, epoch)
        per_process = len(batches) // world_size()
        shares = [batches[r::world_size()][:per_process] for r in range(world_size())]
        for i in range(0, per_process, args.grad_accum):
            micro_batches = [share[i:i + args.grad_accum] for share in shares]
            pairs_in_step = sum(len(batch) for share in micro_batches for batch in share)
            steps.append(Step(epoch, micro_batches[process], pairs_in_step))
        if args.max_steps is not None and len(steps) >= args.max_steps:
            return steps[:args.max_steps]
    return steps


def pairs_trained(n_pairs, args):
    """Every pair index that some process trains on, in order: whose reference log-probs the run needs."""
    return sorted({i for r in range(world_size()) for step in plan_steps(n_pairs, args, r) for i in step.pair_indices})


# ----------------------------------------------------------------------------- layouts

def padded(pairs, indices, device):
    """One sequence per row, right-padded, with an attention mask."""
    sequences, prompts = sequences_of(pairs, indices)
    return layout(indices, sequences, prompts, [[n] for n in range(len(sequences))], device, mask=True)


def packed(pairs, indices, device, break_even):
    """Sequences packed into rows sized by pack_rows(break_even), position ids restarting per sequence."""
    sequences, prompts = sequences_of(pairs, indices)
    return layout(indices, sequences, prompts, pack_rows(list(map(len, sequences)), break_even), device, mask=False)


def one_row(pairs, indices, device):
    """Every sequence in one row, with the cumulative sequence lengths and the longest length that flash
    attention's varlen kernels take: given, transformers skips deriving them from position ids in every layer."""
    sequences, prompts = sequences_of(pairs, indices)
    batch = layout(indices, sequences, prompts, [list(range(len(sequences)))], device, mask=False)
    lengths = list(map(len, sequences))  # the row holds no padding: its width is their sum
    bounds = _to(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32), device)
    return batch | {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
                    "max_length_q": max(lengths), "max_length_k": max(lengths)}


def sequences_of(pairs, indices):
    """The chosen of each pair, then the rejected, as token ids; and each one's prompt length."""
    sequences = [pairs[i]["prompt"] + pairs[i][side] for side in ("chosen", "rejected") for i in indices]
    prompts = [len(pairs[i]["prompt"]) for _ in ("chosen", "rejected") for i in indices]
    return sequences, prompts


def layout(indices, sequences, prompts, rows, device, mask):
    """The tensors of the pairs `indices`, whose `sequences` are laid out in `rows` (lists of sequence numbers).

    Positionally, with no pad id involved: `targets` are the (row, column) positions whose next token is a
    completion token, `labels` those tokens, `sequence_of_target` which sequence each belongs to,
    `num_sequences` how many there are, `pair_indices` the pairs (for their reference log-probs), `tokens`
    the real (unpadded) token count. With `mask` an
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
             "sequence_of_target": torch.tensor(sequence), "pair_indices": torch.tensor(indices)}
    batch |= {"attention_mask": attention_mask} if mask else {"position_ids": position_ids}
    batch = {k: _to(v, device) for k, v in batch.items()}
    return batch | {"targets": tuple(_to(t, device) for t in targets), "num_sequences": len(sequences),
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
