"""Preference data as users have it: JSONL read line by line, parquet files and Hub datasets, TRL's
preference format, and UltraFeedback's scored completions.

Needs only the standard library, so clair.py (over raw HTTP), train.py and evaluate.py share it; parquet
needs pyarrow and Hub datasets need datasets, imported only when used. Bad input is a DataError naming the
file, line (or row) and field.
"""

import json
import math
import re
from collections import Counter
from pathlib import Path

# The bundled CLAIR pairs (data/README.md): train.py's default --data and --eval-data.
BUNDLED_TRAIN = Path(__file__).resolve().parent / "data" / "clair_train.jsonl"
BUNDLED_EVAL = BUNDLED_TRAIN.with_name("clair_eval.jsonl")


class DataError(ValueError):
    """Bad input, with the file, line and field it came from."""


def read_jsonl(path):
    """Yield (line_number, object) for each non-blank line; a malformed line or a file that is not UTF-8 text
    (a parquet file, say) is a DataError."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        why = f"not UTF-8 text (byte {e.start}); expected JSONL, one JSON object a line"
        raise DataError(f"{path}:{line}: {why}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{number}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
        yield number, obj


def read_records(source):
    """Yield (where, row) for each row of a JSONL file, a .parquet file or a Hub dataset id (owner/name, its
    train split); `where` is file:line for JSONL and source[index] for the others, counted from 0."""
    path = Path(source)
    hub_id = (re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and path.suffix not in (".json", ".jsonl")
              and not path.exists())
    if path.suffix == ".parquet":
        pyarrow = optional_import("pyarrow", f"{source}: reading parquet")
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except (OSError, pyarrow.ArrowException) as e:
            raise DataError(f"{source}: cannot read as parquet: {str(e).splitlines()[0]}") from None
    elif hub_id:
        datasets = optional_import("datasets", f"{source}: reading a Hub dataset")
        try:
            rows = datasets.load_dataset(str(source), split="train")
        except Exception as e:  # offline, unknown, gated or without a train split: one line, not a traceback
            why = str(e).splitlines()[0] if str(e) else "no message"
            raise DataError(f"{source}: cannot load the Hub dataset ({type(e).__name__}: {why})") from None
    else:
        for number, row in read_jsonl(source):
            yield f"{source}:{number}", row
        return
    for index, row in enumerate(rows):
        yield f"{source}[{index}]", row


def row_id(row, where):
    """The row's `id`, or where it is (file:line, file[index]) without the file's folder."""
    return str(row.get("id", Path(where).name))


def optional_import(package, purpose):
    """`package`, or a DataError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise DataError(f"{purpose} needs {package}: pip install {package}") from None


def cut_torn_line(path):
    """Truncate `path` after its last newline: a last line torn by a kill mid-write goes."""
    with open(path, "r+b") as f:
        f.truncate(f.read().rfind(b"\n") + 1)


