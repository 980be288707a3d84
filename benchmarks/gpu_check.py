"""The GPU check as one bounded, offline run: install the carried wheels, run each part under its own time limit,
and write the log, a table and a JSON of results to --out as each part ends.

    python -m benchmarks.gpu_check --out OUT                   # the GPU machine, .whl/ carried: 8 minutes at most
    python -m benchmarks.gpu_check --out OUT --rerun-failed    # again, only the parts OUT/results.json has failed
    python -m benchmarks.gpu_check --out OUT --only bench,trl  # only those parts
    python -m benchmarks.gpu_check --dry-run --out OUT         # the same parts in miniature on a CPU

First the wheels in --wheels (benchmarks/gpu_wheels.py fills it) are installed offline into a scratch folder put
first on the path of every process after; the dry run installs a wheel it builds itself. Then one worker
process (gpu_parts.py) runs the parts in order; a part past its limit is killed with the worker and its
children, recorded as timed out, and a new worker goes on with the parts after it. OUT/gpu_check.log holds
everything printed; OUT/results.json and OUT/table.md are rewritten as each part ends. Exits 1 if any part
failed. This file imports neither torch nor transformers, so that the carried packages come first wherever
they are imported.
"""

import argparse
import base64
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 480  # seconds for the whole run, installation included
MARK = "@@gpu_check "  # the worker's event lines: a JSON object follows
STARTUP = 120  # seconds a worker may take to import torch and transformers and begin its first part
WORKER = "benchmarks.gpu_parts"  # the module a worker runs

# The parts in their order, each with its limit in seconds: what each measures is in gpu_parts.py.
PARTS = {"environment": 20, "logprobs": 55, "cache_key": 35, "syncs": 25, "generation": 20, "train": 80, "ddp": 35,
         "fsdp_resume": 75, "bench": 60, "trl": 70}
INSTALL_LIMIT = 60
DRY_SCALE = 3  # the dry run's limits and budget, times these: a shared 2-core CPU is no GPU


# ----------------------------------------------------------------------------- the offline installation

