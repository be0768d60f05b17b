"""`videorl doctor`: the consistency checks people otherwise find by hand, each a number against a tolerance.

The log-prob pitfalls of flow-matching RL (flow_grpo's FAQ, DanceGRPO #57, verl-omni's log-prob checks) are silent:
training runs, the ratio is just wrong. Every check here builds the policy exactly as the actors do (the rollout copy
at rollout.dtype, the learner at model.dtype, LoRA as configured) and measures:

- on-policy importance ratio: sample with the learner's own weights and dtype, recompute the log-probs the way the
  learner does (teacher-forced, detached history); max |ratio - 1| must be far inside PPO's clip range.
- rollout dtype vs learner dtype: the same, sampled by the rollout copy (rollout.dtype): what PPO really sees.
- cached streaming vs teacher forcing: velocities chunk by chunk through the rolling cache == one masked pass.
- shared prefix vs independent caches: G candidates on one expanded prefix == G rollouts generating it themselves.
- adapter export -> fresh import: the published trainable state loaded by a fresh worker reproduces the velocities.
- disabled adapter == base: LoRA's reference policy is the base model exactly.
- VAE round trip: a clip through encode and decode (pixel space: exact).
A check that does not apply to the configuration passes with a note saying why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from policy.backend import Policy, load_policy, uses_lora, without_adapters
from policy.sampling import recompute_log_probs, sample

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly"]
# velocity / latent agreement expected from float arithmetic alone, per model dtype
NUMERIC_TOL = {"float64": 1e-9, "float32": 1e-4, "bfloat16": 5e-2}


@dataclass
class Check:
    name: str
    value: float
    tolerance: float
    note: str = ""

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.value) and self.value <= self.tolerance)

    def row(self) -> dict:
        return {"check": self.name, "value": self.value, "tolerance": self.tolerance, "passed": self.passed,
                "note": self.note}


def _not_applicable(name: str, why: str) -> Check:
    return Check(name, 0.0, 0.0, f"not applicable: {why}")


def _perturb(params, scale: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def run_checks(model_cfg, weights, *, mode: str, sampler: str, eta: float, steps: int, shift: float, group_size: int,
               clip_range: float, rollout_dtype: str | None = None, trained: bool = True, seed: int = 0) -> list[Check]:
    """All checks for one configuration. weights: what `load_policy` reads (None: the model's own starting point).
    trained=False perturbs the weights (and a fresh LoRA adapter) so that every path of an untrained model matters."""
    torch.manual_seed(seed)
    learner = load_policy(model_cfg, weights, for_training=True)
    if not trained:
        _perturb(learner.trainable_parameters(), 0.05, seed)
    elif uses_lora(model_cfg):
        _perturb(learner.trainable_parameters(), 0.05, seed)  # a fresh adapter is the identity: give it weights
    learner.eval()
    rollout = _worker(model_cfg.model_copy(update={"dtype": rollout_dtype}) if rollout_dtype else model_cfg, weights,
                      learner)
    sampling = dict(steps=steps, sde_type=sampler, eta=eta, mode=mode, shift=shift)
    g = max(2, min(group_size, 4))
    tol = NUMERIC_TOL[model_cfg.dtype]
    cond = learner.encode_prompts(PROMPTS[:1])
    checks = [_ratio_check("on-policy importance ratio (learner dtype)", learner, learner, cond, g, sampling,
                           clip_range, seed),
              _ratio_check(f"importance ratio, rollout {rollout.dtype} -> learner {learner.dtype}".replace("torch.", ""),
                           rollout, learner, cond, g, sampling, clip_range, seed)]
    with torch.no_grad():
        checks.append(_streaming_check(learner, cond, g, sampling, tol, seed))
        checks.append(_prefix_check(learner, cond, g, sampling, tol, seed))
        fresh = _worker(model_cfg, weights, learner)
        checks.append(Check("adapter export -> fresh import (max |dv|)", _max_diff(fresh, learner, cond, seed), 0.0,
                            "LoRA adapter tensors" if uses_lora(model_cfg) else "all weights (no LoRA)"))
        checks.append(_disabled_adapter_check(model_cfg, weights, learner, cond, seed))
        checks.append(_vae_check(learner, seed))
    return checks


def _worker(model_cfg, weights, learner: Policy) -> Policy:
    """A rollout worker as the actors make one: its own load of the base, then the learner's published state."""
    worker = load_policy(model_cfg, weights).eval()
    worker.load_trainable_state(learner.trainable_state())
    return worker


def _ratio_check(name, sampler_policy, learner, cond, g, sampling, clip_range, seed) -> Check:
    if sampling["sde_type"] == "ode":
        return _not_applicable(name, "the ode sampler has no log-probabilities (PPO needs a stochastic sampler)")
    traj = sample(sampler_policy, sampler_policy.encode_prompts(PROMPTS[:1]), group_size=g,
                  generator=torch.Generator().manual_seed(seed), **sampling)
    with torch.no_grad():
        new = recompute_log_probs(learner, traj, cond, list(range(sampling["steps"])), sampling["sde_type"],
                                  sampling["eta"])
    old = traj.log_probs[:, traj.prefix_chunks:].to(new.log_probs)
    ratio = torch.exp(new.log_probs - old)
    gap = float((new.log_probs - old).abs().max())
    return Check(name, float((ratio - 1).abs().max()), 0.1 * clip_range,
                 f"max |log-prob gap| {gap:.3g}; tolerance = clip_range/10 (PPO clips at {clip_range:g})")


def _streaming_check(policy, cond, g, sampling, tol, seed) -> Check:
    name = "cached streaming vs teacher forcing (max |dv|)"
    if sampling["mode"] != "causal":
        return _not_applicable(name, "rollout.mode is bidirectional (no cache)")
    traj = sample(policy, cond, group_size=g, generator=torch.Generator().manual_seed(seed), **sampling)
    s, b = policy.shape, g
    conds = cond.expand(b, *cond.shape[1:])
    k = sampling["steps"] // 2
    x, clean, sig = traj.latents[:, k], traj.videos, traj.sigmas[k].expand(b)
    forced = policy.velocity_causal(x, sig, clean, conds)
    cache, streamed = policy.new_cache(), []
    for j in range(s.frames // s.chunk):
        fr = slice(j * s.chunk, (j + 1) * s.chunk)
        streamed.append(policy.velocity_chunk(x[:, fr], sig, conds, cache, j * s.chunk))
        policy.append_to_cache(clean[:, fr], conds, cache, j * s.chunk)
    evicts = s.window < s.frames
    return Check(name, float((torch.cat(streamed, dim=1) - forced).abs().max()), tol,
                 f"window {s.window} of {s.frames} frames, sink {s.sink}" + (" (the cache evicts)" if evicts else ""))


def _prefix_check(policy, cond, g, sampling, tol, seed) -> Check:
    name = "shared prefix vs independent caches (max |dx|)"
    s = policy.shape
    if sampling["mode"] != "causal" or s.frames // s.chunk < 2:
        return _not_applicable(name, "needs causal mode and at least two chunks")
    k = sampling["steps"]
    noise = torch.randn(g, k + 1, s.frames, s.channels, s.height, s.width, generator=torch.Generator().manual_seed(seed))
    prefix = s.frames // s.chunk // 2
    noise[:, :, : prefix * s.chunk] = noise[:1, :, : prefix * s.chunk]
    kw = {**sampling, "noise": noise}
    shared = sample(policy, cond, group_size=g, prefix_chunks=prefix, **kw)
    independent = sample(policy, cond.expand(g, *cond.shape[1:]), **kw)
    # rounding differs between a batch of 1 expanded and a batch of G; it compounds over the k sampler steps of a
    # chunk (and through the cache into later chunks), so the tolerance is the per-pass one times k
    return Check(name, float((shared.latents - independent.latents).abs().max()), tol * k,
                 f"{g} candidates, {prefix} of {s.frames // s.chunk} chunks shared; tolerance {tol:g} x {k} steps")


def _max_diff(a: Policy, b: Policy, cond, seed) -> float:
    s = a.shape
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(2, s.frames, s.channels, s.height, s.width, generator=g).to(a.device)
    sigma = torch.tensor([0.3, 0.8], device=a.device)
    c = cond.expand(2, *cond.shape[1:])
    return float((a.velocity(x, sigma, c).float() - b.velocity(x, sigma, c).float()).abs().max())


def _disabled_adapter_check(model_cfg, weights, learner, cond, seed) -> Check:
    name = "disabled adapter == base (max |dv|)"
    if not uses_lora(model_cfg):
        return _not_applicable(name, "no LoRA (model.lora is not set)")
    base = load_policy(without_adapters(model_cfg), getattr(learner, "base_weights", None)).eval()
    return Check(name, _max_diff(learner.frozen_copy("reference"), base, cond, seed), 0.0, "reference = adapters off")


def _vae_check(policy, seed) -> Check:
    """A smooth moving pattern (what a video looks like to a VAE) through encode and decode: mean |error| in uint8
    levels."""
    s = policy.shape
    codec = getattr(policy, "latents", None)
    t = np.arange(s.video_frames)[:, None, None, None]
    yy, xx = (a[None, :, :, None] / max(s.video_height, s.video_width) for a in np.mgrid[: s.video_height, : s.video_width])
    phase = np.array([0.0, 2.1, 4.2])[None, None, None, :]
    video = (127.5 + 100 * np.sin(6 * xx + 3 * yy + 0.3 * t + phase)).astype(np.uint8)[None]
    if codec is None:  # VideoDiT: pixel space through videos_to_model / decode
        from policy.model import videos_to_model

        back = policy.decode(videos_to_model(video))
        return Check("VAE round trip (mean |error|, uint8 levels)", float(np.abs(back.astype(int) - video).mean()), 0.0,
                     "pixel space: exact")
    back = codec.decode(codec.encode(video))
    pixel = s.temporal_scale == 1 and s.channels == 3
    return Check("VAE round trip (mean |error|, uint8 levels)", float(np.abs(back.astype(int) - video).mean()),
                 0.0 if pixel else 8.0, "pixel space: exact" if pixel else f"{s.video_frames} frames through the Wan VAE")
