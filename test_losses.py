"""apo.py against the paper's equations: values, closed-form gradients, directions and saturation."""

import math

import pytest
import torch
import torch.nn.functional as F

from apo import LOSSES, apo_down_loss, apo_zero_loss, apo_zero_unpaired_loss, dpo_loss, rewards

BETA = 0.1


def reference_formula(name, pc, pr, rc, rr, beta):
    """The paper's losses written naively, differentiated by autograd (float64 only)."""
    r_w, r_l = beta * (pc - rc), beta * (pr - rr)
    return {
        "dpo": -F.logsigmoid(r_w - r_l),
        "apo_zero": 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l),
        "apo_down": 1 + torch.sigmoid(r_w) - torch.sigmoid(r_w - r_l),
    }[name]


def random_logps(batch, scale, seed, dtype=torch.float64):
    """Four [batch] tensors of log-probs whose log-ratios have magnitude about `scale`, mixed signs."""
    g = torch.Generator().manual_seed(seed)
    ref_c, ref_r = -50 * torch.rand(batch, generator=g, dtype=dtype), -50 * torch.rand(batch, generator=g, dtype=dtype)
    pol_c = ref_c + scale * torch.randn(batch, generator=g, dtype=dtype)
    pol_r = ref_r + scale * torch.randn(batch, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (pol_c, pol_r, ref_c, ref_r)]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [0.1, 10.0, 80.0])
def test_gradcheck(name, scale):
    inputs = random_logps(16, scale, seed=int(scale))
    assert torch.autograd.gradcheck(lambda *a: LOSSES[name](*a, beta=BETA), inputs)


def test_gradcheck_unpaired():
    pol, ref = random_logps(16, 10.0, seed=1)[:2]
    desirable = torch.arange(16) % 2 == 0
    assert torch.autograd.gradcheck(lambda p, r: apo_zero_unpaired_loss(p, r, desirable, beta=BETA), (pol, ref))


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("scale", [0.5, 30.0, 1e3])
def test_backward_equals_autograd_of_plain_formula(name, scale):
    inputs = random_logps(64, scale, seed=7)
    weights = torch.randn(64, dtype=torch.float64)  # a non-uniform upstream gradient
    loss = LOSSES[name](*inputs, beta=BETA)
    hand = torch.autograd.grad((loss * weights).sum(), inputs)
    plain = reference_formula(name, *inputs, BETA)
    auto = torch.autograd.grad((plain * weights).sum(), inputs)
    torch.testing.assert_close(loss, plain, atol=1e-10, rtol=0)
    for h, a in zip(hand, auto):
        torch.testing.assert_close(h, a, atol=1e-10, rtol=0)


def test_values_at_initialisation():
    logps = -torch.rand(8) * 100
    assert torch.allclose(dpo_loss(logps, logps - 3, logps, logps - 3), torch.full((8,), math.log(2)))
    assert torch.allclose(apo_zero_loss(logps, logps - 3, logps, logps - 3), torch.ones(8))
    assert torch.allclose(apo_down_loss(logps, logps - 3, logps, logps - 3), torch.ones(8))


def grads_wrt_policy(loss_fn, pc, pr, rc, rr):
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    loss_fn(pc, pr, rc, rr, beta=BETA).sum().backward()
    return pc.grad, pr.grad


def test_apo_down_chosen_gradient_is_zero_at_initialisation():
    logps = -torch.rand(8, dtype=torch.float64) * 100
    g_chosen, g_rejected = grads_wrt_policy(apo_down_loss, logps, logps - 1, logps, logps - 1)
    assert torch.equal(g_chosen, torch.zeros(8, dtype=torch.float64))  # exactly, not approximately
    assert torch.allclose(g_rejected, torch.full((8,), BETA / 4, dtype=torch.float64))  # only y_l moves


def descend(loss_fn, pc, pr, rc, rr, lr, steps):
    """Plain gradient descent on the policy log-probs, as if they were free parameters."""
    pc, pr = pc.clone().requires_grad_(), pr.clone().requires_grad_()
    for _ in range(steps):
        loss_fn(pc, pr, rc, rr, beta=BETA).sum().backward()
        with torch.no_grad():
            pc -= lr * pc.grad
            pr -= lr * pr.grad
        pc.grad = pr.grad = None
    return pc.detach(), pr.detach()


def test_descent_directions():
    ref_c, ref_r = torch.tensor([-40.0, -12.0]), torch.tensor([-35.0, -20.0])

    # APO-zero from initialisation: chosen up, rejected down, symmetrically.
    pc, pr = descend(apo_zero_loss, ref_c, ref_r, ref_c, ref_r, lr=10.0, steps=5)
    assert (pc > ref_c).all() and (pr < ref_r).all()

    # APO-down with an open margin (r_w > r_l): both down, rejected more.
    start_c, start_r = ref_c + 5.0, ref_r - 5.0
    pc, pr = descend(apo_down_loss, start_c, start_r, ref_c, ref_r, lr=10.0, steps=5)
    assert (pc < start_c).all() and (pr < start_r).all()
    assert ((start_r - pr) > (start_c - pc)).all()

    # DPO: the margin grows; the gradient is specified only on the difference (equal and opposite).
    pc, pr = descend(dpo_loss, ref_c, ref_r, ref_c, ref_r, lr=10.0, steps=5)
    assert ((pc - ref_c) - (pr - ref_r) > 0).all()
    g_c, g_r = grads_wrt_policy(dpo_loss, ref_c + 3, ref_r - 1, ref_c, ref_r)
    torch.testing.assert_close(g_c, -g_r)


