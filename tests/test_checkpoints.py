"""Checkpoints: plain-JSON training state, no command that takes a checkpoint runs code planted in it, and the
single-process path needs nothing Linux-only."""

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clair_apo import checkpoints
import evaluate
import train
from benchmarks.testbed import arithmetic_pairs, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickled, it writes a file: what a hostile checkpoint's author could run instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def planted(tmp_path, tiny_model):
    """A model folder that loads as any transformers model, with a pickled trainer_state.pt that runs code
    when loaded (as an older train.py's, or a hostile author's); and the file the code would write."""
    folder = tmp_path / "shared-checkpoint"
    shutil.copytree(tiny_model, folder)
    marker = tmp_path / "payload-ran"
    torch.save({"args": Payload(marker), "step": 3}, folder / "trainer_state.pt")
    return folder, marker


@pytest.mark.parametrize("flags", [["--prompts"], ["--prompts", "--ref"], ["--data", "--ref"]])
def test_evaluate_refuses_a_pickled_state_and_runs_nothing(planted, tiny_model, tmp_path, flags, capsys):
    folder, marker = planted
    files = {"--prompts": write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 plus 3?", "answer": "5"}]),
             "--data": write_jsonl(tmp_path / "d.jsonl", arithmetic_pairs(2)), "--ref": tiny_model}
    with pytest.raises(SystemExit):
        evaluate.main(["--model", str(folder), *[x for flag in flags for x in (flag, files[flag])],
                       "--max-new-tokens", "2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trainer_state.pt: a pickled training state" in err[0] and "unpickling" in err[0]
    assert not marker.exists()


def test_the_refusal_is_one_line_without_a_traceback(planted, tmp_path):
    folder, marker = planted
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Hi"}])
    result = subprocess.run([sys.executable, str(ROOT / "evaluate.py"), "--model", str(folder), "--prompts", prompts],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not marker.exists()


def test_train_on_a_planted_folder_reads_only_its_weights(planted, tmp_path, ref_cache):
    folder, marker = planted
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    train.main(["--model", str(folder), "--data", data, "--eval-data", data, "--out", str(tmp_path / "run"),
                "--max-steps", "1", "--batch-size", "2", "--grad-accum", "1"])
    assert (tmp_path / "run" / "final" / "trainer_state.json").exists() and not marker.exists()


def test_resume_refuses_a_pickled_state(planted, tmp_path, tiny_model, ref_cache, capsys):
    folder, marker = planted
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    out = tmp_path / "run"
    shutil.copytree(folder, out / "checkpoint-1")
    with pytest.raises(SystemExit, match=r"^error: \S+trainer_state.pt: a pickled training state"):
        train.main(["--model", tiny_model, "--data", data, "--eval-data", data, "--out", str(out), "--resume",
                    "--max-steps", "2", "--batch-size", "2", "--grad-accum", "1"])
    assert not marker.exists()


def test_the_state_is_json_and_evaluate_never_opens_the_optimizer(tmp_path, tiny_model, ref_cache):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    out = tmp_path / "run"
    train.main(["--model", tiny_model, "--data", data, "--eval-data", data, "--out", str(out), "--max-steps", "2",
                "--batch-size", "2", "--grad-accum", "1", "--beta", "0.3"])
    state = json.loads((out / "final" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["args"]["beta"] == 0.3
    assert set(state["rng"]) == {"python", "numpy", "torch", "cuda"} and state["scheduler"]["last_epoch"] == 2
    marker = tmp_path / "payload-ran"  # a planted optimizer/ metadata pickle: only --resume may read it
    (out / "final" / "optimizer" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    results = evaluate.main(["--model", str(out / "final"), "--data", data])
    assert results["ref"] == tiny_model and not marker.exists()


def test_rng_state_round_trips_through_json():
    import random

    import numpy as np

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    # Gaussians too: Python's and numpy's draw them in pairs and cache the second, which the state must carry.
    random.gauss(0, 1)
    np.random.standard_normal()
    assert np.random.get_state()[3] == 1  # numpy holds a cached Gaussian now
    saved = json.loads(json.dumps(checkpoints.rng_state()))

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(), np.random.standard_normal(),
                torch.rand(1).item(), torch.randn(1).item())
    expected = draws()
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    random.gauss(0, 1)
    np.random.standard_normal()  # other cached Gaussians, to be replaced
    checkpoints.set_rng_state(saved)
    assert draws() == expected


NOT_LINUX = """
import os, sys
del os.sched_getaffinity  # macOS has none
sys.modules["fcntl"] = None  # Windows has none: import fcntl raises ImportError
import clair, evaluate, train
train.main(sys.argv[1:])
"""


def test_the_single_process_path_needs_neither_sched_getaffinity_nor_fcntl(tmp_path, tiny_model):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(4))
    env = {"CLAIR_APO_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", NOT_LINUX, "--model", tiny_model, "--data", data, "--eval-data",
                             data, "--out", str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "2",
                             "--grad-accum", "1"], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "done: 2 steps" in result.stdout and list((tmp_path / "cache" / "ref_logps").glob("*.pt"))


def test_resume_takes_the_checkpoint_of_the_latest_step(tmp_path):
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-9", "checkpoint-final", ".tmp-checkpoint-12", "final"):
        (tmp_path / name).mkdir()
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-10"  # by step, not by name
    assert checkpoints.latest_checkpoint(tmp_path / "final") is None
