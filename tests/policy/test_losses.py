"""Policy losses against MATH.md §3."""

import math

import pytest
import torch

from policy.losses import (
    ema_update,
    flow_dpo_loss,
    flow_rwr_loss,
    gaussian_kl,
    kl_schedule,
    nft_loss,
    ppo_clip_loss,
    reward_guided_velocity,
    stepwise_kl,
)

torch.set_num_threads(1)


def test_ppo_on_policy_ratio_is_one_and_gradient_is_minus_advantage():
    logp = torch.tensor([-0.7, 0.2, 1.3, -2.0], requires_grad=True)
    adv = torch.tensor([1.5, -0.5, 7.0, 0.0])
    loss, stats = ppo_clip_loss(logp, logp.detach().clone(), adv, clip_range=1e-4)
    assert stats["ratio_mean"] == 1.0 and stats["clip_fraction"] == 0.0 and stats["approx_kl"] == 0.0
    clipped_adv = torch.tensor([1.5, -0.5, 5.0, 0.0])  # A clipped to +-5
    assert loss.item() == pytest.approx(-clipped_adv.mean().item(), abs=1e-7)
    loss.backward()
    torch.testing.assert_close(logp.grad, -clipped_adv / 4)  # d/dlogp of mean(-A ratio) at ratio = 1


def test_ppo_clipping_with_numbers():
    # ratios 1.2, 1.2, 0.8, 0.8, 1.05 against eps = 0.1
    ratio = torch.tensor([1.2, 1.2, 0.8, 0.8, 1.05])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0])
    logp = torch.log(ratio).requires_grad_()
    loss, stats = ppo_clip_loss(logp, torch.zeros(5), adv, clip_range=0.1)
    # per-element max(-A r, -A clip(r)): -1.1, 1.2, -0.8, 0.9, -2.1
    assert loss.item() == pytest.approx((-1.1 + 1.2 - 0.8 + 0.9 - 2.1) / 5, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(0.8)
    assert stats["ratio_mean"] == pytest.approx(ratio.mean().item(), abs=1e-6)
    loss.backward()
    # clipped terms give no gradient; others give -A r / N
    expected = torch.tensor([0.0, 1.2, -0.8, 0.0, -2.0 * 1.05]) / 5
    torch.testing.assert_close(logp.grad, expected)


def test_ppo_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"old_log_prob.*expected \[3\], got \[4\]"):
        ppo_clip_loss(torch.zeros(3), torch.zeros(4), torch.zeros(3), 0.1)


def test_gaussian_kl():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    ref = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]])
    std = torch.tensor([1.0, 0.5, 0.0])
    kl = gaussian_kl(mean, ref, std)
    # (1 + 4)/2 / 2 ; (1 + 1)/2 / (2 * 0.25) ; deterministic -> 0
    torch.testing.assert_close(kl, torch.tensor([1.25, 2.0, 0.0]))
    torch.testing.assert_close(gaussian_kl(mean[:2], ref[:2], 2.0), torch.tensor([5 / 16, 2 / 16]))
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(gaussian_kl(x, x + 0.3, torch.full((2, 3, 4), 0.3)), torch.full((2,), 0.5))


def test_gaussian_kl_is_the_kl_of_equal_variance_gaussians():
    g = torch.Generator().manual_seed(0)
    m, r = torch.randn(2, 5, generator=g), torch.randn(2, 5, generator=g)
    p, q = torch.distributions.Normal(m, 0.7), torch.distributions.Normal(r, 0.7)
    torch.testing.assert_close(gaussian_kl(m, r, 0.7), torch.distributions.kl_divergence(p, q).mean(1))


def test_stepwise_kl():
    behaviour = torch.tensor([-1.0, -2.0, 0.5])
    logp = torch.tensor([-1.5, -1.0, 0.5], requires_grad=True)
    kl = stepwise_kl(behaviour, logp)
    assert kl.item() == pytest.approx((0.5 - 1.0 + 0.0) / 3)
    kl.backward()
    torch.testing.assert_close(logp.grad, torch.full((3,), -1 / 3))


