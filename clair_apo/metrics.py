"""The metrics TRL logs for preference training, named as TRL names them, from summed log-probs."""

import torch

from apo import rewards

METRICS = ["loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected"]


def pair_stats(loss, policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta):
    """Per-pair metric sums of a micro-batch, in METRICS order: a [len(METRICS)] tensor."""
    r_w, r_l = rewards(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    columns = [loss.detach(), r_w, r_l, r_w - r_l, (r_w > r_l).float(), policy_chosen.detach(), policy_rejected.detach()]
    return torch.stack([c.double().sum() for c in columns])


def pair_metrics(policy, ref, loss_fn, beta):
    """METRICS as means over pairs, from [N, 2] policy and reference log-probs."""
    (pc, pr), (rc, rr) = policy.double().T, ref.double().T
    totals = pair_stats(loss_fn(pc, pr, rc, rr, beta), pc, pr, rc, rr, beta)
    return {name: value / len(policy) for name, value in zip(METRICS, totals.tolist())}
