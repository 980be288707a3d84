"""experiment/controlled.py: the primary metric, the minimal reviser (exactly minimal, by exhaustive search on short
strings), the defect injector, the pairs and seeds, the bootstrap and Holm procedure on synthetic scores with
known answers, and the whole --quick pipeline on the tiny random model."""

import json
import random

import numpy as np
import pytest

from experiment import controlled as experiment
from clair import levenshtein_bit_parallel as levenshtein
from experiment.controlled import TAIL, boundary, grade, inject, revise, smallest_edit

CAPITAL = {"keys": ["Paris"], "distractors": ["Lyon"], "lowercase": False}
LOWER = {**CAPITAL, "lowercase": True}
UNITS = {"keys": ["180", "180 minutes"], "distractors": ["179"], "lowercase": False}


@pytest.fixture(scope="module")
def prompts():
    return experiment.build_prompts(experiment.parse_args([]))


def test_primary_metric_fails_cut_off_looping_and_wrong_answers():
    assert grade("The capital of France is Paris.", "stop", CAPITAL)["success"]
    assert not grade("The capital of France is Paris.", "length", CAPITAL)["success"]  # cut at the limit
    for looped in ("The capital of France is Paris Paris Paris.", "Paris. " * 3, "Paris^^^^^^^^"):
        assert not grade(looped, "stop", CAPITAL)["success"] and not grade(looped, "stop", CAPITAL)["no_loop"]
    wrong = grade("The capital of France is Lyon.", "stop", CAPITAL)
    assert not wrong["success"] and not wrong["correct_anywhere"]
    misplaced = grade("Paris is the capital of France.", "stop", CAPITAL)  # right, but not where the form asks
    assert not misplaced["success"] and misplaced["correct_anywhere"]
    assert not grade("The capital of France is Paris.", "stop", LOWER)["success"]
    assert grade("the capital of france is 'paris'!", "stop", LOWER)["success"]
    for unit_answer, right in (("3 hours make 180 minutes.", True), ("It is 180.", True), ("It is 5180.", False),
                               ("It is 180 seconds.", False)):
        assert grade(unit_answer, "stop", UNITS)["success"] == right
    assert not experiment.looping("1, 2, 3, 4 and 5.") and not experiment.looping("Ko... is it Accra?")
    assert not experiment.looping("The answer is 7 7.") and experiment.looping("The answer is 7 7 7.")  # 3 in a row


def test_success_needs_a_sentence_and_lowercase_needs_letters():
    for bare in ("Paris.", "It's Paris.", "  Paris  "):  # fewer than three words: a bare answer
        graded = grade(bare, "stop", CAPITAL)
        assert graded["answer_at_end"] and not graded["sentence"] and not graded["success"]
    assert grade("It is Paris.", "stop", CAPITAL)["success"]
    assert grade("4 * 45 = 180", "stop", UNITS)["success"]  # three words with a digit
    no_letters = grade("4 * 45 = 180", "stop", {**UNITS, "lowercase": True})
    assert not no_letters["lowercase_held"] and not no_letters["success"]  # lowercase not written: no letters
    assert grade("it is 180 minutes", "stop", {**UNITS, "lowercase": True})["success"]


def test_a_one_letter_key_is_not_the_word_a():
    first_a = {"keys": ["a"], "distractors": ["b"], "lowercase": False}
    for text, right in (("A cat is an animal.", False), ("I think it is a good word.", False),
                        ("The first letter of 'apple' is 'A'.", True), ("It starts with the letter a here.", True),
                        ("The first letter of apple is a.", True), ("The first letter is 'b'.", False)):
        assert grade(text, "stop", first_a)["correct_anywhere"] == right, text
    assert grade("Paris is the capital.", "stop", CAPITAL)["correct_anywhere"]
    seven = {"keys": ["7"], "distractors": ["8"], "lowercase": False}  # a one-digit number is no letter
    assert grade("3 plus 4 equals 7, a prime number.", "stop", seven)["correct_anywhere"]


def test_behaviour_no_pair_asks_for():
    graded = grade("I'm sorry, but I cannot answer that.", "stop", CAPITAL)
    assert graded["apology"] and not graded["all_lowercase"]
    graded = grade("the capital of france is paris.", "stop", CAPITAL)
    assert not graded["apology"] and graded["all_lowercase"] and graded["success"]  # allowed where not asked