def stub_wheel(folder):
    """A one-module wheel, written here without a build backend or a package index: what the dry run installs
    offline in place of the carried ones. Its module says where it was imported from."""
    name, version = "gpu_check_stub", "1.0"
    files = {f"{name}.py": "import os\n\nWHERE = os.path.dirname(os.path.abspath(__file__))\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{name}-{version}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: gpu_check\nRoot-Is-Purelib: true\n"
                                                  "Tag: py3-none-any\n",
             f"{name}-{version}.dist-info/top_level.txt": f"{name}\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b'=').decode()},"
              f"{len(text.encode())}" for path, text in files.items()]
    files[f"{name}-{version}.dist-info/RECORD"] = "\n".join([*record, f"{name}-{version}.dist-info/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in files.items():
            wheel.writestr(member, text)
    return path


def install(wheels, site):
    """The install part's rows: every wheel in `wheels` installed into `site` with no index and no
    dependencies, as the GPU machine allows."""
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    if not found:
        return [row("wheels", f"skipped: no wheels in {wheels} (python -m benchmarks.gpu_wheels fills it)")]
    command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
               "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)]
    start = time.time()
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_LIMIT)
    except subprocess.TimeoutExpired:
        return [row("pip install --no-index --no-deps --target", f"timed out after {INSTALL_LIMIT} s", "exits 0", False)]
    print(result.stdout + result.stderr, end="", flush=True)
    value = f"{len(found)} wheels into {site} in {time.time() - start:.0f} s: " + ", ".join(
        path.name.split("-")[0] for path in found)
    if result.returncode:
        value = f"pip exit {result.returncode}: {(result.stderr.strip().splitlines() or ['?'])[-1][:200]}"
    return [row("pip install --no-index --no-deps --target", value, "exits 0", result.returncode == 0)]


def row(check, value, threshold="", passed=None):
    """One line of the table; passed None: a measurement without a threshold, or a skip."""
    return {"check": check, "value": value, "threshold": threshold, "passed": passed}


# ----------------------------------------------------------------------------- running the parts

class Worker:
    """gpu_parts.py running `parts` in a process group of its own; its output goes line by line to `echo`,
    its events to `events`."""

    def __init__(self, parts, flags, env, echo):
        command = [sys.executable, "-u", "-m", WORKER, "--parts", ",".join(parts), *flags]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=env, cwd=ROOT, start_new_session=True)
        self.events = queue.Queue()
        self.reader = threading.Thread(target=self.read, args=(echo,), daemon=True)
        self.reader.start()

    def read(self, echo):
        self.last_line = ""
        for line in self.process.stdout:
            if line.startswith(MARK):
                self.events.put(json.loads(line[len(MARK):]))
            else:
                echo(line)
                self.last_line = line.strip() or self.last_line
        self.events.put({"event": "exit"})

    def stop(self):
        """SIGTERM to the whole group (torchrun passes it on to its workers), SIGKILL after 10 s."""
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def run_parts(parts, flags, env, log, deadline, scale=1):
    """Each of `parts` run by workers, each under its limit times `scale`: yields (part, {status, seconds,
    limit_s, rows}) as each ends."""
    remaining = list(parts)
    while remaining:
        if deadline - time.time() < 5:
            for part in remaining:
                yield part, result("not run", 0, 0, [row(part, "not run: the --budget is spent", "", False)])
            return
        worker = Worker(remaining, flags, env, log.echo)
        current, started, rows, limit = None, time.time(), [], STARTUP
        while True:
            try:
                event = worker.events.get(timeout=1)
            except queue.Empty:
                event = {"event": "tick"}
            elapsed = time.time() - started
            if event["event"] == "start" and deadline - time.time() < 5:
                break  # the loop above records this part and the rest as not run
            if event["event"] == "start":
                current, started, rows = event["part"], time.time(), []
                limit = min(scale * PARTS[current], max(0, deadline - time.time()))
                log.echo(f"== {current}: limit {limit:.0f} s\n")
            elif event["event"] == "row":
                rows.append(event["row"])
                log.echo(f"   {format_row(event['row'])}\n")
            elif event["event"] == "end":
                remaining.remove(current)
                yield current, result(status(rows), elapsed, limit, rows)
                current, started, limit = None, time.time(), STARTUP
                if not remaining:
                    break
            elif current is None and (event["event"] == "exit" or elapsed > limit):  # nor would another start
                worker.stop()
                why = (f"the worker began no part within {STARTUP} s" if elapsed > limit else
                       f"the worker exited with status {worker.process.wait()}: {worker.last_line[:200]}")
                for part in remaining:
                    yield part, result("failed", 0, 0, [row(part, why, "", False)])
                return
            elif event["event"] == "exit" or elapsed > limit:
                worker.stop()
                why = (f"timed out after {limit:.0f} s" if elapsed > limit else
                       f"the worker exited with status {worker.process.wait()}: {worker.last_line[:200]}")
                remaining.remove(current)
                yield current, result("timed out" if elapsed > limit else "failed", elapsed, limit,
                                      rows + [row(current, why, "", False)])
                break
        worker.stop()


def status(rows):
    return "failed" if any(r["passed"] is False for r in rows) else "passed"


def result(state, seconds, limit, rows):
    return {"status": state, "seconds": round(seconds, 1), "limit_s": round(limit), "rows": rows}


def format_row(r):
    verdict = {None: "", True: "yes", False: "NO"}[r["passed"]]
    return f"{r['check']}: {r['value']}" + (f" [{r['threshold']}: {verdict}]" if r["threshold"] else "")


# ----------------------------------------------------------------------------- results

class Log:
    """OUT/gpu_check.log, each line also printed here as it comes."""

    def __init__(self, path):
        self.file = open(path, "a", buffering=1)

    def echo(self, text):
        sys.stdout.write(text)
        sys.stdout.flush()
        self.file.write(text)


def table(results):
    """The markdown table of every part's rows, then each part's status, time and limit."""
    cell = lambda text: str(text).replace("|", "\\|")
    lines = ["| part | check | value | threshold | pass |", "|---|---|---|---|---|"]
    for part, outcome in results["parts"].items():
        for r in outcome["rows"]:
            verdict = {None: "", True: "yes", False: "**no**"}[r["passed"]]
            lines.append(f"| {part} | {cell(r['check'])} | {cell(r['value'])} | {cell(r['threshold'])} | {verdict} |")
    lines += ["", "| part | status | seconds | limit (s) |", "|---|---|---|---|"]
    lines += [f"| {part} | {o['status']} | {o['seconds']} | {o['limit_s']} |" for part, o in results["parts"].items()]
    return "\n".join(lines) + "\n"


