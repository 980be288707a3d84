"""--report-to tensorboard: every metrics.jsonl record in TensorBoard's event files, read back, across a resume."""

import json
import shutil
import sys

import pytest
import transformers

import train
from benchmarks.testbed import arithmetic_pairs, make_tiny_model, write_jsonl


def run(tmp_path, model, out, *flags):
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(8))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(4, seed=1))
    train.main(["--model", model, "--data", data, "--eval-data", eval_data, "--out", str(out), "--lr", "1e-3",
                "--batch-size", "2", "--grad-accum", "1", "--report-to", "tensorboard", *flags])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def scalars(folder):
    """{tag: {step: value}} of every event file in `folder`, as TensorBoard reads them (purges applied)."""
    pytest.importorskip("tensorboard", reason="pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: {event.step: event.value for event in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def as_tensorboard(metrics):
    """The metrics.jsonl records as the event files should hold them: eval/ as logged, the rest under train/."""
    expected = {}
    for record in metrics:
        for name, value in record.items():
            if name != "step":
                expected.setdefault(name if name.startswith("eval/") else f"train/{name}", {})[record["step"]] = value
    return expected


@pytest.mark.parametrize("family", ["Llama", "Qwen2"])
def test_every_metric_reaches_tensorboard_at_its_step(tmp_path, tiny_model, ref_cache, family):
    model = tiny_model if family == "Llama" else make_tiny_model(tmp_path / family, config_class=transformers.Qwen2Config)
    metrics = run(tmp_path, model, tmp_path / "run", "--max-steps", "3", "--eval-every", "2",
                  "--loss", "apo_zero", "sft")
    found, expected = scalars(tmp_path / "run" / "tensorboard"), as_tensorboard(metrics)
    assert {"train/loss", "train/nll_loss", "train/rewards/chosen", "eval/rewards/margins", "eval/nll_loss",
            "train/ref_check/max_abs_diff_per_sqrt_token"} <= set(found)
    assert found.keys() == expected.keys() and list(found["eval/loss"]) == [0, 2, 3]
    for tag, values in expected.items():
        assert found[tag] == pytest.approx(values, rel=1e-6), tag  # stored as float32


def test_a_resumed_run_shows_each_step_once(tmp_path, tiny_model, ref_cache):
    """A run killed after its checkpoint at step 2 logged step 3 too; resumed, TensorBoard shows the uninterrupted
    run's values; a fresh run in the same folder hides the earlier run's."""
    flags = ["--max-steps", "4", "--save-every", "2"]
    full = run(tmp_path, tiny_model, tmp_path / "full", *flags)
    killed = tmp_path / "killed"
    shutil.copytree(tmp_path / "full", killed)
    shutil.rmtree(killed / "final")
    run(tmp_path, tiny_model, killed, *flags, "--resume")
    timeless = lambda found: {tag: values for tag, values in found.items() if tag != "train/tokens/s"}
    resumed = timeless(scalars(killed / "tensorboard"))
    assert resumed == timeless(scalars(tmp_path / "full" / "tensorboard"))
    for tag, values in timeless(as_tensorboard(full)).items():
        assert resumed[tag] == pytest.approx(values, rel=1e-6), tag
    run(tmp_path, tiny_model, killed, "--max-steps", "1")
    assert max(scalars(killed / "tensorboard")["train/loss"]) == 1


def test_a_missing_tensorboard_is_one_line_before_any_model_work(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard now raises ImportError
    message = r"^error: --report-to tensorboard needs tensorboard: pip install tensorboard$"
    with pytest.raises(SystemExit, match=message):
        run(tmp_path, tiny_model, tmp_path / "run", "--max-steps", "1")
    assert capsys.readouterr().out == ""  # nothing loaded, tokenised or computed