def test_revise_rewrites_what_is_wrong_in_place():
    assert revise("The capital of France is Lyon.", CAPITAL) == "The capital of France is Paris."
    assert revise("The capital of France is Paris.", LOWER) == "the capital of france is paris."
    assert revise("5 hours is 120 minutes.", {**UNITS, "keys": ["300", "300 minutes"]}) == "5 hours is 300 minutes."
    assert revise("The word 'garden' has 12 letters.", {**UNITS, "keys": ["6", "6 letters"]}) == (
        "The word 'garden' has 6 letters.")
    assert revise("The first letter is 'B'.", {**CAPITAL, "keys": ["a"]}) == "The first letter is 'a'."
    assert revise("The answer is 15.", {**CAPITAL, "keys": ["5"]}) == "The answer is 5."
    for prompt in (CAPITAL, LOWER, UNITS):  # a revision already in form is left alone
        once = revise("Hi, here it is", prompt)
        assert grade(once, "stop", prompt)["success"] and revise(once, prompt) == once
    with pytest.raises(ValueError):
        smallest_edit("x", ending="Paris", lowercase=True)


def canonical(text, ending, lowercase):
    """The reviser's target, written out: no capital under `lowercase`; `ending` at the start or after a
    boundary character; then only TAIL characters."""
    if lowercase and any(c != c.lower() for c in text):
        return False
    for cut in range(len(text) + 1):
        head, tail = text[:cut], text[cut:]
        start = len(head) - len(ending)
        at_boundary = start == 0 or (start > 0 and boundary(head[start - 1]))
        if all(c in TAIL for c in tail) and head.endswith(ending) and at_boundary:
            return True
    return False


def edit_ball(text, radius, alphabet):
    """Every string within `radius` single-character edits of `text`, over `alphabet`."""
    ball = frontier = {text}
    for _ in range(radius):
        frontier = {s[:i] + c + s[i + k:] for s in frontier for i in range(len(s) + 1)
                    for k, c in [(0, c) for c in alphabet] + [(1, c) for c in alphabet + [""]] if i + k <= len(s)}
        ball = ball | frontier
    return ball


def test_revise_is_exactly_minimal():
    """No string closer than the revision is in the canonical form, by exhaustive search. The search alphabet
    loses nothing: a character of a satisfying string outside the text and the ending can be replaced by the
    representative of its class (' ' a boundary, '!' a boundary and tail, '.' a tail, 'x' neither): the string
    still satisfies, and is no farther from the text."""
    rng = random.Random(0)
    checked = 0
    for _ in range(300):
        text = "".join(rng.choice("aAb'. x") for _ in range(rng.randint(0, 5)))
        lowercase = rng.random() < 0.5
        ending = rng.choice(["a", "ab", "b a"] + ([] if lowercase else ["A"]))
        revised = smallest_edit(text, ending=ending, lowercase=lowercase)[1]
        assert canonical(revised, ending, lowercase), (text, ending, revised)
        distance = levenshtein(text, revised)
        if distance == 0:
            assert revised == text
        elif distance <= 3:
            alphabet = sorted(set(text) | set(ending) | {" ", "!", ".", "x"})
            closer = [s for s in edit_ball(text, distance - 1, alphabet) if canonical(s, ending, lowercase)]
            assert not closer, (text, ending, closer[:3])
            checked += 1
    assert checked > 150


def test_the_canonical_form_succeeds():
    """What the reviser writes is a subset of what the primary metric accepts."""
    rng = random.Random(1)
    for _ in range(2000):
        prompt = rng.choice([CAPITAL, LOWER, UNITS])
        ending = rng.choice(prompt["keys"]).lower() if prompt["lowercase"] else rng.choice(prompt["keys"])
        head = "".join(rng.choice("ab ,'!:(x.-") for _ in range(rng.randint(0, 6)))
        text = head + ending + "".join(rng.choice(TAIL) for _ in range(rng.randint(0, 2)))
        if canonical(text, ending, prompt["lowercase"]):  # a sentence is not the reviser's to write
            graded = grade(text, "stop", prompt)
            assert graded["success"] or experiment.looping(text) or not graded["sentence"], text