@pytest.mark.parametrize("name", ["apo_zero", "apo_down"])
def test_apo_gradients_saturate(name):
    ref = torch.zeros(1, dtype=torch.float64)
    magnitudes = []
    for log_ratio in [0.0, 10.0, 30.0, 60.0, 120.0, 300.0]:
        # Rewards move away from 0 in the direction each loss pushes them.
        pc = ref + (log_ratio if name == "apo_zero" else -log_ratio)
        pr = ref - 2 * log_ratio
        g_c, g_r = grads_wrt_policy(LOSSES[name], pc, pr, ref, ref)
        magnitudes.append((g_c.abs() + g_r.abs()).item())
    assert all(a > b for a, b in zip(magnitudes, magnitudes[1:])), magnitudes
    assert magnitudes[-1] < 1e-10 * magnitudes[0]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_finite_for_extreme_log_ratios(name, dtype):
    # |beta * log-ratio| up to 1e4, all sign combinations.
    values = torch.tensor([-1e5, -1e3, 0.0, 1e3, 1e5], dtype=dtype)
    pc, pr = torch.meshgrid(values, values, indexing="ij")
    pc, pr = pc.flatten().requires_grad_(), pr.flatten().requires_grad_()
    zero = torch.zeros_like(pc)
    loss = LOSSES[name](pc, pr, zero, zero, beta=BETA)
    loss.sum().backward()
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert pc.grad.dtype == dtype
    assert torch.isfinite(loss).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if name != "dpo":
        assert ((loss >= 0) & (loss <= 2)).all()


def test_unpaired_values_and_directions():
    logps = torch.tensor([-10.0, -10.0])
    desirable = torch.tensor([True, False])
    assert torch.allclose(apo_zero_unpaired_loss(logps, logps, desirable), torch.tensor([0.5, 0.5]))
    policy = logps.clone().requires_grad_()
    apo_zero_unpaired_loss(policy, logps, desirable, beta=BETA).sum().backward()
    assert policy.grad[0] < 0 < policy.grad[1]  # descent raises the desirable, lowers the undesirable
    torch.testing.assert_close(policy.grad.abs(), torch.full((2,), BETA / 4))


def test_rewards_are_detached_and_scaled():
    pc, pr, rc, rr = random_logps(4, 1.0, seed=3)
    r_w, r_l = rewards(pc, pr, rc, rr, beta=0.5)
    assert not r_w.requires_grad and not r_l.requires_grad
    torch.testing.assert_close(r_w, 0.5 * (pc - rc).detach())
    torch.testing.assert_close(r_l, 0.5 * (pr - rr).detach())


@pytest.mark.parametrize("name", LOSSES)
def test_traced_whole_by_torch_compile(name):
    """fullgraph=True: dynamo traces each Function (static forward + setup_context), AOT autograd its backward."""
    def step(pc, pr, rc, rr):
        return (LOSSES[name](pc, pr, rc, rr, beta=BETA) * torch.linspace(0.5, 2, 8)).sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_inputs = random_logps(8, 5.0, seed=3, dtype=torch.float32)
    compiled_inputs = [t.detach().clone().requires_grad_() for t in eager_inputs]
    eager, traced = step(*eager_inputs), compiled(*compiled_inputs)
    eager.backward()
    traced.backward()
    torch.testing.assert_close(traced, eager)
    for e, c in zip(eager_inputs, compiled_inputs):
        torch.testing.assert_close(c.grad, e.grad)


def test_the_default_beta_is_a_tenth():
    pc, pr, rc, rr = (t.detach() for t in random_logps(8, 10.0, seed=5))
    for loss_fn in LOSSES.values():
        torch.testing.assert_close(loss_fn(pc, pr, rc, rr), loss_fn(pc, pr, rc, rr, beta=0.1), atol=0, rtol=0)
    desirable = torch.arange(8) % 2 == 0
    torch.testing.assert_close(apo_zero_unpaired_loss(pc, rc, desirable),
                               apo_zero_unpaired_loss(pc, rc, desirable, beta=0.1), atol=0, rtol=0)
    torch.testing.assert_close(rewards(pc, pr, rc, rr), rewards(pc, pr, rc, rr, beta=0.1), atol=0, rtol=0)


@pytest.mark.parametrize("name", LOSSES)
def test_a_float32_gradient_is_not_rounded_through_its_bfloat16_neighbour(name):
    """Each gradient comes back in its own input's dtype, computed in float32: a bfloat16 chosen log-prob beside
    a float32 rejected one leaves the rejected gradient exactly that of all-float32 inputs."""
    pc, pr, rc, rr = random_logps(16, 10.0, seed=11, dtype=torch.float32)
    chosen_bf16 = pc.detach().to(torch.bfloat16).requires_grad_()
    LOSSES[name](chosen_bf16, pr, rc, rr, beta=BETA).sum().backward()
    chosen_fp32, rejected = chosen_bf16.detach().float().requires_grad_(), pr.detach().clone().requires_grad_()
    LOSSES[name](chosen_fp32, rejected, rc.detach(), rr.detach(), beta=BETA).sum().backward()
    assert chosen_bf16.grad.dtype == torch.bfloat16 and pr.grad.dtype == torch.float32
    assert torch.equal(pr.grad, rejected.grad)
