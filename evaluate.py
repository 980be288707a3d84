"""Did alignment work? Held-out rewards and likelihoods (the paper's Figure 4), a plot, and generations.

    python evaluate.py --model runs/apo_zero/final --data data/clair_eval.jsonl       # rewards, likelihoods
    python evaluate.py --model runs/apo_zero/final --prompts data/prompts_eval.jsonl  # answers, accuracy, length
    python evaluate.py --model CKPT --prompts P.jsonl --judge-url http://localhost:8000/v1 --judge-model M
    python evaluate.py plot runs/apo_zero runs/dpo --out figure4.png

The reference (--ref), loss and its weights, beta, length limits, dtype and attention implementation default to the
checkpoints' training args (trainer_state.json, plain JSON: nothing in a checkpoint runs code). The
reference's log-probs come from train.py's cache when it holds them; tokenisation, batching and log-probs
are training's own functions. Generation needs no reference: without --ref, a model that train.py did not
save is evaluated alone.
"""

import argparse
import json
import math
import re
import sys
import unicodedata
from pathlib import Path

import torch

import preference_data
from clair import ChatClient, FatalRequestError, HelpFormatter, RetriesExhausted, fill, judge, prompt_text
from clair_apo import reference_cache
from clair_apo.chat_tokens import tokenize_pairs
from clair_apo.checkpoints import read_state
from clair_apo.generation import Decoding, generate
from clair_apo.logprobs import LogprobPass, pairs_logps
from clair_apo.metrics import pair_metrics
from clair_apo.objective import TERMS, Objective, objective_error
from clair_apo.models import (MAX_LENGTH, MAX_PROMPT_LENGTH, ModelError, default_device, default_dtype, load_model,
                              setting_error)
from clair_apo.packing import choose_batching

GRADER_PROMPT = """\
Grade a response against the reference answer to a question. It is correct when its final answer means the \
same as the reference; wording and extra explanation do not matter. End with [[correct]] or [[incorrect]].

[Question]
[[TASK]]

[Reference answer]
[[ANSWER]]

[Response]
[[RESPONSE]]"""


# Flags that default to the checkpoints' training args: evaluate.py's name -> (train.py's, the value for a model
# train.py did not save: train.py's defaults, and the reference given by --ref).
FROM_TRAINING = {"ref": ("model", None), "loss": ("loss", ["apo_zero"]), "loss_weights": ("loss_weights", [1.0]),
                 "beta": ("beta", 0.1),
                 "max_length": ("max_length", MAX_LENGTH), "max_prompt_length": ("max_prompt_length", MAX_PROMPT_LENGTH),
                 "dtype": ("dtype", None), "attn_implementation": ("attn_implementation", None)}
# Unused by generation (--prompts alone).
PAIRS_ONLY = {"loss", "loss_weights", "beta", "max_length", "max_prompt_length"}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, nargs="+", help="trained checkpoints (train.py folders), one or more")
    p.add_argument("--ref", help="the reference / initial model (default: the one the checkpoints were trained from)")
    p.add_argument("--data", help="held-out preference pairs: JSONL, .parquet or a Hub dataset id")
    p.add_argument("--prompts", help="prompts to answer, JSONL: id, prompt, optional answer")
    p.add_argument("--loss", nargs="+", choices=TERMS, help="for the reported loss, as train.py's (default: the "
                   "training loss)")
    p.add_argument("--loss-weights", nargs="+", type=float, help="one per --loss (default: the training ones with the "
                   "training loss, else 1 each)")
    p.add_argument("--beta", type=float, help="default: the training beta")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per forward; prompts per generate")
    p.add_argument("--max-length", type=int, help="default: the training one")
    p.add_argument("--max-prompt-length", type=int, help="default: the training one")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: the training one")
    p.add_argument("--attn-implementation", help="default: the training one")
    p.add_argument("--packing", choices=["auto", "on", "off"], default="auto", help="as in train.py")
    p.add_argument("--max-new-tokens", type=int, default=160, help="the answers' length limit")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding, for both models")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL of a judge LLM, ending in /v1; checked once "
                   "before the generations")
    p.add_argument("--judge-model", default="gpt-4-turbo", help="the judge's model name on that server")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the judge's key")
    p.add_argument("--out", help="write the results here as JSON")
    args = p.parse_args(argv)
    if not args.data and not args.prompts:
        p.error("give --data (held-out pairs), --prompts (generation), or both")
    try:
        trained = [saved["args"] for saved in map(read_state, args.model) if saved is not None]
    except preference_data.DataError as e:
        p.exit(2, f"error: {e}\n")
    if args.ref is None and not trained and args.data:
        p.error("--ref: no checkpoint holds train.py's training args (trainer_state.json); give the reference model")
    if args.loss is not None and args.loss_weights is None:
        args.loss_weights = [1.0] * len(args.loss)  # the weights of the loss given, not of the training's
    if why := defaults_from_training(args, trained) or objective_error(args.loss, args.loss_weights):
        p.error(why)
    args.dtype = args.dtype or default_dtype(default_device())[0]
    max_length, max_prompt_length = (args.max_length, args.max_prompt_length) if args.data else (MAX_LENGTH,
                                                                                                 MAX_PROMPT_LENGTH)
    if why := setting_error(max_length, max_prompt_length, args.attn_implementation, args.dtype):
        p.error(why)
    return args


