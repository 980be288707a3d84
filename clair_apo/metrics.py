"""The metrics TRL logs for preference training, named as TRL names them, from summed log-probs."""

import torch

from apo import rewards
from clair_apo.objective import SFT

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def pair_stats(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair metric sums of a micro-batch, in METRICS order: a [len(METRICS)] tensor."""
    r_w, r_l = rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    columns = [loss.detach(), r_w, r_l, r_w - r_l, (r_w > r_l).float(), policy_chosen.detach(), policy_rejected.detach()]
    return torch.stack([c.double().sum() for c in columns])


def means(totals, pairs, objective, chosen_tokens):
    """METRICS as means over `pairs` pairs, from the sum of their pair_stats, `totals`. With an SFT term in
    `objective`, `nll_loss` (TRL's name) is that term, the chosen completions' summed log-prob negated over
    their `chosen_tokens`, and `loss` adds it, weighted."""
    metrics = {name: value / pairs for name, value in zip(METRICS, totals.tolist())}
    if objective.sft:
        metrics["nll_loss"] = -totals[METRICS.index("logps/chosen")].item() / chosen_tokens
        metrics["loss"] += objective.terms[SFT] * metrics["nll_loss"]
    return metrics


def pair_metrics(policy, ref, objective, chosen_tokens):
    """means() of [N, 2] policy and reference log-probs under `objective`; `chosen_tokens`: the chosen completions'
    tokens, all N together."""
    (pc, pr), (rc, rr) = policy.double().T, ref.double().T
    totals = pair_stats(objective.pair_losses(pc, pr, rc, rr), pc, pr, rc, rr, objective.beta)
    return means(totals, len(policy), objective, chosen_tokens)
