"""Group advantages and reward shaping for group-based RL on videos (MATH.md §4, §5, §6).

Every function is pure. Rewards come in as torch tensors or numpy arrays (any float dtype),
the maths runs in float64 and results come back as torch tensors: float32 for numbers, bool
for masks. Nothing here knows about Ray, models or videos.

Shapes: B = samples in the batch, K = reward channels, C = constraints, A = auxiliary rewards.
Group ids are per-sample labels (ints or strings); groups need not be contiguous or equal in size.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

EPS = 1e-4  # MATH.md §4: every normaliser divides by (std + 1e-4)

# Self-Paced GRPO: weights over (VQ, MQ, TA); the emphasis moves from visual fidelity
# to temporal coherence to semantic alignment as the generator gets better.
SELF_PACED_STAGES = (
    (0.6, 0.2, 0.2),  # fidelity
    (0.2, 0.6, 0.2),  # coherence
    (0.2, 0.2, 0.6),  # alignment
)


# --------------------------------------------------------------------------- validation

def _as_float64(x, name: str, ndim: int) -> torch.Tensor:
    """Any array-like -> float64 CPU tensor with `ndim` dims; ValueError otherwise."""
    if torch.is_tensor(x):
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            t = torch.as_tensor(np.asarray(x, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{name} must be numeric, got {type(x).__name__}: {exc}") from None
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dim(s), expected shape {_shape_hint(ndim)}, "
                         f"got {tuple(t.shape)}")
    return t


def _shape_hint(ndim: int) -> str:
    return {0: "[]", 1: "[B]", 2: "[B, K]"}.get(ndim, f"{ndim}-D")


def _check_finite(t: torch.Tensor, name: str, channel_names: Sequence[str] | None = None) -> None:
    """Raise ValueError naming the first non-finite entry (row index and channel)."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return
    idx = [int(i) for i in torch.nonzero(bad)[0]]
    value = float(t[tuple(idx)])
    if t.ndim == 1:
        raise ValueError(f"non-finite {name} at index {idx[0]}: {value}")
    row, col = idx[0], idx[1]
    channel = channel_names[col] if channel_names is not None else str(col)
    raise ValueError(f"non-finite {name} at row {row}, channel {channel}: {value}")


def _rewards_2d(rewards, name: str = "rewards") -> torch.Tensor:
    r = _as_float64(rewards, name, 2)
    _check_finite(r, name)
    return r


def _weights(weights, k: int, name: str = "weights") -> torch.Tensor:
    w = _as_float64(weights, name, 1)
    if w.shape[0] != k:
        raise ValueError(f"{name} must have shape [K] = [{k}] to match the reward channels, "
                         f"got {tuple(w.shape)}")
    _check_finite(w, name)
    return w


def _group_index(group_ids, b: int) -> tuple[np.ndarray, torch.Tensor]:
    """Labels -> (sorted unique labels [G], inverse index [B] long)."""
    g = group_ids.detach().cpu().numpy() if torch.is_tensor(group_ids) else np.asarray(group_ids)
    if g.ndim != 1 or g.shape[0] != b:
        raise ValueError(f"group_ids must have shape [B] = [{b}], got {tuple(g.shape)}")
    if g.dtype.kind in "fc":
        raise ValueError(f"group_ids must be integer or string labels, got dtype {g.dtype}")
    labels, inverse = np.unique(g, return_inverse=True)
    return labels, torch.as_tensor(inverse.reshape(-1), dtype=torch.long)


# --------------------------------------------------------------------------- normalisation

def _group_normalise(x: torch.Tensor, inverse: torch.Tensor, n_groups: int, scale: bool = True) -> torch.Tensor:
    """(x - mean_G) / (std_G + EPS) per group and per column; std unbiased (n-1). scale=False: x - mean_G only.

    x: [B] or [B, K] float64. A column that is constant within a group (this includes every
    group of size 1) gives exactly 0 there, never NaN and never rounding noise / EPS.
    """
    squeeze = x.ndim == 1
    x2 = x[:, None] if squeeze else x
    k = x2.shape[1]
    counts = torch.bincount(inverse, minlength=n_groups).to(torch.float64)[:, None]  # [G, 1]
    idx = inverse[:, None].expand(-1, k)
    sums = torch.zeros(n_groups, k, dtype=torch.float64).index_add_(0, inverse, x2)
    dev = x2 - (sums / counts)[inverse]
    sq = torch.zeros(n_groups, k, dtype=torch.float64).index_add_(0, inverse, dev * dev)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    hi = torch.full((n_groups, k), -torch.inf, dtype=torch.float64).scatter_reduce(0, idx, x2, "amax")
    lo = torch.full((n_groups, k), torch.inf, dtype=torch.float64).scatter_reduce(0, idx, x2, "amin")
    constant = (hi == lo)[inverse]
    out = torch.where(constant, torch.zeros_like(dev), dev / (std[inverse] + EPS) if scale else dev)
    return out[:, 0] if squeeze else out


