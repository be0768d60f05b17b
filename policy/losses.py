"""Policy losses for RL post-training of flow-matching video generators (MATH.md §3).

Pure functions on tensors. Conventions: a leading batch dimension B (or N = samples x steps
for per-step losses); "mean over non-batch dims" is per sample; sg(.) = detach.
"""

from __future__ import annotations

from typing import Iterable, Literal

import torch
from torch import Tensor
import torch.nn.functional as F


def _per_sample_mean(t: Tensor) -> Tensor:
    """`[B, ...]` -> `[B]` mean over the non-batch dims (a `[B]` input is returned as is)."""
    return t.reshape(t.shape[0], -1).mean(dim=1)


def _check_same_shape(**tensors: Tensor) -> None:
    names = list(tensors)
    ref = tensors[names[0]].shape
    for name in names[1:]:
        if tensors[name].shape != ref:
            raise ValueError(f"{name} must have the shape of {names[0]}: expected {list(ref)}, got {list(tensors[name].shape)}")


def ppo_clip_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_range: float,
    adv_clip: float = 5.0,
) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip on SDE steps (Flow-GRPO / SAGE-GRPO, MATH.md §3).

    log_prob: `[N]` log-probs under the current policy (carries the gradient).
    old_log_prob: `[N]` behaviour log-probs recorded at rollout (treated as constants).
    advantages: `[N]`, clipped to +-adv_clip.
    Returns (scalar loss = mean(max(-A r, -A clip(r, 1-eps, 1+eps))), stats) where stats holds
    ratio_mean, clip_fraction (share of |r - 1| > eps) and approx_kl (mean of (logp - logp_old)^2 / 2).
    """
    _check_same_shape(log_prob=log_prob, old_log_prob=old_log_prob, advantages=advantages)
    if log_prob.dim() != 1:
        raise ValueError(f"log_prob must be 1-D [N], got shape {list(log_prob.shape)}")
    if clip_range <= 0:
        raise ValueError(f"clip_range must be > 0, got {clip_range}")
    adv = advantages.detach().float().clamp(-adv_clip, adv_clip)
    log_ratio = log_prob.float() - old_log_prob.detach().float()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "ratio_mean": ratio.mean().item(),
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean().item(),
            "approx_kl": (0.5 * log_ratio**2).mean().item(),
        }
    return loss, stats


def gaussian_kl(mean: Tensor, mean_ref: Tensor, std) -> Tensor:
    """Per-step KL between N(mean, std^2) and N(mean_ref, std^2) (SAGE-GRPO trust region, MATH.md §3).

    mean, mean_ref: `[B, ...]`; std: float, `[B]` or `[B, ...]`. Returns `[B]`:
    mean over non-batch dims of (mean - mean_ref)^2 / (2 std^2). Deterministic steps (std == 0)
    carry no policy gradient (their log-prob is 0 by convention) and contribute 0.
    """
    _check_same_shape(mean=mean, mean_ref=mean_ref)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=mean.device)
    if std_t.dim() == 1 and mean.dim() > 1:
        if std_t.shape[0] != mean.shape[0]:
            raise ValueError(f"std must be [B]=[{mean.shape[0]}] or broadcastable to mean, got {list(std_t.shape)}")
        std_t = std_t.reshape(-1, *([1] * (mean.dim() - 1)))
    std_t = torch.broadcast_to(std_t, mean.shape)
    stochastic = std_t > 0
    safe_std = torch.where(stochastic, std_t, torch.ones_like(std_t))
    kl = torch.where(stochastic, (mean.float() - mean_ref.float()) ** 2 / (2.0 * safe_std**2), torch.zeros_like(safe_std))
    return _per_sample_mean(kl)


def stepwise_kl(behaviour_log_prob: Tensor, log_prob: Tensor, weight: Tensor | None = None) -> Tensor:
    """Step-wise KL (SAGE-GRPO, rollout-phase estimate): mean(logp_behaviour - logp_theta), a scalar.
    behaviour_log_prob is a constant; gradient flows through log_prob. weight: optional `[N]` per-element weight
    (Astrolabe selective KL: 1 where the penalty applies, 0 elsewhere): mean(weight (logp_behaviour - logp_theta)),
    still divided by N, so masked elements count as 0, not as absent."""
    _check_same_shape(behaviour_log_prob=behaviour_log_prob, log_prob=log_prob)
    diff = behaviour_log_prob.detach().float() - log_prob.float()
    if weight is None:
        return diff.mean()
    _check_same_shape(log_prob=log_prob, weight=weight)
    return (weight.detach().float() * diff).mean()


def kl_schedule(kind: Literal["fixed", "two_stage", "milder"], step: int, total_steps: int, base: float) -> float:
    """KL coefficient at learner step `step` of `total_steps` (SAGE-GRPO schedules; shapes are ours).

    fixed: base throughout.
    two_stage: loose then tight: 0.1 base for the first half (step < total_steps / 2), base after.
    milder: the same loose-to-tight move without the jump: linear from 0.1 base at step 0 to base
        at the last step (total_steps - 1), constant afterwards.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if kind == "fixed":
        return float(base)
    if kind == "two_stage":
        return float(base) * (0.1 if step < total_steps / 2 else 1.0)
    if kind == "milder":
        frac = min(step / max(total_steps - 1, 1), 1.0)
        return float(base) * (0.1 + 0.9 * frac)
    raise ValueError(f"unknown kl schedule kind {kind!r}; choose one of ['fixed', 'two_stage', 'milder']")


