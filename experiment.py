"""A controlled, programmatically checked version of the paper's comparison, small enough for a CPU.

    python experiment.py                                  # the full experiment, 1 h 23 min on 2 CPU cores
    python experiment.py --quick --model PATH             # a smoke test of every stage, seconds
    python experiment.py --out runs/experiment            # rerun: finished stages and runs are skipped

The task is following verifiable instructions, IFEval-style: a base question from data/prompts.jsonl plus one
to three constraints, each checked by code, each fixable by a minimal edit computed by code.

- Constraints: all lowercase; no commas; end with an exact marker of symbols ("~~~"; the test prompts use
  markers never seen in training), every non-empty combination. A checker and a minimal reviser each. They
  are chosen so that the Levenshtein-smallest fix is also the meaningful one. IFEval's "end with the exact
  phrase ..." fails that: the smallest edit writes the phrase over the answer's last words ("Paris is
  lovely." -> "Paris that is all."), so the markers are symbols answers do not otherwise contain, and
  appending is smallest. "At most N words" (smallest: glue words by deleting spaces), "JSON with key
  'answer'" ("The answer is 4" -> '{"answer":" is 4"}') and "include a keyword" (change one letter of a
  similar word) are left out for the same reason: the reviser would teach something other than the constraint.
- Rejected: SmolLM2's own sample for the constrained prompt (`clair.py sample`, temperature 0.7, top-p 0.9,
  --sample-tokens), kept where it breaks a constraint.
- CLAIR chosen: `revise(rejected)`, the exact smallest Levenshtein edit that satisfies every constraint
  (edit distance to a regular language, Wagner 1974): only what is wrong changes.
- Stronger-Preferred chosen: `revise(fresh)`, where `fresh` is the fixed answer per base question in
  data/fresh.jsonl (written once, as the bundled data's Stronger-Preferred answer, from the prompt alone:
  data/README.md), with the constraints applied. It never sees this experiment's samples
  for the constrained prompts; it is right and fluent, but shares little text with the rejected side. SmolLM2's own greedy answer was not used:
  it would be neither stronger nor independent of the student.
- Arms: CLAIR x {DPO, APO-zero, APO-down}, Stronger Preferred x {APO-zero, DPO}, each a `train.main` run with
  the same pairs count, prompts, steps, lr and beta. Seed s draws the same --pairs training prompts for every
  arm (from the pool whose sample broke a constraint) and sets train.py's data order.
- Tuning: lr on a grid (--lrs), seed 0, every arm, scored by the mean constraint satisfaction over arms on the
  validation questions (held out from the training pool, never the test questions); one lr for all arms.
  Steps are fixed by the budget (--epochs over --pairs). The seed-0 runs of the chosen lr are the main runs'.
- Metrics: constraint satisfaction on test prompts built from held-out base questions, greedy decoding (the
  untrained model too), also counting only answers that are not degenerate (the marker repeated meets every
  constraint: `degenerate`); answer lengths; Figure-4 held-out log-likelihoods from train.py's eval metrics; means
  with 95% t-intervals over seeds.
- Resumable: every stage writes its file last; a run with a result.json is not rerun; reference log-probs
  come from train.py's cache. Each run's checkpoint is deleted once its answers are written (disk).
"""

import argparse
import json
import random
import shutil
import sys
from collections import Counter
from itertools import combinations
from pathlib import Path

import numpy as np
import torch

import clair
import evaluate
import train
from language_model import DEFAULT_MODEL, default_dtype, generate, load_model
from preference_data import read_jsonl

HERE = Path(__file__).resolve().parent
ARMS = {"clair_dpo": ("clair", "dpo"), "clair_apo_zero": ("clair", "apo_zero"), "clair_apo_down": ("clair", "apo_down"),
        "stronger_apo_zero": ("stronger", "apo_zero"), "stronger_dpo": ("stronger", "dpo")}

# ----------------------------------------------------------------------------- constraints and their checkers

# End markers are symbols that answers do not otherwise contain, lowercase and comma-free, so that every
# combination can be met and the smallest edit that adds one is to append it (see the module docstring).
TRAIN_MARKERS = ["~~~", "###", "<<>>", "+++", "***", "=="]
TEST_MARKERS = ["^^^", "@@", "<~>"]  # never seen in training
INSTRUCTIONS = {"lowercase": "Your entire answer must be in lowercase letters; no capital letters at all.",
                "no_commas": "Do not use any commas in your answer.",
                "end_marker": "End your answer with the exact symbols {} and nothing after them."}