# --------------------------------------------------------------------------- advantages

def _sum_of_weights(w: torch.Tensor) -> torch.Tensor:
    total = w.sum()
    if not bool(total > 0):
        raise ValueError(f"sum_norm divides by the sum of the weights, which must be > 0, got {w.tolist()}")
    return total


def grpo_advantages(rewards, group_ids, weights, sum_norm: bool = False) -> torch.Tensor:
    """GRPO advantages (MATH.md §4): s_j = Σ_k w_k r_jk, A_j = (s_j − mean_G s)/(std_G s + 1e-4).

    sum_norm (Stooke et al. 2020, SCRL §5): A_j = (s_j − mean_G s)/Σ_k w_k instead of the std division; with the
    SCRL weights [1, λ_1, …, λ_C] that is (1 + Σλ_c), which keeps the scale bounded as λ grows.
    rewards [B, K] (torch or numpy), group_ids [B] labels, weights [K]. Returns float32 [B].
    std is unbiased; a group of size 1, or one whose weighted sum is constant, gets 0.
    """
    r = _rewards_2d(rewards)
    w = _weights(weights, r.shape[1])
    labels, inverse = _group_index(group_ids, r.shape[0])
    if sum_norm:
        return (_group_normalise(r @ w, inverse, len(labels), scale=False) / _sum_of_weights(w)).to(torch.float32)
    return _group_normalise(r @ w, inverse, len(labels)).to(torch.float32)


def gdpo_advantages(rewards, group_ids, weights, sum_norm: bool = False) -> torch.Tensor:
    """GDPO advantages (NVIDIA GDPO; MATH.md §4): normalise each reward channel within its group,
    sum with weights, then whiten over the whole batch.

    A_jk = (r_jk − mean_G r_·k)/(std_G r_·k + 1e-4); Â_j = Σ_k w_k A_jk;
    A_j = (Â_j − mean_B Â)/(std_B Â + 1e-4).
    sum_norm (Stooke et al. 2020, SCRL §5): A_j = Â_j / Σ_k w_k instead of the batch whitening; with the SCRL
    weights [1, λ_1, …, λ_C] that is (1 + Σλ_c) (whitening would cancel any constant factor).
    rewards [B, K], group_ids [B] labels, weights [K]. Returns float32 [B].
    A channel constant within a group contributes 0 there. A group of size 1 has nothing to be
    compared with: its advantage is exactly 0 and it is left out of the batch whitening
    statistics (so adding singletons does not shift anyone else's advantage).
    """
    r = _rewards_2d(rewards)
    w = _weights(weights, r.shape[1])
    labels, inverse = _group_index(group_ids, r.shape[0])
    summed = _group_normalise(r, inverse, len(labels)) @ w
    if sum_norm:
        return (summed / _sum_of_weights(w)).to(torch.float32)
    in_group = torch.bincount(inverse, minlength=len(labels))[inverse] >= 2
    out = torch.zeros_like(summed)
    kept = summed[in_group]
    out[in_group] = _group_normalise(kept, torch.zeros(len(kept), dtype=torch.long), 1)
    return out.to(torch.float32)


# --------------------------------------------------------------------------- SCRL constrained reward

def _constraint_inputs(primary, constraint_rewards, tau) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = _as_float64(primary, "primary", 1)
    c = _as_float64(constraint_rewards, "constraint_rewards", 2)
    t = _as_float64(tau, "tau", 1)
    if c.shape[0] != p.shape[0]:
        raise ValueError(f"constraint_rewards must have shape [B, C] with B = {p.shape[0]} "
                         f"(from primary), got {tuple(c.shape)}")
    if t.shape[0] != c.shape[1]:
        raise ValueError(f"tau must have shape [C] = [{c.shape[1]}], got {tuple(t.shape)}")
    names = ["primary"] + [f"constraint {i}" for i in range(c.shape[1])]
    _check_finite(torch.cat([p[:, None], c], dim=1), "reward", names)
    _check_finite(t, "tau")
    return p, c, t