def test_injected_defects_fail_the_metric(prompts):
    """Every prompt's right answers, with every defect and every pair of defects: all fail, and the two-defect
    reply (W's rejected side) is the one-defect reply (W's chosen side) with one more."""
    for prompt in prompts:
        for right in prompt["phrasings"]:
            right = right.lower() if prompt["lowercase"] else right
            assert grade(right, "stop", prompt)["success"]
            defects = experiment.defects_for(right, prompt)
            for first in defects:
                chosen = inject(right, prompt, [first])
                assert not grade(chosen, "stop", prompt)["success"], (right, first)
                for second in defects:
                    if second != first:
                        rejected = inject(right, prompt, [first, second])
                        assert not grade(rejected, "stop", prompt)["success"] and rejected != chosen


def test_fresh_answers_are_right_and_matched_in_length(prompts):
    for prompt in prompts[:60]:
        for length in (10, 40, 80):
            fresh = experiment.fresh_answer(prompt, length, avoid=set())
            assert grade(fresh, "stop", prompt)["success"]
            assert experiment.fresh_answer(prompt, length, avoid={fresh}) != fresh


def test_pairs_from_samples(prompts):
    train = [p for p in prompts if p["split"] == "train"][:4]
    def sample(prompt, k, text, reason="stop"):
        return {"id": f"{prompt['id']}-{k}", "prompt_id": prompt["id"], "completion": text, "finish_reason": reason}

    samples = ([sample(p, 0, p["phrasings"][1].lower() if p["lowercase"] else p["phrasings"][1]) for p in train]
               + [sample(p, 1, "I do not know.") for p in train] + [sample(train[0], 2, "It is", reason="length")])
    pairs, left_out = experiment.build_pairs(prompts, samples)
    assert left_out == {"cut at the sampling limit": 1}
    assert [p["rejected"] for p in pairs["clair"]] == [p["rejected"] for p in pairs["stronger"]]
    assert [p["rejected"] for p in pairs["clair"]] == ["I do not know."] * 4
    for kind, rows in pairs.items():
        for pair in rows:
            prompt = next(p for p in train if p["id"] == pair["prompt_id"])
            assert grade(pair["chosen"], "stop", prompt)["success"] == (kind != "w")
            assert not grade(pair["rejected"], "stop", prompt)["success"]
    assert all(len(p["defects"]) == 2 for p in pairs["w"])


def test_seed_shares_are_disjoint_by_prompt():
    pairs = [{"id": f"q{n}-{k}", "prompt_id": f"q{n}"} for n in range(40) for k in range(2)]
    draws = experiment.seed_shares(pairs, seeds=4, size=15)
    prompts_of = [{i.split("-")[0] for i in draw} for draw in draws]
    assert all(len(draw) == 15 for draw in draws)
    assert all(not prompts_of[a] & prompts_of[b] for a in range(4) for b in range(a + 1, 4))
    assert experiment.seed_shares(pairs, seeds=4, size=15) == draws


ONE_POOL = {"a": "p", "b": "p"}
TWO_POOLS = {"a": "p", "b": "q"}


def test_bootstrap_known_answers():
    ones, zeros = np.ones((4, 100)), np.zeros((4, 100))
    assert experiment.bootstrap({"a": ones, "b": zeros}, {"a": 1, "b": -1}, TWO_POOLS, 2000)["p_one_sided"] == (
        pytest.approx(1 / 2001))
    assert experiment.bootstrap({"a": zeros, "b": zeros}, {"a": 1, "b": -1}, TWO_POOLS, 2000)["p_one_sided"] == 1.0
    rng = np.random.default_rng(3)
    # Independent prompts, the same at every seed: the interval is the mean's, 1.96 standard errors wide.
    column = rng.choice([-1.0, 0.0, 1.0], p=[0.2, 0.4, 0.4], size=400)
    result = experiment.bootstrap({"a": np.tile(column, (4, 1)), "b": np.zeros((4, 400))}, {"a": 1, "b": -1},
                                  TWO_POOLS, 4000)
    standard_error = column.std() / np.sqrt(len(column))
    assert result["effect"] == pytest.approx(column.mean())
    assert result["ci95"][0] < 0.2 < result["ci95"][1]
    assert (result["ci95"][1] - result["ci95"][0]) / (2 * 1.96 * standard_error) == pytest.approx(1, abs=0.1)
    assert result["p_one_sided"] < 0.001


