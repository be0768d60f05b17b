"""Stochastic samplers for flow-matching video generators (MATH.md §1) and the
temporal gradient equaliser (MATH.md §2).

Flow matching: x_t = (1 - t) x0 + t eps, velocity v = eps - x0, sigma walks 1 -> 0.
One step goes from sigma s to sigma_next s' < s with dt = s' - s < 0 and is Gaussian,
x' ~ N(mean, std^2); the policy log-prob of a step is the Gaussian log-density averaged
over the non-batch elements (the scale every public Flow-GRPO style code uses).

Shapes: x, v are `[B, ...]` (e.g. `[B, T, C, H, W]`); sigma, sigma_next are python floats or
tensors of shape `[B]` (a per-sample sigma, used by the autoregressive generator). Every
result is float32 whatever the input dtype (bf16 models included), or float64 for float64 inputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SDE_TYPES = ("ode", "flow_grpo", "dance_grpo", "sage", "cps")

# sage clamps s below 1 inside the log so the integral stays finite at s = 1 (MATH.md §1).
SAGE_S_MAX = 0.997
# Floors for divisions: never reached by a real schedule, they only keep s = 0 / s = 1 finite.
_TINY = 1e-6
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)


@dataclass(frozen=True)
class SDEStep:
    """One sampler step.

    sample: `[B, ...]` float32, x' (the next latent).
    mean: `[B, ...]` float32, mean of the step's Gaussian.
    std: `[B]` float32, standard deviation (the same for every element of a sample); 0 means
        the step is deterministic.
    log_prob: `[B]` float32, log N(sample; mean, std^2) averaged over non-batch elements, in nats
        per element; exactly 0 where std == 0.
    """

    sample: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


def _check_sde_type(sde_type: str) -> None:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; choose one of {list(SDE_TYPES)}")


def _sigma_like(sigma, x: Tensor, name: str) -> Tensor:
    """Python float, 0-d tensor or `[B]` tensor -> a tensor of x's dtype broadcastable to x: `[B, 1, ...]` or `[]`."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if s.dim() == 0:
        return s
    if s.shape != (x.shape[0],):
        raise ValueError(f"{name} must be a float or a tensor of shape [B]=[{x.shape[0]}], got shape {list(s.shape)}")
    return s.reshape(-1, *([1] * (x.dim() - 1)))


# --- the samplers: each returns (mean [B, ...], std broadcastable to x), MATH.md §1 -----------------------


def ode_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Deterministic Euler step of the probability-flow ODE: x' = x + dt v, std = 0."""
    return x + (s_next - s) * v, torch.zeros_like(s)