def defaults_from_training(args, trained):
    """Fill each FROM_TRAINING flag not given from the `trained` checkpoints' args, or with its fallback where
    none has it; return why not where they disagree (and the flag matters), else None."""
    for flag, (name, fallback) in FROM_TRAINING.items():
        if getattr(args, flag) is not None:
            continue
        values = {training_value(saved, name, fallback) for saved in trained}
        if len(values) > 1 and not args.data and flag in PAIRS_ONLY:
            values = {training_value({}, name, fallback)}
        if len(values) > 1:
            shown = sorted(repr(" ".join(map(str, v)) if isinstance(v, tuple) else v) for v in values)
            return (f"the checkpoints were trained with different {name} ({', '.join(shown)}): "
                    f"give --{flag.replace('_', '-')}")
        value = values.pop() if values else fallback
        setattr(args, flag, list(value) if isinstance(value, tuple) else value)
    return None


def training_value(saved, name, fallback):
    """A checkpoint's training arg, hashable (a list as a tuple); `fallback` where it has none. A single --loss
    name, as a string, is that one loss."""
    value = saved.get(name, fallback)
    return (value,) if name == "loss" and isinstance(value, str) else tuple(value) if isinstance(value, list) else value


# ----------------------------------------------------------------------------- held-out pairs (Figure 4)

def pair_report(policy, ref, pairs, objective):
    """Figure 4's numbers: rewards, raw and per-token log-likelihoods under both models, directions; the loss
    of `objective`."""
    chosen_tokens = sum(len(pair["chosen"]) for pair in pairs)
    report = {f"eval/{k}": v for k, v in pair_metrics(policy, ref, objective, chosen_tokens).items()}
    for column, side in enumerate(("chosen", "rejected")):
        tokens = torch.tensor([len(p[side]) for p in pairs], dtype=torch.float64)
        delta = (policy[:, column] - ref[:, column]).mean().item()
        report[side] = {
            "logp_policy": policy[:, column].mean().item(), "logp_ref": ref[:, column].mean().item(),
            "logp_per_token_policy": (policy[:, column] / tokens).mean().item(),
            "logp_per_token_ref": (ref[:, column] / tokens).mean().item(),
            "mean_tokens": tokens.mean().item(),
            "direction": "up" if delta > 0 else "down" if delta < 0 else "unchanged",
        }
    return report


def logprob_pass(name, model, pairs, args, device):
    """The LogprobPass for `model`: training's Batching, chosen as train.py chooses it, on the first batch."""
    first = list(range(min(args.batch_size, len(pairs))))
    batching = choose_batching(model, pairs, indices=first, packing=args.packing, device=device, dtype=args.dtype)
    print(f"{name}: batching: {batching.description}")
    return LogprobPass(batching, batch_size=args.batch_size, device=device, dtype=args.dtype)


