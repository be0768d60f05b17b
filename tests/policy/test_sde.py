"""SDE samplers and the temporal gradient equaliser against MATH.md §1-§2."""

import math

import numpy as np
import pytest
import torch

from policy.sde import SDE_TYPES, SDEStep, equalizer_scales, sde_step, sigma_schedule

torch.set_num_threads(1)

# MATH.md §1 check: s = 0.9, s' = 0.8, eta = 1, x = 1, v = 0.5, x' = mean + 0.5 std.
MATH_TABLE = {
    "flow_grpo": (0.425000, 0.948683, -0.991258),
    "dance_grpo": (0.891667, 0.316228, 0.107354),
    "sage": (0.603997, 0.770160, -0.782782),
    "cps": (0.110000, 0.800000, -0.820795),
}


@pytest.mark.parametrize("sde_type", sorted(MATH_TABLE))
def test_math_table(sde_type):
    mean, std, logp = MATH_TABLE[sde_type]
    step = sde_step(sde_type, torch.tensor([1.0]), torch.tensor([0.5]), 0.9, 0.8, 1.0, noise=torch.tensor([0.5]))
    assert isinstance(step, SDEStep)
    assert step.mean.item() == pytest.approx(mean, abs=1e-4)
    assert step.std.item() == pytest.approx(std, abs=1e-4)
    assert step.log_prob.item() == pytest.approx(logp, abs=1e-4)
    assert step.sample.item() == pytest.approx(mean + 0.5 * std, abs=1e-4)


def test_ode_is_deterministic_euler():
    x, v = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    step = sde_step("ode", x, v, 0.7, 0.5, 1.0)
    torch.testing.assert_close(step.mean, x - 0.2 * v)
    torch.testing.assert_close(step.sample, step.mean)
    assert torch.equal(step.std, torch.zeros(3))
    assert torch.equal(step.log_prob, torch.zeros(3))


def test_unknown_sde_type_names_it_and_the_choices():
    with pytest.raises(ValueError, match=r"'heun'.*flow_grpo.*sage"):
        sde_step("heun", torch.ones(1), torch.ones(1), 0.9, 0.8, 1.0)
    with pytest.raises(ValueError, match="heun"):
        equalizer_scales("heun", [1.0, 0.0], 1.0)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "sage", "cps"])
def test_log_prob_is_averaged_gaussian_density(sde_type):
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(4, 2, 3, 5, 5, generator=g), torch.randn(4, 2, 3, 5, 5, generator=g)
    step = sde_step(sde_type, x, v, 0.6, 0.45, 0.7, generator=g)
    expected = torch.distributions.Normal(step.mean, step.std.view(4, 1, 1, 1, 1)).log_prob(step.sample)
    torch.testing.assert_close(step.log_prob, expected.mean(dim=(1, 2, 3, 4)), atol=1e-5, rtol=1e-5)
    assert step.log_prob.shape == (4,) and step.std.shape == (4,)


def test_given_sample_is_scored_and_gradient_reaches_v():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, generator=g)
    recorded = sde_step("sage", x, torch.randn(2, 6, generator=g), 0.8, 0.6, 1.0, generator=g)
    v_new = torch.randn(2, 6, generator=g, requires_grad=True)
    rescored = sde_step("sage", x, v_new, 0.8, 0.6, 1.0, sample=recorded.sample)
    assert torch.equal(rescored.sample, recorded.sample)
    expected = torch.distributions.Normal(rescored.mean, rescored.std[:, None]).log_prob(recorded.sample).mean(1)
    torch.testing.assert_close(rescored.log_prob, expected)
    rescored.log_prob.sum().backward()
    assert v_new.grad is not None and v_new.grad.abs().sum() > 0


def test_rescoring_with_behaviour_velocity_reproduces_log_prob():
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    for sde_type in ("flow_grpo", "dance_grpo", "sage", "cps"):
        rec = sde_step(sde_type, x, v, 0.5, 0.3, 0.8, generator=g)
        again = sde_step(sde_type, x, v, 0.5, 0.3, 0.8, sample=rec.sample)
        assert torch.equal(again.log_prob, rec.log_prob)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_per_sample_sigma_matches_scalar_calls(sde_type):
    g = torch.Generator().manual_seed(3)
    x, v, noise = (torch.randn(3, 2, 4, generator=g) for _ in range(3))
    sig, sig_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.75, 0.4, 0.0])
    batched = sde_step(sde_type, x, v, sig, sig_next, 0.9, noise=noise)
    for i in range(3):
        one = sde_step(sde_type, x[i : i + 1], v[i : i + 1], sig[i].item(), sig_next[i].item(), 0.9, noise=noise[i : i + 1])
        torch.testing.assert_close(batched.sample[i : i + 1], one.sample)
        torch.testing.assert_close(batched.log_prob[i : i + 1], one.log_prob)
        torch.testing.assert_close(batched.std[i : i + 1], one.std)