def _broadcast_batch(t, like: Tensor, name: str) -> Tensor:
    """float / `[B]` -> float32 `[B, 1, ...]` broadcastable to `like` `[B, ...]`."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"{name} must be a float or [B]=[{like.shape[0]}], got shape {list(t.shape)}")
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def nft_loss(
    x0: Tensor,
    eps: Tensor,
    t,
    v_theta: Tensor,
    v_old: Tensor,
    v_ref: Tensor | None,
    advantages: Tensor,
    beta: float,
    kl_weight: float = 0.0,
    form: Literal["diffusionnft", "astrolabe"] = "diffusionnft",
    C: float = 5.0,
    kl_mask: Tensor | None = None,
) -> Tensor:
    """Forward-process negative-aware fine-tuning (DiffusionNFT, Zheng et al. 2025; Astrolabe), MATH.md §3.

    x0: `[B, ...]` clean rollout samples; eps: `[B, ...]` fresh noise; t: float or `[B]` in (0, 1];
    v_theta: `[B, ...]` current velocity at x_t = (1-t) x0 + t eps (the only thing with gradient);
    v_old: `[B, ...]` old (EMA) policy velocity; v_ref: `[B, ...]` reference velocity or None when
    kl_weight = 0; advantages: `[B]`. Optimality r = clip(A/C/2 + 1/2, 0, 1).
    v+ = beta v_theta + (1-beta) sg(v_old), v- = (1+beta) sg(v_old) - beta v_theta, x0^+- = x_t - t v^+-.
    diffusionnft: L^+- = mean((x0^+- - x0)^2) / sg(mean|x0^+- - x0|) (floor 1e-5),
        loss = C (r L+ + (1-r) L-) / beta, averaged over the batch.
    astrolabe: L^+- = mean((x0^+- - x0)^2) and loss = r L+ + (1-r) L- (no weight, no C, no 1/beta;
        C still normalises A inside r).
    Both add kl_weight mean((v_theta - sg(v_ref))^2). kl_mask: optional `[B]` per-sample weight of that KL term
    (Astrolabe selective KL: 1 where it applies, 0 elsewhere): kl_weight mean_B(m_b mean((v_theta - v_ref)_b^2)).
    Returns a scalar.
    """
    _check_same_shape(x0=x0, eps=eps, v_theta=v_theta, v_old=v_old)
    if form not in ("diffusionnft", "astrolabe"):
        raise ValueError(f"unknown nft form {form!r}; choose one of ['diffusionnft', 'astrolabe']")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if advantages.shape != (x0.shape[0],):
        raise ValueError(f"advantages must be [B]=[{x0.shape[0]}], got shape {list(advantages.shape)}")
    x0 = x0.detach().float()
    t_b = _broadcast_batch(t, x0, "t")
    x_t = (1.0 - t_b) * x0 + t_b * eps.detach().float()
    v_theta = v_theta.float()
    v_old = v_old.detach().float()
    r = (advantages.detach().float() / C / 2.0 + 0.5).clamp(0.0, 1.0)

    v_pos = beta * v_theta + (1.0 - beta) * v_old
    v_neg = (1.0 + beta) * v_old - beta * v_theta
    err_pos = x_t - t_b * v_pos - x0
    err_neg = x_t - t_b * v_neg - x0
    loss_pos = _per_sample_mean(err_pos**2)
    loss_neg = _per_sample_mean(err_neg**2)
    if form == "diffusionnft":
        # Adaptive weight: normalise by the (constant) mean absolute x0 error, as DiffusionNFT does.
        loss_pos = loss_pos / _per_sample_mean(err_pos.abs()).detach().clamp_min(1e-5)
        loss_neg = loss_neg / _per_sample_mean(err_neg.abs()).detach().clamp_min(1e-5)
        loss = (C * (r * loss_pos + (1.0 - r) * loss_neg) / beta).mean()
    else:
        loss = (r * loss_pos + (1.0 - r) * loss_neg).mean()
    if kl_weight != 0.0:
        if v_ref is None:
            raise ValueError("v_ref is required when kl_weight != 0")
        _check_same_shape(v_theta=v_theta, v_ref=v_ref)
        if kl_mask is None:
            loss = loss + kl_weight * ((v_theta - v_ref.detach().float()) ** 2).mean()
        else:
            per_sample = _per_sample_mean((v_theta - v_ref.detach().float()) ** 2)
            loss = loss + kl_weight * (_broadcast_batch(kl_mask, per_sample, "kl_mask") * per_sample).mean()
    return loss


def flow_dpo_loss(err_theta_w: Tensor, err_ref_w: Tensor, err_theta_l: Tensor, err_ref_l: Tensor, beta: float = 100.0) -> Tensor:
    """Flow-DPO (VideoAlign, MATH.md §3): -log sigmoid(-(beta/2) [(e_theta^w - e_ref^w) - (e_theta^l - e_ref^l)]).

    Each e is `[B]` (or a float): mean ||v - (eps - x0)||^2 of the winner w / loser l with shared eps, t.
    Returns the batch mean (scalar). Reference errors are constants.
    """
    ew, erw = torch.as_tensor(err_theta_w, dtype=torch.float32), torch.as_tensor(err_ref_w, dtype=torch.float32)
    el, erl = torch.as_tensor(err_theta_l, dtype=torch.float32), torch.as_tensor(err_ref_l, dtype=torch.float32)
    _check_same_shape(err_theta_w=ew, err_ref_w=erw, err_theta_l=el, err_ref_l=erl)
    margin = (ew - erw.detach()) - (el - erl.detach())
    return -F.logsigmoid(-0.5 * beta * margin).mean()


def flow_rwr_loss(v_theta: Tensor, target_v: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Flow reward-weighted regression (VideoAlign, MATH.md §3): mean_B(exp(r/beta) mean||v_theta - (eps - x0)||^2).

    v_theta, target_v: `[B, ...]` (target_v = eps - x0); rewards: `[B]` (constants). Returns a scalar.
    """
    _check_same_shape(v_theta=v_theta, target_v=target_v)
    if rewards.shape != (v_theta.shape[0],):
        raise ValueError(f"rewards must be [B]=[{v_theta.shape[0]}], got shape {list(rewards.shape)}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    weights = torch.exp(rewards.detach().float() / beta)
    return (weights * _per_sample_mean((v_theta.float() - target_v.detach().float()) ** 2)).mean()


def reward_guided_velocity(v: Tensor, t, grad_r: Tensor, w: float, beta: float) -> Tensor:
    """Reward guidance at sampling (VideoAlign, MATH.md §3): v' = v - (t/(1-t)) (w/beta) grad_r.

    v, grad_r: `[B, ...]` (grad_r = d r_phi(x_t, t)/d x_t of a latent reward model); t: float or `[B]`
    in [0, 1). Derivation: v = -(t score + x)/(1-t), so adding (w/beta) grad_r to the score moves v by
    -(t/(1-t)) (w/beta) grad_r; this is singular at t = 1, so t = 1 is refused (skip guidance there).
    """
    _check_same_shape(v=v, grad_r=grad_r)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    t_b = _broadcast_batch(t, v, "t")
    if bool(((t_b < 0) | (t_b >= 1)).any()):
        raise ValueError(f"reward guidance needs t in [0, 1) (t/(1-t) is infinite at t = 1), got {t}")
    return v.float() - (t_b / (1.0 - t_b)) * (w / beta) * grad_r.float()


@torch.no_grad()
def ema_update(target_params: Iterable[Tensor], source_params: Iterable[Tensor], decay: float) -> None:
    """In place: target <- decay target + (1 - decay) source, for each pair (the NFT old policy)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    targets, sources = list(target_params), list(source_params)
    if len(targets) != len(sources):
        raise ValueError(f"target and source need the same number of tensors: {len(targets)} vs {len(sources)}")
    for i, (tgt, src) in enumerate(zip(targets, sources)):
        if tgt.shape != src.shape:
            raise ValueError(f"parameter {i}: expected shape {list(tgt.shape)}, got {list(src.shape)}")
        tgt.mul_(decay).add_(src.detach().to(tgt.dtype), alpha=1.0 - decay)
