"""Astrolabe reward aggregators (MATH.md §6): top-fraction frame pooling and grayscale frames."""
from __future__ import annotations

import math

import numpy as np
import torch

# ITU-R BT.601 luma weights for (R, G, B); they sum to 1, so the map commutes with x -> 2x - 1.
BT601 = (0.299, 0.587, 0.114)


def top_k_count(num_frames: int, fraction: float) -> int:
    """Number of frames kept: ceil(fraction * T), at least 1.

    A 1e-9 slack absorbs float error so that e.g. 0.3 * 10 = 3.0000000000000004 keeps 3, not 4.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if num_frames < 1:
        raise ValueError(f"need at least one frame, got T = {num_frames}")
    return max(1, min(num_frames, math.ceil(fraction * num_frames - 1e-9)))


def top_fraction_mean(frame_scores, fraction: float = 0.3):
    """Mean of the best ceil(fraction·T) per-frame scores (Astrolabe VQ aggregation).

    frame_scores: [B, T] torch tensor or numpy array. Returns [B] of the same kind.
    T = 8, fraction = 0.3 -> the top 3 frames. Differentiable (torch.topk) for training.
    """
    if frame_scores.ndim != 2:
        raise ValueError(f"top_fraction_mean: expected frame_scores [B, T], got {tuple(frame_scores.shape)}")
    k = top_k_count(frame_scores.shape[1], fraction)
    if isinstance(frame_scores, torch.Tensor):
        return frame_scores.topk(k, dim=1).values.mean(dim=1)
    scores = np.asarray(frame_scores)
    return np.sort(scores, axis=1)[:, -k:].mean(axis=1)


def to_grayscale(video, channel_axis: int | None = None):
    """Luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601); the channel axis is removed.

    video: numpy/torch [..., 3] (world layout [N, T, H, W, 3]) or torch [B, T, C, H, W] (model layout).
    channel_axis=None picks by convention: axis 2 for a 5-d torch tensor, else the last axis.
    Works for [0, 1] and [-1, 1] videos alike (the weights sum to 1). Pure red -> 0.299.
    """
    if channel_axis is None:
        channel_axis = 2 if isinstance(video, torch.Tensor) and video.ndim == 5 else -1
    if video.ndim == 0 or video.shape[channel_axis] != 3:
        raise ValueError(
            f"to_grayscale: expected 3 colour channels on axis {channel_axis}, got shape {tuple(video.shape)}"
        )
    if isinstance(video, torch.Tensor):
        w = torch.tensor(BT601, dtype=video.dtype if video.is_floating_point() else torch.float32,
                         device=video.device)
        return torch.tensordot(video.movedim(channel_axis, -1).to(w.dtype), w, dims=1)
    return np.moveaxis(np.asarray(video, dtype=np.float32), channel_axis, -1) @ np.asarray(BT601, np.float32)