def evaluate_pairs(args, device):
    """pair_report for each --model against --ref on --data; the reference's log-probs once (cached)."""
    rows, drops = preference_data.load_pairs(args.data)
    tokenizer, ref_model = load_model(args.ref, device, attn_implementation=args.attn_implementation)
    pairs, tokenize_drops = tokenize_pairs(tokenizer, rows, args.max_length, args.max_prompt_length)
    if not pairs:
        raise preference_data.DataError(f"{args.data}: no pairs left after truncation")
    mode = reference_cache.compute_mode(args.dtype, fsdp=False, device=device)
    path = reference_cache.cache_file(reference_cache.weights_fingerprint(ref_model, mode))
    ref = reference_cache.reference_logps(ref_model, pairs, logprob_pass(args.ref, ref_model, pairs, args, device),
                                          path)
    del ref_model
    reports = {}
    for path in args.model:
        policy_tokenizer, model = load_model(path, device, attn_implementation=args.attn_implementation)
        if tokenize_pairs(policy_tokenizer, rows, args.max_length, args.max_prompt_length)[0] != pairs:
            raise preference_data.DataError(
                f"{path}: its tokenizer or chat template gives other token ids than the reference's ({args.ref}); "
                "evaluate a checkpoint against the model it was trained from (--ref)")
        policy = pairs_logps(model, pairs, logprob_pass(path, model, pairs, args, device))
        reports[path] = pair_report(policy, ref, pairs, Objective.of(args))
        del model
    return {"pairs": len(pairs), "dropped": dict(drops + tokenize_drops), "models": reports}


# ----------------------------------------------------------------------------- generation

UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
NUMBER_WORDS = {**{w: i for i, w in enumerate(UNITS)}, **{w: 20 + 10 * i for i, w in enumerate(TENS)},
                "once": 1, "twice": 2, "thrice": 3}