def allowed(char, constraints):
    """May `char` appear anywhere in an answer under `constraints`?"""
    return not ("lowercase" in constraints and char != char.lower()) and not ("no_commas" in constraints and char == ",")


def broken(text, constraints):
    """Names of the constraints `text` breaks; `constraints` maps a name to its argument (the marker)."""
    return ([name for name in ("lowercase", "no_commas") if name in constraints
             and not all(allowed(c, {name: True}) for c in text)]
            + (["end_marker"] if "end_marker" in constraints and not text.endswith(constraints["end_marker"]) else []))


def degenerate(text, constraints):
    """A trivial answer: with its end marker removed, fewer than 3 letters or digits, or one character making
    up over half of it ("^^^^^^…", "1000000…"). Repeated phrases are not caught."""
    body = text.replace(constraints.get("end_marker", ""), "").strip()
    return sum(c.isalnum() for c in body) < 3 or max(Counter(body).values()) > len(body) / 2


def substantive(answer, constraints):
    """Does a stored answer ({"answer", "broken"}) satisfy every constraint without being degenerate?"""
    return not answer["broken"] and not degenerate(answer["answer"], constraints)


def substantive_satisfaction(answers, prompts):
    """The share of answers that satisfy every constraint and are not degenerate."""
    constraints = {p["id"]: p["constraints"] for p in prompts}
    return float(np.mean([substantive(a, constraints[a["id"]]) for a in answers]))


def instruction(question, constraints):
    return " ".join([question, "Answer briefly."] + [INSTRUCTIONS[name].format(arg) for name, arg in constraints.items()])


# ----------------------------------------------------------------------------- the minimal reviser

EDIT = 1_000_000  # the cost of one edit in revise(); an odd edit adds 1


def revise(text, constraints):
    """The smallest Levenshtein edit of `text` that satisfies every constraint.

    Answers that satisfy the constraints form a regular language, and the edit distance from a string to a
    regular language is a dynamic program over (characters read, automaton state) (Wagner 1974). States: FREE
    (any allowed characters so far), then MARKER + k (the marker's first k characters written, entered from
    FREE at no cost). Moves: keep a character (cost 0), substitute, delete or insert one (1 each). Only
    representative characters need trying: the character's own fix (its lowercase) or the marker's next
    character. Among the smallest edits it takes the one with fewest odd edits (a substitution other than the
    fix; a deletion of a character that could be kept or fixed): costs are edits * EDIT + odd edits. So
    "Paris." becomes "paris." rather than "aris.", and a marker is appended rather than written over the end.
    """
    marker = constraints.get("end_marker", "")
    if not all(allowed(c, constraints) for c in marker):
        raise ValueError(f"the marker {marker!r} breaks the other constraints")
    free, states = 0, len(marker) + 2 if "end_marker" in constraints else 1  # MARKER + k is state 1 + k

    def step(state, char):
        """The next state after writing `char`, or None when it may not be written there."""
        if state == free:
            return free if allowed(char, constraints) else None
        return state + 1 if state < states - 1 and char == marker[state - 1] else None

    inf = float("inf")
    cost = [[inf] * states for _ in range(len(text) + 1)]
    back = [[None] * states for _ in range(len(text) + 1)]  # (previous column, previous state, written text)

    def relax(j, state, value, origin):
        if value < cost[j][state]:
            cost[j][state], back[j][state] = value, origin

    def close(j):
        """Entering the marker and inserting its characters within column j: states only move forward."""
        if states > 1:
            relax(j, 1, cost[j][free], (j, free, ""))
        for state in range(1, states - 1):
            relax(j, state + 1, cost[j][state] + EDIT, (j, state, marker[state - 1]))

    cost[0][free] = 0
    close(0)
    for j, char in enumerate(text):
        fix = char.lower() if len(char.lower()) == 1 else None
        for state in range(states):
            if cost[j][state] == inf:
                continue
            options = [(char, 0), (fix, EDIT)] + ([(marker[state - 1], EDIT + 1)] if 0 < state < states - 1 else [])
            for written, extra in options:
                if written is not None and (nxt := step(state, written)) is not None:
                    relax(j + 1, nxt, cost[j][state] + (extra if written != char else 0), (j, state, written))
            odd = fix is not None and allowed(fix, constraints)  # deleting what could be kept or fixed
            relax(j + 1, state, cost[j][state] + EDIT + odd, (j, state, ""))
        close(j + 1)
    state, j, pieces = states - 1, len(text), []
    while back[j][state] is not None:
        j, state, written = back[j][state]
        pieces.append(written)
    return "".join(reversed(pieces))


