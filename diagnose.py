"""Which loss for this data? The diagnosis before training: chosen answers against the model's own, and the pairs
whose chosen likelihood training is likely to pull down.

    python diagnose.py --model SmolLM2-135M-Instruct --data pairs.jsonl --out report.json   # fresh answers sampled here
    python diagnose.py --model M --data pairs.jsonl --samples samples.jsonl                 # from `clair.py sample`
    python diagnose.py --model M --data pairs.jsonl --base-url URL --judge-url URL --judge-model NAME
    python diagnose.py known --prompts data/prompts.jsonl --samples data/smollm2_samples.jsonl --out-dir runs/known
    python diagnose.py displacement runs/ches_clair runs/ches_stronger --out docs/diagnose_ches.png

This file owns the diagnosis and its two checks. Per pair: a fresh answer of the model (never the rejected
side, which in CLAIR data is the model's earlier sample) against the chosen answer, by its answer key where the
row has one (evaluate.matches) and otherwise by evaluate.py's pairwise judge in both orders; the CHES score; the
lengths, the copy ratio (clair.copy_ratio) and the reference log-probs (train.py's cache, or TRL's
`ref_chosen_logps` / `ref_rejected_logps` columns). Over the pairs: chosen's share of the decided prompts, its
95% Wilson interval, and the anchor it points to:

    APO-zero   when the interval lies above 1/2: chosen beats what the model writes, so raise its likelihood;
    APO-down   when it lies below 1/2: the model already writes better, so push both down, the rejected more;
    unclear    otherwise.

CHES (Razin et al. 2024, "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization",
arXiv 2410.08847, Definition 2). With h_{x,y<k} the hidden state from which the model predicts token k of y (the
input of its LM head) and S(y) = sum_{k=1..|y|} h_{x,y<k}:

    CHES(x, y_w, y_l) = <S(y_w), S(y_l)> - ||S(y_w)||^2
    length-normalised = <S(y_w)/|y_w|, S(y_l)/|y_l|> - ||S(y_w)/|y_w|||^2

The higher it is, the more a preference step on the pair is expected to lower log pi(y_w) (likelihood
displacement). `known` writes two sets whose right recommendation is known by code; `displacement` sets each
pair's CHES against its chosen log-prob's change in a train.py run, with Spearman's rank correlation.
"""

import argparse
import functools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import preference_data
from clair import ChatClient, FatalRequestError, HelpFormatter, RetriesExhausted, copy_ratio, prompt_text, sample_seed
from clair_apo import reference_cache
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.checkpoints import read_state
from clair_apo.distributed import unwrap
from clair_apo.generation import Decoding, generate
from clair_apo.logprobs import measuring, model_inputs, pairs_logps
from clair_apo.models import (DEFAULT_MODEL, MAX_LENGTH, MAX_PROMPT_LENGTH, ModelError, default_device, default_dtype,
                              load_model, setting_error)
from evaluate import NUMBER_WORDS, judge_client, logprob_pass, matches, pairwise, read_prompts, training_value
from preference_data import BUNDLED_TRAIN, DataError, as_messages, read_jsonl

Z_95 = 1.959963984540054  # the standard normal's 97.5% quantile

