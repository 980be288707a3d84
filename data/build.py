"""Assemble the bundled demo datasets from the prompts, SmolLM2's answers and the reviser's output.

    python data/prompts.py                      # data/prompts.jsonl
    python clair.py sample --in data/prompts.jsonl --out data/smollm2_samples.jsonl \
        --temperature 0.7 --top-p 0.9 --max-tokens 160 --batch-size 25 --seed 0
    (the reviser writes data/revisions.jsonl: id, rational, revision, fresh; see data/README.md)
    python data/build.py

Writes, in TRL's preference format, clair_{train,eval}.jsonl (chosen = the minimal revision) and
stronger_{train,eval}.jsonl (chosen = the reviser's fresh answer), rejected = SmolLM2's own answer in
both; and prompts_{train,eval}.jsonl for evaluate.py --prompts. Every revision and fresh answer to a
checkable prompt must contain its computed answer key, or the build stops.
"""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from evaluate import matches  # noqa: E402
from preference_data import read_jsonl  # noqa: E402

REVISER = "claude (Anthropic), as the CLAIR reviser, by hand"


def read(name):
    return {row["id"]: row for _, row in read_jsonl(HERE / name)}


def main():
    prompts, samples, revisions = read("prompts.jsonl"), read("smollm2_samples.jsonl"), read("revisions.jsonl")
    missing = set(prompts) - set(samples) | set(prompts) - set(revisions)
    if missing:
        sys.exit(f"no sample or revision for {sorted(missing)[:5]} ...")
    outputs = {f"{kind}_{split}": [] for kind in ("clair", "stronger", "prompts") for split in ("train", "eval")}
    for pid, prompt in prompts.items():
        student, revision = samples[pid]["completion"], revisions[pid]
        if prompt.get("answer"):
            for field in ("revision", "fresh"):
                if not matches(revision[field], prompt["answer"]):
                    sys.exit(f"{pid}: the {field} misses the answer key {prompt['answer']!r}")
        split = prompt["split"]
        common = {"id": pid, "prompt": prompt["prompt"], "rejected": student, "reviser": REVISER}
        outputs[f"clair_{split}"].append({**common, "chosen": revision["revision"], "rational": revision["rational"]})
        outputs[f"stronger_{split}"].append({**common, "chosen": revision["fresh"]})
        outputs[f"prompts_{split}"].append({k: prompt[k] for k in ("id", "kind", "prompt", "answer") if k in prompt})
    for name, rows in outputs.items():
        with open(HERE / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        print(f"{name}.jsonl: {len(rows)} rows")


if __name__ == "__main__":
    main()
