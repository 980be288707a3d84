"""evaluate.py: agrees with train.py's eval metrics, draws Figure 4, grades and judges over loopback."""

import builtins
import json
import shutil

import pytest

import evaluate
import train
from conftest import ChatServer, arithmetic_pairs, write_jsonl


@pytest.fixture
def trained(tmp_path, tiny_model, ref_cache):
    """A 3-step APO-zero run and a 3-step DPO run of the tiny model; their out folders and eval file."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(16))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(6, seed=1))
    runs = []
    for loss in ("apo_zero", "dpo"):
        out = tmp_path / loss
        train.main(["--model", tiny_model, "--data", data, "--eval-data", eval_data, "--out", str(out), "--loss", loss,
                    "--lr", "1e-3", "--max-steps", "3", "--epochs", "2", "--eval-every", "1", "--warmup-ratio", "0"])
        runs.append(out)
    return runs, eval_data


def test_held_out_metrics_agree_with_train(trained, tiny_model, capsys):
    (run, _), eval_data = trained
    results = evaluate.main(["--model", str(run / "final"), "--ref", tiny_model, "--data", eval_data])
    assert "computed" not in capsys.readouterr().out  # the reference came from train.py's cache
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    report = results["pairs"]["models"][str(run / "final")]
    for name in train.METRICS:
        assert report[f"eval/{name}"] == pytest.approx(last[f"eval/{name}"], abs=1e-5), name
    chosen = report["chosen"]
    for side in ("chosen", "rejected"):
        assert report[side]["direction"] == ("up" if report[f"eval/rewards/{side}"] > 0 else "down")
    assert chosen["logp_policy"] - chosen["logp_ref"] == pytest.approx(report["eval/rewards/chosen"] / 0.1, rel=1e-4)
    assert chosen["logp_per_token_ref"] == pytest.approx(chosen["logp_ref"] / chosen["mean_tokens"], rel=0.2)


def test_plot_is_written(trained, tmp_path):
    runs, _ = trained
    out = evaluate.main(["plot", *map(str, runs), "--out", str(tmp_path / "fig.png")])
    data = (tmp_path / "fig.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000 and out == str(tmp_path / "fig.png")


def test_plot_without_matplotlib_says_how_to_install(trained, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(SystemExit, match="pip install matplotlib"):
        evaluate.main(["plot", str(trained[0][0]), "--out", str(tmp_path / "fig.png")])


def test_plot_of_a_folder_that_is_no_run(tmp_path):
    with pytest.raises(SystemExit, match="metrics.jsonl: cannot read"):
        evaluate.main(["plot", str(tmp_path)])
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "eval/loss": 1.0}\n{"step": 1, "lo\n')
    with pytest.raises(SystemExit, match=r"metrics\.jsonl:2: not valid JSON"):
        evaluate.main(["plot", str(tmp_path)])


@pytest.mark.parametrize("text, answer, expected", [
    ("The answer is 3,999.", "3999", True), ("It is 13999", "3999", False), ("Brasilia is the capital", "Brasília", True),
    ("roughly 2.5 kg", "2.5", True), ("Paris.", "paris", True), ("New Delhi!", "Delhi", True), ("Newcastle", "New", False),
    ("A hexagon has six sides.", "6", True), ("The result is -31.", "-31", True), ("It is 31.", "-31", False),
])
def test_answer_matching(text, answer, expected):
    assert evaluate.matches(text, answer) is expected


def test_generation_with_answer_key_and_judge(tmp_path, tiny_model):
    checkpoint = tmp_path / "copy"  # another path to the same weights: a second "model"
    shutil.copytree(tiny_model, checkpoint)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "What is 2 + 2?", "answer": "4"},
                                                 {"id": "b", "prompt": "Write a haiku."}])

    def judge(body):
        text = body["messages"][0]["content"]
        if text.startswith("Grade"):
            return "Looks right. [[correct]]"
        return "The first is better. [[A]]"  # position bias: A in both orders, so every pair scores a half

    with ChatServer(judge) as server:
        results = evaluate.main(["--model", str(checkpoint), "--ref", tiny_model, "--prompts", prompts,
                                 "--max-new-tokens", "5", "--judge-url", server.base_url, "--judge-model", "j",
                                 "--out", str(tmp_path / "r.json")])
    ref, policy = results["generation"]["models"][tiny_model], results["generation"]["models"][str(checkpoint)]
    assert policy["accuracy_judge"] == ref["accuracy_judge"] == 1.0 and policy["win_rate_vs_ref"] == 0.5
    assert "win_rate_vs_ref" not in ref
    # The same weights under greedy decoding answer alike.
    assert policy["accuracy_match"] == ref["accuracy_match"] and policy["mean_answer_chars"] == ref["mean_answer_chars"]
    assert len(server.requests) == 2 + 4  # one grade per model for the keyed row; 2 prompts x 2 orders
    samples = results["generation"]["samples"]
    assert [s["id"] for s in samples] == ["a", "b"] and set(samples[0]) == {"id", tiny_model, str(checkpoint)}
    assert json.loads((tmp_path / "r.json").read_text())["generation"]["with_answer_key"] == 1


def test_bad_prompts_file(tmp_path, tiny_model):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "q", "answer": 4}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:1: field 'answer'"):
        evaluate.main(["--model", tiny_model, "--ref", tiny_model, "--prompts", str(tmp_path / "p.jsonl")])
