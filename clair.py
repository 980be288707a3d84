"""CLAIR revisions and the paper's comparison datasets, over raw HTTP to any OpenAI-compatible endpoint.

    python clair.py sample    --in prompts.jsonl --out samples.jsonl            # y_l = M(x), locally (SmolLM2)
    python clair.py revise    --in samples.jsonl --out clair.jsonl --base-url URL --model gpt-4-0125-preview
    python clair.py stronger  --in samples.jsonl --out stronger.jsonl --base-url URL --model gpt-4-0125-preview
    python clair.py judge     --in samples2.jsonl --out judge.jsonl --base-url URL --model JUDGE  # sample --n 2
    python clair.py offpolicy --in ultrafeedback.jsonl --out offpolicy.jsonl
    python clair.py stats     clair.jsonl stronger.jsonl judge.jsonl offpolicy.jsonl

Every request goes to {base-url}/chat/completions with the key from $OPENAI_API_KEY (--api-key-env), which is
never printed or written. Rows are appended as they finish; a rerun skips ids already in --out and the rows
dropped to its .rejects.jsonl, and retries the rows that failed, so a crash or kill loses at most the requests
in flight. The exit status is non-zero when any row failed.
"""

import argparse
import difflib
import hashlib
import json
import math
import os
import random
import re
import sys
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

from preference_data import (DataError, as_messages, best_vs_worst, cut_torn_line, read_jsonl, read_records, row_id,
                             split_completion)

# ----------------------------------------------------------------------------- the revision prompt (docs/method.md)

# Our wording of the CLAIR prompt's structure; the {identifiers} are the paper's, exactly. [[TASK]] and
# [[STUDENT_SOLUTION]] are filled in; a --prompt-file must contain both.
REVISION_PROMPT = """\
You are a teacher, and a student has answered a task. Improve the student's answer as little as possible.
You are given the {task} and the {student_solution}. Revise the {student_solution} so that it becomes clearer, \
more correct and more engaging. Keep, word for word, every part of the student's answer that needs no \
correction. The {corrected_student_solution} must read as an original answer: never mention or hint that it \
is a revision or a correction.

{task}: [[TASK]]

{student_solution}: [[STUDENT_SOLUTION]]

-----------------

Begin with your step-by-step reasoning under {teacher_reasoning}, then give the {corrected_student_solution}. \
Write both identifiers out to structure your answer."""

# Split a reply on the first of these found, in this priority order (the authors' parser's order).
REVISION_MARKERS = [
    "**Corrected Student Solution:**", "{corrected_student_solution}:", "{corrected_student_solution}",
    "**Worsened Student Solution:**", "{worsened_student_solution}:", "{worsened_student_solution}",
]

JUDGE_PROMPT = """\
Which of two answers to the user's request below is better: more helpful, correct, clear and honest? \
Ignore their order and length. Reason briefly, then end with exactly one verdict: [[A]], [[B]] or [[tie]].

[Request]
[[TASK]]

[Answer A]
[[A]]

[Answer B]
[[B]]"""


def fill(template, **values):
    """Replace [[NAME]] placeholders in one pass, so no filled-in text is ever substituted again."""
    return re.sub(r"\[\[(\w+)\]\]", lambda m: values.get(m.group(1).lower(), m.group(0)), template)


def parse_revision(reply):
    """(rationale, revision) of a reviser's reply, or None when it has no marker or an empty revision. The
    revision is the text after the first marker found and before that marker's next occurrence, if any, as the
    authors' parser takes it (a split on the marker, then its second part)."""
    for marker in REVISION_MARKERS:
        head, found, tail = reply.partition(marker)
        if found:
            revision = tail.partition(marker)[0].strip()
            rationale = re.sub(r"^\s*\{teacher_reasoning\}\s*:?", "", head).strip()
            return (rationale, revision) if revision else None
    return None


def parse_verdict(reply):
    """'A', 'B' or 'tie' from the last [[...]] verdict in a judge's reply; None when there is none."""
    verdicts = re.findall(r"\[\[(A|B|tie)\]\]", reply, flags=re.IGNORECASE)
    return verdicts[-1].upper().replace("TIE", "tie") if verdicts else None


