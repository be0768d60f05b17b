"""The learner: advantages from scored trajectory groups, then one policy update.

Two losses (MATH.md §3):
- `ppo`: PPO-clip on recorded SDE steps (Flow-GRPO / SAGE-GRPO). A random subset of each group's
  sampler steps is re-scored with the current weights; the importance ratio uses the behaviour
  log-probs recorded at rollout time, so the first on-policy ratio is exactly 1. Optional temporal
  gradient equaliser (per-step scale) and KL trust regions (fixed, moving anchor, step-wise, dual).
- `nft`: forward-process negative-aware fine-tuning (DiffusionNFT / Astrolabe): solver-agnostic,
  needs only the clean clips; the old policy is an EMA of the current weights.

In causal mode only the candidate chunks after a group's shared prefix are trained, with the
history as detached clean context (streaming long tuning); groups carry their own prefix length,
so every window position of the clip is trained over a run, the first chunk included.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from policy.backend import Policy, trainable_bytes
from policy.losses import ema_update, gaussian_kl, kl_schedule, nft_loss, ppo_clip_loss, stepwise_kl
from policy.sampling import Trajectory, recompute_log_probs
from policy.sde import equalizer_scales
from rewards.advantages import constrained_channels, constrained_weights, gdpo_advantages, grpo_advantages


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["ppo", "nft"] = "nft"
    advantage: Literal["grpo", "gdpo"] = "gdpo"
    lr: float = Field(3e-4, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    # ppo
    clip_range: float = Field(1e-3, gt=0)
    adv_clip: float = Field(5.0, gt=0)
    step_fraction: float = Field(0.6, gt=0, le=1)  # share of sampler steps trained per group
    equalizer: bool = True
    kl: Literal["none", "fixed", "moving", "stepwise", "dual"] = "dual"
    kl_weight: float = Field(0.01, ge=0)
    kl_schedule: Literal["fixed", "two_stage", "milder"] = "fixed"
    update_ref_every: int = Field(10, ge=1)  # moving anchor refresh, in learner steps
    w_pos: float = Field(1.0, ge=0)
    w_vel: float = Field(0.1, ge=0)
    # nft
    nft_beta: float = Field(1.0, gt=0)
    nft_form: Literal["diffusionnft", "astrolabe"] = "diffusionnft"
    nft_old_ema: float = Field(0.5, ge=0, lt=1)  # old policy <- EMA of the weights, per step
    nft_kl: float = Field(0.0, ge=0)  # velocity KL to the reference (initial) model


@dataclass
class ScoredGroup:
    """One prompt's G candidates with their rewards. traj rows are the candidates; rewards[name] is [G]."""

    group_id: str
    cond: torch.Tensor  # [1, ...] the prompt's conditioning (policy.encode_prompts)
    traj: Trajectory
    rewards: dict[str, np.ndarray]
    version: int


def advantages(groups: list[ScoredGroup], primary: str, taus: dict[str, float], lambdas: dict[str, float],
               method: str) -> torch.Tensor:
    """SCRL channels (R_f, −ReLU(τ_c − R_c) per constraint) weighted (1, λ_c), by GRPO or GDPO -> [B]."""
    ids = np.concatenate([[i] * len(g.rewards[primary]) for i, g in enumerate(groups)])
    r_f = np.concatenate([g.rewards[primary] for g in groups])
    names = list(taus)
    if names:
        r_c = np.stack([np.concatenate([g.rewards[c] for g in groups]) for c in names], axis=1)
        channels = constrained_channels(r_f, r_c, [taus[c] for c in names])
        weights = constrained_weights([lambdas.get(c, 0.0) for c in names])
    else:
        channels, weights = torch.as_tensor(r_f, dtype=torch.float32)[:, None], [1.0]
    fn = gdpo_advantages if method == "gdpo" else grpo_advantages
    return fn(channels, ids, weights)