def test_an_effect_of_the_seeds_alone_widens_the_interval_to_cover_zero():
    """Seed means that differ, prompts that carry nothing: a bootstrap over prompts alone would find +1/3 with
    no spread at all. Resampling each pool's three seeds widens the interval to cover 0."""
    prompts = 200
    a = np.repeat([[1.0], [0.0], [1.0]], prompts, axis=1)  # seed means 1, 0, 1: the mean 2/3
    b = np.repeat([[0.0], [1.0], [0.0]], prompts, axis=1)  # 0, 1, 0: 1/3
    result = experiment.bootstrap({"a": a, "b": b}, {"a": 1, "b": -1}, TWO_POOLS, 4000)
    assert result["effect"] == pytest.approx(1 / 3)
    assert result["ci95"][0] < 0 < result["ci95"][1] and result["ci95"][1] - result["ci95"][0] > 0.6
    assert result["p_one_sided"] > 0.05


def test_arms_of_one_pool_share_the_seed_resample():
    """Two arms trained on the same draws: a seed's quality moves both, so their contrast carries no seed
    variance and the interval stays narrow; as two pools it would not."""
    rng = np.random.default_rng(0)
    seed_quality = np.array([[0.9], [0.1], [0.5], [0.3]])
    a = (rng.random((4, 400)) < seed_quality).astype(float)
    b = np.where(rng.random((4, 400)) < 0.1, 0.0, a)  # a with a tenth of its successes lost
    paired = experiment.bootstrap({"a": a, "b": b}, {"a": 1, "b": -1}, ONE_POOL, 4000)
    unpaired = experiment.bootstrap({"a": a, "b": b}, {"a": 1, "b": -1}, TWO_POOLS, 4000)
    assert paired["effect"] == unpaired["effect"] and paired["ci95"][0] > 0
    assert paired["ci95"][1] - paired["ci95"][0] < (unpaired["ci95"][1] - unpaired["ci95"][0]) / 3


def test_holm_known_answers():
    assert experiment.holm({"H1": 0.01, "H2": 0.04}) == pytest.approx({"H1": 0.02, "H2": 0.04})
    assert experiment.holm({"H1": 0.04, "H2": 0.03}) == pytest.approx({"H1": 0.06, "H2": 0.06})
    assert experiment.holm({"H1": 0.001, "H2": 0.3}) == pytest.approx({"H1": 0.002, "H2": 0.3})
    assert experiment.holm({"H1": 0.7, "H2": 0.6}) == pytest.approx({"H1": 1.0, "H2": 1.0})
    assert experiment.holm({"H0": 0.01, "H1": 0.02, "H2": 0.04}) == pytest.approx({"H0": 0.03, "H1": 0.04,
                                                                                   "H2": 0.04})


def synthetic_tables(rng, prompts=1000):
    base = (rng.random((4, prompts)) < 0.4).astype(float)
    return base, {"untrained": base[:1], "clair_apo_zero": base, "stronger_apo_zero": base,
                  "clair_apo_down": base, "w_apo_zero": base, "w_apo_down": base}


def test_decision_rule_on_synthetic_arms():
    rng = np.random.default_rng(0)
    base, tables = synthetic_tables(rng)
    better = np.maximum(base, rng.random(base.shape) < 0.2)  # about 12 points more successes
    slightly = np.maximum(base, rng.random(base.shape) < 0.04)  # about 2.4 points: significant, too small to count
    decided, secondary = experiment.decide({**tables, "clair_apo_zero": better, "w_apo_down": better}, 2000)
    assert decided["H0"]["supported"] and decided["H1"]["supported"] and decided["H2"]["supported"]
    assert decided["H1"]["effect"] == pytest.approx((better - base).mean())
    assert decided["H0"]["effect"] == pytest.approx(better.mean() - base[0].mean())
    assert secondary["interaction"]["effect"] == pytest.approx(2 * (better - base).mean())  # +1 on CLAIR, -1 on W
    decided, _ = experiment.decide({**tables, "clair_apo_zero": slightly}, 2000)
    assert decided["H1"]["reason"] == "significant but below the minimum effect" and not decided["H1"]["supported"]
    decided, _ = experiment.decide(tables, 2000)
    assert decided["H1"]["reason"] == decided["H2"]["reason"] == "not significant"