def judge(client, task, a, b, temperature=0.0, max_tokens=1024, **options):
    """(verdict, reply): the judge's verdict on answers A and B to `task` ('A', 'B', 'tie' or None) and its
    reply text; greedy decoding unless a temperature is given, `options` (top_p, seed) passed on."""
    reply = client.complete([{"role": "user", "content": fill(JUDGE_PROMPT, task=task, a=a, b=b)}], temperature,
                            max_tokens, **options)
    return parse_verdict(reply), reply


def prompt_text(prompt):
    """The task as text: a string prompt, or the chat messages' contents."""
    return prompt if isinstance(prompt, str) else "\n\n".join(m["content"] for m in prompt)


# ----------------------------------------------------------------------------- the pairs: y_l = M(x), then four ways to pick y_w

def cmd_sample(args):
    """y = M(x): the target model's own answers, --n per prompt, locally or from an endpoint."""
    prompts = read_rows(args.inp, ["id", "prompt"])
    jobs = [(f"{pid}-{k}" if args.n > 1 else pid, (row, k)) for pid, row in prompts for k in range(args.n)]

    def record(row, k, completion, settings):
        """A sample row: the answer, then its sampling settings and finish reason."""
        out = {"prompt": row["prompt"], "completion": completion, **settings}
        return {**out, "prompt_id": str(row["id"]), "sample_index": k} if args.n > 1 else out

    if args.base_url:
        client = client_for(args)

        def work(job):
            sent = decoding(args, job[1])
            choice = client.choice(as_messages(job[0]["prompt"]), **sent)
            settings = {"model": args.model, **sent, "finish_reason": choice.get("finish_reason")}
            return record(*job, choice["message"]["content"], settings), None

        return run_jobs(jobs, work, args.out, args.workers, "sample")
    return sample_locally(args, jobs, record)


def sample_seed(seed, job_id):
    """The sampling seed of one answer: from --seed and the answer's id alone, so a resumed run repeats it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{job_id}".encode()).digest()[:8], "big") >> 2


def sample_locally(args, jobs, record):
    """Batched local generation; resumable like run_jobs: finished ids are skipped, each batch flushed.

    Each answer samples with its own seed (sample_seed), so a resumed run writes the rows an uninterrupted
    one would."""
    from tqdm import tqdm

    from clair_apo.generation import Decoding, generate
    from clair_apo.models import default_device, default_dtype, load_model

    skip = {row["id"] for row in written_rows(args.out)}
    todo = [job for job in jobs if job[0] not in skip]
    tokenizer, model = load_model(args.model, default_device())
    model.eval()
    top_p = 1.0 if args.top_p is None else args.top_p
    settings = {"model": args.model, "temperature": args.temperature, "top_p": top_p, "max_tokens": args.max_tokens,
                "seed": args.seed or 0}
    decoding = Decoding(args.max_tokens, args.temperature, top_p, dtype=default_dtype(model.device)[0])
    with JsonlAppender(args.out) as out:
        for start in tqdm(range(0, len(todo), args.batch_size), desc="sample"):
            batch = todo[start:start + args.batch_size]
            seeds = [sample_seed(settings["seed"], job_id) for job_id, _ in batch]
            answers, reasons, _ = generate(model, tokenizer, [row["prompt"] for _, (row, _) in batch], decoding, seeds)
            for (job_id, (row, k)), answer, reason in zip(batch, answers, reasons):
                out.write({"id": job_id, **record(row, k, answer, {**settings, "finish_reason": reason})})
    print(f"sample: {len(todo)} answers written to {args.out}, {len(skip)} already done")
    return Counter(done=len(todo), skipped=len(skip))


def cmd_revise(args):
    """CLAIR: chosen = the reviser's minimal revision of the student answer, rejected = the student answer."""
    template = Path(args.prompt_file).read_text() if args.prompt_file else REVISION_PROMPT
    if "[[TASK]]" not in template or "[[STUDENT_SOLUTION]]" not in template:
        sys.exit(f"error: {args.prompt_file}: the prompt must contain [[TASK]] and [[STUDENT_SOLUTION]]")
    samples = read_rows(args.inp, ["id", "prompt", "completion"])
    client = client_for(args)

    def work(row):
        request = fill(template, task=prompt_text(row["prompt"]), student_solution=row["completion"])
        # One user message; the empty system message is the paper's request layout.
        reply = client.complete([{"role": "system", "content": ""}, {"role": "user", "content": request}],
                                **decoding(args))
        parsed = parse_revision(reply)
        if parsed is None:
            return None, {"reason": "no revision marker or an empty revision", "reply": reply}
        rationale, revision = parsed
        return {"prompt": row["prompt"], "chosen": revision, "rejected": row["completion"],
                "rational": rationale, "reviser": args.model}, None

    return run_jobs(samples, work, args.out, args.workers, "revise")


