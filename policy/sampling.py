"""Rollouts of a policy (policy.backend.Policy) with exact per-step log-probs, and their recomputation for the learner.

Every step is `policy.sde.sde_step` (MATH.md §1): x' ~ N(mean, std^2), log-prob averaged over the
non-batch elements. Two generation modes:
- bidirectional: the whole clip is denoised together (one "chunk").
- causal: chunk by chunk with the rolling KV cache (MATH.md §7); each chunk runs its own K steps,
  then its clean result is appended to the cache. Group rollouts generate the first `prefix_chunks`
  once per prompt, freeze that cache and broadcast it (no copy) to G candidates (Astrolabe).
  Causal clips may be longer than the training clip (streaming long tuning, long-video evaluation):
  positions keep growing and the cache evicts beyond the window.
Optional reward guidance (VideoAlign, MATH.md §3): a `guide(x_t, sigma, v, history) -> v'` callable
replaces each step's velocity before the SDE step, so the recorded log-probs are the guided sampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from policy.backend import Policy
from policy.kv_cache import RollingKVCache
from policy.sde import SDE_TYPES, sde_step, sigma_schedule

# guide(x_t [R, F, C, H, W], sigma [R], v [R, F, C, H, W], history [R, F_h, C, H, W] clean frames before x_t) -> v'
Guide = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
GUIDE_T_MAX = 0.9  # t/(1-t) diverges as t -> 1 (x̂0 is pure noise there): the factor is clamped at 0.9/0.1 = 9


@dataclass
class Trajectory:
    """A batch of rollouts, B = P*G ordered prompt-major (candidate g of prompt p is row p*G + g).

    latents: [B, K+1, T, C, H, W] x at each sigma level; in causal mode chunk j's own K steps are stored
        at chunk j's frames (so latents[:, k] holds every chunk at level k).
    log_probs: [B, n_chunks, K] float32 behaviour log-prob of each step of each chunk (0 for deterministic steps).
    sigmas: [K+1] from 1 to 0.
    videos: [B, T, C, H, W] the clean output (= latents[:, K]).
    prefix_chunks: leading chunks generated once per prompt and shared by the group (history, not trained).
    group_size: G.
    mode, sde_type, eta: how it was sampled.
    """

    latents: Tensor
    log_probs: Tensor
    sigmas: Tensor
    videos: Tensor
    prefix_chunks: int
    group_size: int
    mode: str = "bidirectional"
    sde_type: str = "ode"
    eta: float = 0.0


class RecomputedSteps(NamedTuple):
    """Output of `recompute_log_probs` for S requested steps of the n trained chunks (those after the prefix).

    log_probs: [B, n, S] float32, with the current weights (differentiable).
    means: [B, S, T', C, H, W] the steps' Gaussian means at the trained frames T' = T - prefix frames.
    std: [B, S] the steps' standard deviation (the same for every chunk).
    """

    log_probs: Tensor
    means: Tensor
    std: Tensor


def _check_common(cond: Tensor, sde_type: str, eta: float) -> None:
    if sde_type not in SDE_TYPES:
        raise ValueError(f"unknown sde_type {sde_type!r}; choose one of {list(SDE_TYPES)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    if cond.dim() < 2:
        raise ValueError(f"prompt conditioning must be [P, ...] (from policy.encode_prompts), got shape {list(cond.shape)}")


def latent_dtype(model: Policy) -> torch.dtype:
    """Latents and SDE steps are float32, or the model's dtype when that is wider (float64 checks)."""
    return torch.promote_types(model.dtype, torch.float32)


@torch.no_grad()
def sample(
    model: Policy,
    cond: Tensor,
    *,
    steps: int,
    sde_type: str = "ode",
    eta: float = 0.0,
    mode: Literal["bidirectional", "causal"] = "bidirectional",
    num_frames: int | None = None,
    group_size: int = 1,
    prefix_chunks: int = 0,
    generator: torch.Generator | None = None,
    shift: float = 1.0,
    noise: Tensor | None = None,
    on_chunk: Callable[[int, RollingKVCache], None] | None = None,
    sigmas: Tensor | None = None,
    guide: Guide | None = None,
) -> Trajectory:
    """Generate G = group_size clips per prompt (cond [P, ...] from model.encode_prompts) with `steps` sampler steps.

    num_frames: clip length in latent frames (default model.shape.frames); causal mode may exceed it (positions keep growing,
        the cache stays bounded by the window).
    noise: optional standard normal [B, K+1, T, C, H, W]: [:, 0] the initial latent, [:, k+1] the noise of
        step k (drawn with `generator` when None). Shared-prefix frames use the noise of each prompt's
        first candidate (rows p*G).
    on_chunk(j, cache): called in causal mode before chunk j is denoised (inspection, benchmarks).
    sigmas: an explicit schedule [steps + 1] from 1 to 0 instead of `sigma_schedule(steps, shift)` (e.g. a
        distilled model's step list).
    guide: reward guidance (e.g. policy.rollout.RewardGuide.for_prompts): called at every step with the frames being
        denoised (the whole clip, or the current chunk) and the clean frames generated before them; its velocity is
        the one stepped (and scored in the log-prob).
    """
    shp = model.shape
    _check_common(cond, sde_type, eta)
    if mode not in ("bidirectional", "causal"):
        raise ValueError(f"mode must be 'bidirectional' or 'causal', got {mode!r}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    t = shp.frames if num_frames is None else num_frames
    c = shp.chunk if mode == "causal" else t
    if t < 1 or t % c:
        raise ValueError(f"num_frames must be a positive multiple of chunk={c}, got {t}")
    if mode == "bidirectional" and t > shp.frames:
        raise ValueError(f"bidirectional clips have at most {shp.frames} frames, got {t}; use mode='causal'")
    n_chunks = t // c
    if not 0 <= prefix_chunks < n_chunks:
        raise ValueError(f"prefix_chunks must be in [0, {n_chunks - 1}] (n_chunks={n_chunks}), got {prefix_chunks}")

    p, g = cond.shape[0], group_size
    b = p * g
    if sigmas is None:
        sigmas = sigma_schedule(steps, shift)
    elif sigmas.shape != (steps + 1,) or float(sigmas[0]) != 1.0 or float(sigmas[-1]) != 0.0:
        raise ValueError(f"sigmas must be [steps + 1] = [{steps + 1}] values from 1 to 0, got {sigmas.tolist()}")
    shape = (b, steps + 1, t, shp.channels, shp.height, shp.width)
    device, dtype = model.device, latent_dtype(model)
    if noise is None:
        noise = torch.randn(shape, generator=generator, device=generator.device if generator else device)
    elif tuple(noise.shape) != shape:
        raise ValueError(f"noise must be [B, K+1, T, C, H, W] = {list(shape)}, got {list(noise.shape)}")
    noise = noise.to(device=device, dtype=dtype)
    ids = cond.repeat_interleave(g, dim=0)
    latents = torch.empty(shape, device=device, dtype=dtype)
    log_probs = torch.zeros(b, n_chunks, steps, device=device, dtype=dtype)

    cache = model.new_cache()
    rows = slice(0, b, g) if prefix_chunks else slice(None)  # prefix: one row per prompt
    cur_ids = ids[rows]
    for j in range(n_chunks):
        if prefix_chunks and j == prefix_chunks:  # freeze the shared history and broadcast it to G candidates
            cache = cache.detach().expand(g)
            latents[:, :, : j * c] = latents[rows, :, : j * c].repeat_interleave(g, dim=0)
            log_probs[:, :j] = log_probs[rows, :j].repeat_interleave(g, dim=0)
            rows, cur_ids = slice(None), ids
        if on_chunk is not None and mode == "causal":
            on_chunk(j, cache)
        frames = slice(j * c, (j + 1) * c)
        x = noise[rows, 0, frames]
        latents[rows, 0, frames] = x
        for k in range(steps):
            s = sigmas[k].expand(x.shape[0])
            if mode == "causal":
                v = model.velocity_chunk(x, s, cur_ids, cache, j * c)
            else:
                v = model.velocity(x, s, cur_ids)
            if guide is not None:
                v = guide(x, s, v, latents[rows, steps, : j * c])
            step = sde_step(
                sde_type, x, v, float(sigmas[k]), float(sigmas[k + 1]), eta, noise=noise[rows, k + 1, frames]
            )
            x = step.sample
            latents[rows, k + 1, frames] = x
            log_probs[rows, j, k] = step.log_prob
        if mode == "causal" and j + 1 < n_chunks:  # the last chunk is nobody's history
            model.append_to_cache(x, cur_ids, cache, j * c)
    return Trajectory(
        latents=latents,
        log_probs=log_probs,
        sigmas=sigmas,
        videos=latents[:, steps],
        prefix_chunks=prefix_chunks,
        group_size=g,
        mode=mode,
        sde_type=sde_type,
        eta=eta,
    )


def guided_velocity(v: Tensor, sigma: Tensor, grad: Tensor, weight: float, beta: float) -> Tensor:
    """VideoAlign reward guidance (MATH.md §3): v' = v − (t/(1−t))·(w/β)·∇_{x_t} r.

    v, grad [B, ...] (grad = ∇_{x_t} r(x̂0), x̂0 = x_t − t·v); sigma [B] = t. The factor turns a reward gradient into a
    score shift (v = −(x + t·score)/(1 − t)); it is clamped at t = GUIDE_T_MAX, where it would diverge at t = 1.
    Weight 0 returns v exactly.
    """
    t = sigma.to(v.dtype).clamp(max=GUIDE_T_MAX)
    factor = (t / (1 - t)) * (weight / beta)
    return v - factor.view(-1, *([1] * (v.dim() - 1))) * grad.to(v.dtype)


def recompute_log_probs(
    model: Policy,
    traj: Trajectory,
    cond: Tensor,
    chunk_steps: Sequence[int],
    sde_type: str,
    eta: float,
    detach_history: bool = True,
) -> RecomputedSteps:
    """Log-probs (with grad, current weights) of the recorded transitions latents[:, k] -> latents[:, k+1].

    chunk_steps: step indices k in [0, K) to evaluate, the same for every trained chunk (chunks after the prefix).
    cond: [P, ...] (repeated G times) or [B, ...], from model.encode_prompts.
    Bidirectional: `velocity` on latents[:, k]. Causal: one `velocity_causal` pass per step with latents[:, k]
    as the noisy frames and the recorded clean video as history (detached from the graph; with
    detach_history no gradient flows through the history's keys/values either).
    """
    _check_common(cond, sde_type, eta)
    b, k_plus_1, t = traj.latents.shape[:3]
    n_steps = k_plus_1 - 1
    ks = [int(k) for k in chunk_steps]
    if not ks or any(not 0 <= k < n_steps for k in ks):
        raise ValueError(f"chunk_steps must be a non-empty list of steps in [0, {n_steps}), got {list(chunk_steps)}")
    if cond.shape[0] * traj.group_size == b and traj.group_size > 1:
        cond = cond.repeat_interleave(traj.group_size, dim=0)
    if cond.shape[0] != b:
        raise ValueError(f"cond must have P={b // traj.group_size} or B={b} rows, got {cond.shape[0]}")
    n_chunks = traj.log_probs.shape[1]
    c = t // n_chunks
    s_count = len(ks)
    sig = traj.sigmas[ks].to(traj.latents.device)  # [S]
    x = traj.latents[:, ks].detach().flatten(0, 1)  # [B*S, T, C, H, W], sample-major
    ids = cond.repeat_interleave(s_count, dim=0)
    sig_bs = sig.repeat(b)
    if traj.mode == "causal":
        clean = traj.videos.detach().repeat_interleave(s_count, dim=0)
        v = model.velocity_causal(x, sig_bs, clean, ids, detach_history=detach_history)
    else:
        v = model.velocity(x, sig_bs, ids)
    v = v.view(b, s_count, *v.shape[1:])

    first = traj.prefix_chunks
    std = torch.zeros(b, s_count, device=v.device)
    lp_cols, mean_cols = [], []
    for i, k in enumerate(ks):
        lp_row, mean_row = [], []
        for j in range(first, n_chunks):
            fr = slice(j * c, (j + 1) * c)
            step = sde_step(
                sde_type,
                traj.latents[:, k, fr],
                v[:, i, fr],
                float(traj.sigmas[k]),
                float(traj.sigmas[k + 1]),
                eta,
                sample=traj.latents[:, k + 1, fr],
            )
            lp_row.append(step.log_prob)
            mean_row.append(step.mean)
        std[:, i] = step.std
        lp_cols.append(torch.stack(lp_row, dim=1))  # [B, n]
        mean_cols.append(torch.cat(mean_row, dim=1))  # [B, T', ...]
    log_probs = torch.stack(lp_cols, dim=2)
    means = torch.stack(mean_cols, dim=1)
    return RecomputedSteps(log_probs=log_probs, means=means, std=std)
