"""Preference and policy losses against hand-written references: values from scalar math in
Python floats, gradients from the derivatives written out by hand."""
import math

import pytest
import torch

from llmkern.losses import (dpo_loss, group_advantages, grpo_loss, kl_k3, reward_loss,
                            sequence_logps)


def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64) * scale).requires_grad_()


def test_reward_loss_value_and_gradient():
    rc, rr = _leaf(6), _leaf(6)
    margin = torch.rand(6, dtype=torch.float64)
    loss = reward_loss(rc, rr, margin)
    d = [a - b - m for a, b, m in zip(rc.tolist(), rr.tolist(), margin.tolist())]
    assert loss.item() == pytest.approx(sum(-math.log(_sig(x)) for x in d) / 6, rel=1e-12)
    loss.backward()
    expect = torch.tensor([-(1 - _sig(x)) / 6 for x in d], dtype=torch.float64)
    torch.testing.assert_close(rc.grad, expect)
    torch.testing.assert_close(rr.grad, -expect)


@pytest.mark.parametrize("beta,smoothing", [(0.1, 0.0), (0.5, 0.2)])
def test_dpo_sigmoid_value_and_gradient(beta, smoothing):
    pc, pr, rc, rr = (_leaf(5, scale=3.0) for _ in range(4))
    loss = dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=beta, label_smoothing=smoothing)
    h = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    value = sum(-(1 - smoothing) * math.log(_sig(beta * x)) - smoothing * math.log(_sig(-beta * x))
                for x in h) / 5
    assert loss.item() == pytest.approx(value, rel=1e-12)
    loss.backward()
    # d/dh = beta * (-(1 - eps) * (1 - sig(bh)) + eps * sig(bh)) / N; h rises with pc, falls with pr
    dh = torch.tensor([beta * (-(1 - smoothing) * (1 - _sig(beta * x)) + smoothing * _sig(beta * x)) / 5
                       for x in h], dtype=torch.float64)
    torch.testing.assert_close(pc.grad, dh)
    torch.testing.assert_close(pr.grad, -dh)


def test_dpo_ipo_value_and_gradient():
    beta = 0.25
    pc, pr, rc, rr = (_leaf(4) for _ in range(4))
    loss = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    h = [(a - c) - (b - d) for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())]
    assert loss.item() == pytest.approx(sum((x - 2.0) ** 2 for x in h) / 4, rel=1e-12)
    loss.backward()
    dh = torch.tensor([2 * (x - 2.0) / 4 for x in h], dtype=torch.float64)
    for t, sign in ((pc, 1), (pr, -1), (rc, -1), (rr, 1)):
        torch.testing.assert_close(t.grad, sign * dh)


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0], dtype=torch.float64)
    adv = group_advantages(r, 4)
    g = [1.0, 0.0, 0.0, 1.0]
    std = math.sqrt(sum((x - 0.5) ** 2 for x in g) / 3)  # unbiased, as torch.std
    expect = [(x - 0.5) / (std + 1e-4) for x in g] + [0.0] * 4
    torch.testing.assert_close(adv, torch.tensor(expect, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(r, 2, scale=False),
                               torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))


def test_kl_k3_is_nonnegative_and_zero_at_equality():
    lp, ref = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    assert (kl_k3(lp, ref) >= 0).all()
    assert torch.equal(kl_k3(lp, lp), torch.zeros_like(lp))


def _grpo_reference(lp, old, ref, adv, mask, beta, eps_lo, eps_hi, level):
    """Scalar loops: the loss of the GRPO objective written out token by token."""
    rows = []
    total, count = 0.0, 0
    for i in range(len(lp)):
        s, n = 0.0, 0
        for j in range(len(lp[i])):
            if not mask[i][j]:
                continue
            ratio = math.exp(lp[i][j] - old[i][j])
            clipped = min(max(ratio, 1 - eps_lo), 1 + eps_hi)
            term = -min(ratio * adv[i], clipped * adv[i])
            d = ref[i][j] - lp[i][j]
            term += beta * (math.exp(d) - d - 1)
            s, n = s + term, n + 1
        rows.append(s / max(n, 1))
        total, count = total + s, count + n
    return total / max(count, 1) if level == "token" else sum(rows) / len(rows)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_grpo_loss_value_matches_scalar_reference(level):
    lp = _leaf(4, 7, scale=0.5)
    old = lp.detach() + 0.3 * torch.randn(4, 7, dtype=torch.float64)  # ratios hit both clips
    ref = lp.detach() + 0.5 * torch.randn(4, 7, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    mask = torch.rand(4, 7) > 0.3
    mask[:, 0] = True
    loss = grpo_loss(lp, adv, mask, old, ref, beta=0.1, clip_eps=0.1, clip_eps_high=0.3, level=level)
    expect = _grpo_reference(lp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                             0.1, 0.1, 0.3, level)
    assert loss.item() == pytest.approx(expect, rel=1e-12)


def test_grpo_gradient_on_policy():
    """Ratio 1 (old = logps): d loss / d logp = (-A + beta * (1 - exp(ref - logp))) / tokens."""
    lp = _leaf(3, 5)
    ref = lp.detach() + 0.2 * torch.randn(3, 5, dtype=torch.float64)
    adv = torch.randn(3, dtype=torch.float64)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1, 3:] = False
    loss = grpo_loss(lp, adv, mask, ref_logps=ref, beta=0.2)
    loss.backward()
    expect = (-adv.unsqueeze(-1) + 0.2 * (1 - torch.exp(ref - lp.detach()))) * mask / mask.sum()
    torch.testing.assert_close(lp.grad, expect)


def test_grpo_clipped_tokens_get_no_gradient():
    lp = torch.zeros(1, 2, dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[-1.0, 0.0]], dtype=torch.float64)  # token 0: ratio e > 1 + eps
    loss = grpo_loss(lp, torch.ones(1, dtype=torch.float64), torch.ones(1, 2), old, beta=0.0)
    loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() == pytest.approx(-0.5)


def test_sequence_logps():
    t = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[True, False, True], [False, False, False]])
    torch.testing.assert_close(sequence_logps(t, m), torch.tensor([4.0, 0.0]))
    torch.testing.assert_close(sequence_logps(t, m, average=True), torch.tensor([2.0, 0.0]))


def test_bad_inputs():
    x = torch.randn(4)
    with pytest.raises(ValueError, match=r"rejected_rewards .*shape \(3,\).* must have the shape of chosen"):
        reward_loss(x, torch.randn(3))
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(x, x, x, x, beta=0.0)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, x, x, loss_type="hinge2")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        dpo_loss(x, x, x, x, label_smoothing=0.7)
    with pytest.raises(ValueError, match="group_size must be an int >= 2"):
        group_advantages(x, 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.randn(5), 2)
    with pytest.raises(ValueError, match="rewards hold NaN"):
        group_advantages(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match=r"advantages must have shape \(2,\)"):
        grpo_loss(torch.randn(2, 3), torch.randn(3), torch.ones(2, 3))
    with pytest.raises(ValueError, match="level must be one of"):
        grpo_loss(torch.randn(2, 3), torch.randn(2), torch.ones(2, 3), level="batch")
    with pytest.raises(TypeError, match="must be floating point"):
        reward_loss(torch.ones(2, dtype=torch.long), torch.ones(2))