def as_messages(prompt):
    """A prompt as chat messages: a string is one user turn."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _messages(value, where):
    """Check a list of chat messages: each a dict with a string `role` and a string `content`."""
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}[{i}]: expected {{'role': str, 'content': str}}")
    return value


def split_completion(row, field, where):
    """(prompt turns before the completion, completion text) of `chosen` or `rejected`."""
    value = row.get(field)
    if isinstance(value, str):
        return None, value
    if isinstance(value, list) and value:
        _messages(value, f"{where}: field '{field}'")
        if value[-1]["role"] != "assistant":
            raise DataError(f"{where}: field '{field}': the last message must be the assistant's")
        return value[:-1] or None, value[-1]["content"]
    kind = "missing" if value is None else f"a {type(value).__name__}"
    raise DataError(f"{where}: field '{field}': expected a string or a non-empty list of messages, got {kind}")


def best_vs_worst(row, where):
    """The off-policy judge's pair of an UltraFeedback row: the best- against the worst-scored completion, or
    None on a tie. The row has `prompt` (or `instruction`) and `completions`, a list of objects with a
    `response` (or `text`) and an `overall_score` (or `score`)."""
    prompt = row.get("prompt", row.get("instruction"))
    completions = row.get("completions")
    if not isinstance(prompt, (str, list)) or not isinstance(completions, list):
        raise DataError(f"{where}: fields 'prompt' (or 'instruction') and 'completions' are required")
    scored = []
    for i, c in enumerate(completions):
        text = c.get("response", c.get("text")) if isinstance(c, dict) else None
        score = c.get("overall_score", c.get("score")) if isinstance(c, dict) else None
        if not isinstance(text, str) or not isinstance(score, (int, float)):
            raise DataError(f"{where}: field 'completions[{i}]': needs a 'response' and a numeric 'overall_score'")
        scored.append((score, text))
    scored.sort(key=lambda s: s[0])
    if len(scored) < 2 or scored[0][0] == scored[-1][0]:
        return None
    return {"prompt": prompt, "chosen": scored[-1][1], "rejected": scored[0][1], "score_chosen": scored[-1][0],
            "score_rejected": scored[0][0]}


def load_pairs(source):
    """Preference pairs from a JSONL file, a .parquet file or a Hub dataset id: (rows, drop counts).

    TRL's format: `prompt`, `chosen`, `rejected` are strings or chat-message lists. For message lists the
    last assistant turn is the completion and earlier turns belong to the prompt (the released CLAIR layout:
    a string `prompt` plus `chosen`/`rejected` = [user turn, assistant turn]). Extra fields such as
    `rational` are ignored. A row in UltraFeedback's layout (`completions`, no `chosen`) becomes its best-
    against-worst pair. A row whose completion is empty, whose chosen equals its rejected or whose scores
    tie is dropped and counted; anything malformed is a DataError naming file, line (or row) and field.
    """
    rows, drops, seen = [], Counter(), set()
    for where, row in read_records(source):
        if "completions" in row and "chosen" not in row:
            pair = best_vs_worst(row, where)
            if pair is None:
                drops["tied scores"] += 1
                continue
            row = {**row, **pair}
        chosen_turns, chosen = split_completion(row, "chosen", where)
        rejected_turns, rejected = split_completion(row, "rejected", where)
        if chosen_turns != rejected_turns:
            raise DataError(f"{where}: fields 'chosen' and 'rejected' carry different prompt turns")
        prompt = row.get("prompt")
        if chosen_turns is not None:
            prompt = chosen_turns
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        elif isinstance(prompt, list) and prompt:
            prompt = _messages(prompt, f"{where}: field 'prompt'")
        else:
            raise DataError(f"{where}: field 'prompt': expected a string or a list of messages")
        pair_id = row_id(row, where)
        if pair_id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {pair_id!r}")
        seen.add(pair_id)
        if not chosen.strip() or not rejected.strip():
            drops["empty completion"] += 1
        elif chosen == rejected:
            drops["chosen identical to rejected"] += 1
        else:
            rows.append({"id": pair_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not rows:
        raise DataError(f"{source}: no usable pairs")
    return rows, drops


# ----------------------------------------------------------------------------- TRL's precomputed reference log-probs

REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # TRL's names: log pi_ref summed over completion tokens


def read_reference_logps(source):
    """{row id: [ref_chosen_logps, ref_rejected_logps]} from the TRL columns of a JSONL file, a .parquet file or a
    Hub dataset id; empty when no row has them. Ids are load_pairs' (row_id). A value that is not a finite number,
    or a row without the columns where other rows have them, is a DataError naming where it is and the field."""
    found, first_without = {}, None
    for where, row in read_records(source):
        if not any(name in row for name in REFERENCE_COLUMNS):
            first_without = first_without or where
            continue
        values = []
        for name in REFERENCE_COLUMNS:
            value = row.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where}: field '{name}': expected a finite number (a summed log-prob), got {value!r}")
            values.append(float(value))
        found[row_id(row, where)] = values
    if found and first_without:
        raise DataError(f"{first_without}: fields {', '.join(map(repr, REFERENCE_COLUMNS))}: missing, while other "
                        "rows have them")
    return found


def write_reference_logps(rows, logps, path):
    """Write load_pairs' `rows` as JSONL in TRL's conversational preference format (the prompt's messages, each
    completion as an assistant message) with TRL's columns added: logps[i] = (log pi_ref(chosen), log
    pi_ref(rejected)) of rows[i], summed over completion tokens. JSON keeps every float exactly, so
    read_reference_logps reads the same values back, and load_pairs the same rows."""
    with open(path, "w", encoding="utf-8") as f:
        for row, (chosen, rejected) in zip(rows, logps, strict=True):
            completions = {side: [{"role": "assistant", "content": row[side]}] for side in ("chosen", "rejected")}
            columns = dict(zip(REFERENCE_COLUMNS, (float(chosen), float(rejected))))
            f.write(json.dumps({**row, **completions, **columns}, ensure_ascii=False) + "\n")
    return str(path)
