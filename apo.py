"""Preference losses of the paper: DPO, APO-zero and APO-down, with hand-written gradients.

D'Oosterlinck et al. 2024, "Anchored Preference Optimization and Contrastive Revisions".

Every loss takes the four summed completion log-probs of a batch of pairs, shape [B]:
    policy_chosen_logps   log pi_theta(y_w | x)      policy_rejected_logps   log pi_theta(y_l | x)
    ref_chosen_logps      log pi_ref(y_w | x)        ref_rejected_logps      log pi_ref(y_l | x)
and returns the per-pair loss, shape [B]. With Delta(y) = log pi_theta(y|x) - log pi_ref(y|x):

    r_w = beta * Delta(y_w)        r_l = beta * Delta(y_l)        sigma = logistic sigmoid

    DPO        L = -log sigma(r_w - r_l)                      (= ln 2 when policy == reference)
    APO-zero   L = 1 - sigma(r_w) + sigma(r_l)                (paper eq. 7, plus 1: = 1 at start)
    APO-down   L = 1 + sigma(r_w) - sigma(r_w - r_l)          (paper eq. 8, plus 1: = 1 at start)

The constant 1 keeps both APO losses in [0, 2], so logged values compare directly with TRL's; it
changes no gradient. Each paired loss is a torch.autograd.Function (static forward, setup_context and
backward: torch.compile(fullgraph=True) traces it) whose backward is the closed form of the paper, with
delta(u) = sigma(u) * (1 - sigma(u)) (peak 1/4 at u = 0) and g = grad log pi_theta:

    DPO        grad L = -beta * sigma(r_l - r_w) * (g_w - g_l)
    APO-zero   grad L = -beta * delta(r_w) * g_w + beta * delta(r_l) * g_l
    APO-down   grad L =  beta * delta(r_w) * g_w - beta * delta(r_w - r_l) * (g_w - g_l)

Dtypes: the math runs in float64 for float64 inputs and in float32 otherwise (bfloat16, float16,
float32); the loss is returned in that compute dtype, gradients in each input's own dtype.
All of it is finite for any finite input: sigmoid, delta and softplus saturate instead of overflowing.
"""

import torch
import torch.nn.functional as F


def _compute_dtype(tensor):
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    """r_w, r_l = beta * (log pi_theta - log pi_ref), in the compute dtype."""
    dtype = _compute_dtype(policy_chosen_logps)
    chosen = beta * (policy_chosen_logps.to(dtype) - ref_chosen_logps.to(dtype))
    rejected = beta * (policy_rejected_logps.to(dtype) - ref_rejected_logps.to(dtype))
    return chosen, rejected


def _delta(u):
    """delta(u) = sigma(u) * (1 - sigma(u)) = sigma(u) * sigma(-u), the derivative of sigma."""
    return torch.sigmoid(u) * torch.sigmoid(-u)


def _input_grads(ctx, grad_chosen, grad_rejected):
    """Gradients for (policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta).

    The reference enters every loss only through Delta = policy - ref, so its gradient is the
    policy gradient negated. beta gets none (it is a hyperparameter).
    """
    chosen_dtype, rejected_dtype = ctx.dtypes
    grad_chosen, grad_rejected = grad_chosen.to(chosen_dtype), grad_rejected.to(rejected_dtype)
    return grad_chosen, grad_rejected, -grad_chosen, -grad_rejected, None


class _PairLoss(torch.autograd.Function):
    """Shared plumbing: `setup_context` saves the inputs. Each loss has a static `forward` (the loss from the
    rewards) and a static `backward` (its closed-form gradient): the form torch.compile traces whole."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        *logps, beta = inputs
        ctx.save_for_backward(*logps)
        ctx.beta = beta
        ctx.dtypes = (logps[0].dtype, logps[1].dtype)


class _DPO(_PairLoss):
    @staticmethod
    def forward(*inputs):
        # -log sigma(r_w - r_l) = softplus(-(r_w - r_l)): finite for any margin.
        r_w, r_l = _rewards(*inputs)
        return F.softplus(r_l - r_w)

    @staticmethod
    def backward(ctx, grad_loss):
        # dL/dlogpi(y_w) = -beta * sigma(r_l - r_w);  dL/dlogpi(y_l) = +beta * sigma(r_l - r_w).
        r_w, r_l = _rewards(*ctx.saved_tensors, ctx.beta)
        weight = grad_loss * ctx.beta * torch.sigmoid(r_l - r_w)
        return _input_grads(ctx, -weight, weight)


class _APOZero(_PairLoss):
    @staticmethod
    def forward(*inputs):
        # Paper eq. 7 (+1): push the chosen likelihood up and the rejected down, each anchored at ref.
        r_w, r_l = _rewards(*inputs)
        return 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)

    @staticmethod
    def backward(ctx, grad_loss):
        # dL/dlogpi(y_w) = -beta * delta(r_w);  dL/dlogpi(y_l) = +beta * delta(r_l).
        r_w, r_l = _rewards(*ctx.saved_tensors, ctx.beta)
        weight = grad_loss * ctx.beta
        return _input_grads(ctx, -weight * _delta(r_w), weight * _delta(r_l))


class _APODown(_PairLoss):
    @staticmethod
    def forward(*inputs):
        # Paper eq. 8 (+1): push the chosen likelihood down, and the rejected further down (margin term).
        r_w, r_l = _rewards(*inputs)
        return 1 + torch.sigmoid(r_w) - torch.sigmoid(r_w - r_l)

    @staticmethod
    def backward(ctx, grad_loss):
        # dL/dlogpi(y_w) = beta * delta(r_w) - beta * delta(r_w - r_l)  (0 at initialisation);
        # dL/dlogpi(y_l) = beta * delta(r_w - r_l).
        r_w, r_l = _rewards(*ctx.saved_tensors, ctx.beta)
        weight = grad_loss * ctx.beta
        margin = weight * _delta(r_w - r_l)
        return _input_grads(ctx, weight * _delta(r_w) - margin, margin)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """DPO: -log sigma(r_w - r_l), per pair. ln 2 when policy == reference."""
    return _DPO.apply(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def apo_zero_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """APO-zero (eq. 7): chosen up, rejected down. For chosen answers better than the model (CLAIR)."""
    return _APOZero.apply(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def apo_down_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """APO-down (eq. 8): both down, rejected more. For a model already better than the chosen answers."""
    return _APODown.apply(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


def apo_zero_unpaired_loss(policy_logps, ref_logps, desirable, beta=0.1):
    """APO-zero on unpaired (KTO-style) data: 1 - sigma(r) for a desirable completion, sigma(r) otherwise.

    `desirable` is a bool tensor of shape [B]. Plain autograd: the gradient is -beta * delta(r) * g for
    a desirable completion and +beta * delta(r) * g for an undesirable one.
    """
    dtype = _compute_dtype(policy_logps)
    reward = beta * (policy_logps.to(dtype) - ref_logps.to(dtype))
    return torch.where(desirable, 1 - torch.sigmoid(reward), torch.sigmoid(reward))


def rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta=0.1):
    """Detached implicit rewards (r_w, r_l) = beta * (log pi_theta - log pi_ref), for logging."""
    with torch.no_grad():
        return _rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)


LOSSES = {"dpo": dpo_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss}
