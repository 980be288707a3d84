"""Peak host memory of each train.py process: one process against two under torchrun, DDP and FSDP, fresh and resumed.

    python -m benchmarks.bench_scale           # a random 231M Llama (hidden 1024, 16 layers, tied embeddings), float32
    python -m benchmarks.bench_scale --tiny    # the same table on the tiny test Llama, in about a minute
    python -m benchmarks.bench_scale --untied  # the 231M Llama with an LM head of its own (281M parameters)

Each run is train.py itself (train.main), two optimizer steps of one short pair per process with a
checkpoint after each, then the same run resumed from its first checkpoint. Inside every process
train_step, save_checkpoint and load_checkpoint are wrapped to read the peak resident memory (VmHWM)
and reset it (/proc/self/clear_refs) at their start and end, which splits the process's peak into
phases: start-up (model, sharding, reference log-probs, step-0 evaluation), training step, checkpoint
save, and checkpoint load on --resume. Linux only. The table compares every process with the single
process's peak over the whole run: rank 0 at most 1.0x, the others at most 0.6x. Every process runs with
MALLOC_MMAP_THRESHOLD_=65536 (see run()).
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PHASES = ["start-up", "step", "save", "resume"]
SIZE_231M = dict(vocab_size=49152, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                 num_attention_heads=16, num_key_value_heads=4, head_dim=64, tie_word_embeddings=True)


def peak_rss():
    """This process's peak resident memory since start or the last reset, in bytes."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) * 1024


def child(report, argv):
    """Run train.main(argv) with its phases measured; write {phase: peak bytes} to report.<rank>.json."""
    import train

    peaks, current = {}, ["start-up"]

    def enter(phase):
        peaks[current[0]] = max(peaks.get(current[0], 0), peak_rss())
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident memory
        current[0] = phase

    def measured(phase, fn):
        def wrapper(*args, **kwargs):
            enter(phase)
            try:
                return fn(*args, **kwargs)
            finally:
                enter("other")
        return wrapper

    train.train_step = measured("step", train.train_step)
    train.save_checkpoint = measured("save", train.save_checkpoint)
    train.load_checkpoint = measured("resume", train.load_checkpoint)
    rank = os.environ.get("RANK", "0")
    train.main(argv)
    enter("other")
    Path(f"{report}.{rank}.json").write_text(json.dumps(peaks))


def run(mode, train_args, folder, resume):
    """One train.py run in `mode` (one, ddp, fsdp): a list of {phase: peak bytes}, one per process."""
    report = folder / f"{mode}-{'resume' if resume else 'fresh'}"
    command = [sys.executable, "-m", "benchmarks.bench_scale", "--child", str(report), "--", *train_args,
               "--out", str(folder / mode)]
    if mode != "one":
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
        command += ["--fsdp"] if mode == "fsdp" else []
    if resume:
        shutil.rmtree(folder / mode / "final")
        command.append("--resume")
    # A fixed mmap threshold: glibc then returns every freed buffer over 64 KiB to the system at once, so
    # that resident memory follows the live tensors rather than what its heaps happen to retain.
    env = {**os.environ, "CLAIR_APO_CACHE": str(folder / "cache"), "OMP_NUM_THREADS": "1",
           "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, env=env, cwd=folder, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{mode} failed:\n{result.stderr[-5000:]}")
    return [json.loads(Path(f"{report}.{rank}.json").read_text()) for rank in range(1 if mode == "one" else 2)]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny test Llama instead of the 231M one")
    p.add_argument("--untied", action="store_true", help="an LM head of its own, as Llama-3 has")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args, train_args = p.parse_known_args()
    if args.child:
        return child(args.child, [a for a in train_args if a != "--"])
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from benchmarks.testbed import arithmetic_pairs, make_tiny_model, write_jsonl

    folder = Path(tempfile.mkdtemp(prefix="bench_scale-"))
    model = make_tiny_model(folder / "model", **({} if args.tiny else SIZE_231M | {"tie_word_embeddings": not args.untied}))
    train_args = ["--model", model, "--data", write_jsonl(folder / "train.jsonl", arithmetic_pairs(8)),
                  "--eval-data", write_jsonl(folder / "eval.jsonl", arithmetic_pairs(2, seed=1)),
                  "--batch-size", "1", "--grad-accum", "1", "--max-steps", "2", "--save-every", "1"]
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model)).parameters())
    print(f"bench_scale: random Llama, {params / 1e6:.0f}M parameters, float32, {os.cpu_count()} CPUs; "
          f"train.py {' '.join(train_args[6:])}", flush=True)

    results = {}
    for mode in ["one", "ddp", "fsdp"]:
        for resume in (False, True):
            results[mode, resume] = run(mode, train_args, folder, resume)
            print(f"  {mode} {'resumed' if resume else 'fresh'}: done", flush=True)
        shutil.rmtree(folder / mode)
    shutil.rmtree(folder)

    gib = 2 ** 30
    single = {resume: max(results["one", resume][0].values()) for resume in (False, True)}
    print("\n| run | process | start-up | training step | checkpoint save | resume (load) | peak | / one process | target | met |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (mode, resume), ranks in results.items():
        for rank, peaks in enumerate(ranks):
            peak = max(peaks.values())
            ratio = peak / single[resume]
            target, met = "", ""
            if mode == "fsdp":
                limit = 1.0 if rank == 0 else 0.6
                target, met = f"<= {limit:.1f}x", "yes" if ratio <= limit else "**no**"
            cells = [f"{peaks[phase] / gib:.2f}" if phase in peaks else "" for phase in PHASES]
            print(f"| {mode} {'resumed' if resume else 'fresh'} | rank {rank} | " + " | ".join(cells)
                  + f" | {peak / gib:.2f} | {ratio:.2f}x | {target} | {met} |")
    print("GiB, peak resident memory (VmHWM) of each process in each phase; peak includes evaluation and logging.")


if __name__ == "__main__":
    main()
