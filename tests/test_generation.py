"""clair_apo/generation.py's sampler: an exact sample of the temperature- and top-p-cut softmax, one uniform a
row a step from the row's own generator, and its top-k speed-up equal to the full sort."""

import torch
from transformers import TemperatureLogitsWarper, TopPLogitsWarper

from clair_apo.generation import NucleusSample


def nucleus_probabilities(scores, temperature, top_p):
    """The distribution transformers' own warpers sample from: temperature, top-p, softmax."""
    warped = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, scores.clone()))
    return torch.softmax(warped, dim=-1)


def sampled_tokens(scores, temperature, top_p, seeds, candidates=NucleusSample.CANDIDATES, steps=1):
    sampler = NucleusSample([torch.Generator().manual_seed(s) for s in seeds], temperature, top_p)
    sampler.CANDIDATES = candidates
    return torch.stack([sampler(None, scores).argmax(dim=-1) for _ in range(steps)])


def test_the_samples_follow_the_nucleus_distribution():
    """4,000 rows of one distribution, 5 steps: the sample frequencies match the warpers' probabilities, and no
    token outside the nucleus is ever drawn."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0)) * 2
    scores = logits.expand(4000, 50).contiguous()
    for temperature, top_p in ((0.7, 0.9), (1.0, 0.5), (1.3, 1.0)):
        expected = nucleus_probabilities(scores[:1], temperature, top_p)[0].double()
        tokens = sampled_tokens(scores, temperature, top_p, seeds=range(4000), steps=5).flatten()
        frequencies = torch.bincount(tokens, minlength=50).double() / len(tokens)
        assert (frequencies[expected == 0] == 0).all(), (temperature, top_p)
        assert 0.5 * (frequencies - expected).abs().sum() < 0.02, (temperature, top_p)


def test_a_row_draws_from_its_own_generator_alone():
    """A row's samples depend on its seed and its scores, not on the rows beside it."""
    scores = torch.randn(6, 300, generator=torch.Generator().manual_seed(1))
    together = sampled_tokens(scores, 0.8, 0.95, seeds=[10, 11, 12, 13, 14, 15], steps=4)
    alone = torch.cat([sampled_tokens(scores[i:i + 1], 0.8, 0.95, seeds=[10 + i], steps=4) for i in range(6)], dim=1)
    assert torch.equal(together, alone)


def test_the_top_k_candidates_give_the_full_sorts_samples():
    """With 20 candidates, two thirds of the rows' nuclei reach past them and sort the whole vocabulary; with the
    default, none do: the same seeds draw the same tokens either way."""
    scores = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2)) * torch.linspace(0.2, 4, 64)[:, None]
    top20 = torch.softmax(scores / 0.7, dim=-1).topk(20).values.sum(dim=-1)
    assert (top20 < 0.9).sum() > 10 and (top20 >= 0.9).sum() > 10  # both paths taken
    few = sampled_tokens(scores, 0.7, 0.9, seeds=range(64), candidates=20, steps=3)
    default = sampled_tokens(scores, 0.7, 0.9, seeds=range(64), steps=3)
    assert torch.equal(few, default)