def test_flow_grpo_at_s_equal_one_uses_next_sigma():
    step = sde_step("flow_grpo", torch.tensor([1.0]), torch.tensor([0.5]), 1.0, 0.8, 1.0, noise=torch.tensor([0.0]))
    sigma_t = math.sqrt(1.0 / (1.0 - 0.8))
    assert step.std.item() == pytest.approx(sigma_t * math.sqrt(0.2), abs=1e-5)
    # mean = x (1 + sigma_t^2 dt / 2) + v dt ((1 - s) = 0 kills the correction on v)
    assert step.mean.item() == pytest.approx(1.0 * (1 - sigma_t**2 * 0.2 / 2) + 0.5 * (-0.2), abs=1e-5)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
@pytest.mark.parametrize("s, s_next", [(1.0, 0.95), (1.0, 0.0), (0.05, 0.0), (1.0, 1.0), (0.0, 0.0), (0.999, 0.998)])
def test_edges_stay_finite(sde_type, s, s_next):
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    step = sde_step(sde_type, x, v, s, s_next, 1.0)
    for name in ("sample", "mean", "std", "log_prob"):
        assert torch.isfinite(getattr(step, name)).all(), (sde_type, s, s_next, name)
    assert (step.std >= 0).all()


def test_cps_terminal_step_is_deterministic():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    step = sde_step("cps", x, v, 0.2, 0.0, 1.0)
    assert torch.equal(step.std, torch.zeros(2))
    assert torch.equal(step.log_prob, torch.zeros(2))
    torch.testing.assert_close(step.sample, x - 0.2 * v)  # x0_hat, the clean prediction
    assert torch.equal(step.sample, step.mean)


@pytest.mark.parametrize("s, s_next, eta", [(0.9, 0.8, 1.0), (0.5, 0.3, 0.7), (0.997, 0.9, 1.0), (0.2, 0.0, 0.5)])
def test_sage_variance_is_the_integral_of_flow_grpo_diffusion(s, s_next, eta):
    t = np.linspace(s_next, s, 200_001)
    integral = np.trapezoid(eta**2 * t / (1 - t), t)
    std = sde_step("sage", torch.zeros(1), torch.zeros(1), s, s_next, eta).std.item()
    assert std**2 == pytest.approx(integral, rel=1e-4)


def test_flow_grpo_over_injects_relative_to_sage():
    def var(kind, s, s_next):
        return sde_step(kind, torch.zeros(1), torch.zeros(1), s, s_next, 1.0).std.item() ** 2

    mid = var("flow_grpo", 0.9, 0.8) / var("sage", 0.9, 0.8)
    high = var("flow_grpo", 0.997, 0.9) / var("sage", 0.997, 0.9)
    assert round(mid, 2) == 1.52
    assert round(high, 1) == 9.5
    assert high == pytest.approx((0.997 / 0.003 * 0.097) / (-0.097 + math.log(0.1 / 0.003)), rel=1e-4)


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "sage", "cps"])
def test_samples_have_stated_mean_and_std(sde_type):
    g = torch.Generator().manual_seed(4)
    n = 200_000
    x, v = torch.full((n,), 0.3), torch.full((n,), -0.8)
    step = sde_step(sde_type, x, v, 0.7, 0.55, 0.8, generator=g)
    mean, std = step.mean[0].item(), step.std[0].item()
    # 5-sigma bounds for the sample mean and the sample std of n normals
    assert abs(step.sample.mean().item() - mean) < 5 * std / math.sqrt(n)
    assert abs(step.sample.std().item() - std) < 5 * std / math.sqrt(2 * n)


@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_bf16_inputs_give_float32(sde_type):
    g = torch.Generator().manual_seed(5)
    x, v, noise = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    xb, vb = x.bfloat16(), v.bfloat16()
    step = sde_step(sde_type, xb, vb, 0.6, 0.4, 1.0, noise=noise)
    ref = sde_step(sde_type, xb.float(), vb.float(), 0.6, 0.4, 1.0, noise=noise)
    for name in ("sample", "mean", "std", "log_prob"):
        assert getattr(step, name).dtype == torch.float32
        torch.testing.assert_close(getattr(step, name), getattr(ref, name))


