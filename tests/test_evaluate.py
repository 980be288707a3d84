"""evaluate.py: agrees with train.py's eval metrics, draws Figure 4, grades and judges over loopback."""

import builtins
import functools
import json
import shutil

import pytest

import clair
import evaluate
import train
from benchmarks.testbed import ChatServer, arithmetic_pairs, write_jsonl
from clair_apo import metrics


@pytest.fixture
def trained(tmp_path, tiny_model, ref_cache):
    """A 3-step APO-zero run and a 3-step DPO run of the tiny model, beta and lengths not train.py's defaults
    (completions truncated): their out folders and eval file."""
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(16))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(6, seed=1))
    runs = []
    for loss in ("apo_zero", "dpo"):
        out = tmp_path / loss
        train.main(["--model", tiny_model, "--data", data, "--eval-data", eval_data, "--out", str(out), "--loss", loss,
                    "--lr", "1e-3", "--max-steps", "3", "--epochs", "2", "--eval-every", "1", "--warmup-ratio", "0",
                    "--beta", "0.25", "--max-length", "105", "--max-prompt-length", "100"])
        runs.append(out)
    return runs, eval_data


@pytest.mark.parametrize("give_ref", [False, True])
def test_held_out_metrics_agree_with_train(trained, tiny_model, capsys, give_ref):
    """Without --ref, the reference, loss, beta and lengths come from the checkpoint's training args."""
    (run, _), eval_data = trained
    results = evaluate.main(["--model", str(run / "final"), "--data", eval_data, *(["--ref", tiny_model] * give_ref)])
    assert "computed" not in capsys.readouterr().out  # the reference came from train.py's cache
    assert results["ref"] == tiny_model and results["pairs"]["pairs"] == 6
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    report = results["pairs"]["models"][str(run / "final")]
    for name in metrics.METRICS:
        assert report[f"eval/{name}"] == pytest.approx(last[f"eval/{name}"], abs=1e-5), name
    chosen = report["chosen"]
    for side in ("chosen", "rejected"):
        assert report[side]["direction"] == ("up" if report[f"eval/rewards/{side}"] > 0 else "down")
    assert chosen["logp_policy"] - chosen["logp_ref"] == pytest.approx(report["eval/rewards/chosen"] / 0.25, rel=1e-4)
    assert chosen["logp_per_token_ref"] == pytest.approx(chosen["logp_ref"] / chosen["mean_tokens"], rel=0.2)


def test_checkpoints_trained_differently_need_the_flag(trained, capsys):
    runs, eval_data = trained
    with pytest.raises(SystemExit):
        evaluate.main(["--model", *(str(run / "final") for run in runs), "--data", eval_data])
    assert "trained with different loss ('apo_zero', 'dpo'): give --loss" in capsys.readouterr().err
    results = evaluate.main(["--model", *(str(run / "final") for run in runs), "--data", eval_data, "--loss", "dpo"])
    assert len(results["pairs"]["models"]) == 2
    prompts = write_jsonl(runs[0].parent / "prompts.jsonl", [{"prompt": "What is 2 plus 3?", "answer": "5"}])
    results = evaluate.main(["--model", *(str(run / "final") for run in runs), "--prompts", prompts,
                             "--max-new-tokens", "4"])  # generation alone uses no loss: no flag needed
    scores = results["generation"]["models"][str(runs[0] / "final")]
    assert len(results["generation"]["models"]) == 3 and 0 <= scores["cut_at_max_new_tokens"] <= 1