def write_results(out, results):
    """OUT/results.json and OUT/table.md, each replaced whole, parts in their run order."""
    order = ["install", *PARTS]
    results["parts"] = dict(sorted(results["parts"].items(), key=lambda item: order.index(item[0])))
    for name, text in (("results.json", json.dumps(results, indent=1) + "\n"), ("table.md", table(results))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        tmp.replace(out / name)


def selected_parts(args, previous):
    """The parts to run: --only's, else those --rerun-failed finds not passed in the previous results, else all."""
    if args.only:
        unknown = set(args.only) - set(PARTS)
        if unknown:
            raise ValueError(f"--only: no part {', '.join(sorted(unknown))}; the parts: {', '.join(PARTS)}")
        return [part for part in PARTS if part in args.only]
    if args.rerun_failed:
        done = previous.get("parts", {})
        return [part for part in PARTS if done.get(part, {}).get("status") != "passed"]
    return list(PARTS)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu_check_out"), help="the log, results.json and table.md")
    p.add_argument("--wheels", type=Path, default=ROOT / ".whl", help="the carried wheels and SmolLM2's files "
                   "(default: .whl; the dry run builds its own)")
    p.add_argument("--dry-run", action="store_true", help="on this CPU, every part in miniature")
    p.add_argument("--only", type=lambda text: text.split(","), help=f"comma-separated parts of: {', '.join(PARTS)}")
    p.add_argument("--rerun-failed", action="store_true", help="only the parts OUT/results.json has not passed; "
                   "their rows replace the old ones")
    p.add_argument("--budget", type=float, default=BUDGET, help=f"seconds for the whole run (default: %(default)s; "
                   f"the dry run's and its parts' limits are {DRY_SCALE} times theirs)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    previous_file = args.out / "results.json"
    previous = json.loads(previous_file.read_text()) if args.rerun_failed and previous_file.exists() else {}
    try:
        parts = selected_parts(args, previous)
    except ValueError as e:
        sys.exit(f"error: {e}")
    scale = DRY_SCALE if args.dry_run else 1
    deadline = time.time() + scale * args.budget
    log = Log(args.out / "gpu_check.log")
    log.echo(f"gpu_check {'--dry-run ' if args.dry_run else ''}parts: {', '.join(parts) or 'none'}\n")
    results = {"dry_run": args.dry_run, "budget_s": args.budget, "parts": previous.get("parts", {})}
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as scratch:
        scratch = Path(scratch)
        wheels = args.wheels
        if args.dry_run:
            stub_wheel(scratch / "wheels")
            if (args.wheels / "SmolLM2-135M-Instruct").is_dir():
                shutil.copytree(args.wheels / "SmolLM2-135M-Instruct", scratch / "wheels" / "SmolLM2-135M-Instruct")
            wheels = scratch / "wheels"
        started = time.time()
        rows = install(wheels, scratch / "site")
        results["parts"]["install"] = result(status(rows), time.time() - started, INSTALL_LIMIT, rows)
        write_results(args.out, results)
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(scratch / "site"), str(ROOT),
                                                                         os.environ.get("PYTHONPATH")]))}
        flags = ["--work", str(scratch / "work"), "--wheels", str(wheels), "--site", str(scratch / "site"),
                 *(["--dry-run"] if args.dry_run else [])]
        for part, outcome in run_parts(parts, flags, env, log, deadline, scale):
            results["parts"][part] = outcome
            write_results(args.out, results)
            log.echo(f"== {part}: {outcome['status']} in {outcome['seconds']} s\n")
    log.echo("\n" + table(results))
    failed = [part for part, outcome in results["parts"].items() if outcome["status"] != "passed"]
    log.echo(f"\n{'failed: ' + ', '.join(failed) if failed else 'every part passed'}; {args.out / 'results.json'}\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