def normalise(text):
    """Lower case, accents and punctuation off, thousands separators gone, number words as digits ("twice",
    "thirty-one" and "31" all read as numbers), so that words and digits match either way."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"(?<=\d),(?=\d{3})", "", text)
    text = re.sub(rf"\b({'|'.join(TENS)})[ -]({'|'.join(UNITS[1:10])})\b",
                  lambda m: str(NUMBER_WORDS[m[1]] + NUMBER_WORDS[m[2]]), text)
    text = re.sub(r"(?<!\d)\.|\.(?!\d)|[^\w.-]+|-(?!\d)", " ", text)
    return " ".join(str(NUMBER_WORDS.get(word, word)) for word in text.split())


def matches(response, answer):
    """Normalised exact or contained match: the answer appears as whole words in the response."""
    return f" {normalise(answer)} " in f" {normalise(response)} "


def read_prompts(path):
    rows = []
    for number, row in preference_data.read_jsonl(path):
        prompt, answer = row.get("prompt"), row.get("answer")
        if not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
            raise preference_data.DataError(f"{path}:{number}: field 'prompt': expected a string or chat messages")
        if answer is not None and not isinstance(answer, str):
            raise preference_data.DataError(f"{path}:{number}: field 'answer': expected a string")
        rows.append({"id": str(row.get("id", number)), "prompt": prompt, "answer": answer})
    return rows


def generations(args, rows, device):
    """Answers of the reference and each checkpoint to the prompts, same decoding; accuracy by match, length,
    and the share of answers cut by --max-new-tokens (their length is a lower bound)."""
    keyed = [i for i, r in enumerate(rows) if r["answer"] is not None]
    report = {"answered": len(rows), "with_answer_key": len(keyed), "models": {}}
    answers = {}
    for path in [args.ref, *args.model] if args.ref else args.model:
        tokenizer, model = load_model(path, device)
        model.eval()
        torch.manual_seed(0)
        texts, reasons = [], []
        for start in range(0, len(rows), args.batch_size):
            answered, why_stopped, _ = generate(model, tokenizer, [r["prompt"] for r in rows[start:start + args.batch_size]],
                                                Decoding(args.max_new_tokens, args.temperature, dtype=args.dtype))
            texts += answered
            reasons += why_stopped
        answers[path] = texts
        del model
        scores = {"mean_answer_chars": sum(map(len, texts)) / len(texts),
                  "cut_at_max_new_tokens": reasons.count("length") / len(reasons)}
        if keyed:
            scores["accuracy_match"] = sum(matches(texts[i], rows[i]["answer"]) for i in keyed) / len(keyed)
        report["models"][path] = scores
    report["samples"] = [{"id": r["id"], **{path: texts[i] for path, texts in answers.items()}}
                         for i, r in enumerate(rows)]
    return report


def judge_generations(client, rows, report, ref):
    """The judge's scores beside each model's others: accuracy_judge on the prompts with an answer key and
    win_rate_vs_ref, each over the replies with a verdict. Replies without one are counted (judge_unparsed of
    judge_replies) and kept; a score is withheld (None) when most of its replies have none."""
    answers = {path: [sample[path] for sample in report["samples"]] for path in report["models"]}
    for path, scores in report["models"].items():
        judged = {}  # score name -> [(prompt id, score or None, reply)]
        keyed = [(row, text) for row, text in zip(rows, answers[path]) if row["answer"] is not None]
        if keyed:
            judged["accuracy_judge"] = [(row["id"], *grade(client, row, text)) for row, text in keyed]
        if ref and path != ref:
            judged["win_rate_vs_ref"] = [(row["id"], *result)
                                         for row, mine, theirs in zip(rows, answers[path], answers[ref])
                                         for result in pairwise(client, row, mine, theirs)]
        for key, results in judged.items():
            parsed = [score for _, score, _ in results if score is not None]
            scores[key] = sum(parsed) / len(parsed) if 2 * len(parsed) >= len(results) else None
        unparsed = [{"id": i, "reply": reply} for results in judged.values() for i, score, reply in results
                    if score is None]
        scores.update(judge_replies=sum(map(len, judged.values())), judge_unparsed=len(unparsed),
                      unparsed_judge_replies=unparsed)


def grade(client, row, response):
    """MixEval-style: an LLM parser decides whether a free-form response matches the answer key.
    (True, False or None when the reply has no verdict; the reply)."""
    reply = client.complete([{"role": "user", "content": fill(GRADER_PROMPT, task=prompt_text(row["prompt"]),
                                                              answer=row["answer"], response=response)}], 0.0, 512)
    verdicts = re.findall(r"\[\[(correct|incorrect)\]\]", reply, flags=re.IGNORECASE)
    return (verdicts[-1].lower() == "correct" if verdicts else None), reply


def pairwise(client, row, mine, theirs):
    """The checkpoint's answer against the reference's, judged in both orders: a (score, reply) for each,
    the score 1 for a win, 0.5 for a tie, 0 for a loss and None without a verdict."""
    task = prompt_text(row["prompt"])
    wins = {"A": 1.0, "tie": 0.5, "B": 0.0}
    (first, first_reply), (second, second_reply) = judge(client, task, mine, theirs), judge(client, task, theirs, mine)
    return [(wins.get(first), first_reply), (None if second is None else 1.0 - wins[second], second_reply)]


# ----------------------------------------------------------------------------- the plot

PANELS = [("logps", "log-likelihood  log π(y|x)"), ("rewards", "reward  β·(log π − log π_ref)")]


def curves(run):
    """(label, {(metric, side): (steps, values)}) of a train.py run: its held-out metrics, or its training
    metrics when it evaluated once at most. A missing field is a DataError naming file, line and field."""
    metrics_path, args_path = Path(run) / "metrics.jsonl", Path(run) / "args.json"
    numbered = list(preference_data.read_jsonl(metrics_path))
    evals = [(number, m) for number, m in numbered if "eval/loss" in m]
    prefix, points = ("eval/", evals) if len(evals) > 1 else ("", [(number, m) for number, m in numbered if "loss" in m])

    def column(name):
        missing = next((number for number, m in points if name not in m), None)
        if missing is not None:
            raise preference_data.DataError(f"{metrics_path}:{missing}: field '{name}': missing")
        return [m[name] for _, m in points]

    config = json.loads(args_path.read_text()) if args_path.exists() else {}
    label = f"{' '.join(training_value(config, 'loss', ['?']))} on {Path(config.get('data') or 'bundled CLAIR').stem}"
    return label, {(metric, side): (column("step"), column(f"{prefix}{metric}/{side}"))
                   for metric, _ in PANELS for side in ("chosen", "rejected")}


def plot(argv):
    p = argparse.ArgumentParser(prog="evaluate.py plot", description="Figure 4 from train.py runs' metrics.jsonl",
                                formatter_class=HelpFormatter)
    p.add_argument("runs", nargs="+", help="train.py --out folders")
    p.add_argument("--out", default="figure4.png", help="the PNG to write")
    args = p.parse_args(argv)
    try:
        runs = [curves(run) for run in args.runs]
    except preference_data.DataError as e:
        sys.exit(f"error: {e} (each run must be a train.py --out folder)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        sys.exit("the plot needs matplotlib: pip install matplotlib")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for n, (label, lines) in enumerate(runs):
        for ax, (metric, title) in zip(axes, PANELS):
            for side, style in (("chosen", "-"), ("rejected", "--")):
                ax.plot(*lines[metric, side], style, color=f"C{n}", marker="o", markersize=3, label=f"{label}: {side}")
            ax.set_title(title)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
    axes[1].axhline(0, color="black", linewidth=0.8)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("Held-out chosen (solid) and rejected (dashed) outputs during training", fontsize=12)
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(labels) / 4), 1, 1))
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return args.out


# ----------------------------------------------------------------------------- main

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["plot"]:
        return plot(argv[1:])
    args = parse_args(argv)
    device = default_device()
    if args.ref is None:
        print("no reference: --model is evaluated alone, and no reference model is compared")
    results = {"model": args.model, "ref": args.ref}
    try:
        rows = read_prompts(args.prompts) if args.prompts else None
        client = judge_client(args) if args.judge_url and rows else None
        if args.data:
            results["pairs"] = evaluate_pairs(args, device)
        if rows:
            results["generation"] = generations(args, rows, device)
            if client:
                judge_generations(client, rows, results["generation"], args.ref)
    except (preference_data.DataError, ModelError) as e:
        sys.exit(f"error: {e}")
    except (FatalRequestError, RetriesExhausted) as e:
        if args.out and "generation" in results:  # the judge failed after the generations: keep them
            write_results(results, args.out)
            sys.exit(f"error: judge: {e} (the generations are in {args.out})")
        sys.exit(f"error: judge: {e}")
    print_table(results)
    if args.out:
        write_results(results, args.out)
    models = results.get("generation", {}).get("models", {})
    withheld = [f"{path} {key}" for path, scores in models.items() for key, value in scores.items() if value is None]
    if withheld:
        sys.exit(f"error: judge: most replies had no verdict, so these scores are withheld: {', '.join(withheld)}; "
                 "check --judge-model and the unparsed_judge_replies" + (f" in {args.out}" if args.out else " (--out)"))
    return results


def judge_client(args):
    """The judge's ChatClient, checked with one tiny request: a wrong URL, model or key fails before any
    long work."""
    client = ChatClient(args.judge_url, args.judge_model, args.api_key_env, url_option="--judge-url")
    client.check()
    return client


def write_results(results, path):
    Path(path).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path}")


def print_table(results):
    if "pairs" in results:
        r = results["pairs"]
        print(f"\nheld-out pairs: {r['pairs']}, against the reference {results['ref']}")
        print(f"{'':<32} {'logp ref':>9} {'logp':>9} {'per-token ref':>14} {'per-token':>10} {'reward':>8}  moved")
        for path, report in r["models"].items():
            for side in ("chosen", "rejected"):
                s = report[side]
                print(f"{path[-22:] + ' ' + side:<32} {s['logp_ref']:>9.2f} {s['logp_policy']:>9.2f} "
                      f"{s['logp_per_token_ref']:>14.3f} {s['logp_per_token_policy']:>10.3f} "
                      f"{report[f'eval/rewards/{side}']:>+8.3f}  {s['direction']}")
            print(f"{path[-22:] + ' margin':<32} {report['eval/rewards/margins']:+.3f}   accuracy "
                  f"{report['eval/rewards/accuracies']:.3f}   loss {report['eval/loss']:.4f}")
    if "generation" in results:
        g = results["generation"]
        print(f"\ngenerations: {g['answered']} prompts, {g['with_answer_key']} with an answer key")
        keys = [k for k in ("accuracy_match", "accuracy_judge", "mean_answer_chars", "win_rate_vs_ref",
                            "judge_unparsed") if any(k in m for m in g["models"].values())]
        print(f"{'':<32}" + "".join(f"{k:>20}" for k in keys))
        for path, scores in g["models"].items():
            label = ("reference: " if path == results["ref"] else "") + path[-22:]
            print(f"{label:<32}" + "".join(f"{table_cell(scores, k):>20}" for k in keys))


def table_cell(scores, key):
    """One score as the table shows it: withheld when most judge replies had no verdict."""
    if key not in scores:
        return ""
    if scores[key] is None:
        return "withheld"
    if key == "judge_unparsed":
        return f"{scores[key]} of {scores['judge_replies']}"
    return f"{scores[key]:.3f}"


if __name__ == "__main__":
    main()