def test_a_model_without_training_args_needs_ref(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--model", tiny_model, "--data", write_jsonl(tmp_path / "e.jsonl", arithmetic_pairs(2))])
    assert "--ref: no checkpoint holds train.py's training args" in capsys.readouterr().err


def test_a_model_without_training_args_generates_alone(tiny_model, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 plus 3?", "answer": "5"}])
    results = evaluate.main(["--model", tiny_model, "--prompts", prompts, "--max-new-tokens", "4"])
    assert "no reference: --model is evaluated alone" in capsys.readouterr().out
    assert results["ref"] is None and list(results["generation"]["models"]) == [tiny_model]
    assert list(results["generation"]["samples"][0]) == ["id", tiny_model]


def test_a_policy_with_another_tokenizer_is_refused(trained, tmp_path):
    from transformers import AutoTokenizer

    (run, _), eval_data = trained
    other = tmp_path / "other"
    shutil.copytree(run / "final", other)
    tokenizer = AutoTokenizer.from_pretrained(other)
    tokenizer.chat_template = tokenizer.chat_template.replace("tiny test model", "small test model")
    tokenizer.save_pretrained(other)
    with pytest.raises(SystemExit, match=r"other: its tokenizer or chat template gives other token ids than the "
                                         r"reference's \("):
        evaluate.main(["--model", str(other), "--data", eval_data])


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
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "loss": 1.0, "logps/chosen": -3.0}\n')
    with pytest.raises(SystemExit, match=r"metrics\.jsonl:1: field 'logps/rejected': missing"):
        evaluate.main(["plot", str(tmp_path)])


@pytest.mark.parametrize("text, answer, expected", [
    ("The answer is 3,999.", "3999", True), ("It is 13999", "3999", False), ("Brasilia is the capital", "Brasília", True),
    ("roughly 2.5 kg", "2.5", True), ("Paris.", "paris", True), ("New Delhi!", "Delhi", True), ("Newcastle", "New", False),
    ("A hexagon has six sides.", "6", True), ("The result is -31.", "-31", True), ("It is 31.", "-31", False),
    # Number words both ways: once, twice and thrice are 1, 2 and 3; compound tens read whole.
    ("The letter 'b' appears once.", "1", True), ("It appears twice", "2", True), ("thrice!", "3", True),
    ("It appears 2 times.", "two", True), ("once", "one", True), ("It appears once.", "2", False),
    ("January has thirty-one days.", "31", True), ("thirty one", "31", True), ("It has 31 days.", "thirty-one", True),
    ("thirty-one", "30", False), ("thirty-one", "1", False), ("forty people", "40", True),
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
    assert len(server.requests) == 1 + 2 + 4  # the check; one grade per model for the keyed row; 2 prompts x 2 orders
    assert server.requests[0]["max_tokens"] == 1  # the check: a tiny request before any generation
    assert (policy["judge_unparsed"], policy["judge_replies"], ref["judge_replies"]) == (0, 5, 1)
    samples = results["generation"]["samples"]
    assert [s["id"] for s in samples] == ["a", "b"] and set(samples[0]) == {"id", tiny_model, str(checkpoint)}
    assert json.loads((tmp_path / "r.json").read_text())["generation"]["with_answer_key"] == 1


def test_generation_without_a_pad_token(tmp_path, padless_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "What is 2 + 2?", "answer": "4"},
                                                 {"id": "b", "prompt": "Write a haiku about the sea, please."}])
    results = evaluate.main(["--model", padless_model, "--ref", padless_model, "--prompts", prompts,
                             "--max-new-tokens", "5"])
    assert [set(s) for s in results["generation"]["samples"]] == [{"id", padless_model}] * 2


def test_bad_prompts_file(tmp_path, tiny_model):
    (tmp_path / "p.jsonl").write_text('{"id": "a", "prompt": "q", "answer": 4}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl:1: field 'answer'"):
        evaluate.main(["--model", tiny_model, "--ref", tiny_model, "--prompts", str(tmp_path / "p.jsonl")])


@pytest.fixture
def two_models(tmp_path, tiny_model):
    """The tiny model as reference and a copy of it as checkpoint; a keyed and an open prompt."""
    checkpoint = tmp_path / "copy"
    shutil.copytree(tiny_model, checkpoint)
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "What is 2 + 2?", "answer": "4"},
                                                 {"id": "b", "prompt": "Write a haiku."}])
    return ["--model", str(checkpoint), "--ref", tiny_model, "--prompts", prompts, "--max-new-tokens", "3"]


def test_a_judge_without_verdicts_is_counted_and_its_scores_withheld(tmp_path, two_models, capsys):
    with ChatServer(lambda body: "12 times 3 is 36.") as server:
        with pytest.raises(SystemExit, match=r"most replies had no verdict, so these scores are withheld: .*copy "
                                             r"accuracy_judge, .*copy win_rate_vs_ref.*r\.json") as exit:
            evaluate.main([*two_models, "--judge-url", server.base_url, "--out", str(tmp_path / "r.json")])
    assert exit.value.code != 0
    table = capsys.readouterr().out
    assert "withheld" in table and "5 of 5" in table and "0.500" not in table
    policy = json.loads((tmp_path / "r.json").read_text())["generation"]["models"][two_models[1]]
    assert policy["accuracy_judge"] is None and policy["win_rate_vs_ref"] is None
    assert policy["unparsed_judge_replies"][0] == {"id": "a", "reply": "12 times 3 is 36."}


def test_a_wrong_judge_url_fails_before_any_generation(tmp_path, two_models, monkeypatch):
    monkeypatch.setattr(train, "load_model", lambda *args: pytest.fail("a model was loaded before the check"))
    with ChatServer(lambda body: "[[A]]") as server:
        with pytest.raises(SystemExit, match=r"^error: judge: .*HTTP 404 \(check --judge-url: it should end in /v1"):
            evaluate.main([*two_models, "--judge-url", server.base_url.removesuffix("/v1")])
        assert len(server.requests) == 1