def cmd_stronger(args):
    """Stronger Preferred: chosen = the strong model's own fresh answer, rejected = the student answer."""
    samples = read_rows(args.inp, ["id", "prompt", "completion"])
    client = client_for(args)

    def work(row):
        answer = client.complete(as_messages(row["prompt"]), **decoding(args)).strip()
        if not answer:
            return None, {"reason": "empty answer"}
        return {"prompt": row["prompt"], "chosen": answer, "rejected": row["completion"], "reviser": args.model}, None

    return run_jobs(samples, work, args.out, args.workers, "stronger")


def cmd_judge(args):
    """On-policy judge (RLAIF): two samples per prompt, judged in both orders; kept only when both agree."""
    samples = read_rows(args.inp, ["id", "prompt", "completion", "prompt_id"])
    groups = {}
    for _, row in samples:
        groups.setdefault(row["prompt_id"], []).append(row)
    client = client_for(args)

    def work(rows):
        if len(rows) < 2:
            return None, {"reason": "fewer than two samples"}
        first, second = rows[0], rows[1]
        if first["completion"] == second["completion"]:
            return None, {"reason": "identical samples"}
        task = prompt_text(first["prompt"])
        (forward, forward_reply), (backward, backward_reply) = (
            judge(client, task, a["completion"], b["completion"], **decoding(args))
            for a, b in ((first, second), (second, first)))
        winner = {("A", "B"): first, ("B", "A"): second}.get((forward, backward))
        if winner is None:
            verdicts = (forward, backward)
            reason = "no verdict" if None in verdicts else "tie" if "tie" in verdicts else "orders disagree"
            return None, {"reason": reason, "verdicts": list(verdicts), "replies": [forward_reply, backward_reply]}
        loser = second if winner is first else first
        return {"prompt": first["prompt"], "chosen": winner["completion"], "rejected": loser["completion"],
                "judge": args.model}, None

    return run_jobs(list(groups.items()), work, args.out, args.workers, "judge")


def cmd_offpolicy(args):
    """Off-policy judge: the best- against the worst-scored existing completion; ties dropped.

    UltraFeedback layout (JSONL, .parquet or a Hub dataset id): `prompt` (or `instruction`) and `completions`,
    a list of objects with a `response` (or `text`) and an `overall_score` (or `score`).
    """
    rows, counts = [], Counter()
    for where, row in read_records(args.inp):
        pair = best_vs_worst(row, where)
        if pair is None:
            counts["tie"] += 1
            continue
        rows.append({"id": row_id(row, where), **pair})
    with open(args.out, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    print(f"offpolicy: {len(rows)} pairs written to {args.out}, {counts['tie']} ties dropped")
    return counts


# ----------------------------------------------------------------------------- contrastiveness (Table 1)

def levenshtein(a, b):
    """Character edit distance: the fewest insertions, deletions and substitutions that turn `a` into `b`.
    The textbook recurrence, row by row: O(len(a) * len(b)). Table 1 uses levenshtein_bit_parallel, its
    speed-up, which the tests check against this."""
    previous = list(range(len(b) + 1))  # distances from a[:0] to every prefix of b
    for i, char in enumerate(a, 1):
        current = [i]
        for j, other in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char != other)))
        previous = current
    return previous[-1]