def test_bad_inputs_raise_clear_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"noise.*expected \[2, 3\], got \[2, 4\]"):
        sde_step("sage", x, x, 0.9, 0.8, 1.0, noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"v must.*expected \[2, 3\]"):
        sde_step("sage", x, torch.zeros(3, 3), 0.9, 0.8, 1.0)
    with pytest.raises(ValueError, match=r"sigma must .*\[B\]=\[2\]"):
        sde_step("sage", x, x, torch.tensor([0.9, 0.9, 0.9]), 0.8, 1.0)
    with pytest.raises(ValueError, match="sigma_next must be <= sigma"):
        sde_step("sage", x, x, 0.5, 0.6, 1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sde_step("sage", x, x, 1.5, 0.6, 1.0)
    with pytest.raises(ValueError, match="sample must"):
        sde_step("sage", x, x, 0.9, 0.8, 1.0, sample=torch.zeros(5))


def test_generator_makes_noise_reproducible():
    x = torch.zeros(2, 3)
    a = sde_step("dance_grpo", x, x, 0.9, 0.8, 1.0, generator=torch.Generator().manual_seed(7))
    b = sde_step("dance_grpo", x, x, 0.9, 0.8, 1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.sample, b.sample)
    assert not torch.equal(a.sample, a.mean)


def test_sigma_schedule():
    torch.testing.assert_close(sigma_schedule(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    shifted = sigma_schedule(4, shift=3.0)
    expected = [3 * s / (1 + 2 * s) for s in (1.0, 0.75, 0.5, 0.25, 0.0)]  # [1, 0.9, 0.75, 0.5, 0]
    torch.testing.assert_close(shifted, torch.tensor(expected))
    assert shifted.dtype == torch.float32 and shifted.shape == (5,)
    assert (shifted[1:] < shifted[:-1]).all()
    with pytest.raises(ValueError, match="num_steps"):
        sigma_schedule(0)
    with pytest.raises(ValueError, match="shift"):
        sigma_schedule(4, shift=0.0)


SIGMAS = [1.0, 0.8, 0.6, 0.4, 0.2, 0.0]


def _g_math(sde_type, s, s_next, eta):
    """MATH.md §2's g_k written out by hand, independent of policy.sde."""
    dt = s_next - s
    if sde_type == "dance_grpo":
        return abs(dt * (1 + 0.5 * eta**2 * (1 - s) / s)) / (eta * math.sqrt(s - s_next))
    if sde_type == "sage":
        var = eta**2 * (-(s - s_next) + math.log((1 - s_next) / (1 - min(s, 0.997))))
        return abs(dt - 0.5 * var * (1 - s) / s) / math.sqrt(var)
    if sde_type == "flow_grpo":
        sigma_t2 = eta**2 * s / (1 - (s_next if s == 1 else s))
        return abs(dt * (1 + sigma_t2 * (1 - s) / (2 * s))) / math.sqrt(sigma_t2 * -dt)
    if sde_type == "cps":
        std = s_next * math.sin(eta * math.pi / 2)
        g = abs(-s * (1 - s_next) + (1 - s) * math.sqrt(max(s_next**2 - std**2, 0.0)))
        return g / std if std > 0 else float("inf")
    raise AssertionError(sde_type)


def test_equalizer_math_check_sage():
    scales = equalizer_scales("sage", SIGMAS, 1.0)
    g = [_g_math("sage", s, sn, 1.0) for s, sn in zip(SIGMAS[:-1], SIGMAS[1:])]
    np.testing.assert_allclose(g, [0.1, 0.3726, 0.5923, 0.8975, 1.6189], atol=1e-4)
    np.testing.assert_allclose(scales.numpy(), [5.923, 1.590, 1.0, 0.660, 0.366], atol=1e-3)
    assert scales.shape == (5,) and scales.dtype == torch.float32


@pytest.mark.parametrize("sde_type", ["flow_grpo", "dance_grpo", "sage", "cps"])
@pytest.mark.parametrize("eta", [1.0, 0.6])
def test_equalizer_matches_math_formulas(sde_type, eta):
    g = torch.tensor([_g_math(sde_type, s, sn, eta) for s, sn in zip(SIGMAS[:-1], SIGMAS[1:])], dtype=torch.float64)
    g = torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))
    expected = g.median() / g
    torch.testing.assert_close(equalizer_scales(sde_type, SIGMAS, eta).double(), expected, atol=1e-5, rtol=1e-4)


def test_equalizer_lower_median_and_nonfinite_fallback():
    # cps at eta = 1 on [1, .5, 0]: g = [1 * 0.5 / 0.5, inf -> 1] = [1, 1]; on 4 steps use the lower median.
    torch.testing.assert_close(equalizer_scales("cps", [1.0, 0.5, 0.0], 1.0), torch.ones(2))
    sig = [1.0, 0.75, 0.5, 0.25, 0.0]
    g = torch.tensor([_g_math("dance_grpo", s, sn, 1.0) for s, sn in zip(sig[:-1], sig[1:])])
    lower_median = torch.sort(g).values[1]
    torch.testing.assert_close(equalizer_scales("dance_grpo", sig, 1.0), lower_median / g)


def test_equalizer_ode_is_all_ones():
    assert torch.equal(equalizer_scales("ode", sigma_schedule(7, 3.0), 1.0), torch.ones(7))
