"""Local generation: a batch of prompts answered by a local model, greedily or sampled with a seed per answer.

`clair.py sample`, evaluate.py, diagnose.py and experiment/ generate here, from the same prompt token ids
as training (chat_tokens.chat_ids).
"""

import torch

from clair_apo.chat_tokens import chat_ids
from clair_apo.models import autocast
from preference_data import as_messages


def generate(model, tokenizer, prompts, max_tokens, temperature=0.0, top_p=1.0, seeds=None, dtype="fp32"):
    """(answers, finish reasons, token counts) of a local model to a batch of prompts (strings or chat messages).

    A finish reason is "stop" where the model ended its turn (an end-of-sequence token) and "length" where it
    hit `max_tokens`; a token count is the generated tokens up to the end of the turn, its end included. Temperature 0 decodes greedily; otherwise each prompt samples with its own generator,
    seeded by `seeds` (one per prompt; drawn from torch's global generator when None), so that an answer does
    not depend on the other prompts of its batch. `dtype` bf16 decodes under autocast, as training computes.

    The prompts' token ids are training's (chat template, its BOS only, the same date), left-padded under an
    attention mask. A tokenizer without a pad token (Llama-3) pads with its end-of-sequence id."""
    ids = [chat_ids(tokenizer, as_messages(p), add_generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    sampling = {}
    if temperature > 0:
        seeds = torch.randint(2 ** 62, (len(prompts),)).tolist() if seeds is None else seeds
        sampling = {"logits_processor": seeded_sampling(seeds, temperature, top_p, model.device)}
    with torch.no_grad(), autocast(model.device, dtype):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                                pad_token_id=pad, do_sample=False, **sampling)[:, width:]
    answers = [a.strip() for a in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return answers, *finishes(model, tokenizer, output)


def seeded_sampling(seeds, temperature, top_p, device):
    """Logits processors that make greedy decoding sample each row with its own generator: temperature and
    top-p, then Gumbel noise (the argmax of logits plus Gumbel noise is a sample of their softmax), drawn on
    `device`: a seed gives the same samples on every CPU, and other ones on a GPU."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]

    def gumbel_noise(input_ids, scores):
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64, device=device)
                               for g in generators])
        return scores - (-uniform.log()).log().to(scores)

    return LogitsProcessorList([TemperatureLogitsWarper(temperature), TopPLogitsWarper(top_p), gumbel_noise])


def finishes(model, tokenizer, output):
    """(finish reasons, token counts) of rows of generated ids: "stop" and the tokens up to the first
    end-of-sequence token, its own included, where a row holds one; "length" and the whole row elsewhere."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [tokenizer.eos_token_id if eos is None else eos])
    reasons, counts = [], []
    for row in output.tolist():  # one copy off the device
        end = next((k for k, token in enumerate(row) if token in eos), None)
        reasons.append("length" if end is None else "stop")
        counts.append(len(row) if end is None else end + 1)
    return reasons, counts