def levenshtein_bit_parallel(a, b):
    """levenshtein(a, b), bit-parallel (Myers 1999, Hyyro 2001): O(len(a) * len(b) / wordsize).

    Python integers serve as bit vectors as wide as `a`; the common prefix and suffix are cut first
    (minimal revisions share most of their text).
    """
    start = 0
    while start < min(len(a), len(b)) and a[start] == b[start]:
        start += 1
    end = 0
    while end < min(len(a), len(b)) - start and a[-1 - end] == b[-1 - end]:
        end += 1
    a, b = a[start:len(a) - end], b[start:len(b) - end]
    if len(a) < len(b):
        a, b = b, a
    if not b:
        return len(a)
    m = len(b)  # bit vectors over the pattern b
    mask, top = (1 << m) - 1, 1 << (m - 1)
    peq = {}
    for i, ch in enumerate(b):
        peq[ch] = peq.get(ch, 0) | (1 << i)
    pv, mv, score = mask, 0, m
    for ch in a:
        eq = peq.get(ch, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | (~(xh | pv) & mask)
        mh = pv & xh
        if ph & top:
            score += 1
        elif mh & top:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = mh | (~(xv | ph) & mask)
        mv = ph & xv
    return score


def jaccard(a, b):
    """Token-level Jaccard similarity of the sets of lower-cased words and punctuation marks."""
    ta, tb = (set(re.findall(r"\w+|[^\w\s]", s.lower())) for s in (a, b))
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


def copy_ratio(chosen, rejected):
    """The share of the rejected answer's words that the chosen one keeps, in order (difflib's matching
    blocks over whitespace-separated words): 1.0 for an untouched answer, near 0 for a fresh one."""
    rejected_words, chosen_words = rejected.split(), chosen.split()
    matcher = difflib.SequenceMatcher(None, rejected_words, chosen_words, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / max(1, len(rejected_words))


def contrastiveness(path):
    """Table 1's column for one pair file."""
    pairs = [tuple(split_completion(row, field, f"{path}:{number}")[1] for field in ("chosen", "rejected"))
             for number, row in read_jsonl(path)]
    if not pairs:
        raise DataError(f"{path}: no pairs")
    n = len(pairs)
    return {
        "pairs": n,
        "jaccard (higher = more contrastive)": sum(jaccard(c, r) for c, r in pairs) / n,
        "levenshtein (lower = more contrastive)": sum(levenshtein_bit_parallel(c, r) for c, r in pairs) / n,
        "copy ratio (higher = more contrastive)": sum(copy_ratio(c, r) for c, r in pairs) / n,
        "chosen length (chars)": sum(len(c) for c, _ in pairs) / n,
        "rejected length (chars)": sum(len(r) for _, r in pairs) / n,
    }


def cmd_stats(args):
    """The paper's Table 1, one column per readable pair file; the empty or bad ones are named after it."""
    columns, problems = {}, []
    for path in args.files:
        try:
            columns[Path(path).stem] = contrastiveness(path)
        except DataError as e:
            problems.append(str(e))
    if columns:
        print_table(columns)
    if problems:
        sys.exit(f"error: stats: {len(problems)} of {len(args.files)} files left out:\n  " + "\n  ".join(problems))
    return columns


def print_table(columns):
    """A Markdown table: one row per key, one column per name."""
    names = list(columns)
    label = max(len(k) for k in columns[names[0]])
    widths = [max(12, len(n)) for n in names]
    print(f"| {'':<{label}} | " + " | ".join(f"{n:>{w}}" for n, w in zip(names, widths)) + " |")
    print(f"|{'-' * (label + 2)}|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for key in columns[names[0]]:
        cells = [f"{columns[n][key]:.0f}" if key == "pairs" else f"{columns[n][key]:.3f}" for n in names]
        print(f"| {key:<{label}} | " + " | ".join(f"{c:>{w}}" for c, w in zip(cells, widths)) + " |")


# ============================================================================= plumbing
# What the subcommands above run on: an HTTP client with retries, and a job runner whose output survives a kill.

# ----------------------------------------------------------------------------- the HTTP client

CONNECT_TIMEOUT = 10.0  # seconds to reach the server; --timeout bounds the wait for its reply


class FatalRequestError(RuntimeError):
    """A reply that retrying cannot fix (4xx other than 429)."""


class RetriesExhausted(RuntimeError):
    """Every try of one request failed: the server down, overloaded or replying garbage."""


class ConsoleNotices:
    """Lines on stderr, at most one per kind per `interval` seconds; the lines held back are counted in the
    next one of their kind. Progress bars are cleared around each line."""

    def __init__(self, interval=15.0):
        self.interval, self.last, self.lock = interval, {}, threading.Lock()

    def __call__(self, kind, line):
        now = time.monotonic()
        with self.lock:
            shown_at, held = self.last.get(kind, (-math.inf, 0))
            if now - shown_at < self.interval:
                self.last[kind] = (shown_at, held + 1)
                return
            self.last[kind] = (now, 0)
        from tqdm import tqdm

        tqdm.write(line + (f" (and {held} more like it since the last such line)" if held else ""), file=sys.stderr)


class ChatClient:
    """POST {base_url}/chat/completions with retries: 429, 5xx, timeouts, dropped connections and 200s
    without valid JSON or choices are retried with exponential backoff and jitter, honouring Retry-After.
    Each retry is shown on stderr (one line per kind of failure per `notices` interval)."""

    max_backoff = 60.0  # seconds: the longest wait between two tries, Retry-After aside

    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", timeout=600.0, max_retries=8,
                 url_option="--base-url"):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env, self.url_option = model, api_key_env, url_option
        self.timeout, self.max_retries = timeout, max_retries
        key = os.environ.get(api_key_env, "")
        self._headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._local = threading.local()  # one requests.Session per thread
        self.notices = ConsoleNotices()

    def complete(self, messages, temperature, max_tokens, top_p=None, seed=None):
        """The reply text of one chat completion; top_p and seed are sent when given."""
        return self.choice(messages, temperature, max_tokens, top_p, seed)["message"]["content"]

    def choice(self, messages, temperature, max_tokens, top_p=None, seed=None):
        """The first choice of one chat completion as the server sent it: its `message` and `finish_reason`."""
        body = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        body.update({k: v for k, v in (("top_p", top_p), ("seed", seed)) if v is not None})
        return self._post(body, self.max_retries)

    def check(self, max_retries=1):
        """One tiny request with few retries, so that a wrong URL, model or key fails before any long work."""
        self._post({"model": self.model, "messages": [{"role": "user", "content": "Say OK."}], "temperature": 0.0,
                    "max_tokens": 1}, max_retries)

    def _session(self):
        """This thread's requests.Session. The proxy and CA-bundle environment variables are read once, here,
        for the server's URL: left to requests (trust_env), they are read again for every request, which costs
        more client time than the request itself. ~/.netrc is not read: the key is
        --api-key-env's, and requests would let a .netrc entry replace its Authorization header."""
        import requests  # here, not at the top: clair.py --help and the file-only subcommands answer at once

        if not hasattr(self._local, "session"):
            session = requests.Session()
            settings = session.merge_environment_settings(self.url, {}, None, None, None)
            session.trust_env = False
            session.proxies, session.verify = settings["proxies"], settings["verify"]
            self._local.session = session
        return self._local.session

    def _post(self, body, max_retries):
        import requests

        session = self._session()
        for attempt in range(max_retries + 1):
            wait_s, why = None, None
            try:
                r = session.post(self.url, json=body, headers=self._headers, timeout=(CONNECT_TIMEOUT, self.timeout))
            except requests.Timeout as e:
                why = f"{type(e).__name__} (the server may still be generating the abandoned request)"
            except requests.ConnectionError as e:
                why = type(e).__name__
            else:
                if r.status_code == 200:
                    try:
                        choice = r.json()["choices"][0]
                        if isinstance(choice["message"]["content"], str):
                            return choice
                    except (ValueError, KeyError, IndexError, TypeError):
                        pass
                    why = "a 200 reply without valid JSON choices"
                elif r.status_code == 429 or r.status_code >= 500:
                    why = f"HTTP {r.status_code}"
                    retry_after = r.headers.get("Retry-After", "")
                    wait_s = float(retry_after) if retry_after.replace(".", "", 1).isdigit() else None
                else:
                    raise FatalRequestError(f"{self.url}: HTTP {r.status_code}{self._hint(r.status_code)}: "
                                            f"{r.text[:300]}")
            if attempt == max_retries:
                raise RetriesExhausted(f"{self.url}: gave up after {attempt + 1} tries; last: {why}")
            if wait_s is None:
                wait_s = min(self.max_backoff, 2 ** attempt) * random.uniform(0.5, 1.0)
            self.notices(why, f"retrying {self.url}: {why}; attempt {attempt + 1} of {max_retries + 1} failed, "
                              f"next in {wait_s:.1f} s")
            time.sleep(wait_s)

    def _hint(self, status):
        """What to check for a 4xx that retrying cannot fix."""
        if status in (401, 403):
            return f" (check ${self.api_key_env})"
        if status == 404:
            return f" (check {self.url_option}: it should end in /v1, e.g. http://localhost:8000/v1; or the model)"
        return ""


def client_for(args):
    """The ChatClient of a subcommand's --base-url, --model, --api-key-env, --timeout and --max-retries."""
    return ChatClient(args.base_url, args.model, args.api_key_env, args.timeout, args.max_retries)


def decoding(args, sample_index=0):
    """A subcommand's decoding flags as ChatClient.complete takes them; the seed, when given, is offset by the
    sample index so that the samples of one prompt differ."""
    seed = None if args.seed is None else args.seed + sample_index
    return {"temperature": args.temperature, "max_tokens": args.max_tokens, "top_p": args.top_p, "seed": seed}


# ----------------------------------------------------------------------------- resumable output

def written_rows(path):
    """The rows already in `path`, each with an id. A torn last line (a kill mid-write) is cut off, to be
    redone; any other bad line is a DataError naming it, and nothing is deleted."""
    path = Path(path)
    if not path.exists():
        return []
    cut_torn_line(path)
    rows = []
    for number, row in read_jsonl(path):
        if "id" not in row:
            raise DataError(f"{path}:{number}: field 'id': missing")
        rows.append(row)
    return rows


class JsonlAppender:
    """Appends one flushed JSON line per row. The file and its folder are made at the first row, so a run
    that writes nothing leaves nothing behind."""

    def __init__(self, path):
        self.path, self.file = Path(path), None

    def write(self, row):
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a", encoding="utf-8")
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


def rows_to_skip(out, rejects_path):
    """Ids a rerun skips: those in `out` and those dropped to the rejects file. Failed rows (with an `error`)
    are taken out of the rejects file, replaced atomically, to be retried."""
    rejects = written_rows(rejects_path)
    dropped = [row for row in rejects if "error" not in row]
    if len(dropped) < len(rejects):  # the failed rows leave the file, to be retried
        if dropped:
            temporary = rejects_path.with_name(rejects_path.name + ".tmp")
            temporary.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in dropped), encoding="utf-8")
            temporary.replace(rejects_path)
        else:
            rejects_path.unlink()
    return {row["id"] for row in written_rows(out)} | {row["id"] for row in dropped}