MEANINGS = {
    "apo_zero": "APO-zero (--loss apo_zero): the chosen answers beat the model's own, so training should raise their "
                "likelihood and lower the rejected one's.",
    "apo_down": "APO-down (--loss apo_down): the model's own answers beat the chosen ones, so training should lower "
                "both likelihoods, the rejected one more, and learn only from their contrast.",
    "unclear": "unclear: the interval holds one half, so these prompts cannot tell whether the chosen answers beat the "
               "model's own; compare more prompts (--limit), or judge the unkeyed ones (--judge-url).",
    "withheld": "withheld: most judge replies had no verdict, so the judged prompts tell nothing; check --judge-model "
                "and the unparsed_judge_replies.",
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="the model to be trained: its answers, hidden states and "
                   "reference log-probs")
    p.add_argument("--data", required=True, help="preference pairs as train.py reads them: JSONL, .parquet or a Hub "
                   "dataset id; an `answer` field is a row's answer key")
    p.add_argument("--limit", type=int, help="diagnose the first N pairs only (default: all)")
    p.add_argument("--answers", help="answer keys for pairs of the same id: a prompts file (id, prompt, answer), as "
                   "evaluate.py --prompts reads; a pair's own `answer` comes first")
    fresh = p.add_mutually_exclusive_group()
    fresh.add_argument("--samples", help="the model's fresh answers, a `clair.py sample` file with the pairs' ids "
                       "(default: sampled here)")
    fresh.add_argument("--base-url", help="OpenAI-compatible base URL, ending in /v1, that serves the model's fresh "
                       "answers (default: sampled here)")
    p.add_argument("--served-model", help="the model's name on --base-url (default: --model)")
    p.add_argument("--temperature", type=float, default=0.7, help="for fresh answers; 0: greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling of the fresh answers")
    p.add_argument("--seed", type=int, default=1, help="each fresh answer's seed comes from it and the pair's id, as in "
                   "`clair.py sample`; that command's seed with the same settings would redraw the rejected sides of "
                   "data it sampled")
    p.add_argument("--max-new-tokens", type=int, default=512, help="a fresh answer's length limit")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of a judge LLM, for the pairs without an answer "
                   "key; checked once before any long work")
    p.add_argument("--judge-model", default="gpt-4-turbo", help="the judge's model name on that server")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the servers' key")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward; prompts per generate")
    p.add_argument("--max-length", type=int, default=MAX_LENGTH, help="as in train.py")
    p.add_argument("--max-prompt-length", type=int, default=MAX_PROMPT_LENGTH, help="as in train.py")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: bf16 on CUDA and on a CPU with native bf16, "
                   "else fp32")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto", help="as in train.py")
    p.add_argument("--top", type=int, default=5, help="pairs flagged in the table: the highest CHES scores")
    p.add_argument("--out", help="write the report, every per-pair value in it, here as JSON")
    args = p.parse_args(argv)
    args.dtype = args.dtype or default_dtype(default_device())[0]
    if why := setting_error(args.max_length, args.max_prompt_length, None, args.dtype):
        p.error(why)
    return args


# ----------------------------------------------------------------------------- statistics

def wilson_interval(wins, trials, z=Z_95):
    """The Wilson score interval of the share wins / trials (Wilson 1927): inside [0, 1], and right near 0 and 1
    where the normal approximation is not."""
    centre = (wins + z * z / 2) / (trials + z * z)
    half = z * math.sqrt(wins * (trials - wins) / trials + z * z / 4) / (trials + z * z)
    return [max(0.0, centre - half), min(1.0, centre + half)]


def recommend(interval):
    """APO-zero when the interval of chosen's share lies above one half, APO-down below, unclear otherwise."""
    low, high = interval
    return "apo_zero" if low > 0.5 else "apo_down" if high < 0.5 else "unclear"


def ranks(values):
    """Ranks from 1; tied values share the mean of the ranks they span."""
    _, group, sizes = np.unique(np.asarray(values, dtype=np.float64), return_inverse=True, return_counts=True)
    last = np.cumsum(sizes)  # the rank of the last value of each group
    return (last - (sizes - 1) / 2)[group]


def spearman(x, y):
    """Spearman's rank correlation and its 95% interval by Fisher's z with the standard error sqrt(1.06 / (n - 3))
    (Fieller, Hartley and Pearson 1957); no interval for fewer than 4 values."""
    rho = float(np.corrcoef(ranks(x), ranks(y))[0, 1])
    if len(x) < 4:
        return rho, None
    half = Z_95 * math.sqrt(1.06 / (len(x) - 3))
    z = math.atanh(max(-1 + 1e-12, min(1 - 1e-12, rho)))  # rho = +-1 has no finite z
    return rho, [math.tanh(z - half), math.tanh(z + half)]


# ----------------------------------------------------------------------------- CHES

