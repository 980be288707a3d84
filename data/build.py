"""Assemble the bundled demo datasets from the prompts, SmolLM2's answers and the reviser's two passes.

    python data/prompts.py                      # data/prompts.jsonl
    OMP_NUM_THREADS=1 python clair.py sample --in data/prompts.jsonl --out data/smollm2_samples.jsonl \
        --temperature 0.7 --top-p 0.9 --max-tokens 512 --seed 0 --batch-size 25
    (the reviser writes data/revisions.jsonl: id, rational, revision, rewrite; and, blind to the answers,
     data/fresh.jsonl: id, fresh; see data/README.md)
    python data/build.py

Writes, in TRL's preference format, clair_{train,eval}.jsonl (chosen = the minimal revision, with its
`copy_ratio` and `rewrite` flag) and stronger_{train,eval}.jsonl (chosen = the fresh answer), rejected =
SmolLM2's own answer in both, over the same prompts; and prompts_{train,eval}.jsonl for evaluate.py
--prompts (every prompt of the split). A prompt gets no pair when SmolLM2's answer hit the token limit or
when the reviser left it unchanged (correct and clear: chosen would equal rejected). Every revision and fresh
answer to a checkable prompt must contain its computed answer key, or the build stops. Prints the counts
and distributions of the data card.
"""

import json
import statistics
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from clair import copy_ratio  # noqa: E402
from evaluate import matches  # noqa: E402
from preference_data import read_jsonl  # noqa: E402

REVISER = "claude (Anthropic), as the CLAIR reviser, by hand"


def read(name):
    return {row["id"]: row for _, row in read_jsonl(HERE / name)}


def quantiles(values):
    if len(values) < 2:
        return f"{len(values)} values: {values}"
    q = statistics.quantiles(values, n=4)
    return f"median {q[1]:.3g} (quartiles {q[0]:.3g}-{q[2]:.3g}), min {min(values):.3g}"


def main():
    prompts, samples = read("prompts.jsonl"), read("smollm2_samples.jsonl")
    revisions, fresh = read("revisions.jsonl"), read("fresh.jsonl")
    if missing := sorted(set(prompts) - set(samples)):
        sys.exit(f"no sample for {missing[:5]} ...")
    outputs = {f"{kind}_{split}": [] for kind in ("clair", "stronger", "prompts") for split in ("train", "eval")}
    dropped = Counter()
    for pid, prompt in prompts.items():
        split = prompt["split"]
        outputs[f"prompts_{split}"].append({k: prompt[k] for k in ("id", "kind", "prompt", "answer") if k in prompt})
        sample = samples[pid]
        if sample["finish_reason"] != "stop":
            dropped["answer hit the token limit"] += 1
            continue
        if pid not in revisions or pid not in fresh:
            sys.exit(f"{pid}: no revision or no fresh answer")
        student, revision, answer = sample["completion"], revisions[pid], fresh[pid]["fresh"]
        if prompt.get("answer"):
            for name, text in (("revision", revision["revision"]), ("fresh answer", answer)):
                if not matches(text, prompt["answer"]):
                    sys.exit(f"{pid}: the {name} misses the answer key {prompt['answer']!r}")
        if revision["revision"] == student:
            dropped["correct and clear: no revision"] += 1
            continue
        common = {"id": pid, "kind": prompt["kind"], "prompt": prompt["prompt"], "rejected": student,
                  "reviser": REVISER}
        outputs[f"clair_{split}"].append({**common, "chosen": revision["revision"], "rational": revision["rational"],
                                          "copy_ratio": round(copy_ratio(revision["revision"], student), 3),
                                          "rewrite": revision["rewrite"]})
        outputs[f"stronger_{split}"].append({**common, "chosen": answer})
    for name, rows in outputs.items():
        with open(HERE / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{name}.jsonl: {len(rows)} rows")
    print("prompts without a pair:", dict(dropped))
    clair = outputs["clair_train"] + outputs["clair_eval"]
    stronger = outputs["stronger_train"] + outputs["stronger_eval"]
    minimal = [row["copy_ratio"] for row in clair if not row["rewrite"]]
    print(f"copy ratio, {len(minimal)} minimal revisions: {quantiles(minimal)}")
    print(f"copy ratio, {len(clair) - len(minimal)} flagged rewrites: "
          f"{quantiles([row['copy_ratio'] for row in clair if row['rewrite']])}")
    print(f"copy ratio, {len(stronger)} fresh answers: {quantiles([copy_ratio(r['chosen'], r['rejected']) for r in stronger])}")
    for name, rows in (("rejected (SmolLM2)", clair), ("CLAIR chosen", clair), ("Stronger chosen", stronger)):
        field = "rejected" if name.startswith("rejected") else "chosen"
        words = [len(row[field].split()) for row in rows]
        print(f"words, {name}: {quantiles(words)}, mean {statistics.mean(words):.0f}")


if __name__ == "__main__":
    main()