def flow_grpo_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Flow-GRPO (Liu et al. 2025, eq. 9) Euler-Maruyama step with g^2 = eta^2 s/(1-s) evaluated at s.

    std = sigma_t sqrt(-dt), sigma_t = eta sqrt(s/(1-s)); at s = 1 the denominator uses s' instead.
    mean = x (1 + sigma_t^2 dt/(2s)) + v (1 + sigma_t^2 (1-s)/(2s)) dt.
    """
    dt = s_next - s
    denom_s = torch.where(s >= 1.0, s_next, s)
    sigma_t = eta * torch.sqrt(s / (1.0 - denom_s).clamp_min(_TINY))
    s_safe = s.clamp_min(_TINY)
    mean = x * (1.0 + sigma_t**2 / (2.0 * s_safe) * dt) + v * (1.0 + sigma_t**2 * (1.0 - s) / (2.0 * s_safe)) * dt
    return mean, sigma_t * torch.sqrt((-dt).clamp_min(0.0))


def _score(x: Tensor, v: Tensor, s: Tensor) -> Tensor:
    """Score of x_s from the velocity: -(x + (1-s) v)/s (MATH.md notation)."""
    return -(x + (1.0 - s) * v) / s.clamp_min(_TINY)


def dance_grpo_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """DanceGRPO (Xue et al. 2025) step: mean = x + dt v - eta^2/2 score dt, std = eta sqrt(s - s')."""
    dt = s_next - s
    mean = x + dt * v - 0.5 * eta**2 * _score(x, v, s) * dt
    return mean, eta * torch.sqrt((-dt).clamp_min(0.0))


def _sage_variance(s: Tensor, s_next: Tensor, eta: float) -> Tensor:
    """Exact integral of eta^2 t/(1-t) over [s', s] (SAGE-GRPO eq. for the manifold-aware SDE).

    var = eta^2 [-(s - s') + ln((1 - s')/(1 - min(s, 0.997)))], floored at 0 (it can dip below 0
    only when s' > 0.997 because of the clamp).
    """
    log_term = torch.log((1.0 - s_next).clamp_min(_TINY) / (1.0 - s.clamp_max(SAGE_S_MAX)))
    return (eta**2 * (-(s - s_next) + log_term)).clamp_min(0.0)


def sage_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """SAGE-GRPO (Zheng et al. 2026) step: mean = x + dt v + var/2 score, std = sqrt(var)."""
    var = _sage_variance(s, s_next, eta)
    mean = x + (s_next - s) * v + 0.5 * var * _score(x, v, s)
    return mean, torch.sqrt(var)


def cps_step(x: Tensor, v: Tensor, s: Tensor, s_next: Tensor, eta: float) -> tuple[Tensor, Tensor]:
    """Coefficient-preserving sampling (CPS, Wang & Yu 2025): std = s' sin(eta pi/2),
    mean = x0_hat (1 - s') + eps_hat sqrt(s'^2 - std^2), x0_hat = x - s v, eps_hat = x + (1-s) v.
    std is 0 on the terminal step (s' = 0)."""
    std = s_next * math.sin(eta * math.pi / 2.0)
    x0_hat = x - s * v
    eps_hat = x + (1.0 - s) * v
    mean = x0_hat * (1.0 - s_next) + eps_hat * torch.sqrt((s_next**2 - std**2).clamp_min(0.0))
    return mean, std


_STEP_FNS = {
    "ode": ode_step,
    "flow_grpo": flow_grpo_step,
    "dance_grpo": dance_grpo_step,
    "sage": sage_step,
    "cps": cps_step,
}


def _per_sample(t: Tensor, batch: int) -> Tensor:
    """Broadcastable `[]` / `[B, 1, ...]` -> `[B]`."""
    return t.reshape(-1).expand(batch) if t.numel() == 1 else t.reshape(batch)


def sde_step(
    sde_type: str,
    x: Tensor,
    v: Tensor,
    sigma,
    sigma_next,
    eta: float,
    noise: Tensor | None = None,
    sample: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDEStep:
    """One sampler step from sigma to sigma_next (MATH.md §1), computed in float32 (float64 for float64 inputs).

    x, v: `[B, ...]` latent and predicted velocity, any float dtype.
    sigma, sigma_next: floats or `[B]` tensors in [0, 1] with sigma_next <= sigma.
    eta: noise level (>= 0); ignored by "ode".
    noise: optional standard normal `[B, ...]`; drawn (with `generator` if given) when None.
    sample: optional recorded x' `[B, ...]`; when given it is returned as-is and log_prob is
        evaluated at it (how the learner recomputes log-probs of recorded transitions).
    Where std == 0 the step is deterministic: sample = mean (unless `sample` is given), log_prob = 0.
    """
    _check_sde_type(sde_type)
    if x.dim() < 1:
        raise ValueError(f"x must have a batch dimension [B, ...], got shape {list(x.shape)}")
    if v.shape != x.shape:
        raise ValueError(f"v must have x's shape: expected {list(x.shape)}, got {list(v.shape)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    wide = torch.promote_types(torch.promote_types(x.dtype, v.dtype), torch.float32)
    x32, v32 = x.to(wide), v.to(wide)
    s = _sigma_like(sigma, x32, "sigma")
    s_next = _sigma_like(sigma_next, x32, "sigma_next")
    if bool(((s < 0) | (s > 1) | (s_next < 0) | (s_next > 1)).any()):
        raise ValueError(f"sigma and sigma_next must lie in [0, 1], got {sigma} and {sigma_next}")
    if bool((s_next > s).any()):
        raise ValueError(f"sigma_next must be <= sigma (sampling walks 1 -> 0), got {sigma} -> {sigma_next}")

    mean, std = _STEP_FNS[sde_type](x32, v32, s, s_next, eta)
    batch = x.shape[0]
    std_b = _per_sample(torch.as_tensor(std, dtype=wide, device=x.device), batch)  # [B]
    std_full = std.expand_as(mean) if std.dim() else std

    if sample is None:
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, dtype=wide, device=x.device)
        elif noise.shape != x.shape:
            raise ValueError(f"noise must have x's shape: expected {list(x.shape)}, got {list(noise.shape)}")
        sample = mean + std_full * noise.to(wide)
    else:
        if sample.shape != x.shape:
            raise ValueError(f"sample must have x's shape: expected {list(x.shape)}, got {list(sample.shape)}")
        sample = sample.to(wide)

    # Gaussian log-density per element, averaged over non-batch elements; deterministic steps -> 0.
    stochastic = std_b > 0
    safe_std = torch.where(stochastic, std_b, torch.ones_like(std_b)).reshape(-1, *([1] * (x.dim() - 1)))
    log_density = -((sample - mean) ** 2) / (2.0 * safe_std**2) - torch.log(safe_std) - _HALF_LOG_2PI
    log_prob = log_density.reshape(batch, -1).mean(dim=1)
    log_prob = torch.where(stochastic, log_prob, torch.zeros_like(log_prob))
    return SDEStep(sample=sample, mean=mean, std=std_b, log_prob=log_prob)


def sigma_schedule(num_steps: int, shift: float = 1.0) -> Tensor:
    """Sampling sigmas `[num_steps + 1]` float32 from 1 to 0, linear then SD3-shifted:
    s -> shift s / (1 + (shift - 1) s). shift > 1 spends more steps at high noise."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s)).float()


def equalizer_scales(sde_type: str, sigmas, eta: float) -> Tensor:
    """Temporal gradient equaliser (SAGE-GRPO, MATH.md §2): per-step loss scales `[K]`, K = len(sigmas) - 1.

    g_k = |d mean / d v| / std_k is the data-free size of the log-prob gradient at step k; a
    non-finite or non-positive g_k becomes 1. scale_k = median(g) / g_k (lower median for even K),
    so every step contributes a gradient of the same size. "ode" returns all ones.
    """
    _check_sde_type(sde_type)
    sig = torch.as_tensor(sigmas, dtype=torch.float32).reshape(-1)
    if sig.numel() < 2:
        raise ValueError(f"sigmas needs at least 2 values, got {sig.numel()}")
    if sde_type == "ode":
        return torch.ones(sig.numel() - 1)
    s, s_next = sig[:-1], sig[1:]
    # The mean is affine in v with an x-independent coefficient, so d mean/d v = mean(v=1) - mean(v=0) at x=0.
    zeros = torch.zeros_like(s)
    mean_v1, std = _STEP_FNS[sde_type](zeros, torch.ones_like(s), s, s_next, eta)
    mean_v0, _ = _STEP_FNS[sde_type](zeros, zeros, s, s_next, eta)
    g = (mean_v1 - mean_v0).abs() / torch.as_tensor(std, dtype=torch.float32).expand_as(s)
    g = torch.where(torch.isfinite(g) & (g > 0), g, torch.ones_like(g))
    return g.median() / g  # torch.median returns the lower of the two middle values
