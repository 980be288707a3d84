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
    input_ids, attention_mask, pad = prompt_batch(tokenizer, prompts, model.device)
    width = input_ids.shape[1]
    sampling = {}
    if decoding.temperature > 0:
        seeds = torch.randint(2 ** 62, (len(prompts),)).tolist() if seeds is None else seeds
        sampling = {"logits_processor": seeded_sampling(seeds, decoding, model.device)}
    with torch.no_grad(), autocast(model.device, decoding.dtype):
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=decoding.max_tokens,
                                pad_token_id=pad, do_sample=False, **sampling)[:, width:]
    answers = [a.strip() for a in tokenizer.batch_decode(output, skip_special_tokens=True)]
    return answers, *finishes(model, tokenizer, output)


def prompt_batch(tokenizer, prompts, device):
    """(input ids, attention mask, pad id) of `prompts` with the generation prompt, left-padded: training's token
    ids (chat template, its BOS only, the same date). Without a pad token (Llama-3) the end-of-sequence id pads."""
    ids = [chat_ids(tokenizer, as_messages(p), add_generation_prompt=True) for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(map(len, ids))
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, attention_mask, pad


def seeded_sampling(seeds, decoding, device):
    """A logits processor that makes greedy decoding sample each row with its own generator (NucleusSample)."""
    from transformers import LogitsProcessorList

    generators = [torch.Generator(device).manual_seed(seed) for seed in seeds]
    return LogitsProcessorList([NucleusSample(generators, decoding.temperature, decoding.top_p)])


class NucleusSample:
    """A sample of each row's softmax at `temperature`, cut to its top-p nucleus (the most probable tokens
    whose preceding mass is below top_p, as transformers' TopPLogitsWarper keeps them), drawn by the inverse
    cumulative distribution: one float64 uniform u from the row's own generator per step, and the first token,
    most probable first, whose cumulative probability exceeds u times the nucleus's mass. The scores it
    returns leave that token the only one greedy decoding can pick.

    The nucleus is looked for among the `CANDIDATES` most probable tokens, a top-k, which costs far less than
    sorting the vocabulary (docs/benchmarks.md, row 12); a row whose nucleus is larger sorts the whole of it.
    tests/test_generation.py checks both paths against each other and against transformers' warpers."""
    CANDIDATES = 1024

    def __init__(self, generators, temperature, top_p):
        self.generators, self.temperature, self.top_p = generators, temperature, top_p

    def __call__(self, input_ids, scores):
        logits = scores.float() / self.temperature
        log_total = logits.logsumexp(dim=-1, keepdim=True)
        out = torch.full_like(scores, -torch.inf)
        if self.top_p >= 1:  # the whole vocabulary, in token-id order: no sort needed
            cdf = (logits - log_total).exp().double().cumsum(dim=-1)
            every = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)
            return self.draw(out, torch.arange(len(logits), device=logits.device), cdf, every)
        top_logits, tokens = logits.topk(min(self.CANDIDATES, logits.shape[-1]), dim=-1)
        cdf = (top_logits - log_total).exp().double().cumsum(dim=-1)
        beyond = cdf[:, -1] < self.top_p  # rows whose nucleus reaches past the candidates
        rows = (~beyond).nonzero()[:, 0]
        self.draw(out, rows, cdf[rows], tokens[rows])
        rows = beyond.nonzero()[:, 0]
        if len(rows):
            sorted_logits, sorted_tokens = logits[rows].sort(dim=-1, descending=True)
            self.draw(out, rows, (sorted_logits - log_total[rows]).exp().double().cumsum(dim=-1), sorted_tokens)
        return out

    def draw(self, out, rows, cdf, tokens):
        """Set out[row, its sample] = 0 for each of `rows`, whose `cdf` runs over its `tokens` in their order."""
        if not len(rows):
            return out
        before = torch.cat([cdf.new_zeros(len(cdf), 1), cdf[:, :-1]], dim=-1)
        mass = (cdf * (before < self.top_p)).max(dim=-1).values  # the cdf at the nucleus's last token
        uniform = torch.cat([torch.rand(1, generator=self.generators[r], dtype=torch.float64,
                                        device=self.generators[r].device) for r in rows.tolist()])
        position = torch.searchsorted(cdf, (uniform.to(cdf.device) * mass).unsqueeze(-1), right=True)
        out[rows, tokens.gather(-1, position.clamp(max=cdf.shape[-1] - 1))[:, 0]] = 0.0
        return out


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
