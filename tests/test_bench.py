"""bench.py runs end to end at tiny scale and prints every row of its table (its numbers are not checked here)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("flags, rows", [(["--gen-prompts", "8"], ["1.", "2.", "3.", "4.", "5.", "7.", "9.", "10.", "11.",
                                                                    "12."]),
                                         (["--rows", "13"], ["13."]), (["--gpu"], ["6."]),
                                         (["--peer", "trl", "--rows", "8", "--peer-pairs", "4"], ["8."])])
def test_bench_prints_its_table(tmp_path, flags, rows):
    if "--peer" in flags and importlib.util.find_spec("trl") is None:
        pytest.skip("--peer trl needs TRL (pip install trl)")
    env = {**os.environ, "CLAIR_APO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--tiny", *flags], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    table = result.stdout.split("| measurement | value | target | met |", 1)[1].strip().splitlines()[1:]
    assert sorted({line.split()[1] for line in table}) == sorted(rows)
    assert all(len(line.split("|")) == 6 for line in table)  # measurement, value, target, met