def hidden_sums(model, pairs, how):
    """[len(pairs), 2, hidden] float64: for the chosen and the rejected side, S(y) = the sum over the completion's
    tokens of the hidden state that predicts each, as the LM head reads it; batches as `how` (a LogprobPass)."""
    head, sums, seen = unwrap(model).get_output_embeddings(), [], []
    with measuring(model, how.device, how.dtype):
        for start in range(0, len(pairs), how.batch_size):
            indices = list(range(start, min(start + how.batch_size, len(pairs))))
            batch = how.batching.collate(pairs, indices, how.device)
            rows, cols = batch["targets"]
            seen.clear()

            def head_input_at_targets(module, args):  # the head then computes logits at the targets alone
                seen.append(args[0][rows, cols].double())
                return (args[0][rows, cols][None], *args[1:])
            hook = head.register_forward_pre_hook(head_input_at_targets)
            try:
                model(**model_inputs(batch), use_cache=False)
            finally:
                hook.remove()
            summed = torch.zeros(batch["num_sequences"], seen[0].shape[-1], dtype=torch.float64, device=seen[0].device)
            summed.index_add_(0, batch["sequence_of_target"], seen[0])
            sums.append(summed.view(2, len(indices), -1).transpose(0, 1).cpu())
    return torch.cat(sums)


def ches_scores(chosen_sums, rejected_sums, chosen_tokens, rejected_tokens):
    """[pairs, 2]: CHES and its length-normalised variant from S(y_w), S(y_l) ([pairs, hidden]) and |y_w|, |y_l|."""
    ches = (chosen_sums * rejected_sums).sum(-1) - (chosen_sums * chosen_sums).sum(-1)
    chosen_mean = chosen_sums / chosen_tokens[:, None]
    rejected_mean = rejected_sums / rejected_tokens[:, None]
    normalised = (chosen_mean * rejected_mean).sum(-1) - (chosen_mean * chosen_mean).sum(-1)
    return torch.stack([ches, normalised], dim=1)


# ----------------------------------------------------------------------------- per-pair values

def tokenize_rows(tokenizer, rows, max_length, max_prompt_length):
    """(rows kept, their token ids, drop counts): the rows tokenize_pairs keeps, matched by id, in order."""
    pairs, drops = tokenize_pairs(tokenizer, rows, max_length, max_prompt_length)
    kept = {pair["id"] for pair in pairs}
    return [row for row in rows if row["id"] in kept], pairs, drops


def measure_pairs(model, rows, pairs, trl_columns, args, device):
    """(per-pair values, where the reference log-probs came from): lengths, copy ratio, reference log-probs (TRL's
    columns when the dataset has them, else train.py's cache, computed where it lacks them) and CHES."""
    how = logprob_pass(args.model, model, pairs, args, device)
    if trl_columns:
        ref = torch.tensor([trl_columns[row["id"]] for row in rows], dtype=torch.float64)
        source = "the dataset's ref_chosen_logps and ref_rejected_logps columns"
    else:
        mode = reference_cache.compute_mode(args.dtype, fsdp=False, device=device)
        path = reference_cache.cache_file(reference_cache.weights_fingerprint(model, mode))
        ref = reference_cache.reference_logps(model, pairs, how, path)
        source = f"the reference cache ({reference_cache.FOLDER})"
    lengths = torch.tensor([[len(p["chosen"]), len(p["rejected"])] for p in pairs], dtype=torch.float64)
    sums = hidden_sums(model, pairs, how)
    scores = ches_scores(sums[:, 0], sums[:, 1], chosen_tokens=lengths[:, 0], rejected_tokens=lengths[:, 1])
    values = []
    for row, (chosen, rejected), (ref_chosen, ref_rejected), (ches, normalised) in zip(
            rows, lengths.int().tolist(), ref.tolist(), scores.tolist()):
        values.append({"id": row["id"], "chosen_tokens": chosen, "rejected_tokens": rejected,
                       "length_gap": chosen - rejected, "copy_ratio": copy_ratio(row["chosen"], row["rejected"]),
                       "ref_logp_chosen": ref_chosen, "ref_logp_rejected": ref_rejected,
                       "ref_logp_per_token_chosen": ref_chosen / chosen,
                       "ref_logp_per_token_rejected": ref_rejected / rejected,
                       "ches": ches, "ches_length_normalised": normalised})
    return values, source


SUMMARISED = ["chosen_tokens", "rejected_tokens", "length_gap", "copy_ratio", "ref_logp_per_token_chosen",
              "ref_logp_per_token_rejected", "ches", "ches_length_normalised"]


