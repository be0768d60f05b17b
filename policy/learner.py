"""The learner: advantages from scored trajectory groups, then one policy update.

Five losses (MATH.md §3):
- `ppo`: PPO-clip on recorded SDE steps (Flow-GRPO / SAGE-GRPO). A random subset of each group's
  sampler steps is re-scored with the current weights; the importance ratio uses the behaviour
  log-probs recorded at rollout time, so the first on-policy ratio is exactly 1. Optional temporal
  gradient equaliser (per-step scale) and KL trust regions (fixed, moving anchor, step-wise, dual).
- `nft`: forward-process negative-aware fine-tuning (DiffusionNFT / Astrolabe): solver-agnostic,
  needs only the clean clips; the old policy is an EMA of the current weights.
- `flow_dpo`, `flow_rwr`, `sft` (VideoAlign), online on the clean clips: each group's candidates are ranked by their
  advantage; Flow-DPO takes its best as winner and worst as loser (shared ε and t, errors against the reference),
  Flow-RWR weights every candidate's flow-matching error by exp(A/β), SFT fits the winner alone.

The reference (`learner.reference`) is the initial model, or with `moving` is reset to the current weights every
`reference_reset_every` steps and/or when the step's measured KL to it exceeds `reference_reset_kl` (Astrolabe).
Selective KL (Astrolabe, MATH.md §6) applies the KL term only to samples whose primary reward ranks them above the
auxiliary rewards by more than a batch percentile (likely reward hacking).

In causal mode only the candidate chunks after a group's shared prefix are trained, with the
history as detached clean context (streaming long tuning); groups carry their own prefix length,
so every window position of the clip is trained over a run, the first chunk included.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from policy.backend import Policy, trainable_bytes
from policy.losses import (ema_update, flow_dpo_loss, flow_rwr_loss, gaussian_kl, kl_schedule, nft_loss,
                           ppo_clip_loss, stepwise_kl)
from policy.parallel import (Ranks, all_reduce_gradients, full_state, gather_stats, group_generator, local_like,
                             local_numel, reshard, scalar, shard)
from policy.sampling import Trajectory, recompute_log_probs
from policy.sde import equalizer_scales
from rewards.advantages import (constrained_channels, constrained_weights, gdpo_advantages, grpo_advantages,
                                selective_kl_mask)


class SelectiveKLConfig(BaseModel):
    """Astrolabe selective KL: the KL term applies to samples whose uncertainty u = rank(primary) − mean rank(auxiliary)
    lies above the `percentile`-th percentile of the batch."""

    model_config = ConfigDict(extra="forbid")

    percentile: float = Field(ge=0, le=100)
    auxiliary: list[str] = Field(min_length=1)  # reward names of the run (e.g. oracle-free vq, mq, ta)


class LearnerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loss: Literal["ppo", "nft", "flow_dpo", "flow_rwr", "sft"] = "nft"
    # how a learner group of ray.learner_workers > 1 ranks splits the work (policy.parallel): full replicas with
    # summed gradients, or FSDP2-sharded weights, gradients and optimiser state
    parallel: Literal["ddp", "fsdp2"] = "ddp"
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
    nft_draws: int = Field(1, ge=1)  # (t, ε) draws per clip per step, losses averaged: less gradient noise, K x compute
    nft_kl: float = Field(0.0, ge=0)  # velocity KL to the reference (initial) model
    # flow_dpo / flow_rwr (VideoAlign)
    dpo_beta: float = Field(100.0, gt=0)
    rwr_beta: float = Field(1.0, gt=0)  # weights exp(A/β) of the (whitened) advantages
    # the reference model (nft with nft_kl > 0, ppo with kl=fixed, flow_dpo): frozen initial model, or moving (Astrolabe)
    reference: Literal["frozen", "moving"] = "frozen"
    reference_reset_every: int | None = Field(None, ge=1)  # moving: reference <- current weights every N steps
    reference_reset_kl: float | None = Field(None, gt=0)  # moving: ... when the step's kl/reference stat exceeds it
    selective_kl: SelectiveKLConfig | None = None

    @model_validator(mode="after")
    def _consistent(self):
        resets = [k for k in ("reference_reset_every", "reference_reset_kl") if getattr(self, k) is not None]
        if self.reference == "frozen" and resets:
            raise ValueError(f"learner.{resets[0]} resets a moving reference: set learner.reference=moving")
        if self.reference == "moving" and not resets:
            raise ValueError("learner.reference=moving needs a reset rule: learner.reference_reset_every and/or "
                             "learner.reference_reset_kl")
        if self.reference == "moving" and not self.uses_reference:
            raise ValueError(f"learner.reference=moving: learner.loss={self.loss} does not use the reference here "
                             "(it is used by nft with nft_kl > 0, ppo with kl=fixed, and flow_dpo)")
        if self.nft_draws > 1 and self.loss != "nft":
            raise ValueError(f"learner.nft_draws={self.nft_draws} averages the nft loss over noise draws, but "
                             f"learner.loss={self.loss}")
        if self.selective_kl is not None and not self.has_kl:
            raise ValueError(f"learner.selective_kl masks a KL term, but learner.loss={self.loss} has none "
                             "(use nft with learner.nft_kl > 0, or ppo with learner.kl other than none)")
        return self

    @property
    def uses_reference(self) -> bool:
        return (self.loss == "flow_dpo" or (self.loss == "nft" and self.nft_kl > 0)
                or (self.loss == "ppo" and self.kl == "fixed"))

    @property
    def reads_steps(self) -> bool:
        """Whether the learner reads the sampler's intermediate latents and log-probs (ppo re-scores recorded steps);
        the forward-process losses read the clean clip only, so rollouts store nothing else (`trajectory_payload`)."""
        return self.loss == "ppo"

    @property
    def has_kl(self) -> bool:
        return (self.loss == "nft" and self.nft_kl > 0) or (self.loss == "ppo" and self.kl != "none")

    def required_rewards(self) -> list[str]:
        """Reward names this learner reads beyond the primary and the constraints (selective KL's auxiliaries)."""
        return list(self.selective_kl.auxiliary) if self.selective_kl else []


def check_rewards(cfg: LearnerConfig, scored: Iterable[str]) -> None:
    """Every reward the learner config names is one the run scores; ValueError naming the first missing one."""
    scored = sorted(scored)
    for name in cfg.required_rewards():
        if name not in scored:
            raise ValueError(f"learner.selective_kl.auxiliary names reward {name!r}, which this run does not score "
                             f"(its rewards: {scored})")


@dataclass
class ScoredGroup:
    """One prompt's G candidates with their rewards. traj rows are the candidates; rewards[name] is [G]."""

    group_id: str
    cond: torch.Tensor  # [1, ...] the prompt's conditioning (policy.encode_prompts)
    traj: Trajectory
    rewards: dict[str, np.ndarray]
    version: int


def advantages(groups: list[ScoredGroup], primary: str, taus: dict[str, float], lambdas: dict[str, float],
               method: str, sum_norm: bool = False, channel_weights: dict[str, float] | None = None) -> torch.Tensor:
    """SCRL channels (R_f, −ReLU(τ_c − R_c) per constraint) weighted (1, λ_c), by GRPO or GDPO -> [B].

    channel_weights: extra channels, reward name -> weight (each a key of group.rewards), after the SCRL ones.
    sum_norm: divide by the sum of the weights (1 + Σλ_c without extra channels) instead of the final whitening
    (GDPO) / std division (GRPO), Stooke's normalisation (`gdpo_advantages`).
    """
    ids = np.concatenate([[i] * len(g.rewards[primary]) for i, g in enumerate(groups)])
    r_f = np.concatenate([g.rewards[primary] for g in groups])
    names = list(taus)
    if names:
        r_c = np.stack([np.concatenate([g.rewards[c] for g in groups]) for c in names], axis=1)
        channels = constrained_channels(r_f, r_c, [taus[c] for c in names])
        weights = constrained_weights([lambdas.get(c, 0.0) for c in names])
    else:
        channels, weights = torch.as_tensor(r_f, dtype=torch.float32)[:, None], [1.0]
    if channel_weights:
        for name in channel_weights:
            if name not in groups[0].rewards:
                raise ValueError(f"channel_weights names reward {name!r}, which this run does not score "
                                 f"(its rewards: {sorted(groups[0].rewards)})")
        extra = np.stack([np.concatenate([g.rewards[n] for g in groups]) for n in channel_weights], axis=1)
        channels = torch.cat([channels, torch.as_tensor(extra, dtype=torch.float32)], dim=1)
        weights = torch.cat([torch.as_tensor(weights, dtype=torch.float32),
                             torch.tensor(list(channel_weights.values()), dtype=torch.float32)])
    fn = gdpo_advantages if method == "gdpo" else grpo_advantages
    return fn(channels, ids, weights, sum_norm=sum_norm)


def flow_matching_error(v: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """e = mean ||v − (ε − x0)||² per sample: v, target [B, ...] -> [B] float32 (MATH.md §3, Flow-DPO)."""
    return ((v.float() - target.float()) ** 2).reshape(v.shape[0], -1).mean(dim=1)


class Learner:
    """Holds the policy, its optimiser and the reference / anchor / old copies; `step` is one update.

    The copies are `policy.frozen_copy(role)`: whole models for full fine-tuning, adapters on the same base with
    LoRA (reference = adapters off; a moving reference has an adapter of its own). The optimiser sees only
    `policy.trainable_parameters()`. sum_norm: `constraints.sum_norm` (see `advantages`).
    """

    def __init__(self, model: Policy, cfg: LearnerConfig, total_steps: int, seed: int = 0, sum_norm: bool = False,
                 ranks: Ranks = Ranks(), mixed_bf16: bool = False):
        """ranks: this process's rank in a learner group (`policy.parallel`; the default trains alone).
        mixed_bf16: FSDP2 computes in bf16 and reduces in fp32 (GPU)."""
        self.model, self.cfg, self.total_steps, self.sum_norm = model.train(), cfg, total_steps, sum_norm
        self.seed, self.ranks = seed, ranks
        # the initial (base) model; a moving one is loaded with the current weights on reset, so needs its own adapter
        self.reference = model.frozen_copy("reference" if cfg.reference == "frozen" else "moving_reference")
        self.anchor = model.frozen_copy("anchor")  # moving anchor, refreshed every update_ref_every
        self.old = model.frozen_copy("old")  # NFT old policy (EMA)
        self.sharded = []  # FSDP2 roots: the policy's and its copies' (the same one with LoRA)
        if ranks.sharded:  # before the optimiser: fully_shard swaps the parameters for sharded ones
            self.sharded = shard([model, self.reference, self.anchor, self.old], mixed_bf16)
        self.opt = torch.optim.AdamW(model.trainable_parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
        self.generator = torch.Generator()  # the current group's stream (`policy.parallel.group_generator`)
        self.version = 0
        self.reference_resets = 0
        self.publish_bytes = trainable_bytes(self.weights())

    def step(self, groups: list[ScoredGroup], primary: str, taus: dict[str, float], lambdas: dict[str, float],
             channel_weights: dict[str, float] | None = None) -> dict[str, float]:
        """One optimiser step over all groups (gradients accumulated group by group). Returns stats.

        channel_weights: extra advantage channels, reward name -> weight, beside the SCRL ones (`advantages`);
        None: R_f and the constraints only."""
        cfg, ranks = self.cfg, self.ranks
        check_rewards(cfg, groups[0].rewards)
        adv = advantages(groups, primary, taus, lambdas, cfg.advantage, self.sum_norm,
                         channel_weights).to(self.model.device)
        kl_mask = self._selective_kl_mask(groups, primary)
        loss_fn = {"ppo": self._ppo, "nft": self._nft, "flow_dpo": self._flow_dpo, "flow_rwr": self._flow_rwr,
                   "sft": self._sft}[cfg.loss]
        self.opt.zero_grad(set_to_none=True)
        sizes = [len(g.rewards[primary]) for g in groups]
        starts, n_samples = np.cumsum([0, *sizes]), sum(sizes)
        per_group: dict[int, dict[str, float]] = {}
        for i, counted in ranks.passes(len(groups)):  # this rank's groups (the others train theirs)
            g, rows = groups[i], slice(starts[i], starts[i + 1])
            self.generator = group_generator(self.seed, self.version, i)
            loss, parts = loss_fn(g, adv[rows], None if kl_mask is None else kl_mask[rows])
            (loss * (ranks.loss_scale * sizes[i] / n_samples if counted else 0.0)).backward()
            if counted:
                per_group[i] = parts
        per_group = gather_stats(per_group)
        reshard(self.sharded)
        if ranks.world > 1 and not ranks.sharded:
            all_reduce_gradients(self.model.trainable_parameters())
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.trainable_parameters(), cfg.grad_clip)
        self.opt.step()
        self.version += 1
        if cfg.loss == "nft":
            ema_update(self.old.trainable_parameters(), self.model.trainable_parameters(), cfg.nft_old_ema)
        if self.version % cfg.update_ref_every == 0:
            self.anchor.load_trainable_state(self.model.trainable_state())
        out = {k: float(np.mean([per_group[i][k] for i in sorted(per_group)])) for k in per_group[0]}
        if self._reference_due(out.get("kl/reference", 0.0)):
            self.reference.load_trainable_state(self.model.trainable_state())
            self.reference_resets += 1
        if kl_mask is not None:
            out["kl/selected_fraction"] = float(kl_mask.float().mean())
        out.update(grad_norm=scalar(grad_norm), adv_abs=float(adv.abs().mean()), version=self.version,
                   **{"weights/bytes_per_version": self.publish_bytes, "reference/resets": self.reference_resets,
                      "learner/local_params": local_numel(self.model.trainable_parameters())})
        return out

    def _reference_due(self, kl: float) -> bool:
        """Moving reference (Astrolabe): reset every reference_reset_every steps, or once the KL to it is too large."""
        cfg = self.cfg
        if cfg.reference == "frozen":
            return False
        every = cfg.reference_reset_every is not None and self.version % cfg.reference_reset_every == 0
        return every or (cfg.reference_reset_kl is not None and kl > cfg.reference_reset_kl)

    def _selective_kl_mask(self, groups: list[ScoredGroup], primary: str) -> torch.Tensor | None:
        """[B] float: 1 where the KL term applies (Astrolabe selective KL), None without selective_kl."""
        sel = self.cfg.selective_kl
        if sel is None:
            return None
        ids = np.concatenate([[i] * len(g.rewards[primary]) for i, g in enumerate(groups)])
        r_p = np.concatenate([g.rewards[primary] for g in groups])
        aux = np.stack([np.concatenate([g.rewards[a] for g in groups]) for a in sel.auxiliary], axis=1)
        return selective_kl_mask(r_p, aux, ids, sel.percentile).float().to(self.model.device)

    def _ppo(self, g: ScoredGroup, adv: torch.Tensor,
             kl_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        traj, cfg = g.traj, self.cfg
        if traj.latents.shape[1] != traj.sigmas.shape[0]:
            raise ValueError(f"group {g.group_id}: learner.loss=ppo re-scores sampler steps, but its rollout stored only "
                             "the clean clip (a rollout worker made with keep_steps=False, for a forward-process loss)")
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
        kl, parts = self._kl(g, traj, ks, new, old_lp, kl_mask)
        weight = kl_schedule(cfg.kl_schedule, self.version, self.total_steps, cfg.kl_weight)
        return loss + weight * kl, {"loss/policy": loss.item(), "kl": kl.item(), "ratio": float(np.mean(ratios)),
                                    "clip_fraction": float(np.mean(clipped)), **parts}

    def _kl(self, g, traj, ks, new, old_lp, kl_mask=None) -> tuple[torch.Tensor, dict[str, float]]:
        """The PPO KL term (scalar), applied per sample where kl_mask [G] is 1 (all samples when None), and
        {"kl/reference": the unmasked KL to the reference} when the term measures one (kl=fixed)."""
        kind = self.cfg.kl
        if kind == "none":
            return torch.zeros((), device=new.log_probs.device), {}
        weight = None if kl_mask is None else kl_mask[:, None, None].expand_as(old_lp).reshape(-1)
        step_kl = stepwise_kl(old_lp.reshape(-1), new.log_probs.reshape(-1), weight)
        if kind == "stepwise":
            return step_kl, {}
        ref = self.reference if kind == "fixed" else self.anchor
        with torch.no_grad():
            ref_means = recompute_log_probs(ref, traj, g.cond, ks, traj.sde_type, traj.eta).means
        per_sample = torch.stack([gaussian_kl(new.means[:, i], ref_means[:, i], new.std[:, i]) for i in range(len(ks))])
        pos_kl = per_sample.mean() if kl_mask is None else (per_sample * kl_mask).mean()  # [S, G] -> scalar
        if kind == "dual":
            return self.cfg.w_pos * pos_kl + self.cfg.w_vel * step_kl, {}
        return pos_kl, {"kl/reference": per_sample.mean().item()}

    def _flow_inputs(self, g: ScoredGroup, rows: list[int] | None = None, shared: bool = False):
        """The forward process on the group's clean clips (all rows, or `rows`): fresh ε and t per row (one pair for
        every row with shared), x_t = (1 − t) x0 + t ε. Returns (x0, ε, t [B], frames, velocity) where frames are
        the trained frames (after the shared prefix in causal mode) and velocity(model) -> v [B, frames, ...]
        there, with the history as detached clean context."""
        traj = g.traj
        x0 = traj.videos.detach() if rows is None else traj.videos[rows].detach()
        b, t = x0.shape[:2]
        ids = g.cond.expand(b, *g.cond.shape[1:])
        frames = slice(traj.prefix_chunks * self.model.shape.chunk if traj.mode == "causal" else 0, t)
        n = 1 if shared else b
        tt = torch.rand(n, generator=self.generator).clamp(0.02, 0.98).to(x0.device).expand(b)
        eps = torch.randn((n, *x0.shape[1:]), generator=self.generator).to(x0.device).expand_as(x0)
        x_t = (1 - tt[:, None, None, None, None]) * x0 + tt[:, None, None, None, None] * eps

        def velocity(model) -> torch.Tensor:
            if traj.mode == "causal":
                return model.velocity_causal(x_t, tt, x0, ids, detach_history=True)[:, frames]
            return model.velocity(x_t, tt, ids)

        return x0, eps, tt, frames, velocity

    def _nft(self, g: ScoredGroup, adv: torch.Tensor,
             kl_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        losses, kls = [], []
        for _ in range(cfg.nft_draws):  # each draw its own (t, ε) per clip; the loss is their mean
            x0, eps, tt, frames, velocity = self._flow_inputs(g)
            v_theta = velocity(self.model)
            with torch.no_grad():
                v_old = velocity(self.old)
                v_ref = velocity(self.reference) if cfg.nft_kl else None
            losses.append(nft_loss(x0[:, frames], eps[:, frames], tt, v_theta, v_old, v_ref, adv, cfg.nft_beta,
                                   cfg.nft_kl, cfg.nft_form, kl_mask=kl_mask))
            with torch.no_grad():
                kls.append(((v_theta - (v_ref if v_ref is not None else v_old)) ** 2).mean().item())
        loss, kl = torch.stack(losses).mean(), float(np.mean(kls))
        return loss, {"loss/policy": loss.item(), "kl": kl, **({"kl/reference": kl} if cfg.nft_kl else {})}

    def _flow_dpo(self, g: ScoredGroup, adv: torch.Tensor, kl_mask=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-DPO on the group's best (winner) and worst (loser) candidate by advantage, shared ε and t."""
        win, lose = int(adv.argmax()), int(adv.argmin())
        x0, eps, _, frames, velocity = self._flow_inputs(g, [win, lose], shared=True)
        target = (eps - x0)[:, frames]
        v_theta = velocity(self.model)
        with torch.no_grad():
            v_ref = velocity(self.reference)
        e_theta, e_ref = flow_matching_error(v_theta, target), flow_matching_error(v_ref, target)
        if win == lose:  # every candidate scored alike: no preference, no gradient
            loss = 0.0 * e_theta.sum()
        else:
            loss = flow_dpo_loss(e_theta[0], e_ref[0], e_theta[1], e_ref[1], self.cfg.dpo_beta)
        margin = ((e_theta[0] - e_ref[0]) - (e_theta[1] - e_ref[1])).item()
        kl = ((v_theta.detach() - v_ref) ** 2).mean().item()
        return loss, {"loss/policy": loss.item(), "dpo/margin": margin, "kl": kl, "kl/reference": kl}

    def _flow_rwr(self, g: ScoredGroup, adv: torch.Tensor, kl_mask=None) -> tuple[torch.Tensor, dict[str, float]]:
        """Flow-RWR: every candidate's flow-matching error weighted by exp(A/β)."""
        x0, eps, _, frames, velocity = self._flow_inputs(g)
        loss = flow_rwr_loss(velocity(self.model), (eps - x0)[:, frames], adv, self.cfg.rwr_beta)
        return loss, {"loss/policy": loss.item()}

    def _sft(self, g: ScoredGroup, adv: torch.Tensor, kl_mask=None) -> tuple[torch.Tensor, dict[str, float]]:
        """SFT baseline: plain flow matching on the group's winner (best advantage) only."""
        x0, eps, _, frames, velocity = self._flow_inputs(g, [int(adv.argmax())])
        loss = flow_matching_error(velocity(self.model), (eps - x0)[:, frames]).mean()
        return loss, {"loss/policy": loss.item()}

    def weights(self) -> dict[str, torch.Tensor]:
        """What rollout workers load per version (`policy.trainable_state()`: an adapter with LoRA, else all
        weights), as whole CPU tensors for the object store. Sharded: a collective every rank calls."""
        return full_state(self.model.trainable_state())

    def copy_states(self) -> dict[str, dict[str, torch.Tensor]]:
        """Whole trainable state of the policy and its copies, for a checkpoint (sharded: every rank calls)."""
        return {name: full_state(getattr(self, attr).trainable_state()) for name, attr in COPIES}

    def load_copy_states(self, states: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Inverse of `copy_states`, on any number of ranks: each keeps its shard of the whole tensors."""
        for name, attr in COPIES:
            policy = getattr(self, attr)
            own = policy.trainable_state()
            policy.load_trainable_state({k: local_like(torch.as_tensor(v), own[k]) if k in own else v
                                         for k, v in states[name].items()})

    def optimizer_state(self) -> dict:
        """`opt.state_dict()` with whole tensors (sharded: every rank calls)."""
        state = self.opt.state_dict()
        return {**state, "state": {pid: full_state(entries) for pid, entries in state["state"].items()}}

    def load_optimizer_state(self, state: Mapping) -> None:
        params = self.model.trainable_parameters()
        local = {pid: {k: local_like(v, params[pid]) if torch.is_tensor(v) and v.dim() else v
                       for k, v in entries.items()} for pid, entries in state["state"].items()}
        self.opt.load_state_dict({**state, "state": local})


COPIES = (("policy", "model"), ("reference", "reference"), ("anchor", "anchor"), ("old", "old"))