# ----------------------------------------------------------------------------- prompts and pairs

def constraint_sets(rng, markers):
    """Every non-empty combination of the three constraints, in turn; each end marker drawn from `markers`."""
    names = ["lowercase", "no_commas", "end_marker"]
    combos = [c for k in (1, 2, 3) for c in combinations(names, k)]
    while True:
        for combo in rng.sample(combos, len(combos)):
            yield {name: rng.choice(markers) if name == "end_marker" else True for name in combo}


def build_prompts(args):
    """Constrained prompts: train (the pool the pairs come from), val (tuning) and test (held-out questions)."""
    fresh = {row["id"]: row["fresh"] for _, row in read_jsonl(HERE / "data" / "fresh.jsonl")}
    base = [row for _, row in read_jsonl(HERE / "data" / "prompts.jsonl")]
    rng = random.Random(2024)
    pool = rng.sample([r for r in base if r["split"] == "train"], args.train_questions + args.val_questions)
    splits = {"train": (pool[args.val_questions:], TRAIN_MARKERS), "val": (pool[:args.val_questions], TRAIN_MARKERS),
              "test": ([r for r in base if r["split"] == "eval"][:args.test_questions], TEST_MARKERS)}
    prompts = []
    for split, (questions, markers) in splits.items():
        for question, constraints in zip(questions, constraint_sets(rng, markers)):
            prompts.append({"id": f"{split}-{question['id']}", "split": split, "question": question["prompt"],
                            "constraints": constraints, "prompt": instruction(question["prompt"], constraints),
                            "fresh": fresh[question["id"]]})
    return prompts


def build_pairs(prompts, samples):
    """CLAIR and Stronger-Preferred pairs on the same prompts: those whose sample breaks a constraint."""
    pairs, counts = {"clair": [], "stronger": []}, {"sample already satisfies": 0, "empty sample": 0}
    for row in prompts:
        rejected = samples[row["id"]]
        if not rejected.strip():
            counts["empty sample"] += 1
        elif not broken(rejected, row["constraints"]):
            counts["sample already satisfies"] += 1
        else:
            for kind, chosen in (("clair", revise(rejected, row["constraints"])),
                                 ("stronger", revise(row["fresh"], row["constraints"]))):
                pairs[kind].append({"id": row["id"], "split": row["split"], "prompt": row["prompt"],
                                    "chosen": chosen, "rejected": rejected})
    return pairs, counts


def write_jsonl(path, rows):
    """Write to a temporary file, then rename: a file that exists is complete."""
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    tmp.replace(path)
    return str(path)


def write_json(path, value):
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- generation and satisfaction

def answer(model_path, prompts, args):
    """Greedy answers of a model to the prompts, and their satisfaction and length report."""
    tokenizer, model = load_model(model_path, "cuda" if torch.cuda.is_available() else "cpu")
    model.eval()
    batches = [prompts[start:start + args.gen_batch] for start in range(0, len(prompts), args.gen_batch)]
    texts = [a for batch in batches  # generate returns (answers, finish reasons)
             for a in generate(model, tokenizer, [p["prompt"] for p in batch], args.gen_tokens,
                               dtype=default_dtype(model.device))[0]]
    tokens = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    failures = [broken(t, p["constraints"]) for t, p in zip(texts, prompts)]
    per_constraint = {name: float(np.mean([name not in f for f, p in zip(failures, prompts) if name in p["constraints"]]))
                      for name in INSTRUCTIONS if any(name in p["constraints"] for p in prompts)}
    return {"satisfaction": float(np.mean([not f for f in failures])), "per_constraint": per_constraint,
            "answer_tokens": {"mean": float(np.mean(tokens)), "median": float(np.median(tokens)),
                              "p90": float(np.percentile(tokens, 90)), "max": int(max(tokens)),
                              f"at the {args.gen_tokens}-token limit": float(np.mean([n >= args.gen_tokens for n in tokens]))},
            "answers": [{"id": p["id"], "answer": t, "tokens": n, "broken": f}
                        for p, t, n, f in zip(prompts, texts, tokens, failures)]}