def dataset_summary(values, top):
    """Mean, median, min and max of each SUMMARISED value over the pairs; the ids of the `top` highest CHES scores."""
    summary = {}
    for key in SUMMARISED:
        column = np.array([v[key] for v in values], dtype=np.float64)
        summary[key] = {name: float(stat(column)) for name, stat in
                        (("mean", np.mean), ("median", np.median), ("min", np.min), ("max", np.max))}
    for key in ("ches", "ches_length_normalised"):
        summary[f"highest_{key}"] = [v["id"] for v in sorted(values, key=lambda v: -v[key])[:top]]
    return summary


# ----------------------------------------------------------------------------- the model's fresh answers

def read_samples(path):
    """{prompt id: (file:line, row)} of a `clair.py sample` file; with several samples per prompt, the first."""
    samples = {}
    for number, row in read_jsonl(path):
        if not isinstance(row.get("completion"), str):
            raise DataError(f"{path}:{number}: field 'completion': expected a string")
        if "id" not in row:
            raise DataError(f"{path}:{number}: field 'id': missing")
        samples.setdefault(str(row.get("prompt_id", row["id"])), (f"{path}:{number}", row))
    return samples


def answers_from_samples(rows, path):
    """{pair id: the fresh answer to its prompt} from a samples file, matched by id. A missing one, another prompt,
    or the pair's own rejected side (CLAIR data's rejected answer is the model's earlier sample) is a DataError."""
    samples, answers = read_samples(path), {}
    for row in rows:
        if row["id"] not in samples:
            raise DataError(f"{path}: no answer for pair {row['id']!r}: its ids must be the pairs' ids")
        where, sample = samples[row["id"]]
        if as_messages(sample.get("prompt", "")) != row["prompt"]:
            raise DataError(f"{where}: field 'prompt': not the prompt of pair {row['id']!r}")
        if sample["completion"] == row["rejected"]:
            raise DataError(f"{where}: field 'completion': it is pair {row['id']!r}'s rejected side, not a fresh "
                            "answer; sample anew with another --seed")
        answers[row["id"]] = sample["completion"]
    return answers


def answers_sampled_here(model, tokenizer, rows, *, args):
    """Fresh answers of the local model, each with its own seed from --seed and the pair's id (clair.sample_seed)."""
    answers = []
    for start in tqdm(range(0, len(rows), args.batch_size), desc="fresh answers"):
        batch = rows[start:start + args.batch_size]
        decoding = Decoding(args.max_new_tokens, args.temperature, args.top_p, dtype=args.dtype)
        texts, _, _ = generate(model, tokenizer, [row["prompt"] for row in batch], decoding,
                               seeds=[sample_seed(args.seed, row["id"]) for row in batch])
        answers += texts
    return answers


def answers_from_server(rows, *, client, args):
    """Fresh answers from an OpenAI-compatible server, a request per prompt with the same decoding flags."""
    return [client.complete(row["prompt"], args.temperature, args.max_new_tokens, top_p=args.top_p, seed=args.seed)
            for row in tqdm(rows, desc="fresh answers")]


# ----------------------------------------------------------------------------- chosen against the fresh answer

def compare_by_key(chosen, fresh, answer):
    """1 when only the chosen answer is right, 0 when only the fresh one is, 0.5 when both or neither are."""
    chosen_right, fresh_right = matches(chosen, answer), matches(fresh, answer)
    return 0.5 if chosen_right == fresh_right else float(chosen_right)


def compare(rows, fresh, keys, client):
    """Per prompt, how the chosen answer fared against the fresh one: by its answer key, else by the judge in both
    orders (a score per order with a verdict; their mean decides), else not compared."""
    results = []
    for row, answer in zip(rows, fresh):
        if row["id"] in keys:
            result = {"by": "answer key", "scores": [compare_by_key(row["chosen"], answer, keys[row["id"]])]}
        elif client:
            judged = pairwise(client, row, row["chosen"], answer)
            result = {"by": "judge", "scores": [score for score, _ in judged], "replies": [reply for _, reply in judged]}
        else:
            results.append({"id": row["id"], "by": None, "outcome": "not compared"})
            continue
        parsed = [score for score in result["scores"] if score is not None]
        mean = sum(parsed) / len(parsed) if parsed else None
        outcome = ("no verdict" if mean is None else "win" if mean > 0.5 else "loss" if mean < 0.5 else "tie")
        results.append({"id": row["id"], **result, "outcome": outcome})
    return results


