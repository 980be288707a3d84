"""Local generation: a batch of prompts answered by a local model, greedily or sampled with a seed per answer.

`clair.py sample`, evaluate.py, diagnose.py and experiment/ generate here, from the same prompt token ids
as training (chat_tokens.chat_ids). A sampled answer depends on its prompt and its seed alone, not on the
other prompts of its batch, so that a resumed `clair.py sample` writes what an uninterrupted one would.
"""

from dataclasses import dataclass

import torch

from clair_apo.chat_tokens import chat_ids
from clair_apo.models import autocast
from preference_data import as_messages


@dataclass(frozen=True)
class Decoding:
    """How to decode: at most `max_tokens` new tokens; greedily at temperature 0, else sampled from the softmax
    at `temperature`, cut to its top-p nucleus; computed in `dtype` (bf16: under autocast, as training)."""
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    dtype: str = "fp32"


def generate(model, tokenizer, prompts, decoding, seeds=None):
    """(answers, finish reasons, token counts) of a local model to a batch of prompts (strings or chat messages).

    A finish reason is "stop" where the model ended its turn (an end-of-sequence token) and "length" where it
    hit the limit; a token count is the generated tokens up to the end of the turn, its end included. A sampled
    prompt draws from its own generator, seeded by `seeds` (one per prompt; drawn from torch's global generator
    when None). The prompts' token ids are training's, left-padded under an attention mask; a tokenizer without
    a pad token (Llama-3) pads with its end-of-sequence id."""
    ids = [chat_ids(tokenizer, as_messages(p), add_generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=model.device)
    sampling = {}
    if decoding.temperature > 0:
        seeds = torch.randint(2 ** 62, (len(prompts),)).tolist() if seeds is None else seeds
        sampling = {"logits_processor": seeded_sampling(seeds, decoding, model.device)}
    with torch.no_grad(), autocast(model.device, decoding.dtype):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=decoding.max_tokens,
                                pad_token_id=pad, do_sample=False, **sampling)[:, width:]
    answers = [a.strip() for a in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return answers, *finishes(model, tokenizer, output)


def seeded_sampling(seeds, decoding, device):
    """Logits processors that make greedy decoding sample each row with its own generator: temperature, top-p,
    then InverseCdfSample, which leaves the sampled token the only one greedy decoding can pick."""
    from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    return LogitsProcessorList([TemperatureLogitsWarper(decoding.temperature), TopPLogitsWarper(decoding.top_p),
                                InverseCdfSample(generators)])


class InverseCdfSample:
    """A sample of each row's softmax, by its inverse cumulative distribution: one uniform u from the row's
    generator per step, and the first token, in token-id order, whose cumulative probability exceeds u. One
    float64 draw a row a step, on the generator's device: a seed gives the same answers on every CPU."""

    def __init__(self, generators):
        self.generators = generators

    def __call__(self, input_ids, scores):
        probs = torch.softmax(scores.float(), dim=-1)  # top-p's cut tokens are -inf: probability 0
        cdf = probs.double().cumsum(dim=-1)
        uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=g.device)
                             for g in self.generators]).to(cdf.device)
        token = torch.searchsorted(cdf, (uniform * cdf[:, -1]).unsqueeze(-1), right=True)
        token = token.clamp(max=scores.shape[-1] - 1)
        return torch.full_like(scores, -torch.inf).scatter_(-1, token, 0.0)


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
