"""diagnose.py: CHES against hand-computed values, the interval and its recommendation, the known sets, the judge
over loopback and `transformers serve`, and TRL's reference-log-prob columns read back exactly."""

import dataclasses
import functools
import json

import pytest
import torch

from clair_apo import batching
import clair
import diagnose
import preference_data
from clair_apo import reference_cache
from clair_apo.models import load_model
from clair_apo.chat_tokens import tokenize_pairs
from test_clair import real_server  # noqa: F401 (a fixture: `transformers serve` on loopback)
from benchmarks.testbed import ChatServer, arithmetic_pairs, padded_pass, write_jsonl


# ----------------------------------------------------------------------------- CHES

def test_ches_matches_a_hand_computed_case():
    """S(y_w) = (1, 2), S(y_l) = (3, 0), |y_w| = 2, |y_l| = 3:
    CHES = 1*3 + 2*0 - (1 + 4) = -2; per token = (0.5, 1).(1, 0) - (0.25 + 1) = -0.75.
    Identical sides, S = (0, 1), one token each: CHES = 1 - 1 = 0."""
    chosen = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    rejected = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    scores = diagnose.ches_scores(chosen, rejected, chosen_tokens=torch.tensor([2.0, 1.0]),
                                  rejected_tokens=torch.tensor([3.0, 1.0]))
    assert scores.tolist() == [[-2.0, -0.75], [0.0, 0.0]]


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_hidden_sums_are_the_head_inputs_that_predict_each_completion_token(tmp_path, tiny_model, layout):
    """S(y) = sum over k = 1..|y| of h_{x, y<k}: the base model's last hidden state (the LM head's input) at the
    positions from the prompt's last token to the completion's second last, each sequence run alone."""
    tokenizer, model = load_model(tiny_model)
    rows, _ = preference_data.load_pairs(write_jsonl(tmp_path / "d.jsonl", arithmetic_pairs(5)))
    pairs, _ = tokenize_pairs(tokenizer, rows, 512, 192)
    how = padded_pass(2)
    if layout == "packed":
        collate = functools.partial(batching.packed, break_even=batching.attention_break_even(model))
        how = dataclasses.replace(how, batching=dataclasses.replace(how.batching, collate=collate))
    sums = diagnose.hidden_sums(model, pairs, how)
    with torch.no_grad():
        for i, pair in enumerate(pairs):
            for side, completion in enumerate((pair["chosen"], pair["rejected"])):
                ids = torch.tensor([pair["prompt"] + completion])
                hidden = model.model(input_ids=ids).last_hidden_state[0].double()
                expected = hidden[len(pair["prompt"]) - 1:-1].sum(0)
                torch.testing.assert_close(sums[i, side], expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- statistics

def test_wilson_interval_and_the_recommendation():
    z2 = diagnose.Z_95 ** 2
    assert diagnose.wilson_interval(10, 10)[0] == pytest.approx(10 / (10 + z2))  # all wins: n / (n + z^2)
    assert diagnose.wilson_interval(0, 10)[1] == pytest.approx(z2 / (10 + z2))
    assert diagnose.wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    assert [diagnose.recommend(i) for i in ([0.6, 0.9], [0.1, 0.4], [0.3, 0.7])] == ["apo_zero", "apo_down", "unclear"]


def test_spearman_by_hand_and_with_ties():
    rho, (low, high) = diagnose.spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5])
    assert rho == pytest.approx(1 - 6 * 2 / (5 * 24)) and low < rho < high  # 1 - 6 sum d^2 / (n (n^2 - 1))
    assert diagnose.ranks([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    scipy_stats = pytest.importorskip("scipy.stats")
    x, y = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]
    assert diagnose.spearman(x, y)[0] == pytest.approx(scipy_stats.spearmanr(x, y).statistic, abs=1e-12)


# ----------------------------------------------------------------------------- the known sets

def sums(n):
    """Keyed prompts 'What is a + b?' and their answers."""
    return [{"id": f"q{i}", "prompt": f"What is {i + 10} + {2 * i + 30}?", "answer": str(3 * i + 40)} for i in range(n)]


def known_files(tmp_path):
    """The two known sets from 12 keyed prompts and the model's earlier answers, 6 wrong and 6 right."""
    prompts = sums(12)
    earlier = [{"id": p["id"], "prompt": p["prompt"],
                "completion": f"Adding them gives {int(p['answer']) + (1 if i < 6 else 0)}."} for i, p in enumerate(prompts)]
    write_jsonl(tmp_path / "prompts.jsonl", prompts)
    write_jsonl(tmp_path / "earlier.jsonl", earlier)
    better, worse, counts = diagnose.main(["known", "--prompts", str(tmp_path / "prompts.jsonl"), "--samples",
                                           str(tmp_path / "earlier.jsonl"), "--out-dir", str(tmp_path / "known")])
    return prompts, better, worse, counts


def test_known_sets_are_checked_by_code(tmp_path):
    prompts, better, worse, counts = known_files(tmp_path)
    assert (counts["chosen_better"], counts["chosen_worse"]) == (6, 6)
    for row in better:  # the last number fixed in place, the rest kept: a minimal revision
        assert diagnose.matches(row["chosen"], row["answer"]) and not diagnose.matches(row["rejected"], row["answer"])
        assert row["chosen"] == f"Adding them gives {row['answer']}."
    for row in worse:  # the model's right answer with the key made wrong
        assert not diagnose.matches(row["chosen"], row["answer"])
        assert row["chosen"] == f"Adding them gives {int(row['answer']) + 1}."
    assert preference_data.load_pairs(tmp_path / "known" / "chosen_better.jsonl")[0][0]["id"] == "q0"


def test_defects_and_fixes_of_words_and_separated_numbers():
    assert diagnose.inject_defect("It is 3,999, so 3999.", "3999", "4000") == "It is 4000, so 4000."
    assert diagnose.inject_defect("The capital is Paris. paris!", "Paris", "Rome") == "The capital is Rome. Rome!"
    assert diagnose.wrong_value("Paris", ["Paris", "Rome", "Oslo", "6"]) == "Rome"
    assert diagnose.fix_answer("Sydney, I think.", "Canberra") == "Sydney, I think.\n\nThe answer is Canberra."
    assert diagnose.fix_answer("45 minus 76 is 31.", "-31") == "45 minus 76 is -31."


def fresh_file(tmp_path, name, prompts, right):
    """A `clair.py sample` file of fresh answers, right for the ids in `right`, otherwise wrong."""
    rows = [{"id": p["id"], "prompt": p["prompt"],
             "completion": f"I make it {p['answer'] if p['id'] in right else int(p['answer']) + 2}."} for p in prompts]
    return write_jsonl(tmp_path / name, rows)


def test_the_known_sets_get_their_recommendations(tmp_path, tiny_model, ref_cache, capsys):
    """Stubbed fresh answers: chosen-better pairs against fresh answers mostly wrong give APO-zero; chosen-worse pairs
    against fresh answers all right give APO-down; both or neither right everywhere is all ties: unclear."""
    prompts, better, worse, _ = known_files(tmp_path)
    common = ["--model", tiny_model, "--batch-size", "4"]
    report = diagnose.main([*common, "--data", str(tmp_path / "known" / "chosen_better.jsonl"), "--samples",
                            fresh_file(tmp_path, "f1.jsonl", prompts, right={"q0"}), "--out", str(tmp_path / "r.json")])
    c = report["chosen_vs_model"]
    assert (c["win"], c["tie"], c["loss"], c["by_answer_key"], c["recommendation"]) == (5, 1, 0, 6, "apo_zero")
    assert c["interval_95"][0] > 0.5 and c["chosen_share"] == 1.0
    assert "recommendation: APO-zero (--loss apo_zero)" in capsys.readouterr().out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["chosen_vs_model"] == c and len(saved["per_pair"]) == 6
    assert set(saved["per_pair"][0]) == {
        "id", "chosen_tokens", "rejected_tokens", "length_gap", "copy_ratio", "ref_logp_chosen", "ref_logp_rejected",
        "ref_logp_per_token_chosen", "ref_logp_per_token_rejected", "ches", "ches_length_normalised", "fresh_answer",
        "answer_key", "comparison"}
    assert saved["per_pair"][0]["copy_ratio"] == clair.copy_ratio(better[0]["chosen"], better[0]["rejected"])
    report = diagnose.main([*common, "--data", str(tmp_path / "known" / "chosen_worse.jsonl"), "--samples",
                            fresh_file(tmp_path, "f2.jsonl", prompts, right={p["id"] for p in prompts})])
    c = report["chosen_vs_model"]
    assert (c["win"], c["loss"], c["recommendation"]) == (0, 6, "apo_down") and c["interval_95"][1] < 0.5
    report = diagnose.main([*common, "--data", str(tmp_path / "known" / "chosen_better.jsonl"), "--samples",
                            fresh_file(tmp_path, "f3.jsonl", prompts, right={p["id"] for p in prompts})])
    c = report["chosen_vs_model"]
    assert (c["tie"], c["chosen_share"], c["recommendation"]) == (6, None, "unclear")


def test_answer_keys_from_a_prompts_file(tmp_path, tiny_model, ref_cache):
    prompts = sums(3)
    rows = [{"id": p["id"], "prompt": p["prompt"], "chosen": f"It is {p['answer']}.", "rejected": "No idea."}
            for p in prompts]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    report = diagnose.main(["--model", tiny_model, "--data", data, "--answers", write_jsonl(tmp_path / "p.jsonl", prompts),
                            "--samples", fresh_file(tmp_path, "f.jsonl", prompts, right=set())])
    assert report["chosen_vs_model"]["win"] == 3 and report["per_pair"][0]["answer_key"] == prompts[0]["answer"]


# ----------------------------------------------------------------------------- fresh answers

def test_fresh_answers_sampled_here(tmp_path, tiny_model, ref_cache):
    """Without --samples or --base-url the model samples, each answer seeded by --seed and its pair's id; a pair
    without an answer key and no judge is counted as not compared."""
    data = write_jsonl(tmp_path / "pairs.jsonl", arithmetic_pairs(3))
    flags = ["--model", tiny_model, "--data", data, "--max-new-tokens", "6", "--batch-size", "2"]
    first, second = diagnose.main(flags), diagnose.main(flags)
    answers = [v["fresh_answer"] for v in first["per_pair"]]
    assert answers == [v["fresh_answer"] for v in second["per_pair"]]
    assert first["chosen_vs_model"]["not compared"] == 3 and first["chosen_vs_model"]["recommendation"] == "unclear"
    assert first["fresh_answers_from"].startswith("sampled here: temperature 0.7, top-p 0.9, seed 1")


@pytest.mark.parametrize("change, message", [
    (lambda samples, rows: samples[1:], r"s\.jsonl: no answer for pair 'sum-0'"),
    (lambda samples, rows: [{**samples[0], "completion": rows[0]["rejected"]}, *samples[1:]],
     r"s\.jsonl:1: field 'completion': it is pair 'sum-0''s rejected side, not a fresh answer"),
    (lambda samples, rows: [{**samples[0], "prompt": "Another?"}, *samples[1:]],
     r"s\.jsonl:1: field 'prompt': not the prompt of pair 'sum-0'"),
    (lambda samples, rows: [{**samples[0], "completion": 3}, *samples[1:]],
     r"s\.jsonl:1: field 'completion': expected a string"),
])
def test_a_bad_samples_file_is_a_one_line_error(tmp_path, tiny_model, change, message, monkeypatch):
    """Checked before the model loads."""
    monkeypatch.setattr(diagnose, "load_model", lambda *args: pytest.fail("a model was loaded before the check"))
    rows = arithmetic_pairs(2)
    samples = change([{"id": r["id"], "prompt": r["prompt"], "completion": "Some answer."} for r in rows], rows)
    with pytest.raises(SystemExit, match=rf"^error: \S*{message}"):
        diagnose.main(["--model", tiny_model, "--data", write_jsonl(tmp_path / "d.jsonl", rows),
                       "--samples", write_jsonl(tmp_path / "s.jsonl", samples)])


@pytest.mark.parametrize("line, message", [
    ('{"id": "a", "prompt": "q", "rejected": "r"}', r"d\.jsonl:1: field 'chosen'"),
    ('{"id": "a", "prompt": "q", "chosen": "c", "rejected": "r", "answer": 4}', r"d\.jsonl:1: field 'answer'"),
    ('{"id": "a", "prompt": "q", "chosen": "c", "rejected": "r", "ref_chosen_logps": "-3"}',
     r"d\.jsonl:1: field 'ref_chosen_logps': expected a finite number"),
])
def test_bad_data_names_file_line_and_field(tmp_path, tiny_model, line, message, monkeypatch):
    monkeypatch.setattr(diagnose, "load_model", lambda *args: pytest.fail("a model was loaded before the check"))
    (tmp_path / "d.jsonl").write_text(line + "\n")
    with pytest.raises(SystemExit, match=rf"^error: .*{message}"):
        diagnose.main(["--model", tiny_model, "--data", str(tmp_path / "d.jsonl")])


# ----------------------------------------------------------------------------- the judge

@pytest.fixture
def unkeyed(tmp_path):
    """Three pairs without an answer key, one with, and fresh answers for all four."""
    rows = arithmetic_pairs(3) + [{"id": "keyed", "prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5.",
                                   "answer": "4"}]
    samples = [{"id": r["id"], "prompt": r["prompt"], "completion": "Maybe twelve?"} for r in rows]
    return ["--data", write_jsonl(tmp_path / "d.jsonl", rows), "--samples", write_jsonl(tmp_path / "s.jsonl", samples)]


def answer_a(body):
    """[[A]] where the answer shown as A has the chosen answers' form ('a + b = c.'), [[B]] elsewhere."""
    text = body["messages"][-1]["content"]
    if "[Answer A]" not in text:
        return "OK"  # the check
    return "[[A]]" if " = " in text.split("[Answer A]", 1)[1].split("[Answer B]", 1)[0] else "[[B]]"


def test_the_judge_compares_the_unkeyed_pairs_in_both_orders(tiny_model, ref_cache, unkeyed):
    with ChatServer(answer_a) as server:
        report = diagnose.main(["--model", tiny_model, *unkeyed, "--judge-url", server.base_url, "--judge-model", "j"])
    c = report["chosen_vs_model"]
    assert len(server.requests) == 1 + 3 * 2 and server.requests[0]["max_tokens"] == 1  # the check, then 2 orders
    assert (c["by_judge"], c["by_answer_key"], c["win"], c["judge_replies"], c["judge_unparsed"]) == (3, 1, 4, 6, 0)
    assert report["per_pair"][0]["comparison"] == {"by": "judge", "scores": [1.0, 1.0], "outcome": "win"}


@pytest.mark.parametrize("verdicts, outcome", [(("[[A]]", "[[A]]"), "tie"), (("[[tie]]", "[[B]]"), "win"),
                                               (("[[tie]]", "[[A]]"), "loss"), (("[[B]]", "[[tie]]"), "loss")])
def test_the_two_orders_decide_together(tiny_model, ref_cache, unkeyed, verdicts, outcome):
    """The judge's verdict in each order (chosen shown first, then second): a first-position bias is a tie; a tie
    in one order leaves the other to decide."""
    def reply(body):
        text = body["messages"][-1]["content"]
        if "[Answer A]" not in text:
            return "OK"  # the check
        chosen_first = " = " in text.split("[Answer A]", 1)[1].split("[Answer B]", 1)[0]
        return verdicts[0] if chosen_first else verdicts[1]

    with ChatServer(reply) as server:
        report = diagnose.main(["--model", tiny_model, *unkeyed, "--judge-url", server.base_url, "--judge-model", "j"])
    judged = [pair["comparison"]["outcome"] for pair in report["per_pair"] if pair["comparison"]["by"] == "judge"]
    assert judged == [outcome] * 3


def test_a_judge_without_verdicts_is_counted_and_withheld(tmp_path, tiny_model, ref_cache, unkeyed, capsys):
    with ChatServer(lambda body: "Both answers are fine.") as server:
        with pytest.raises(SystemExit, match=r"most replies had no verdict, so the comparison is withheld.*r\.json"):
            diagnose.main(["--model", tiny_model, *unkeyed, "--judge-url", server.base_url,
                           "--out", str(tmp_path / "r.json")])
    assert "judge replies without a verdict: 6 of 6" in capsys.readouterr().out
    c = json.loads((tmp_path / "r.json").read_text())["chosen_vs_model"]
    assert (c["recommendation"], c["chosen_share"], c["no verdict"], c["win"]) == ("withheld", None, 3, 1)
    assert c["unparsed_judge_replies"][0] == {"id": "sum-0", "reply": "Both answers are fine."}


def test_an_unreachable_judge_fails_before_any_model_loads(tiny_model, unkeyed, monkeypatch):
    monkeypatch.setattr(diagnose, "load_model", lambda *args: pytest.fail("a model was loaded before the check"))
    with ChatServer(lambda body: "[[A]]") as server:
        url = server.base_url
    with pytest.raises(SystemExit, match=r"^error: judge: .*gave up after 2 tries; last: ConnectionError$"):
        diagnose.main(["--model", tiny_model, *unkeyed, "--judge-url", url])


def test_a_judge_that_fails_later_keeps_the_per_pair_values(tmp_path, tiny_model, ref_cache, unkeyed, monkeypatch):
    monkeypatch.setattr(diagnose, "judge_client", judge_client_with_few_retries)

    def reply(body):  # the check passes, then the judge answers 500 for good
        server.faults.extend(["500"] * 10)
        return "OK"

    with ChatServer(reply) as server:
        with pytest.raises(SystemExit) as exit:
            diagnose.main(["--model", tiny_model, *unkeyed, "--judge-url", server.base_url,
                           "--out", str(tmp_path / "r.json")])
    message = str(exit.value.code)
    assert message.startswith("error: judge: ") and "HTTP 500" in message and "\n" not in message
    assert message.endswith(f"(the per-pair values and fresh answers are in {tmp_path / 'r.json'})")
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [v["fresh_answer"] for v in saved["per_pair"]] == ["Maybe twelve?"] * 4 and "chosen_vs_model" not in saved


def judge_client_with_few_retries(args):
    client = clair.ChatClient(args.judge_url, args.judge_model, args.api_key_env, max_retries=1)
    client.max_backoff = 0.0
    client.check()
    return client


def test_answers_and_judge_from_transformers_serve(tmp_path, real_server, ref_cache):
    """SmolLM2 served by `transformers serve` writes the fresh answers and judges the unkeyed pair; whatever its
    replies, every one is accounted for."""
    base_url, model = real_server
    rows = [{"id": "keyed", "prompt": "What is 2 + 2?", "chosen": "2 + 2 = 4.", "rejected": "5.", "answer": "4"},
            {"id": "open", "prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Car."}]
    flags = ["--model", model, "--data", write_jsonl(tmp_path / "d.jsonl", rows), "--base-url", base_url,
             "--judge-url", base_url, "--judge-model", model, "--max-new-tokens", "8", "--out", str(tmp_path / "r.json")]
    try:
        diagnose.main(flags)
    except SystemExit as e:
        assert "most replies had no verdict" in str(e.code)
    c = json.loads((tmp_path / "r.json").read_text())["chosen_vs_model"]
    assert (c["by_answer_key"], c["by_judge"], c["judge_replies"]) == (1, 1, 2)
    assert c["judge_unparsed"] == len(c["unparsed_judge_replies"])


# ----------------------------------------------------------------------------- TRL's columns

def test_trl_reference_columns_round_trip(tmp_path, tiny_model, ref_cache, capsys):
    """Reference log-probs written as ref_chosen_logps / ref_rejected_logps come back to 1e-9, and with them in
    the data nothing is computed or cached."""
    rows, _ = preference_data.load_pairs(write_jsonl(tmp_path / "d.jsonl", arithmetic_pairs(4)))
    tokenizer, model = load_model(tiny_model)
    pairs, _ = tokenize_pairs(tokenizer, rows, 512, 192)
    path = tmp_path / "elsewhere" / f"{reference_cache.weights_fingerprint(model, 'fp32')}.pt"
    ref = reference_cache.reference_logps(model, pairs, padded_pass(2), path)
    data = preference_data.write_reference_logps(rows, ref.tolist(), tmp_path / "with_ref.jsonl")
    assert list(preference_data.read_reference_logps(data).values()) == ref.tolist()
    capsys.readouterr()
    report = diagnose.main(["--model", tiny_model, "--data", data, "--samples", write_jsonl(
        tmp_path / "s.jsonl", [{"id": r["id"], "prompt": r["prompt"], "completion": "?"} for r in rows])])
    read_back = torch.tensor([[v["ref_logp_chosen"], v["ref_logp_rejected"]] for v in report["per_pair"]],
                             dtype=torch.float64)
    torch.testing.assert_close(read_back, ref, rtol=0, atol=1e-9)
    assert "computed" not in capsys.readouterr().out and not ref_cache.exists()
    assert report["reference_logps_from"] == "the dataset's ref_chosen_logps and ref_rejected_logps columns"


def test_trl_columns_on_some_rows_only(tmp_path):
    rows = arithmetic_pairs(2)
    rows[1] |= {"ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}
    with pytest.raises(preference_data.DataError, match=r"d\.jsonl:1: fields 'ref_chosen_logps', 'ref_rejected_logps': "
                                                          r"missing, while other rows have them"):
        preference_data.read_reference_logps(write_jsonl(tmp_path / "d.jsonl", rows))


# ----------------------------------------------------------------------------- CHES against training

def test_displacement_of_a_short_run(tmp_path, tiny_model, ref_cache):
    import train

    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_pairs(8))
    eval_data = write_jsonl(tmp_path / "eval.jsonl", arithmetic_pairs(2, seed=1))
    train.main(["--model", tiny_model, "--data", data, "--eval-data", eval_data, "--out", str(tmp_path / "run"),
                "--lr", "1e-3", "--warmup-ratio", "0"])
    results = diagnose.main(["displacement", str(tmp_path / "run"), "--out", str(tmp_path / "ches.png")])
    (result,) = results.values()
    assert result["pairs"] == 8 and -1 <= result["spearman_ches"]["rho"] <= 1
    assert (tmp_path / "ches.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("family", ["Gemma2Config", "padless"])
def test_diagnose_beyond_the_tiny_llama(tmp_path, family, padless_model, ref_cache):
    """A soft-capping family with a head of its own, and a tokenizer without a pad token (Llama-3's way): fresh
    answers, CHES and reference log-probs come out for every pair, keyed rows compared by code."""
    import transformers

    from benchmarks.testbed import make_tiny_model

    model = padless_model if family == "padless" else make_tiny_model(
        tmp_path / "model", config_class=getattr(transformers, family), head_dim=8)
    rows = [{**row, "answer": row["chosen"].split("= ")[1].rstrip(".")} for row in arithmetic_pairs(3)]
    report = diagnose.main(["--model", model, "--data", write_jsonl(tmp_path / "pairs.jsonl", rows),
                            "--max-new-tokens", "4", "--batch-size", "2"])
    assert report["pairs"] == 3 and report["chosen_vs_model"]["by_answer_key"] == 3
    assert all(torch.isfinite(torch.tensor([v["ches"], v["ref_logp_chosen"]])).all() for v in report["per_pair"])