def comparison_summary(results, fresh, rows):
    """Chosen's share of the decided prompts (wins against losses; ties apart) with its Wilson interval, the
    recommendation, and the judge's accounting as evaluate.py keeps it: replies without a verdict counted and kept,
    and the judged prompts' verdicts withheld when most replies have none."""
    counts = Counter(r["outcome"] for r in results)
    replies = [(r["id"], score, reply) for r in results if r["by"] == "judge"
               for score, reply in zip(r["scores"], r["replies"])]
    unparsed = [{"id": i, "reply": reply} for i, score, reply in replies if score is None]
    summary = {"compared": sum(r["by"] is not None for r in results),
               **{f"by_{by.replace(' ', '_')}": sum(r["by"] == by for r in results) for by in ("answer key", "judge")},
               **{k: counts[k] for k in ("win", "tie", "loss", "no verdict", "not compared")},
               "fresh_equal_to_rejected": sum(a == row["rejected"] for a, row in zip(fresh, rows)),
               "judge_replies": len(replies), "judge_unparsed": len(unparsed), "unparsed_judge_replies": unparsed,
               "interval": "95% Wilson score interval of wins / (wins + losses); ties excluded"}
    decided = counts["win"] + counts["loss"]
    if replies and 2 * len(unparsed) > len(replies):
        summary.update(chosen_share=None, interval_95=None, recommendation="withheld")
    elif decided:
        interval = wilson_interval(counts["win"], decided)
        summary.update(chosen_share=counts["win"] / decided, interval_95=interval, recommendation=recommend(interval))
    else:
        summary.update(chosen_share=None, interval_95=None, recommendation="unclear")
    return summary | {"meaning": MEANINGS[summary["recommendation"]]}


# ----------------------------------------------------------------------------- the command

def answer_keys(args, rows):
    """{pair id: answer key}: the pairs' own `answer` fields, then --answers' keys for the ids still without one."""
    keys = {}
    for where, row in preference_data.read_records(args.data):
        if row.get("answer") is not None:
            if not isinstance(row["answer"], str):
                raise DataError(f"{where}: field 'answer': expected a string")
            keys[preference_data.row_id(row, where)] = row["answer"]
    extra = {p["id"]: p["answer"] for p in read_prompts(args.answers) if p["answer"] is not None} if args.answers else {}
    ids = {row["id"] for row in rows}
    return {i: answer for i, answer in (extra | keys).items() if i in ids}


def fresh_source(args):
    if args.samples:
        return f"the samples file {args.samples}"
    if args.base_url:
        return f"{args.served_model or args.model} on {args.base_url}"
    return (f"sampled here: temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}, "
            f"at most {args.max_new_tokens} new tokens")


def fresh_answers(args, rows):
    """How the fresh answers come, settled before any model loads: a function (model, tokenizer, rows) -> answers.
    A samples file is read and checked against `rows` now; a server answers one tiny request now."""
    if args.samples:
        answers = answers_from_samples(rows, args.samples)
        return lambda model, tokenizer, kept: [answers[row["id"]] for row in kept]
    if args.base_url:
        client = ChatClient(args.base_url, args.served_model or args.model, args.api_key_env)
        client.check()
        return lambda model, tokenizer, kept: answers_from_server(kept, client=client, args=args)
    return functools.partial(answers_sampled_here, args=args)


def measure(args, rows, trl_columns, answer, device):
    """(rows kept, per-pair values, drop counts, where the reference log-probs came from, fresh answers by
    `answer`), in one model load."""
    tokenizer, model = load_model(args.model, device)
    rows, pairs, drops = tokenize_rows(tokenizer, rows, args.max_length, args.max_prompt_length)
    if not pairs:
        raise DataError(f"{args.data}: no pairs left after truncation")
    values, ref_source = measure_pairs(model, rows, pairs, trl_columns, args, device)
    return rows, values, drops, ref_source, answer(model, tokenizer, rows)