def run_jobs(jobs, work, out, workers, desc):
    """Run work(job) -> (row, None) | (None, reject) for each (id, job) over a thread pool.

    Rows go to `out`, rejects (dropped, with the reason) to `out`.rejects.jsonl, one flushed line each
    as it completes. Rows whose retries ran out go to the rejects file with their `error`; a rerun retries
    them and skips every other id in either file. A fatal error stops at once. Exits non-zero when any row
    failed.
    """
    from tqdm import tqdm

    rejects_path = Path(str(out).removesuffix(".jsonl") + ".rejects.jsonl")
    skip = rows_to_skip(out, rejects_path)
    todo = [(i, job) for i, job in jobs if i not in skip]
    counts = Counter(skipped=len(jobs) - len(todo))
    notices = ConsoleNotices()
    start = time.time()
    with JsonlAppender(out) as rows_file, JsonlAppender(rejects_path) as rejects_file, \
            ThreadPoolExecutor(workers) as pool, tqdm(total=len(todo), desc=desc, dynamic_ncols=True) as bar:
        pending, queue = {}, iter(todo)
        while True:
            while len(pending) < 2 * workers and (item := next(queue, None)) is not None:
                pending[pool.submit(work, item[1])] = item[0]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                job_id = pending.pop(future)
                try:
                    row, reject = future.result()
                except FatalRequestError as e:
                    for f in pending:
                        f.cancel()
                    sys.exit(f"error: {e}")
                except Exception as e:  # retries exhausted or a local failure: kept with its error, for a rerun
                    counts["failed"] += 1
                    rejects_file.write({"id": job_id, "error": str(e)})
                    notices("failed", f"{desc}: {job_id} failed: {e}")
                else:
                    (rows_file if row is not None else rejects_file).write({"id": job_id, **(row or reject)})
                    counts["done" if row is not None else "dropped"] += 1
                bar.update()
                bar.set_postfix(done=counts["done"], failed=counts["failed"], dropped=counts["dropped"],
                                rps=f"{(counts['done'] + counts['dropped']) / (time.time() - start):.1f}",
                                refresh=False)  # drawn at tqdm's own pace, not once per request
    rejected = f" (in {rejects_path})" if counts["dropped"] or counts["failed"] else ""
    print(f"{desc}: {counts['done']} written to {out}, {counts['dropped']} dropped and {counts['failed']} failed"
          f"{rejected}, {counts['skipped']} already done")
    if counts["failed"]:
        sys.exit(f"error: {desc}: {counts['failed']} of {len(todo)} rows failed after retries, each with its last "
                 f"error in {rejects_path}; rerun the same command to retry them")
    return counts