class Learner:
    """Holds the policy, its optimiser and the reference / anchor / old copies; `step` is one update.

    The copies are `policy.frozen_copy(role)`: whole models for full fine-tuning, adapters on the same base with
    LoRA (reference = adapters off). The optimiser sees only `policy.trainable_parameters()`.
    """

    def __init__(self, model: Policy, cfg: LearnerConfig, total_steps: int, seed: int = 0):
        self.model, self.cfg, self.total_steps = model.train(), cfg, total_steps
        self.reference = model.frozen_copy("reference")  # the initial (base) model
        self.anchor = model.frozen_copy("anchor")  # moving anchor, refreshed every update_ref_every
        self.old = model.frozen_copy("old")  # NFT old policy (EMA)
        self.opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.generator = torch.Generator().manual_seed(seed)
        self.version = 0
        self.publish_bytes = trainable_bytes(model.trainable_state())

    def step(self, groups: list[ScoredGroup], primary: str, taus: dict[str, float],
             lambdas: dict[str, float]) -> dict[str, float]:
        """One optimiser step over all groups (gradients accumulated group by group). Returns stats."""
        adv = advantages(groups, primary, taus, lambdas, self.cfg.advantage).to(self.model.device)
        self.opt.zero_grad(set_to_none=True)
        stats: dict[str, list[float]] = {}
        start = 0
        n_samples = sum(len(g.traj.videos) for g in groups)
        for g in groups:
            a = adv[start : start + len(g.traj.videos)]
            start += len(g.traj.videos)
            loss, parts = (self._ppo if self.cfg.loss == "ppo" else self._nft)(g, a)
            (loss * len(a) / n_samples).backward()
            for k, v in parts.items():
                stats.setdefault(k, []).append(v)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.version += 1
        if self.cfg.loss == "nft":
            ema_update(self.old.trainable_parameters(), self.model.trainable_parameters(), self.cfg.nft_old_ema)
        if self.version % self.cfg.update_ref_every == 0:
            self.anchor.load_trainable_state(self.model.trainable_state())
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out.update(grad_norm=float(grad_norm), adv_abs=float(adv.abs().mean()), version=self.version,
                   **{"weights/bytes_per_version": self.publish_bytes})
        return out

    def _ppo(self, g: ScoredGroup, adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        traj, cfg = g.traj, self.cfg
        n_steps = traj.log_probs.shape[2]
        k_count = max(1, round(cfg.step_fraction * n_steps))
        ks = sorted(torch.randperm(n_steps, generator=self.generator)[:k_count].tolist())
        new = recompute_log_probs(self.model, traj, g.cond, ks, traj.sde_type, traj.eta)
        old_lp = traj.log_probs[:, traj.prefix_chunks :, ks]  # [G, n, S] behaviour log-probs
        scales = equalizer_scales(traj.sde_type, traj.sigmas, traj.eta)[ks] if cfg.equalizer else torch.ones(len(ks))
        scales = scales.to(new.log_probs.device)
        per_step, ratios, clipped = [], [], []
        for i in range(len(ks)):
            lp, lp_old = new.log_probs[:, :, i].reshape(-1), old_lp[:, :, i].reshape(-1)
            a = adv.repeat_interleave(new.log_probs.shape[1])
            loss, st = ppo_clip_loss(lp, lp_old, a, cfg.clip_range, cfg.adv_clip)
            per_step.append(scales[i] * loss)
            ratios.append(st["ratio_mean"])
            clipped.append(st["clip_fraction"])
        loss = torch.stack(per_step).mean()
        kl = self._kl(g, traj, ks, new, old_lp)
        weight = kl_schedule(cfg.kl_schedule, self.version, self.total_steps, cfg.kl_weight)
        return loss + weight * kl, {"loss/policy": loss.item(), "kl": kl.item(), "ratio": float(np.mean(ratios)),
                                    "clip_fraction": float(np.mean(clipped))}

    def _kl(self, g, traj, ks, new, old_lp) -> torch.Tensor:
        kind = self.cfg.kl
        if kind == "none":
            return torch.zeros((), device=new.log_probs.device)
        step_kl = stepwise_kl(old_lp.reshape(-1), new.log_probs.reshape(-1))
        if kind == "stepwise":
            return step_kl
        ref = self.reference if kind == "fixed" else self.anchor
        with torch.no_grad():
            ref_means = recompute_log_probs(ref, traj, g.cond, ks, traj.sde_type, traj.eta).means
        pos_kl = torch.stack([gaussian_kl(new.means[:, i], ref_means[:, i], new.std[:, i]) for i in range(len(ks))]).mean()
        if kind == "dual":
            return self.cfg.w_pos * pos_kl + self.cfg.w_vel * step_kl
        return pos_kl

    def _nft(self, g: ScoredGroup, adv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        traj, cfg = g.traj, self.cfg
        x0 = traj.videos.detach()
        b, t = x0.shape[:2]
        ids = g.cond.expand(b, *g.cond.shape[1:])
        frames = slice(traj.prefix_chunks * self.model.shape.chunk if traj.mode == "causal" else 0, t)
        tt = torch.rand(b, generator=self.generator).clamp(0.02, 0.98).to(x0.device)
        eps = torch.randn(x0.shape, generator=self.generator).to(x0.device)
        x_t = (1 - tt[:, None, None, None, None]) * x0 + tt[:, None, None, None, None] * eps

        def velocity(model):
            if traj.mode == "causal":
                return model.velocity_causal(x_t, tt, x0, ids, detach_history=True)[:, frames]
            return model.velocity(x_t, tt, ids)

        v_theta = velocity(self.model)
        with torch.no_grad():
            v_old = velocity(self.old)
            v_ref = velocity(self.reference) if cfg.nft_kl else None
        loss = nft_loss(x0[:, frames], eps[:, frames], tt, v_theta, v_old, v_ref, adv, cfg.nft_beta,
                        cfg.nft_kl, cfg.nft_form)
        with torch.no_grad():
            kl = ((v_theta - (v_ref if v_ref is not None else v_old)) ** 2).mean()
        return loss, {"loss/policy": loss.item(), "kl": kl.item()}

    def weights(self) -> dict[str, torch.Tensor]:
        """What rollout workers load per version (`policy.trainable_state()`: an adapter with LoRA, else all
        weights), as CPU tensors for the object store."""
        return self.model.trainable_state()