def run(args):
    """The report of --data against --model. A server that fails its check stops the run before any long work; a
    judge that fails later leaves the per-pair values and fresh answers in --out."""
    device = default_device()
    rows, drops = preference_data.load_pairs(args.data)
    rows = rows[:args.limit] if args.limit else rows
    keys, trl_columns = answer_keys(args, rows), preference_data.read_reference_logps(args.data)
    try:
        client = judge_client(args) if args.judge_url and any(row["id"] not in keys for row in rows) else None
    except (FatalRequestError, RetriesExhausted) as e:
        sys.exit(f"error: judge: {e}")
    try:
        rows, values, tokenize_drops, ref_source, fresh = measure(args, rows, trl_columns, fresh_answers(args, rows), device)
    except (FatalRequestError, RetriesExhausted) as e:
        sys.exit(f"error: answers: {e}")
    for value, answer in zip(values, fresh):
        value.update(fresh_answer=answer, answer_key=keys.get(value["id"]))
    report = {"model": args.model, "data": args.data, "pairs": len(rows), "dropped": dict(drops + tokenize_drops),
              "reference_logps_from": ref_source, "fresh_answers_from": fresh_source(args),
              "dataset": dataset_summary(values, args.top), "per_pair": values}
    try:
        results = compare(rows, fresh, keys, client)
    except (FatalRequestError, RetriesExhausted) as e:
        if args.out:
            write_json(report, args.out)
            sys.exit(f"error: judge: {e} (the per-pair values and fresh answers are in {args.out})")
        sys.exit(f"error: judge: {e}")
    for value, result in zip(values, results):
        value["comparison"] = {k: v for k, v in result.items() if k not in ("id", "replies")}
    return {**report, "chosen_vs_model": comparison_summary(results, fresh, rows)}


def print_report(report):
    c = report["chosen_vs_model"]
    print(f"\n{report['pairs']} pairs of {report['data']} against {report['model']}'s fresh answers "
          f"({report['fresh_answers_from']})")
    print(f"chosen against the model's own answer: {c['compared']} prompts compared ({c['by_answer_key']} by the "
          f"answer key, {c['by_judge']} by the judge), {c['not compared']} not compared")
    print(f"  wins {c['win']}, ties {c['tie']}, losses {c['loss']}, no verdict {c['no verdict']}; judge replies "
          f"without a verdict: {c['judge_unparsed']} of {c['judge_replies']}")
    if c["chosen_share"] is not None:
        low, high = c["interval_95"]
        print(f"  chosen wins {c['chosen_share']:.3f} of the decided prompts, 95% Wilson interval [{low:.3f}, {high:.3f}]")
    print(f"  recommendation: {c['meaning']}")
    d = report["dataset"]
    print("\nper pair, over the dataset" + "".join(f"{stat:>12}" for stat in ("mean", "median", "min", "max")))
    for key in SUMMARISED:
        print(f"  {key:<26}" + "".join(f"{d[key][stat]:>12.4g}" for stat in ("mean", "median", "min", "max")))
    print(f"\nhighest CHES per token, the pairs most at risk of a falling chosen likelihood (reference log-probs "
          f"from {report['reference_logps_from']})")
    print(f"  {'id':<24}{'CHES':>12}{'per token':>12}{'tokens w/l':>12}{'copy':>7}{'ref logp/token w/l':>20}")
    by_id = {v["id"]: v for v in report["per_pair"]}
    for pair_id in d["highest_ches_length_normalised"]:
        v = by_id[pair_id]
        print(f"  {pair_id[-24:]:<24}{v['ches']:>12.4g}{v['ches_length_normalised']:>12.4g}"
              f"{v['chosen_tokens']:>7}/{v['rejected_tokens']:<4}{v['copy_ratio']:>7.2f}"
              f"{v['ref_logp_per_token_chosen']:>11.3f}/{v['ref_logp_per_token_rejected']:.3f}")


def write_json(value, path):
    Path(path).write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["known"]:
        return known(argv[1:])
    if argv[:1] == ["displacement"]:
        return displacement(argv[1:])
    args = parse_args(argv)
    try:
        report = run(args)
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")
    print_report(report)
    if args.out:
        write_json(report, args.out)
    if report["chosen_vs_model"]["recommendation"] == "withheld":
        sys.exit("error: judge: most replies had no verdict, so the comparison is withheld; check --judge-model and "
                 "the unparsed_judge_replies" + (f" in {args.out}" if args.out else " (--out)"))
    return report