def test_a_judge_that_goes_away_keeps_the_generations(tmp_path, two_models, monkeypatch):
    monkeypatch.setattr(clair.ChatClient, "max_backoff", 0.0)
    monkeypatch.setattr(evaluate, "ChatClient", functools.partial(clair.ChatClient, max_retries=1))

    def reply(body):  # the check passes, then the judge fails for good
        server.faults.extend(["500"] * 10)
        return "OK"

    with ChatServer(reply) as server:
        with pytest.raises(SystemExit) as exit:
            evaluate.main([*two_models, "--judge-url", server.base_url, "--out", str(tmp_path / "r.json")])
    message = str(exit.value.code)
    assert message.startswith("error: judge: ") and "gave up after 2 tries" in message and "\n" not in message
    assert message.endswith(f"(the generations are in {tmp_path / 'r.json'})")
    samples = json.loads((tmp_path / "r.json").read_text())["generation"]["samples"]
    assert [s["id"] for s in samples] == ["a", "b"] and all(two_models[1] in s for s in samples)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        evaluate.main(["--help"])
    assert "(default: gpt-4-turbo)" in " ".join(capsys.readouterr().out.split())


def test_the_pairwise_judge_swaps_the_order():
    """A judge that prefers one answer by its content, wherever it stands: a win in both orders. Asked in the
    same order twice, it would score one win and one loss."""
    def reply(body):
        text = body["messages"][-1]["content"]
        first = text.split("[Answer A]", 1)[1].split("[Answer B]", 1)[0]
        return "[[A]]" if "good" in first else "[[B]]"

    with ChatServer(reply) as server:
        client = clair.ChatClient(server.base_url, "judge", "NO_KEY_NEEDED")
        row = {"prompt": "Say something."}
        assert [score for score, _ in evaluate.pairwise(client, row, "a good answer", "a bad one")] == [1.0, 1.0]
        assert [score for score, _ in evaluate.pairwise(client, row, "a bad one", "a good answer")] == [0.0, 0.0]
        answers = [text.split("[Answer A]")[1].split("[Answer B]")[0].strip()
                   for text in (r["messages"][-1]["content"] for r in server.requests)]
    assert answers == ["a good answer", "a bad one", "a bad one", "a good answer"]


def judge_client(server):
    return clair.ChatClient(server.base_url, "judge", "NO_KEY_NEEDED")


def test_the_grader_takes_the_last_verdict_in_any_case():
    replies = iter(["[[correct]]? No: [[incorrect]]", "It matches. [[Correct]]", "It is close."])
    with ChatServer(lambda body: next(replies)) as server:
        row = {"prompt": "What is 2 + 2?", "answer": "4"}
        assert [evaluate.grade(judge_client(server), row, "4")[0] for _ in range(3)] == [False, True, None]


def test_a_tie_scores_one_half_in_both_orders():
    with ChatServer(lambda body: "Equally good. [[tie]]") as server:
        scores = evaluate.pairwise(judge_client(server), {"prompt": "Say something."}, "mine", "theirs")
    assert [score for score, _ in scores] == [0.5, 0.5]


def test_the_two_orders_combine_when_the_judge_changes_its_verdict_with_the_order():
    """A judge biased to the first position scores one win and one loss: a win rate of one half. A tie in one
    order and a win in the other average to three quarters."""
    rows = [{"id": "q", "prompt": "Say something.", "answer": None}]
    biased = lambda body: "[[A]]"

    def tie_when_mine_first(body):
        return "[[tie]]" if "[Answer A]\nmine" in body["messages"][-1]["content"] else "[[B]]"

    for reply, scores, rate in ((biased, [1.0, 0.0], 0.5), (tie_when_mine_first, [0.5, 1.0], 0.75)):
        with ChatServer(reply) as server:
            assert [score for score, _ in evaluate.pairwise(judge_client(server), rows[0], "mine", "theirs")] == scores
            report = {"models": {"ref": {}, "ckpt": {}}, "samples": [{"id": "q", "ref": "theirs", "ckpt": "mine"}]}
            evaluate.judge_generations(judge_client(server), rows, report, ref="ref")
        assert report["models"]["ckpt"]["win_rate_vs_ref"] == rate


def test_a_score_with_a_verdict_in_half_its_replies_is_kept():
    def reply(body):  # a verdict only when the checkpoint's answer comes first
        return "[[A]]" if "[Answer A]\nmine" in body["messages"][-1]["content"] else "I cannot decide."

    rows = [{"id": "q", "prompt": "Say something.", "answer": None}]
    report = {"models": {"ref": {}, "ckpt": {}}, "samples": [{"id": "q", "ref": "theirs", "ckpt": "mine"}]}
    with ChatServer(reply) as server:
        evaluate.judge_generations(judge_client(server), rows, report, ref="ref")
    scores = report["models"]["ckpt"]
    assert scores["win_rate_vs_ref"] == 1.0 and (scores["judge_replies"], scores["judge_unparsed"]) == (2, 1)


@pytest.mark.parametrize("text, answer, expected", [
    ("The codes are 1,2 and 3.", "12", False), ("It costs 1,250,000 dollars.", "1250000", True),
    ("thirty-nine steps", "39", True), ("ninety nine", "99", True),
    ("a state-of-the-art model", "art", True), ("It is well-known.", "known", True),
])
def test_answer_matching_of_separators_number_words_and_hyphens(text, answer, expected):
    assert evaluate.matches(text, answer) is expected
