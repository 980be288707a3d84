"""Preference data as users have it: JSONL read line by line, and TRL's preference format.

Needs only the standard library, so clair.py (over raw HTTP), train.py and evaluate.py share it. Bad input
is a DataError naming the file, line and field.
"""

import json
from collections import Counter
from pathlib import Path


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


def cut_torn_line(path):
    """Truncate `path` after its last newline: a last line torn by a kill mid-write goes."""
    with open(path, "r+b") as f:
        f.truncate(f.read().rfind(b"\n") + 1)


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


def load_pairs(path):
    """Preference pairs in TRL's format: (rows, drop counts).

    `prompt`, `chosen`, `rejected` are strings or chat-message lists. For message lists the last
    assistant turn is the completion and earlier turns belong to the prompt (the released CLAIR layout:
    a string `prompt` plus `chosen`/`rejected` = [user turn, assistant turn]). Extra fields such as
    `rational` are ignored. A row whose completion is empty or whose chosen equals its rejected is dropped
    and counted; anything malformed is a DataError naming file, line and field.
    """
    rows, drops, seen = [], Counter(), set()
    for number, row in read_jsonl(path):
        where = f"{path}:{number}"
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
        row_id = str(row.get("id", f"{Path(path).name}:{number}"))
        if row_id in seen:
            raise DataError(f"{where}: field 'id': duplicate id {row_id!r}")
        seen.add(row_id)
        if not chosen.strip() or not rejected.strip():
            drops["empty completion"] += 1
        elif chosen == rejected:
            drops["chosen identical to rejected"] += 1
        else:
            rows.append({"id": row_id, "prompt": prompt, "chosen": chosen, "rejected": rejected})
    if not rows:
        raise DataError(f"{path}: no usable pairs")
    return rows, drops