# ----------------------------------------------------------------------------- sets whose answer is known

def numeric(text):
    return re.fullmatch(r"-?\d+", text) is not None


def fix_answer(answer, key):
    """A CLAIR-style minimal fix of a wrong answer: its last number becomes the key; without a number, or for a key
    that is not a number, a closing sentence states the key."""
    numbers = list(re.finditer(r"-?\d[\d,]*(?:\.\d+)?", answer))
    if numeric(key) and numbers:
        last = numbers[-1]
        return answer[:last.start()] + key + answer[last.end():]
    return f"{answer.rstrip()}\n\nThe answer is {key}."


def inject_defect(answer, key, wrong):
    """A right answer with every whole-word occurrence of its key replaced by `wrong`: for a number, its digits with
    or without thousands separators and its number words ("six", "twice"); for a word, in any case."""
    if numeric(key):
        words = [w for w, n in NUMBER_WORDS.items() if n == int(key)]
        spelled = "|".join(map(re.escape, [f"{int(key):,}", key, *words]))
    else:
        spelled = re.escape(key)
    return re.sub(rf"(?<![\w-])(?:{spelled})(?!\w)", wrong, answer, flags=re.IGNORECASE)


def wrong_value(key, other_keys):
    """A wrong answer of the key's kind: a number one off, or the next of the other word answers in sorted order."""
    if numeric(key):
        return str(int(key) + 1)
    words = sorted({k for k in other_keys if not numeric(k) and not matches(k, key) and not matches(key, k)})
    words = words or ["no answer"]
    return next((w for w in words if w > key), words[0])


def alike(prompt, prompts):
    """The answer keys of the prompts that open with the same three words as `prompt` (the other capitals for
    "What is the capital of ..."), else of all of them."""
    opening = prompt_text(prompt).split()[:3]
    keys = [p["answer"] for p in prompts if prompt_text(p["prompt"]).split()[:3] == opening]
    return keys if len(keys) > 1 else [p["answer"] for p in prompts]


def known_sets(prompts, samples):
    """(chosen better, chosen worse, counts), two sets of code-checked pairs from keyed prompts and the model's own
    sampled answers (`samples`: {prompt id: answer}).

    - chosen better: where the model's answer is wrong; chosen = its minimal fix (fix_answer), rejected = the
      answer itself, as a CLAIR pair. The model mostly answers wrong, so the fix should beat its fresh answers.
    - chosen worse: where the model's answer is right; chosen = that answer with a defect (inject_defect: the key
      replaced by a wrong value), rejected = a refusal. The model often answers right, so its fresh answers should
      beat chosen.
    Each pair keeps the prompt's `answer`; a pair whose fix or defect code does not verify (matches) is dropped."""
    keyed = [p for p in prompts if p["answer"] is not None and p["id"] in samples]
    better, worse, counts = [], [], Counter(keyed=len(keyed))
    for p in keyed:
        answer, key = samples[p["id"]], p["answer"]
        base = {"id": p["id"], "prompt": p["prompt"], "answer": key}
        if matches(answer, key):
            chosen = inject_defect(answer, key, wrong_value(key, alike(p["prompt"], keyed)))
            if matches(chosen, key):
                counts["right, defect not injected"] += 1
                continue
            worse.append({**base, "chosen": chosen, "rejected": "I do not know the answer to that."})
        else:
            chosen = fix_answer(answer, key)
            if not matches(chosen, key):
                counts["wrong, fix not verified"] += 1
                continue
            better.append({**base, "chosen": chosen, "rejected": answer})
    return better, worse, counts | Counter(chosen_better=len(better), chosen_worse=len(worse))


def known(argv):
    p = argparse.ArgumentParser(prog="diagnose.py known", description=known_sets.__doc__, formatter_class=HelpFormatter)
    p.add_argument("--prompts", required=True, help="keyed prompts: id, prompt, answer (data/prompts.jsonl)")
    p.add_argument("--samples", required=True, help="the model's answers to them, a `clair.py sample` file")
    p.add_argument("--out-dir", required=True, help="writes chosen_better.jsonl and chosen_worse.jsonl here")
    args = p.parse_args(argv)
    try:
        samples = {pid: row["completion"] for pid, (_, row) in read_samples(args.samples).items()}
        better, worse, counts = known_sets(read_prompts(args.prompts), samples)
    except DataError as e:
        sys.exit(f"error: {e}")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("chosen_better", better), ("chosen_worse", worse)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"known: {dict(counts)}; written to {out}/chosen_better.jsonl and chosen_worse.jsonl")
    return better, worse, counts