def _lambdas(lambdas, c: int) -> torch.Tensor:
    lam = _as_float64(lambdas, "lambdas", 1)
    if lam.shape[0] != c:
        raise ValueError(f"lambdas must have shape [C] = [{c}], got {tuple(lam.shape)}")
    _check_finite(lam, "lambdas")
    if bool((lam < 0).any()):
        raise ValueError(f"lambdas must be >= 0, got {lam.tolist()}")
    return lam


def constrained_channels(primary, constraint_rewards, tau) -> torch.Tensor:
    """SCRL reward channels (MATH.md §5) for GDPO: [R_f, −ReLU(τ_1 − R_1), …, −ReLU(τ_C − R_C)].

    primary [B] (R_f), constraint_rewards [B, C] (R_c), tau [C]. Returns float32 [B, 1 + C].
    Pair with `constrained_weights(λ)` so GDPO weights the channels 1, λ_1, …, λ_C.
    A non-finite reward raises ValueError naming its row and channel.
    """
    p, c, t = _constraint_inputs(primary, constraint_rewards, tau)
    penalties = -torch.relu(t[None, :] - c)
    return torch.cat([p[:, None], penalties], dim=1).to(torch.float32)


def constrained_weights(lambdas) -> torch.Tensor:
    """Channel weights [1, λ_1, …, λ_C] (float32 [1 + C]) for `constrained_channels`; λ ≥ 0."""
    lam = _as_float64(lambdas, "lambdas", 1)
    lam = _lambdas(lam, lam.shape[0])
    return torch.cat([torch.ones(1, dtype=torch.float64), lam]).to(torch.float32)


def composite_reward(primary, constraint_rewards, tau, lambdas, sum_norm: bool = False) -> torch.Tensor:
    """Scalar SCRL reward (MATH.md §5): R = R_f − Σ_c λ_c·ReLU(τ_c − R_c), float32 [B].

    With sum_norm (Stooke et al. 2020) the sum is divided by (1 + Σ_c λ_c) so the reward scale
    stays bounded as λ grows. (A batch whitening cancels this constant factor: the learner's advantages use
    `gdpo_advantages(..., sum_norm=True)`, which divides instead of whitening.)
    """
    p, c, t = _constraint_inputs(primary, constraint_rewards, tau)
    lam = _lambdas(lambdas, c.shape[1])
    r = p - torch.relu(t[None, :] - c) @ lam
    if sum_norm:
        r = r / (1.0 + lam.sum())
    return r.to(torch.float32)


# --------------------------------------------------------------------------- Astrolabe selective KL