def test_the_decision_takes_holms_p_not_the_raw_one(monkeypatch):
    """Raw one-sided p of 0.02, 0.03 and 0.04, each effect large: below alpha alone, but Holm makes all 0.06."""
    raw = iter([0.02, 0.03, 0.04, 0.5])
    monkeypatch.setattr(experiment, "bootstrap",
                        lambda tables, contrast, pools, replicates: {"effect": 0.1, "p_one_sided": next(raw)})
    decided, _ = experiment.decide(synthetic_tables(np.random.default_rng(0), prompts=10)[1], replicates=10)
    assert [decided[h]["p_holm"] for h in ("H0", "H1", "H2")] == pytest.approx([0.06, 0.06, 0.06])
    assert not any(decided[h]["supported"] for h in ("H0", "H1", "H2"))


def test_the_pilot_breakdown():
    prompts = [{"id": "c1", "kind": "capital", "lowercase": True, "keys": ["Paris"]},
               {"id": "c2", "kind": "capital", "lowercase": True, "keys": ["Paris"]},
               {"id": "s1", "kind": "small_sum", "lowercase": False, "keys": ["7"]}]
    texts = {"c1": "The capital of France is Paris.", "c2": "The capital of France is Lyon.", "s1": "It is 7."}
    records = [{"id": p["id"], "answer": texts[p["id"]], "finish_reason": "stop", **grade(texts[p["id"]], "stop", p)}
               for p in prompts]
    rows = experiment.breakdown(records, prompts)
    assert rows["capital"]["fixed by lowercasing"] == 0.5 and rows["capital"]["fails answer_at_end"] == 0.5
    assert rows["all"]["success"] == pytest.approx(1 / 3) and rows["all"]["fixed by lowercasing"] == (
        pytest.approx(1 / 3))
    no_letters = {"id": "p1", "kind": "product", "lowercase": True, "keys": ["18"]}  # lowercasing cannot add letters
    records = [{"id": "p1", "answer": "2 * 9 = 18", "finish_reason": "stop", **grade("2 * 9 = 18", "stop", no_letters)}]
    assert experiment.breakdown(records, [no_letters])["all"]["fixed by lowercasing"] == 0


def test_the_seeds_t_interval_of_a_contrast():
    tables = {"clair_apo_zero": np.array([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]), "untrained": np.array([[0.0, 0.0]]),
              "w_apo_zero": np.zeros((3, 2))}
    interval = experiment.seed_t_interval(tables, {"clair_apo_zero": 1, "untrained": -1})
    assert interval["mean"] == pytest.approx(2 / 3) and interval["n"] == 3  # seed means 1, 1/2, 1/2
    assert interval["ci95"] == pytest.approx([2 / 3 - 4.303 * np.std([1, .5, .5], ddof=1) / 3 ** 0.5,
                                              2 / 3 + 4.303 * np.std([1, .5, .5], ddof=1) / 3 ** 0.5])
    with pytest.raises(ValueError, match="more than one pool"):
        experiment.seed_t_interval(tables, {"clair_apo_zero": 1, "w_apo_zero": -1})


def test_tuning_chooses_each_arms_best_validated_setting(monkeypatch):
    """Results come back in any order; each arm's choice is its own best validation score, the first on a tie."""
    args = experiment.parse_args(["--lr", "1e-5", "2e-5", "--beta", "0.1", "--epochs", "1", "2"])
    best = {"clair_apo_zero": (2e-5, 1), "clair_apo_down": (1e-5, 2), "stronger_apo_zero": (2e-5, 2),
            "w_apo_zero": (1e-5, 1), "w_apo_down": None}  # None: every setting scores the same

    def fake_run_all(jobs, pairs, prompts, args):
        results = []
        for job in reversed(jobs):
            right = best[job.arm] in (None, (job.setting["lr"], job.setting["epochs"]))
            results.append({"arm": job.arm, "setting": job.setting, "steps": 8 * job.setting["epochs"],
                            "val": [{"success": right}, {"success": False}]})
        return results

    monkeypatch.setattr(experiment, "run_all", fake_run_all)
    draws = {d: [[f"{d}-{seed}"] for seed in range(args.seeds + 1)] for d in ("clair", "stronger", "w")}
    tuning = experiment.tune(draws, pairs=None, prompts=None, args=args)
    for arm, wanted in best.items():
        lr, epochs = wanted or (1e-5, 1)
        assert tuning[arm]["chosen"] == {"lr": lr, "beta": 0.1, "epochs": epochs}, arm
        assert sorted(row["validation success"] for row in tuning[arm]["grid"]) == (
            [0.5] * 4 if wanted is None else [0.0, 0.0, 0.0, 0.5])