def evaluate_model(model_path, prompts, args, splits=("val", "test")):
    return {split: answer(model_path, [p for p in prompts if p["split"] == split], args) for split in splits}


# ----------------------------------------------------------------------------- runs

def run(arm, lr, seed, pairs, args, prompts):
    """One train.main run of an arm, then its answers to the test prompts (and, at seed 0, the tuning runs, to
    the validation prompts): result.json."""
    folder = Path(args.out) / "runs" / arm / f"lr{lr:g}-seed{seed}"
    result_path = folder / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    kind, loss = ARMS[arm]
    folder.mkdir(parents=True, exist_ok=True)
    train_rows = [p for p in pairs[kind] if p["split"] == "train"]
    chosen_ids = sorted(random.Random(seed).sample(sorted(p["id"] for p in train_rows), args.pairs))
    data = write_jsonl(folder / "pairs.jsonl", [p for p in train_rows if p["id"] in chosen_ids])
    train.main(["--model", args.model, "--data", data, "--eval-data", str(Path(args.out) / f"{kind}_test.jsonl"),
                "--loss", loss, "--lr", str(lr), "--beta", str(args.beta), "--epochs", str(args.epochs),
                "--max-steps", "0", "--batch-size", str(args.batch_size), "--grad-accum", str(args.grad_accum),
                "--eval-every", str(args.eval_every), "--max-length", str(args.max_length),
                "--max-prompt-length", str(args.max_prompt_length),
                "--seed", str(seed), "--out", str(folder)])
    result = {"arm": arm, "lr": lr, "seed": seed, "pair_ids": chosen_ids,
              **evaluate_model(str(folder / "final"), prompts, args, ("val", "test") if seed == 0 else ("test",))}
    write_json(result_path, result)
    shutil.rmtree(folder / "final")
    return result


# Two-sided 97.5% quantiles of Student's t, by degrees of freedom; 1.96 beyond 30.
T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def mean_interval(values):
    """Mean and 95% t-interval over seeds: mean +- t * s / sqrt(n); no interval from one seed."""
    values = np.asarray(values, dtype=float)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "ci95": None, "n": len(values)}
    t = T975[len(values) - 2] if len(values) <= 31 else 1.96
    half = t * values.std(ddof=1) / np.sqrt(len(values))
    return {"mean": mean, "ci95": [mean - half, mean + half], "n": len(values)}


# ----------------------------------------------------------------------------- the report

def summary(results):
    """The results as markdown tables: every arm beside the untrained model, then CLAIR minus Stronger."""
    def cell(stat, digits=2):
        interval = " [{:.{d}f}, {:.{d}f}]".format(*stat["ci95"], d=digits) if stat["ci95"] else ""
        return f"{stat['mean']:.{digits}f}{interval}"

    base = results["baseline"]["test"]
    names = list(base["per_constraint"])
    lines = [f"lr {results['tuning']['chosen_lr']:g} (tuned on validation); test prompts, greedy; mean [95% interval] "
             f"over {results['config']['seeds']} seeds",
             "",
             "| arm | satisfaction | satisfied, not degenerate | " + " | ".join(names)
             + " | answer tokens | Δ held-out log π chosen | rejected |",
             "|---|---|---|" + "---|" * len(names) + "---|---|---|",
             f"| untrained | {base['satisfaction']:.2f} | {base['substantive_satisfaction']:.2f} | "
             + " | ".join(f"{base['per_constraint'][n]:.2f}" for n in names) + f" | {base['answer_tokens']['mean']:.0f} |  |  |"]
    for arm, r in results["arms"].items():
        lines.append(f"| {arm} | {cell(r['test_satisfaction'])} | {cell(r['test_substantive_satisfaction'])} | "
                     + " | ".join(cell(r["test_per_constraint"][n]) for n in names)
                     + f" | {cell(r['test_answer_tokens'], 0)} | {cell(r['heldout_logps_change']['chosen'], 1)}"
                     + f" | {cell(r['heldout_logps_change']['rejected'], 1)} |")
    differences = results["clair_minus_stronger"]
    lines += ["", "| loss | CLAIR minus Stronger Preferred: " + " | ".join(differences) + " |",
              "|---|" + "---|" * len(differences)]
    losses = next(iter(differences.values()))
    lines += [f"| {loss} | " + " | ".join(cell(d[loss]) for d in differences.values()) + " |" for loss in losses]
    return lines