def test_stepwise_kl_weight_masks_elements_but_keeps_the_mean_over_all():
    behaviour, logp = torch.tensor([0.5, -0.2, 1.0, 0.3]), torch.tensor([0.1, 0.3, 0.0, 0.3], requires_grad=True)
    weight = torch.tensor([1.0, 0.0, 1.0, 0.0])
    kl = stepwise_kl(behaviour, logp, weight)
    assert kl.item() == pytest.approx((0.4 + 1.0) / 4, abs=1e-7)
    kl.backward()
    torch.testing.assert_close(logp.grad, -weight / 4)
    assert stepwise_kl(behaviour, logp, torch.ones(4)).item() == pytest.approx(stepwise_kl(behaviour, logp).item())
    with pytest.raises(ValueError, match="weight"):
        stepwise_kl(behaviour, logp, torch.ones(3))


def test_kl_schedule():
    assert [kl_schedule("fixed", s, 10, 0.2) for s in (0, 9)] == [0.2, 0.2]
    assert [kl_schedule("two_stage", s, 10, 0.2) for s in (0, 4, 5, 9)] == pytest.approx([0.02, 0.02, 0.2, 0.2])
    milder = [kl_schedule("milder", s, 11, 1.0) for s in range(11)]
    assert milder == pytest.approx([0.1 + 0.09 * s for s in range(11)])
    assert kl_schedule("milder", 50, 11, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="'cosine'.*fixed"):
        kl_schedule("cosine", 0, 10, 1.0)


# MATH.md §3 NFT check
X0, EPS, VOLD, VTH = [1.0, -0.5], [0.2, 0.4], [-0.5, 0.5], [-0.7, 0.8]


def _nft(beta, **kw):
    return nft_loss(torch.tensor([X0]), torch.tensor([EPS]), 0.6, torch.tensor([VTH]), torch.tensor([VOLD]), None,
                    torch.tensor([2.0]), beta, **kw)


def test_nft_math_check():
    assert _nft(1.0).item() == pytest.approx(0.765, abs=1e-4)
    assert _nft(0.1).item() == pytest.approx(10.403446, abs=1e-4)


def test_nft_astrolabe_form_drops_weight_C_and_beta():
    # beta = 1: x0+ - x0 = [-0.06, 0.06], x0- - x0 = [-0.3, 0.42]; r = 0.7
    expected = 0.7 * 0.0036 + 0.3 * (0.09 + 0.1764) / 2
    assert _nft(1.0, form="astrolabe").item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="form"):
        _nft(1.0, form="grpo")


def test_nft_gradients_flow_only_through_v_theta_and_batch_is_mean():
    g = torch.Generator().manual_seed(1)
    x0, eps, v_old, v_ref = (torch.randn(3, 2, 4, generator=g).requires_grad_() for _ in range(4))
    v_theta = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    t, adv = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([3.0, -1.0, 0.0])
    loss = nft_loss(x0, eps, t, v_theta, v_old, v_ref, adv, beta=0.5, kl_weight=0.1)
    loss.backward()
    assert v_theta.grad is not None and v_theta.grad.abs().sum() > 0
    assert all(p.grad is None for p in (x0, eps, v_old, v_ref))
    per_sample = [
        nft_loss(x0[i : i + 1], eps[i : i + 1], t[i].item(), v_theta[i : i + 1], v_old[i : i + 1], None, adv[i : i + 1], 0.5)
        for i in range(3)
    ]
    kl = 0.1 * ((v_theta - v_ref) ** 2).mean()
    assert loss.item() == pytest.approx((sum(per_sample) / 3 + kl).item(), abs=1e-5)


