"""Token ids of prompts and completions, through the model's chat template, and their truncation.

Every script that runs a model tokenises here, with the same template and date, so train.py, evaluate.py,
experiment/ and `clair.py sample` agree on token ids, and so on the reference cache's keys.
"""

from collections import Counter

from jinja2 import TemplateError

from preference_data import DataError

# Llama-3.2's and 3.3's chat templates print today's date unless given `date_string`: other token ids every
# day, reference cache misses, evaluate.py disagreeing with train.py. They get Llama-3.1's fixed date instead.
TEMPLATE_DATE = "26 Jul 2024"


def chat_ids(tokenizer, messages, add_generation_prompt=False):
    """Token ids of `messages` as the chat template writes them (a BOS only where the template writes one),
    dated TEMPLATE_DATE."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True,
                                         return_dict=False, date_string=TEMPLATE_DATE)


def tokenize_completion(tokenizer, prompt, completion):
    """(prompt ids, completion ids) through the chat template, cut positionally.

    The prompt is rendered with the generation prompt; prompt + completion is rendered and tokenised once,
    and the completion is what follows the prompt's tokens: everything the template writes for the answer
    turn, an empty think block (Qwen3) and the end-of-turn token included.
    """
    prompt_ids = chat_ids(tokenizer, prompt, add_generation_prompt=True)
    full_ids = chat_ids(tokenizer, prompt + [{"role": "assistant", "content": completion}])
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise DataError("the chat template renders the prompt differently with and without the answer; "
                        "the completion boundary would be wrong")
    return prompt_ids, full_ids[len(prompt_ids):]


def tokenize_pairs(tokenizer, rows, max_length, max_prompt_length):
    """Token ids of each pair: (list of {'id', 'prompt', 'chosen', 'rejected'}, drop counts).

    Truncation: a prompt longer than max_prompt_length drops the pair; otherwise each completion keeps
    its first max_length - len(prompt) tokens. A pair whose sides are then the same tokens is dropped.
    A template that refuses a row (Gemma's on a system turn) is a DataError naming the row.
    """
    pairs, drops = [], Counter()
    for row in rows:
        try:
            prompt_ids, chosen_ids = tokenize_completion(tokenizer, row["prompt"], row["chosen"])
            _, rejected_ids = tokenize_completion(tokenizer, row["prompt"], row["rejected"])
        except (DataError, TemplateError) as e:
            raise DataError(f"pair {row['id']!r}: {e}") from None
        if len(prompt_ids) > max_prompt_length:
            drops["prompt longer than --max-prompt-length"] += 1
            continue
        room = max_length - len(prompt_ids)
        chosen_ids, rejected_ids = chosen_ids[:room], rejected_ids[:room]
        if chosen_ids == rejected_ids:
            drops["chosen identical to rejected once tokenised and truncated"] += 1
            continue
        pairs.append({"id": row["id"], "prompt": prompt_ids, "chosen": chosen_ids, "rejected": rejected_ids})
    return pairs, drops