# ----------------------------------------------------------------------------- input files

def read_rows(path, required):
    """Validated (id, row) pairs of a JSONL file: every `required` field present, ids unique.

    `prompt` may be a string or a list of chat messages; other required fields must be strings.
    """
    rows, seen = [], {}
    for number, row in read_jsonl(path):
        for field in required:
            value = row.get(field)
            ok = isinstance(value, str) or (field == "prompt" and isinstance(value, list) and value and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in value))
            if not ok:
                got = "missing" if value is None else f"a {type(value).__name__}"
                raise DataError(f"{path}:{number}: field '{field}': expected a string"
                                f"{' or chat messages' if field == 'prompt' else ''}, got {got}")
        this_id = str(row["id"])
        if this_id in seen:
            raise DataError(f"{path}:{number}: field 'id': duplicate id {this_id!r} (first on line {seen[this_id]})")
        seen[this_id] = number
        rows.append((this_id, row))
    return rows


# ----------------------------------------------------------------------------- command line

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and each option's default where it has one."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, http=True, default_temperature=0.7, default_max_tokens=2048):
        c = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__,
                           formatter_class=HelpFormatter)
        c.set_defaults(func=func)
        c.add_argument("--in", dest="inp", required=True, help="input JSONL")
        c.add_argument("--out", required=True, help="output JSONL, appended to (rejects: OUT.rejects.jsonl)")
        if http:
            local = name == "sample"
            c.add_argument("--base-url", required=not local, help="the server's OpenAI-compatible base URL, ending "
                           "in /v1, e.g. http://localhost:8000/v1" + (" (none: sample locally)" if local else ""))
            c.add_argument("--model", required=not local, default="SmolLM2-135M-Instruct" if local else None,
                           help="the model name sent to the server" + (
                               "; without --base-url, a local path or hub id" if local else ""))
            c.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the key")
            c.add_argument("--workers", type=int, default=16, help="concurrent requests; fewer when the server is "
                           "slow, since concurrency is what slows each request")
            c.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one reply (connecting: "
                           f"{CONNECT_TIMEOUT:.0f} s); keep it above --max-tokens at the server's slowest speed")
            c.add_argument("--max-retries", type=int, default=8, help="retries of a failed request")
            c.add_argument("--temperature", type=float, default=default_temperature, help="sampling temperature")
            c.add_argument("--max-tokens", type=int, default=default_max_tokens, help="the reply's length limit")
            c.add_argument("--top-p", type=float, help="nucleus sampling, sent when given (local sampling: 1.0)")
            c.add_argument("--seed", type=int, help="sent when given, plus the sample index for sample --n "
                           "(local sampling: each answer's seed comes from it and the answer's id; 0 when not given)")
        return c

    sample = command("sample", cmd_sample, default_max_tokens=512)
    sample.add_argument("--n", type=int, default=1, help="samples per prompt (the on-policy judge needs 2)")
    sample.add_argument("--batch-size", type=int, default=16, help="local generation batch")
    command("revise", cmd_revise).add_argument("--prompt-file", help="replaces the built-in revision prompt")
    command("stronger", cmd_stronger)
    command("judge", cmd_judge, default_temperature=0.0, default_max_tokens=1024)
    command("offpolicy", cmd_offpolicy, http=False)
    stats = sub.add_parser("stats", help=cmd_stats.__doc__.splitlines()[0], description=cmd_stats.__doc__)
    stats.set_defaults(func=cmd_stats)
    stats.add_argument("files", nargs="+", help="pair files in TRL's preference format")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return args.func(args)
    except DataError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