def _group_ranks(x: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """Rank of each sample within its group scaled to [0, 1] (ties share their average rank;
    a group of size 1 gets 0.5) so groups of different sizes are comparable."""
    out = np.empty_like(x)
    for g in range(n_groups):
        idx = np.nonzero(inverse == g)[0]
        n = len(idx)
        if n == 1:
            out[idx] = 0.5
            continue
        values, tie_index = np.unique(x[idx], return_inverse=True)
        order_rank = np.empty(n)
        order_rank[np.argsort(x[idx], kind="stable")] = np.arange(n)
        average = np.bincount(tie_index, weights=order_rank) / np.bincount(tie_index)
        out[idx] = average[tie_index] / (n - 1)
    return out


def reward_uncertainty(primary, auxiliary, group_ids) -> torch.Tensor:
    """Astrolabe uncertainty u = rank(primary) − mean_a rank(auxiliary_a) within the group
    (MATH.md §6), ranks scaled to [0, 1]. Large u: the primary reward likes a sample that the
    other rewards do not — a likely reward hack. primary [B], auxiliary [B] or [B, A]; float64 [B]
    (float64 so the percentile cut in `selective_kl_mask` sees exact rank arithmetic)."""
    p = _as_float64(primary, "primary", 1)
    aux = torch.as_tensor(auxiliary) if not torch.is_tensor(auxiliary) else auxiliary
    a = _as_float64(aux[:, None] if aux.ndim == 1 else aux, "auxiliary", 2)
    if a.shape[0] != p.shape[0]:
        raise ValueError(f"auxiliary must have shape [B, A] with B = {p.shape[0]}, got {tuple(a.shape)}")
    if a.shape[1] == 0:
        raise ValueError("auxiliary needs at least one reward column, got shape "
                         f"{tuple(a.shape)}")
    _check_finite(p, "primary")
    _check_finite(a, "auxiliary")
    labels, inverse = _group_index(group_ids, p.shape[0])
    inv = inverse.numpy()
    rank_p = _group_ranks(p.numpy(), inv, len(labels))
    rank_a = np.stack([_group_ranks(col, inv, len(labels)) for col in a.numpy().T], axis=1)
    return torch.as_tensor(rank_p - rank_a.mean(axis=1), dtype=torch.float64)


def selective_kl_mask(primary, auxiliary, group_ids, percentile: float) -> torch.Tensor:
    """Astrolabe uncertainty-aware selective KL (MATH.md §6): True where the KL penalty applies.

    u = `reward_uncertainty(...)`; the mask is u > the `percentile`-th percentile of u over the
    batch (numpy linear interpolation), percentile in [0, 100]. If every u is equal (the rewards
    agree everywhere) nothing is masked. Returns bool [B].
    """
    if not 0.0 <= float(percentile) <= 100.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    u = reward_uncertainty(primary, auxiliary, group_ids)
    threshold = float(np.percentile(u.numpy(), float(percentile)))
    return u > threshold


# --------------------------------------------------------------------------- Self-Paced GRPO

def self_paced_weights(competence: float, thresholds, stages=SELF_PACED_STAGES) -> torch.Tensor:
    """Self-Paced GRPO reward emphasis: weights over (VQ, MQ, TA), float32 [K].

    thresholds [S] strictly increasing competence levels; stages [S, K] weight vectors
    (default SELF_PACED_STAGES: fidelity → coherence → alignment). Stage i is fully in force
    once the running quality `competence` reaches thresholds[i]; between two thresholds the
    weights interpolate linearly, below the first they equal stages[0], above the last
    stages[-1]. The schedule is therefore continuous in competence (no jump in the loss when
    a threshold is crossed) and each output is a convex mix of two stage rows.
    """
    comp = float(competence)
    if not np.isfinite(comp):
        raise ValueError(f"competence must be finite, got {competence}")
    th = _as_float64(thresholds, "thresholds", 1).numpy()
    st = _as_float64(stages, "stages", 2).numpy()
    if st.shape[0] != th.shape[0] or th.shape[0] == 0:
        raise ValueError(f"stages must have shape [S, K] with S = len(thresholds) = {th.shape[0]} >= 1, "
                         f"got {st.shape}")
    if not np.all(np.isfinite(th)) or np.any(np.diff(th) <= 0):
        raise ValueError(f"thresholds must be finite and strictly increasing, got {th.tolist()}")
    if not np.all(np.isfinite(st)) or np.any(st < 0) or np.any(st.sum(axis=1) <= 0):
        raise ValueError(f"stages must be finite, >= 0, and each row must sum to > 0, got {st.tolist()}")
    w = np.array([np.interp(comp, th, st[:, k]) for k in range(st.shape[1])])
    return torch.as_tensor(w, dtype=torch.float32)


def low_signal_groups(rewards, group_ids, min_std: float) -> dict:
    """Dynamic grouping (Self-Paced GRPO): which groups carry too little reward signal.

    rewards [B] or [B, K]; a group is low-signal when the unbiased std of every channel within
    it is below `min_std` (so its advantages would be ~0 or amplified noise). A group of size 1
    has no within-group spread and is always low-signal. Returns {label: bool} ordered by label
    (labels as python ints / strs), ready for `[low[g] for g in group_ids]`.
    """
    if not float(min_std) >= 0.0:
        raise ValueError(f"min_std must be >= 0, got {min_std}")
    r = torch.as_tensor(rewards) if not torch.is_tensor(rewards) else rewards
    r = _rewards_2d(r[:, None] if r.ndim == 1 else r)
    labels, inverse = _group_index(group_ids, r.shape[0])
    n = len(labels)
    counts = torch.bincount(inverse, minlength=n).to(torch.float64)[:, None]
    mean = torch.zeros(n, r.shape[1], dtype=torch.float64).index_add_(0, inverse, r) / counts
    dev = r - mean[inverse]
    sq = torch.zeros(n, r.shape[1], dtype=torch.float64).index_add_(0, inverse, dev * dev)
    std = torch.sqrt(sq / (counts - 1).clamp(min=1))
    low = (std < float(min_std)).all(dim=1) | (counts[:, 0] < 2)
    return {label.item() if hasattr(label, "item") else label: bool(flag)
            for label, flag in zip(labels, low.tolist())}