# ----------------------------------------------------------------------------- CHES against training

def chosen_logp_change(run, batch_size, device):
    """(label, per-pair arrays) of a train.py run over its --data: CHES, its length-normalised variant and the chosen
    answer's tokens under the initial model, and log pi(y_w) after training minus before (the reference, from the
    cache). The run should have trained on every pair: give train.py --eval-data, and steps enough."""
    state = read_state(Path(run) / "final")
    if state is None:
        raise DataError(f"{run}/final: no trainer_state.json; give train.py --out folders")
    trained = state["args"]
    settings = argparse.Namespace(model=trained["model"], batch_size=batch_size, packing="auto", dtype=trained["dtype"])
    data = trained["data"] or BUNDLED_TRAIN
    rows, _ = preference_data.load_pairs(data)
    tokenizer, model = load_model(trained["model"], device)
    rows, pairs, _ = tokenize_rows(tokenizer, rows, trained["max_length"], trained["max_prompt_length"])
    values, _ = measure_pairs(model, rows, pairs, trl_columns={}, args=settings, device=device)
    del model
    _, policy = load_model(str(Path(run) / "final"), device)
    after = pairs_logps(policy, pairs, logprob_pass(run, policy, pairs, settings, device))
    arrays = {key: np.array([v[key] for v in values]) for key in ("ches", "ches_length_normalised", "chosen_tokens")}
    arrays["change"] = after[:, 0].numpy() - np.array([v["ref_logp_chosen"] for v in values])
    return f"{' '.join(training_value(trained, 'loss', ['?']))} on {Path(data).stem}", arrays


# What is ranked against what: CHES against the change, and, as the confound to beat, the chosen answer's length.
CORRELATIONS = {"ches": ("ches", "change"), "ches_length_normalised": ("ches_length_normalised", "change"),
                "ches_length_normalised_per_token": ("ches_length_normalised", "change_per_token"),
                "chosen_tokens": ("chosen_tokens", "change")}


def displacement(argv):
    p = argparse.ArgumentParser(prog="diagnose.py displacement", description=chosen_logp_change.__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out folders")
    p.add_argument("--out", default="diagnose_ches.png", help="the scatter plot to write")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward")
    args = p.parse_args(argv)
    device = default_device()
    try:
        runs = dict(chosen_logp_change(run, args.batch_size, device) for run in args.runs)
    except (DataError, ModelError) as e:
        sys.exit(f"error: {e}")
    results = {}
    for label, arrays in runs.items():
        arrays["change_per_token"] = arrays["change"] / arrays["chosen_tokens"]
        results[label] = {"pairs": len(arrays["change"]), "chosen_logp_change_mean": float(arrays["change"].mean()),
                          "chosen_logp_fell": float((arrays["change"] < 0).mean())}
        for name, (score, change) in CORRELATIONS.items():
            rho, interval = spearman(arrays[score], arrays[change])
            results[label][f"spearman_{name}"] = {"rho": rho, "interval_95": interval}
        print(f"{label}: {json.dumps(results[label])}")
    plot_displacement(runs, results, args.out)
    return results


def plot_displacement(runs, results, out):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, (label, arrays) in enumerate(runs.items()):
        for ax, name in zip(axes, ("ches", "ches_length_normalised")):
            rho = results[label][f"spearman_{name}"]["rho"]
            ax.scatter(arrays[name], arrays["change"], s=12, alpha=0.6, color=f"C{n}",
                       label=f"{label}: Spearman {rho:+.2f}")
    for ax, title in zip(axes, ("CHES", "length-normalised CHES")):
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{title} under the initial model")
        ax.set_ylabel("change of log π(chosen) in training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_xscale("symlog")  # CHES grows with the squared length: spread over orders of magnitude
    fig.suptitle("Does CHES rank which chosen answers lose likelihood?", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
