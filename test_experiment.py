"""experiment.py: the constraint checkers, the minimal reviser (exactly minimal, by exhaustive search on short
strings), and the whole --quick pipeline on the tiny random model."""

import itertools
import json
import random

import pytest

import experiment
from clair import levenshtein
from experiment import broken, revise

ALL = {"lowercase": True, "no_commas": True, "end_marker": "a~"}
COMBOS = [dict(c) for k in (1, 2, 3) for c in itertools.combinations(ALL.items(), k)]


def test_checkers():
    assert broken("hello world", {"lowercase": True}) == []
    assert broken("Hello world", {"lowercase": True}) == ["lowercase"]
    assert broken("a, b", {"no_commas": True}) == ["no_commas"]
    assert broken("ok ~~~", {"end_marker": "~~~"}) == [] and broken("ok~~~", {"end_marker": "~~~"}) == []
    assert broken("ok ~~~ ", {"end_marker": "~~~"}) == ["end_marker"]  # nothing after it
    assert broken("Yes, ~~", {"lowercase": True, "no_commas": True, "end_marker": "~~~"}) == [
        "lowercase", "no_commas", "end_marker"]


def test_revise_changes_only_what_is_wrong():
    assert revise("Paris is the capital, of course.", {"lowercase": True}) == "paris is the capital, of course."
    assert revise("Paris, France.", {"no_commas": True}) == "Paris France."
    assert revise("Paris is lovely.", {"end_marker": "~~~"}) == "Paris is lovely.~~~"  # appended, not over the end
    assert revise("Paris ~~ is lovely ~~", {"end_marker": "~~~"}) == "Paris ~~ is lovely ~~~"
    text = "Photosynthesis, in short, makes sugar from light."
    assert revise(text, {"lowercase": True, "no_commas": True, "end_marker": "###"}) == (
        "photosynthesis in short makes sugar from light.###")
    for combo in COMBOS:  # an answer that already complies is left alone
        good = revise("Hi, there", combo)
        assert revise(good, combo) == good
    with pytest.raises(ValueError):
        revise("x", {"lowercase": True, "end_marker": "END"})


def edit_ball(text, radius, alphabet):
    """Every string within `radius` single-character edits of `text`, over `alphabet`."""
    ball = frontier = {text}
    for _ in range(radius):
        frontier = {s[:i] + c + s[i + k:] for s in frontier for i in range(len(s) + 1)
                    for k, c in [(0, c) for c in alphabet] + [(1, c) for c in alphabet + [""]] if i + k <= len(s)}
        ball = ball | frontier
    return ball


def test_revise_is_exactly_minimal():
    """No string closer than the revision satisfies the constraints, by exhaustive search. The search alphabet
    (the text's and marker's characters and a space) loses nothing: any other character of a satisfying string
    lies outside the marker and matches nothing in the text, so a space in its place is no farther and
    satisfies too."""
    rng = random.Random(0)
    checked = 0
    for _ in range(150):
        text = "".join(rng.choice("aAb,~ ") for _ in range(rng.randint(0, 6)))
        combo = rng.choice(COMBOS)
        revised = revise(text, combo)
        assert broken(revised, combo) == []
        distance = levenshtein(text, revised)
        if distance == 0:
            assert revised == text
        elif distance <= 3:
            alphabet = sorted(set(text) | set(combo.get("end_marker", "")) | {" "})
            assert not [s for s in edit_ball(text, distance - 1, alphabet) if not broken(s, combo)], (text, combo)
            checked += 1
    assert checked > 60


def test_revise_beats_constructed_edits():
    """On answers like SmolLM2's, no hand-made satisfying edit is smaller than the reviser's."""
    constraints = {"lowercase": True, "no_commas": True, "end_marker": "<~>"}
    answers = ["The capital of France is Paris, a city known for art, food, and history. Have a nice day!",
               "Sure! Here are three tips: sleep early, avoid screens, and keep a routine. <~",
               "Water evaporates, forms clouds, and falls as rain.\n\n~> Have a great day."]
    marker = constraints["end_marker"]
    for text in answers:
        revised = revise(text, constraints)
        assert broken(revised, constraints) == []
        fixed = text.lower().replace(",", "")
        alternatives = [fixed + marker, fixed + " " + marker, fixed[:-1] + marker,
                        text.lower().replace(",", " ") + marker, fixed.replace("~", "") + marker,
                        *(fixed[:k] + marker for k in range(len(fixed)))]
        for other in alternatives:
            assert broken(other, constraints) == []
            assert levenshtein(text, revised) <= levenshtein(text, other)


def test_t_interval():
    assert experiment.mean_interval([0.5])["ci95"] is None
    r = experiment.mean_interval([0.2, 0.4, 0.6])
    assert r["mean"] == pytest.approx(0.4) and r["ci95"] == pytest.approx([0.4 - 4.303 * 0.2 / 3 ** 0.5,
                                                                          0.4 + 4.303 * 0.2 / 3 ** 0.5])


def test_prompts_keep_test_questions_out_of_training():
    args = experiment.parse_args(["--quick"])
    prompts = experiment.build_prompts(args)
    questions = {split: {p["question"] for p in prompts if p["split"] == split} for split in ("train", "val", "test")}
    assert not questions["test"] & (questions["train"] | questions["val"]) and not questions["val"] & questions["train"]
    assert all(p["constraints"].get("end_marker") in (None, *experiment.TEST_MARKERS)
               for p in prompts if p["split"] == "test")


def test_quick_end_to_end(tiny_model, ref_cache, tmp_path):
    """The CI smoke test: every stage on the tiny random model; a rerun redoes nothing."""
    out = tmp_path / "exp"
    results = experiment.main(["--quick", "--model", tiny_model, "--out", str(out)])
    assert set(results["arms"]) == set(experiment.ARMS)
    for arm in results["arms"].values():
        seed = arm["seeds"][0]
        assert 0 <= seed["test"]["satisfaction"] <= 1 and seed["test"]["answers"]
    assert json.loads((out / "results.json").read_text())["tuning"]["chosen_lr"] == results["tuning"]["chosen_lr"]
    pairs = [json.loads(line) for line in (out / "clair_train.jsonl").read_text().splitlines()]
    assert all(not broken(p["chosen"], c) for p in pairs for c in [
        next(q["constraints"] for q in map(json.loads, (out / "prompts.jsonl").read_text().splitlines())
             if q["id"] == p["id"])])
    stamps = {p: p.stat().st_mtime for p in out.rglob("result.json")}
    experiment.main(["--quick", "--model", tiny_model, "--out", str(out)])
    assert {p: p.stat().st_mtime for p in out.rglob("result.json")} == stamps


def test_degenerate_answers_are_flagged():
    marker = {"end_marker": "^^^"}
    assert experiment.degenerate("^" * 96, marker) and experiment.degenerate("<~>", {"end_marker": "<~>"})
    assert experiment.degenerate("1" + "0" * 60, {}) and experiment.degenerate("ok ^^^", marker)
    assert not experiment.degenerate("64 + 41 = 105^^^", marker)
    assert not experiment.degenerate("the capital of germany is berlin.", {"lowercase": True})
    prompts = [{"id": "a", "constraints": marker}, {"id": "b", "constraints": marker}]
    answers = [{"id": "a", "answer": "^" * 30, "broken": []}, {"id": "b", "answer": "berlin^^^", "broken": []}]
    assert experiment.substantive_satisfaction(answers, prompts) == 0.5
