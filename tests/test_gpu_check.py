"""gpu_check.py's dry run on this CPU: every check's row in its table, the CUDA-only ones skipped, none failed."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = r"tiny random Llama, hidden \d+"

# (the check column, the pass column) of each row the dry run must print, once each; no other row.
AUTOCAST, PARAMETERS = "fp32 weights under bf16 autocast", "bf16 parameters"
EXPECTED_ROWS = [
    *((rf"1\. {first} vs {second}, {TINY}, sdpa, {layout}", "yes") for layout in ("padded", "packed")
      for first, second in ((AUTOCAST, "fp32"), (PARAMETERS, "fp32"), (AUTOCAST, PARAMETERS))),
    *((rf"1\. packed vs padded \(batching\.packing_gaps\), {TINY}, sdpa, {mode}", "yes")
      for mode in (AUTOCAST, PARAMETERS)),
    (rf"2\. two packed forwards, bit for bit, {TINY}, sdpa", "yes"),
    (rf"1\. log-probs, {TINY}, flash_attention_2", "skipped"),
    (rf"2\. two packed forwards, bit for bit, {TINY}, flash_attention_2", "skipped"),
    (r"1\. log-probs, SmolLM2-135M-Instruct, sdpa", "skipped"),
    (r"2\. two packed forwards, bit for bit, SmolLM2-135M-Instruct, sdpa", "skipped"),
    (r"1\. log-probs, SmolLM2-135M-Instruct, flash_attention_2", "skipped"),
    (r"2\. two packed forwards, bit for bit, SmolLM2-135M-Instruct, flash_attention_2", "skipped"),
    (r"3\. host syncs per train_step, 1 / 4 micro-batches", "skipped"),
    (r"4\. python train\.py --max-steps 3", "yes"),
    (r"5\. torchrun --fsdp --gradient-checkpointing --dtype bf16, killed after step 1, --resume", "yes"),
    (r"6\. check 5 with --attn-implementation flash_attention_2", "skipped"),
    (r"7\. bench\.py --gpu --tiny: 6\. tiny stand-in for SmolLM2-135M on cpu, .*", "yes"),
    (r"7\. bench\.py --gpu --tiny: 6\. tiny stand-in for Llama 1\.1B .*", "yes"),
]


def test_dry_run_prints_every_checks_row(tmp_path):
    env = {**os.environ, "CLAIR_APO_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    table = result.stdout.split("| check | value | tolerance or expectation | pass |\n|---|---|---|---|\n")[1]
    rows = [[cell.strip() for cell in re.split(r"(?<!\\)\|", line.strip()[1:-1])]  # an escaped pipe stays in its cell
            for line in table.strip().splitlines()]
    assert all(len(row) == 4 for row in rows), table
    found = [(check, verdict) for check, _, _, verdict in rows]
    for pattern, verdict in EXPECTED_ROWS:
        matches = [row for row in found if re.fullmatch(pattern, row[0])]
        assert [v for _, v in matches] == [verdict], f"{pattern}: {matches}"
    assert len(found) == len(EXPECTED_ROWS), found
    assert all(value.startswith("skipped: ") for _, value, _, verdict in rows if verdict == "skipped")
