"""gpu_check.py on this CPU: the dry run end to end (the offline install from a wheels folder included), a part
past its limit killed with its children while the next parts go on, and the rerun of failed parts."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from benchmarks import gpu_check, gpu_parts

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32, TF32 off", "bf16 autocast", "bf16 parameters (FSDP's)")
LAYOUTS = ("padded (attention mask, unequal lengths)", "one row", "packed")


def rows_of(results, part):
    return {r["check"]: r for r in results["parts"][part]["rows"]}


def test_dry_run_passes_every_part_and_reruns_none(tmp_path):
    env = {**os.environ, "CLAIR_APO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path / "out"),
               "--wheels", str(tmp_path / "no-wheels")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["parts"]) == ["install", *gpu_check.PARTS]
    assert all(outcome["status"] == "passed" for outcome in results["parts"].values())
    install = results["parts"]["install"]["rows"][0]
    assert install["passed"] and "gpu_check_stub" in install["value"]  # the stub wheel, installed offline
    assert rows_of(results, "environment")["carried packages import from the install folder"]["passed"]
    logprobs = rows_of(results, "logprobs")
    for model in ("tiny random Llama, untied", "SmolLM2-135M shape, random, tied (shrunk)"):
        for mode in MODES:
            for layout in LAYOUTS:
                assert logprobs[f"{model}, {mode}: {layout} vs one sequence per forward"]["passed"]
            assert any(check.startswith(f"{model}, {mode}: fused head vs the definition") for check in logprobs)
    assert len(results["parts"]["cache_key"]["rows"]) == 4
    assert [r["passed"] for r in results["parts"]["syncs"]["rows"]] == [None]  # no CUDA: skipped
    assert sum(r["passed"] is True for r in results["parts"]["train"]["rows"]) == 6
    assert [r["passed"] for r in results["parts"]["fsdp_resume"]["rows"]] == [True] * 4
    assert len(results["parts"]["bench"]["rows"]) == 8  # 2 models x 2 lengths x speed and memory
    table = (tmp_path / "out" / "table.md").read_text()
    assert table.startswith("| part | check | value | threshold | pass |") and "**no**" not in table
    assert "== fsdp_resume: passed" in (tmp_path / "out" / "gpu_check.log").read_text()

    again = subprocess.run([*command, "--rerun-failed"], capture_output=True, text=True, env=env, cwd=tmp_path,
                           timeout=120)
    assert again.returncode == 0 and "parts: none" in again.stdout, again.stdout[-3000:]


FAKE_WORKER = '''
    """A worker whose part `hang` starts a child and waits forever; its other parts pass at once."""
    import argparse, json, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--parts")
    p.add_argument("--pids")
    args, _ = p.parse_known_args()
    for part in args.parts.split(","):
        print("@@gpu_check " + json.dumps({"event": "start", "part": part}), flush=True)
        if part == "hang":
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
            open(args.pids, "w").write(str(child.pid))
            time.sleep(600)
        row = {"check": part, "value": "ok", "threshold": "ok", "passed": True}
        print("@@gpu_check " + json.dumps({"event": "row", "part": part, "row": row}), flush=True)
        print("@@gpu_check " + json.dumps({"event": "end", "part": part}), flush=True)
'''


def test_a_part_past_its_limit_is_killed_with_its_children_and_the_next_parts_run(tmp_path, monkeypatch):
    (tmp_path / "fake_worker.py").write_text(textwrap.dedent(FAKE_WORKER))
    monkeypatch.setattr(gpu_check, "WORKER", "fake_worker")
    monkeypatch.setattr(gpu_check, "PARTS", {"first": 5, "hang": 2, "last": 5})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    log = gpu_check.Log(tmp_path / "log")
    pids = tmp_path / "pids"
    outcomes = dict(gpu_check.run_parts(["first", "hang", "last"], ["--pids", str(pids)], env, log,
                                        deadline=time.time() + 60))
    assert [o["status"] for o in outcomes.values()] == ["passed", "timed out", "passed"]
    assert outcomes["hang"]["rows"][-1]["value"] == "timed out after 2 s"
    child = int(pids.read_text())
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or "Z" in Path(f"/proc/{child}/stat").read_text().split()[2]


def test_parts_after_the_budget_are_not_run(tmp_path, monkeypatch):
    (tmp_path / "fake_worker.py").write_text(textwrap.dedent(FAKE_WORKER))
    monkeypatch.setattr(gpu_check, "WORKER", "fake_worker")
    monkeypatch.setattr(gpu_check, "PARTS", {"first": 5, "hang": 60, "last": 5})
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    outcomes = dict(gpu_check.run_parts(["first", "hang", "last"], ["--pids", str(tmp_path / "pids")], env,
                                        gpu_check.Log(tmp_path / "log"), deadline=time.time() + 8))
    assert [o["status"] for o in outcomes.values()] == ["passed", "timed out", "not run"]


def test_a_worker_that_cannot_start_fails_every_part_once_with_its_reason(tmp_path, monkeypatch):
    (tmp_path / "broken_worker.py").write_text("import sys\nsys.exit('error: no CUDA device')\n")
    monkeypatch.setattr(gpu_check, "WORKER", "broken_worker")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    outcomes = dict(gpu_check.run_parts(["environment", "logprobs"], [], env, gpu_check.Log(tmp_path / "log"),
                                        deadline=time.time() + 60))
    assert [o["status"] for o in outcomes.values()] == ["failed", "failed"]
    assert outcomes["logprobs"]["rows"][0]["value"] == "the worker exited with status 1: error: no CUDA device"


def test_rerun_failed_selects_the_parts_not_passed(tmp_path):
    previous = {"parts": {part: {"status": "passed"} for part in gpu_check.PARTS}}
    previous["parts"]["ddp"]["status"] = "timed out"
    del previous["parts"]["trl"]  # never reached
    args = gpu_check.argparse.Namespace(only=None, rerun_failed=True)
    assert gpu_check.selected_parts(args, previous) == ["ddp", "trl"]
    with pytest.raises(ValueError, match="no part nope"):
        gpu_check.selected_parts(gpu_check.argparse.Namespace(only=["nope"], rerun_failed=False), previous)


def test_the_check_and_its_worker_name_the_same_parts():
    assert list(gpu_check.PARTS) == list(gpu_parts.PARTS)


def test_syncs_may_grow_by_each_forwards_own_only():
    assert gpu_parts.syncs_within(one=5, four=8, per_forward=1)  # transformers' one read-back a forward
    assert not gpu_parts.syncs_within(one=5, four=12, per_forward=1)  # the step syncs per micro-batch too
    assert gpu_parts.syncs_within(one=5, four=5, per_forward=0)


def test_the_stub_wheel_installs_offline(tmp_path):
    wheel = gpu_check.stub_wheel(tmp_path / "wheels")
    rows = gpu_check.install(wheel.parent, tmp_path / "site")
    assert rows[0]["passed"], rows
    found = subprocess.run([sys.executable, "-c", "import gpu_check_stub; print(gpu_check_stub.WHERE)"],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert found.stdout.strip() == str(tmp_path / "site")