def test_nft_kl_mask_applies_the_kl_term_per_sample():
    """Selective KL: loss(mask) = loss(no KL) + kl mean_B(m_b mean((v_theta - v_ref)_b^2))."""
    g = torch.Generator().manual_seed(2)
    x0, eps, v_old, v_ref, v_theta = (torch.randn(3, 2, 4, generator=g) for _ in range(5))
    t, adv = torch.tensor([0.2, 0.5, 0.9]), torch.tensor([3.0, -1.0, 0.0])

    def loss(mask=None, kl=0.5):
        return nft_loss(x0, eps, t, v_theta, v_old, v_ref, adv, 0.5, kl, kl_mask=mask).item()

    d = ((v_theta - v_ref) ** 2).reshape(3, -1).mean(1)
    mask = torch.tensor([True, False, True])
    assert loss(mask) == pytest.approx(loss(kl=0.0) + 0.5 * (d[0] + d[2]).item() / 3, rel=1e-6)
    assert loss(torch.ones(3)) == pytest.approx(loss(), rel=1e-6)
    assert loss(torch.zeros(3)) == pytest.approx(loss(kl=0.0), rel=1e-6)
    with pytest.raises(ValueError, match="kl_mask"):
        loss(torch.ones(2))


def test_nft_at_old_policy_positive_and_negative_agree():
    # With v_theta = v_old both implicit policies equal the old one, so r drops out.
    x0, eps, v = torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5)
    a = nft_loss(x0, eps, 0.4, v, v, None, torch.tensor([5.0, 5.0]), 1.0)
    b = nft_loss(x0, eps, 0.4, v, v, None, torch.tensor([-5.0, -5.0]), 1.0)
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


def test_nft_kl_requires_reference():
    with pytest.raises(ValueError, match="v_ref"):
        _nft(1.0, kl_weight=0.5)


def test_flow_dpo_math_check():
    loss = flow_dpo_loss(0.30, 0.35, 0.40, 0.38, beta=100.0)
    assert loss.item() == pytest.approx(0.029750, abs=1e-6)
    ew = torch.tensor([0.30, 0.30], requires_grad=True)
    loss = flow_dpo_loss(ew, torch.tensor([0.35, 0.35]), torch.tensor([0.40, 0.38]), torch.tensor([0.38, 0.40]))
    expected = (math.log1p(math.exp(-3.5)) + math.log1p(math.exp(-1.5))) / 2  # margins -0.07, -0.03
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    assert (ew.grad > 0).all()  # lowering the winner's error lowers the loss


def test_flow_rwr_loss():
    v = torch.tensor([[1.0, 1.0], [0.0, 2.0]], requires_grad=True)
    target = torch.zeros(2, 2)
    loss = flow_rwr_loss(v, target, torch.tensor([0.0, 1.0]), beta=0.5)
    # weights 1 and e^2; per-sample errors 1 and 2
    assert loss.item() == pytest.approx((1.0 + math.exp(2.0) * 2.0) / 2, rel=1e-6)
    loss.backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, 0.5], [0.0, math.exp(2.0) * 1.0]]))


def test_reward_guided_velocity():
    v, grad_r = torch.ones(2, 3), torch.full((2, 3), 2.0)
    out = reward_guided_velocity(v, torch.tensor([0.5, 0.0]), grad_r, w=1.0, beta=4.0)
    # t = 0.5: 1 - 1 * 0.25 * 2 = 0.5; t = 0: unchanged
    torch.testing.assert_close(out, torch.tensor([[0.5] * 3, [1.0] * 3]))
    torch.testing.assert_close(reward_guided_velocity(v, 0.75, grad_r, 1.0, 4.0), torch.full((2, 3), 1 - 3 * 0.5))
    with pytest.raises(ValueError, match="t = 1"):
        reward_guided_velocity(v, 1.0, grad_r, 1.0, 4.0)


def test_ema_update():
    target = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    source = [torch.tensor([3.0, 6.0], requires_grad=True), torch.tensor([[10.0]], requires_grad=True)]
    ema_update(target, source, decay=0.75)
    torch.testing.assert_close(target[0], torch.tensor([1.5, 3.0]))
    torch.testing.assert_close(target[1], torch.tensor([[2.5]]))
    assert not target[0].requires_grad
    old = torch.nn.Linear(3, 2)
    new = torch.nn.Linear(3, 2)
    ema_update(old.parameters(), new.parameters(), decay=0.0)
    torch.testing.assert_close(old.weight, new.weight)
    with pytest.raises(ValueError, match="decay"):
        ema_update(target, source, 1.5)
    with pytest.raises(ValueError, match="same number"):
        ema_update(target, source[:1], 0.5)