# ----------------------------------------------------------------------------- the plot

def plot(results, out, run_folders):
    """Test satisfaction per arm with 95% intervals, and the change of held-out log-likelihoods (Figure 4)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot: pip install matplotlib")
        return
    fig, (bars, lines) = plt.subplots(1, 2, figsize=(13, 4.5))
    arms = list(results["arms"])

    def mean_and_errors(key):
        stats = [results["arms"][a][key] for a in arms]
        return ([st["mean"] for st in stats],
                np.array([[st["mean"] - low, high - st["mean"]]
                          for st in stats for low, high in [st["ci95"] or (st["mean"], st["mean"])]]).T)

    means, errors = mean_and_errors("test_satisfaction")
    bars.bar(range(len(arms)), means, yerr=errors, capsize=4, color=[f"C{n}" for n in range(len(arms))])
    means, errors = mean_and_errors("test_substantive_satisfaction")
    bars.errorbar(range(len(arms)), means, yerr=errors, fmt="D", color="black", capsize=3,
                  label="satisfied and not degenerate")
    bars.axhline(results["baseline"]["test"]["satisfaction"], color="black", linestyle=":", label="untrained")
    bars.set_xticks(range(len(arms)), arms, rotation=20, fontsize=8)
    bars.set_ylabel("test constraint satisfaction")
    bars.legend(fontsize=8)
    for n, arm in enumerate(arms):
        seeds = [evaluate.curves(folder)[1] for folder in run_folders[arm]]
        steps = seeds[0]["logps", "chosen"][0]
        for side, style in (("chosen", "-"), ("rejected", "--")):
            change = [np.subtract(s["logps", side][1], s["logps", side][1][0]) for s in seeds]
            lines.plot(steps, np.mean(change, axis=0), style, color=f"C{n}", marker="o", markersize=3,
                       label=f"{arm}: {side}")
    lines.set_xlabel("optimizer step")
    lines.set_title("held-out log π(y|x) minus its step-0 value, mean over seeds", fontsize=10)
    lines.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--out", default="runs/experiment")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test: seconds, meaningless numbers")
    p.add_argument("--train-questions", type=int, default=112, help="base questions of the training pool")
    p.add_argument("--val-questions", type=int, default=24, help="base questions for tuning lr")
    p.add_argument("--test-questions", type=int, default=48, help="held-out base questions (data/prompts.jsonl eval)")
    p.add_argument("--pairs", type=int, default=64, help="training pairs per run, the same prompts for every arm")
    p.add_argument("--eval-pairs", type=int, default=24, help="held-out pairs for the Figure-4 likelihoods")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--lrs", type=float, nargs="+", default=[5e-6, 2e-5], help="the tuning grid")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--grad-accum", type=int, default=4)
    p.add_argument("--eval-every", type=int, default=4)
    p.add_argument("--max-length", type=int, default=320, help="train.py's, prompt + completion tokens")
    p.add_argument("--max-prompt-length", type=int, default=192, help="train.py's")
    p.add_argument("--sample-tokens", type=int, default=96, help="length limit of the rejected samples")
    p.add_argument("--gen-tokens", type=int, default=96, help="length limit of the greedy test answers")
    p.add_argument("--gen-batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.quick:
        args.__dict__.update(train_questions=6, val_questions=2, test_questions=2, pairs=4, eval_pairs=2, seeds=1,
                             lrs=args.lrs[:1], batch_size=2, grad_accum=1, eval_every=1, sample_tokens=12,
                             gen_tokens=12, gen_batch=4, max_length=640, max_prompt_length=600)
    return args


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # 1. Prompts, the student's own samples (the rejected side), and both kinds of pairs.
    prompts = build_prompts(args)
    write_jsonl(out / "prompts.jsonl", prompts)
    sampling = ["--temperature", "0.7", "--top-p", "0.9", "--max-tokens", str(args.sample_tokens), "--seed", "0",
                "--batch-size", str(args.gen_batch), "--model", args.model]
    clair.main(["sample", "--in", str(out / "prompts.jsonl"), "--out", str(out / "samples.jsonl"), *sampling])
    samples = {row["id"]: row["completion"] for _, row in read_jsonl(out / "samples.jsonl")}
    pairs, counts = build_pairs(prompts, samples)
    for kind, rows in pairs.items():
        write_jsonl(out / f"{kind}_test.jsonl", [r for r in rows if r["split"] == "test"][:args.eval_pairs])
    pool = sum(p["split"] == "train" for p in pairs["clair"])
    if pool < args.pairs:
        sys.exit(f"error: only {pool} training prompts have a sample that breaks a constraint; lower --pairs")
    results = {"config": vars(args), "sampling": " ".join(sampling), "prompts": counts | {"training pool": pool},
               "contrastiveness": {kind: clair.contrastiveness(write_jsonl(out / f"{kind}_train.jsonl", [
                   r for r in rows if r["split"] == "train"])) for kind, rows in pairs.items()}}

    # 2. The untrained model, then lr tuned on the validation questions (seed 0, mean over arms).
    baseline = out / "baseline.json"
    if not baseline.exists():
        write_json(baseline, evaluate_model(args.model, prompts, args))
    results["baseline"] = json.loads(baseline.read_text())
    tuning = {lr: {arm: run(arm, lr, 0, pairs, args, prompts)["val"]["satisfaction"] for arm in ARMS}
              for lr in args.lrs}
    lr = max(args.lrs, key=lambda lr: np.mean(list(tuning[lr].values())))
    results["tuning"] = {"criterion": "mean validation satisfaction over arms, seed 0", "chosen_lr": lr,
                         "grid": {f"{lr:g}": scores for lr, scores in tuning.items()}}

    # 3. Every arm with every seed at that lr; means and 95% intervals over seeds.
    results["arms"], folders = {}, {}
    for arm in ARMS:
        seeds = [run(arm, lr, seed, pairs, args, prompts) for seed in range(args.seeds)]
        for result in seeds:  # computed from the stored answers, so that earlier runs' results serve too
            result["test"]["substantive_satisfaction"] = substantive_satisfaction(result["test"]["answers"], prompts)
        folders[arm] = [out / "runs" / arm / f"lr{lr:g}-seed{seed}" for seed in range(args.seeds)]
        logps = [evaluate.curves(f)[1] for f in folders[arm]]
        results["arms"][arm] = {
            "test_satisfaction": mean_interval([s["test"]["satisfaction"] for s in seeds]),
            "test_substantive_satisfaction": mean_interval([s["test"]["substantive_satisfaction"] for s in seeds]),
            "test_per_constraint": {name: mean_interval([s["test"]["per_constraint"][name] for s in seeds])
                                    for name in seeds[0]["test"]["per_constraint"]},
            "test_answer_tokens": mean_interval([s["test"]["answer_tokens"]["mean"] for s in seeds]),
            "heldout_logps_change": {side: mean_interval([c["logps", side][1][-1] - c["logps", side][1][0] for c in logps])
                                     for side in ("chosen", "rejected")},
            "seeds": seeds}
    # The paper's comparison: the same loss on CLAIR against Stronger-Preferred pairs. Over seeds, paired by seed
    # (a seed draws the same training prompts for both); and over test prompts, each prompt's mean over seeds,
    # which also counts the chance of which prompts were drawn for testing (the seeds share them).
    constraints = {p["id"]: p["constraints"] for p in prompts}
    scores = {"satisfaction": lambda a: not a["broken"],
              "satisfied, not degenerate": lambda a: substantive(a, constraints[a["id"]])}

    def per_answer(arm, score):  # [seed, test prompt]
        return np.array([[score(a) for a in s["test"]["answers"]] for s in results["arms"][arm]["seeds"]], dtype=float)

    results["clair_minus_stronger"] = {
        f"{name}, over {over}": {
            loss: mean_interval((per_answer(f"clair_{loss}", score) - per_answer(f"stronger_{loss}", score)).mean(axis))
            for loss in ("dpo", "apo_zero")}
        for name, score in scores.items() for over, axis in (("seeds", 1), ("test prompts", 0))}
    results["baseline"]["test"]["substantive_satisfaction"] = substantive_satisfaction(
        results["baseline"]["test"]["answers"], prompts)
    write_json(out / "results.json", results)
    table = "\n".join(summary(results))
    (out / "table.md").write_text(table + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'table.md'}\n\n{table}")
    plot(results, out / "experiment.png", folders)
    return results


if __name__ == "__main__":
    main()