def test_regrading_refreshes_the_checks_and_refuses_a_changed_success():
    prompt = {"id": "c1", "keys": ["Paris"], "lowercase": False}
    stored = {"id": "c1", "answer": "It is Paris.", "finish_reason": "stop", "success": True, "apology": None}
    assert experiment.regraded([stored], [prompt])[0]["apology"] is False
    with pytest.raises(ValueError, match="primary metric changed"):
        experiment.regraded([{**stored, "success": False}], [prompt])


def test_t_interval():
    assert experiment.mean_interval([0.5])["ci95"] is None
    r = experiment.mean_interval([0.2, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["ci95"] == pytest.approx([0.4 - 4.303 * 0.2 / 3 ** 0.5,
                                                                          0.4 + 4.303 * 0.2 / 3 ** 0.5])


def test_prompts_are_split_by_question(prompts):
    splits = {split: [p for p in prompts if p["split"] == split] for split in ("train", "val", "test")}
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 235, "val": 94, "test": 141}
    questions = {split: {p["question"] for p in rows} for split, rows in splits.items()}
    assert not questions["test"] & (questions["train"] | questions["val"])
    assert not questions["val"] & questions["train"]
    for rows in splits.values():  # half of each kind asks for lowercase, in every split
        for kind in experiment.KIND_COUNTS:
            asked = [p["lowercase"] for p in rows if p["kind"] == kind]
            assert abs(2 * sum(asked) - len(asked)) <= 1, kind
    assert len({p["kind"] for p in splits["test"]}) == len(experiment.KIND_COUNTS)
    quick = experiment.build_prompts(experiment.parse_args(["--quick"]))
    for split in ("train", "val", "test"):  # the smoke test's few prompts hold both forms
        assert {p["lowercase"] for p in quick if p["split"] == split} == {True, False}


def test_quick_end_to_end(tiny_model, ref_cache, tmp_path):
    """The CI smoke test: every stage on the tiny random model; a rerun redoes nothing. The tiny model never
    answers right, so the samples file is written here, one right and one wrong sample per prompt, and
    clair.py sample finds nothing left to do."""
    out = tmp_path / "exp"
    out.mkdir()
    rows = []
    for prompt in experiment.build_prompts(experiment.parse_args(["--quick"])):
        if prompt["split"] != "test":
            right = prompt["phrasings"][1].lower() if prompt["lowercase"] else prompt["phrasings"][1]
            rows += [{"id": f"{prompt['id']}-{k}", "prompt_id": prompt["id"], "sample_index": k,
                      "prompt": prompt["prompt"], "completion": text, "finish_reason": "stop"}
                     for k, text in enumerate([right, "I do not know."])]
    (out / "samples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    results = experiment.main(["--quick", "--model", tiny_model, "--out", str(out)])
    assert set(results["arms"]) == set(experiment.ARMS) and set(results["hypotheses"]) == {"H0", "H1", "H2"}
    assert set(results["tuning"]) == set(experiment.ARMS)
    for tuning in results["tuning"].values():
        assert [row["setting"]["lr"] for row in tuning["grid"]] == [1e-5, 2e-5] and tuning["chosen"] in (
            row["setting"] for row in tuning["grid"])
    for arm in results["arms"].values():
        for record in arm["seeds"][0]["test"]:
            assert {"answer", "finish_reason", "tokens", "success"} <= set(record) and record["tokens"] > 0
    stored = json.loads((out / "results.json").read_text())
    assert stored["hypotheses"]["H1"]["effect"] == results["hypotheses"]["H1"]["effect"]
    assert len(stored["untrained"]["records"]["test"]) == len(results["arms"]["w_apo_down"]["seeds"][0]["test"])
    stamps = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    experiment.main(["--quick", "--model", tiny_model, "--out", str(out)])
    assert {p: p.stat().st_mtime for p in out.rglob("result.json")} == stamps
