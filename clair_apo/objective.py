"""What a step minimises: apo.py's preference losses and TRL's SFT term, each weighted, summed.

`--loss apo_zero sft --loss-weights 1.0 0.5` is TRL's spelling (loss_type, loss_weights) of RPO: APO-zero plus
half the SFT term. A preference term is the mean of its per-pair loss over the step's pairs. The SFT term is
the chosen completions' mean token negative log-likelihood, every chosen completion token of the step counted
once, so a long answer weighs more than a short one:

    sft = - sum_i log pi_theta(y_w,i | x_i) / sum_i |y_w,i|

TRL takes it as the cross-entropy over the chosen completion tokens of a micro-batch; here the step's tokens on
all processes are one pool, so micro-batching changes nothing, as the preference terms' mean over the step's
pairs does. It needs no reference; its gradient is plain autograd's.
"""

from dataclasses import dataclass

import torch

from apo import LOSSES

SFT = "sft"
TERMS = [*sorted(LOSSES), SFT]


def objective_error(losses, weights):
    """Why --loss `losses` with --loss-weights `weights` (None: 1 each) is no objective, or None."""
    if len(set(losses)) < len(losses):
        return f"--loss names a loss twice ({' '.join(losses)})"
    if weights is not None and len(weights) != len(losses):
        return f"--loss-weights takes one weight per --loss: {len(weights)} given for {' '.join(losses)}"
    return None


@dataclass(frozen=True)
class Objective:
    """The losses of --loss and their --loss-weights, {name: weight} in the order given, and beta."""
    terms: dict
    beta: float

    @classmethod
    def of(cls, args):
        """The objective of parsed flags: args.loss, args.loss_weights, args.beta."""
        return cls(dict(zip(args.loss, args.loss_weights)), args.beta)

    @property
    def sft(self):
        """Whether the SFT term is one of the terms."""
        return SFT in self.terms

    def __str__(self):
        return " + ".join(name if weight == 1 else f"{weight:g} {name}" for name, weight in self.terms.items())

    def pair_losses(self, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        """The preference terms' weighted sum per pair, shape [B], as apo.py's losses take and return it; zeros
        (no gradient) when the SFT term is the only one."""
        losses = [weight * LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                        ref_rejected_logps, self.beta)
                  for name, weight in self.terms.items() if name != SFT]
        return sum(losses[1:], losses[0]) if losses else torch.zeros_like(policy_chosen_logps.detach())


def sft_loss(policy_chosen_logps, chosen_tokens):
    """The SFT term's share of `policy_chosen_logps` (summed log-probs of chosen completions, [B]): their
    negated sum over `chosen_tokens`, the chosen completion tokens of the whole step."""
    return -policy_chosen_logps.sum() / chosen_tokens
