"""Reward-model training losses (MATH.md §6; VideoAlign uses Bradley–Terry with ties).

All losses are per pair / per sample (no reduction) so callers can mask and weight them.
Reward differences are unitless logits: delta = r_a - r_b.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_k(k: float) -> None:
    # ln(k^2 - 1) must exist and the tie probability must be positive.
    if not k > 1.0:
        raise ValueError(f"k (Rao–Kupper tie parameter) must be > 1, got {k}")


def btt_loss(delta: torch.Tensor, is_tie: torch.Tensor, k: float = 5.0) -> torch.Tensor:
    """Bradley–Terry with ties (Rao & Kupper 1967; VideoAlign, MATH.md §6), per pair.

    delta: [N] float, r_a - r_b where a is the preferred video (either one for a tie).
    is_tie: [N] bool.
    Returns [N] float: -log P(label) under
        P(a wins) = σ(Δ - ln k),  P(b wins) = σ(-Δ - ln k),
        P(tie)    = (k² - 1)·σ(Δ - ln k)·σ(-Δ - ln k)      (the three sum to 1).
    Check: Δ = 1, k = 5 -> win 1.043592, tie 0.545971.
    """
    _check_k(k)
    delta = torch.as_tensor(delta)
    is_tie = torch.as_tensor(is_tie, dtype=torch.bool, device=delta.device)
    if delta.ndim != 1 or is_tie.shape != delta.shape:
        raise ValueError(
            f"btt_loss: expected delta [N] and is_tie [N], got {tuple(delta.shape)} and {tuple(is_tie.shape)}"
        )
    log_k = math.log(k)
    # logsigmoid keeps the loss finite for any |Δ| (plain log(sigmoid) underflows to -inf).
    win = -F.logsigmoid(delta - log_k)
    tie = win - F.logsigmoid(-delta - log_k) - math.log(k * k - 1.0)
    return torch.where(is_tie, tie, win)


def bt_loss(delta: torch.Tensor) -> torch.Tensor:
    """Plain Bradley–Terry, per pair: -log σ(Δ), delta [N] = r_preferred - r_other. Returns [N]."""
    delta = torch.as_tensor(delta)
    if delta.ndim != 1:
        raise ValueError(f"bt_loss: expected delta [N], got {tuple(delta.shape)}")
    return -F.logsigmoid(delta)


def regression_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error per sample: pred, target [N, ...] -> [N] (mean over the non-batch dims)."""
    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.ndim == 0:
        raise ValueError(
            f"regression_loss: expected pred and target of the same shape [N, ...], "
            f"got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    return ((pred - target) ** 2).reshape(pred.shape[0], -1).mean(dim=1)


def tie_threshold(k: float = 5.0) -> float:
    """The |Δ| below which a tie is the most likely outcome under the Rao–Kupper model.

    Derivation (Δ ≥ 0, so P(a wins) ≥ P(b wins)): a tie beats "a wins" iff
        (k² - 1)·σ(-Δ - ln k) > 1  ⟺  1 + e^{Δ + ln k} < k² - 1  ⟺  Δ < ln((k² - 2)/k).
    For k = 5 this is ln(4.6) = 1.526056. When k ≤ 2 the bound is ≤ 0: a tie is never the most
    likely outcome and the threshold is 0.
    """
    _check_k(k)
    if k * k - 2.0 <= k:
        return 0.0
    return math.log((k * k - 2.0) / k)
