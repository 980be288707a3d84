#!/usr/bin/env bash
# The miniature reproduction (docs/evaluation.md): SmolLM2-135M-Instruct trained for one epoch on the bundled
# data with DPO, APO-zero and APO-down on CLAIR, and APO-zero on Stronger Preferred; same hyperparameters
# and seed. Then Table 1, the Figure-4 plot, held-out rewards and likelihoods, and generations.
# 31 minutes on 2 CPU cores in bf16 (docs/benchmarks.md, Timings); unmeasured on a GPU.
set -euo pipefail
cd "$(dirname "$0")"
out=runs/repro
common=(--epochs 1 --batch-size 2 --grad-accum 4 --lr 5e-6 --beta 0.1 --eval-every 5 --seed 0)

python clair.py stats data/clair_train.jsonl data/stronger_train.jsonl | tee docs/table1.md
for loss in dpo apo_zero apo_down; do
    python train.py --loss $loss --data data/clair_train.jsonl --eval-data data/clair_eval.jsonl \
        --out $out/${loss}_clair "${common[@]}"
done
python train.py --loss apo_zero --data data/stronger_train.jsonl --eval-data data/stronger_eval.jsonl \
    --out $out/apo_zero_stronger "${common[@]}"

python evaluate.py plot $out/dpo_clair $out/apo_zero_clair $out/apo_down_clair $out/apo_zero_stronger \
    --out docs/figure4.png
models=($out/dpo_clair/final $out/apo_zero_clair/final $out/apo_down_clair/final $out/apo_zero_stronger/final)
# rewards and likelihoods do not depend on the loss; eval/loss is reported under APO-zero for every run
python evaluate.py --model "${models[@]}" --data data/clair_eval.jsonl --loss apo_zero --out docs/eval_clair_pairs.json
python evaluate.py --model "${models[@]}" --prompts data/prompts_eval.jsonl --max-new-tokens 128 \
    --batch-size 25 --out docs/eval_generation.json
