"""Simulated users: SCRL's primary reward (sparse real clicks + a dense engagement predictor).

Hidden taste (what the simulated users like; nothing here looks at what the prompt asked for):
each user u clicks a video with probability
    p_u(video) = σ(b_u + Σ_f w_uf · z_f(video)),   z_f = clip((feature_f − CENTRE_f) / SCALE_f, ±3)
over five features measured from the pixels (`video_features`):
    speed       object centroid speed, pixels per frame    (population weight +1.0)
    size        fraction of the frame the object covers     (+0.8)
    brightness  mean BT.601 luma of the whole frame         (+0.5)
    warmth      mean (R − B) over object pixels             (+0.6)
    saturation  mean (max − min channel) over object pixels (+0.4)
Users share this population taste and differ around it: w_u = w_pop + 0.3·N(0, 1),
b_u = −1.0 + 0.3·N(0, 1) (a neutral clip is clicked ~27 % of the time).
So users like fast, large, bright, warm, vivid objects regardless of the prompt: a generator
that maximises feedback alone is pulled towards "a big orange blob racing across the frame"
even when the prompt asked for a slow small blue one — the conflict SCRL's constraints
(quality and alignment thresholds) exist to contain.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

FEATURES = ("speed", "size", "brightness", "warmth", "saturation")
POPULATION_TASTE = np.array([1.0, 0.8, 0.5, 0.6, 0.4])
# Centre and spread of each feature over true and degraded 8×16×16 world clips; z = (f − centre)/scale,
# clipped to ±Z_CLIP so that no single feature (e.g. pixel noise read as a huge object) dominates.
CENTRE = np.array([0.75, 0.14, 0.065, 0.0, 0.65])
SCALE = np.array([0.4, 0.05, 0.04, 0.6, 0.3])
Z_CLIP = 3.0
USER_SPREAD, BASE_LOGIT, BIAS_SPREAD = 0.3, -1.0, 0.3
OBJECT_THRESHOLD = 0.15  # a pixel belongs to the object when some channel differs this much from the background


def _world_videos(videos: np.ndarray) -> np.ndarray:
    """[N, T, H, W, 3] uint8 or float in [0, 1] -> float32 in [0, 1]; anything else is a ValueError."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[1] < 2:
        raise ValueError(f"expected videos [N, T>=2, H, W, 3], got {videos.shape}")
    out = videos.astype(np.float32) / 255.0 if videos.dtype == np.uint8 else videos.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("videos contain non-finite values")
    return out


def video_features(videos: np.ndarray) -> np.ndarray:
    """Features [N, 5] in FEATURES order from world videos [N, T, H, W, 3] ([0, 1] float or uint8).

    The background of a frame is its per-channel median colour (the object covers less than half the frame);
    object pixels differ from it by more than OBJECT_THRESHOLD in some channel. Speed is the mean
    distance between object centroids of consecutive frames (frames without object pixels skipped).
    """
    v = _world_videos(videos)
    n, t, h, w, _ = v.shape
    r, g, b = v[..., 0], v[..., 1], v[..., 2]  # channel slices: numpy reduces a size-3 last axis slowly
    # per-frame, per-channel (upper) median over pixels; partition is linear time
    flat = np.ascontiguousarray(np.moveaxis(v.reshape(n, t, h * w, 3), 3, 2))  # [N, T, 3, H*W]
    bg = np.partition(flat, (h * w) // 2, axis=3)[..., (h * w) // 2][:, :, None, None, :]  # [N, T, 1, 1, 3]
    diff = np.maximum(np.maximum(np.abs(r - bg[..., 0]), np.abs(g - bg[..., 1])), np.abs(b - bg[..., 2]))
    mask = (diff > OBJECT_THRESHOLD).astype(np.float32)  # [N, T, H, W]
    area = mask.sum(axis=(2, 3))  # [N, T]
    size = area.mean(axis=1) / (h * w)
    ys, xs = np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32)
    safe = np.maximum(area, 1.0)
    cy = (mask.sum(axis=3) * ys).sum(axis=2) / safe
    cx = (mask.sum(axis=2) * xs).sum(axis=2) / safe
    step = np.hypot(np.diff(cy, axis=1), np.diff(cx, axis=1))
    both = (area[:, 1:] > 0) & (area[:, :-1] > 0)
    speed = np.where(both, step, 0.0).sum(axis=1) / np.maximum(both.sum(axis=1), 1)
    brightness = (0.299 * r + 0.587 * g + 0.114 * b).mean(axis=(1, 2, 3))  # BT.601 luma
    obj_pixels = np.maximum(mask.sum(axis=(1, 2, 3)), 1.0)
    warmth = ((r - b) * mask).sum(axis=(1, 2, 3)) / obj_pixels
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    saturation = (chroma * mask).sum(axis=(1, 2, 3)) / obj_pixels
    return np.stack([speed, size, brightness, warmth, saturation], axis=1).astype(np.float32)


class UserPopulation:
    """n_users simulated users with hidden tastes around POPULATION_TASTE (see module docstring).

    Invariant: a user's click probability depends only on the video's pixels, never on the prompt.
    """

    def __init__(self, seed: int = 0, n_users: int = 100):
        if n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {n_users}")
        rng = np.random.default_rng(seed)
        self.weights = POPULATION_TASTE + USER_SPREAD * rng.standard_normal((n_users, len(FEATURES)))
        self.bias = BASE_LOGIT + BIAS_SPREAD * rng.standard_normal(n_users)

    @property
    def n_users(self) -> int:
        return len(self.bias)

    def click_probability(self, videos: np.ndarray, users: np.ndarray | None = None) -> np.ndarray:
        """P(click) [N]: for users[i] on video i, or averaged over the whole population when users is None."""
        z = np.clip((video_features(videos) - CENTRE) / SCALE, -Z_CLIP, Z_CLIP)  # [N, F]
        if users is None:
            logits = z @ self.weights.T + self.bias  # [N, U]
            return (1.0 / (1.0 + np.exp(-logits))).mean(axis=1)
        users = np.asarray(users)
        if users.shape != (len(z),):
            raise ValueError(f"expected users [N={len(z)}], got {users.shape}")
        logits = (z * self.weights[users]).sum(axis=1) + self.bias[users]
        return 1.0 / (1.0 + np.exp(-logits))

    def impressions(self, videos: np.ndarray, prompts: list[str], rng: np.random.Generator,
                    impression_rate: float = 0.3) -> np.ndarray:
        """Sparse real feedback: clicks [N] float32, 1/0 where the video got an impression, NaN elsewhere.

        Each video independently gets an impression with probability impression_rate, shown to one
        uniformly random user, who clicks ~ Bernoulli(p_user(video)). Prompts are checked for count only:
        the users' taste ignores them (see module docstring).
        """
        videos = np.asarray(videos)
        if not 0.0 <= impression_rate <= 1.0:
            raise ValueError(f"impression_rate must be in [0, 1], got {impression_rate}")
        if isinstance(prompts, str) or len(prompts) != len(videos):
            raise ValueError(f"expected {len(videos)} prompts (one per video), got {len(prompts)}")
        clicks = np.full(len(videos), np.nan, dtype=np.float32)
        shown = np.flatnonzero(rng.random(len(videos)) < impression_rate)
        if len(shown):
            users = rng.integers(0, self.n_users, size=len(shown))
            p = self.click_probability(videos[shown], users)
            clicks[shown] = (rng.random(len(shown)) < p).astype(np.float32)
        return clicks


# ---- dense engagement predictor --------------------------------------------------------------

class EngagementPredictor(nn.Module):
    """Tiny 3-D conv net: video [B, T, 3, H, W] in [-1, 1] -> click logit [B].

    Frame differences are fed as 3 extra channels so motion is one layer away.
    """

    def __init__(self, width: int = 16):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv3d(6, width, kernel_size=3, stride=(1, 2, 2), padding=1), nn.GELU(),
            nn.Conv3d(width, 2 * width, kernel_size=3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(4 * width, 1)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[2] != 3 or video.shape[1] < 2:
            raise ValueError(f"EngagementPredictor: expected video [B, T>=2, 3, H, W], got {tuple(video.shape)}")
        x = video.float().permute(0, 2, 1, 3, 4)  # [B, 3, T, H, W]
        diff = F.pad(x[:, :, 1:] - x[:, :, :-1], (0, 0, 0, 0, 1, 0))
        h = self.net(torch.cat([x, diff], dim=1))
        pooled = torch.cat([h.mean(dim=(2, 3, 4)), h.amax(dim=(2, 3, 4))], dim=1)
        return self.head(pooled).squeeze(-1)

    def save(self, file) -> None:
        """Write the weights to a safetensors `file`, atomically (temp + rename)."""
        import os
        import tempfile
        from pathlib import Path

        from safetensors.torch import save_file

        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=file.parent, prefix=f".{file.name}.")
        os.close(fd)
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tmp)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, file) -> "EngagementPredictor":
        """Rebuild from a safetensors file written by `save` (the width is read from tensor `net.0.weight`);
        a file that is not an EngagementPredictor, or has a missing or mis-shaped tensor, is a ValueError."""
        from safetensors.torch import load_file

        state = load_file(str(file))
        if "net.0.weight" not in state:
            raise ValueError(f"{file}: not an EngagementPredictor checkpoint (no tensor 'net.0.weight')")
        model = cls(width=state["net.0.weight"].shape[0])
        try:
            model.load_state_dict(state)
        except RuntimeError as e:  # strict: names the missing, unexpected or mis-shaped tensor
            raise ValueError(f"{file}: {e}") from None
        return model.eval()

    @torch.no_grad()
    def predict(self, videos: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """World videos [N, T, H, W, 3] -> predicted click probability [N] float32 (the dense reward)."""
        v = _world_videos(videos)
        was_training = self.training
        self.eval()
        try:
            device = self.head.weight.device
            out = [torch.sigmoid(self(_to_model(v[i:i + batch_size]).to(device))) for i in range(0, len(v), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out).cpu().numpy() if out else np.zeros(0, np.float32)


def _to_model(v: np.ndarray) -> torch.Tensor:
    """float [N, T, H, W, 3] in [0, 1] -> [N, T, 3, H, W] in [-1, 1]."""
    return (2.0 * torch.from_numpy(np.ascontiguousarray(v)) - 1.0).permute(0, 1, 4, 2, 3)


@dataclass
class ClickLog:
    """Logged feedback: videos [N, T, H, W, 3] (uint8 or [0, 1] float) and clicks [N] (1, 0, or NaN = no impression)."""

    videos: np.ndarray
    clicks: np.ndarray

    def __post_init__(self) -> None:
        self.videos = np.asarray(self.videos)
        self.clicks = np.asarray(self.clicks, dtype=np.float32)
        if self.clicks.shape != (len(self.videos),):
            raise ValueError(f"ClickLog: expected clicks [N={len(self.videos)}], got {self.clicks.shape}")
        seen = self.clicks[~np.isnan(self.clicks)]
        if not np.isin(seen, (0.0, 1.0)).all():
            raise ValueError("ClickLog: clicks must be 0, 1 or NaN")

    def impressions_only(self) -> "ClickLog":
        keep = ~np.isnan(self.clicks)
        return ClickLog(self.videos[keep], self.clicks[keep])


def train_engagement(logs, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                     predictor: EngagementPredictor | None = None, progress: bool = True) -> EngagementPredictor:
    """Fit an EngagementPredictor to logged impressions with binary cross-entropy (NaN rows are skipped)."""
    logs = (logs if isinstance(logs, ClickLog) else ClickLog(**dict(logs))).impressions_only()
    if len(logs.clicks) == 0:
        raise ValueError("train_engagement: the logs hold no impressions")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    model = predictor or EngagementPredictor()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    device = model.head.weight.device
    videos = _to_model(_world_videos(logs.videos)).to(device)
    clicks = torch.from_numpy(logs.clicks).to(device)
    model.train()
    bar = tqdm(range(steps), desc="engagement predictor", disable=not progress, unit="step")
    for _ in bar:
        idx = torch.from_numpy(rng.choice(len(clicks), size=min(batch_size, len(clicks)), replace=False)).to(device)
        loss = F.binary_cross_entropy_with_logits(model(videos[idx]), clicks[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(bce=f"{loss.item():.4f}")
    return model


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (Mann–Whitney U / (n_pos · n_neg)); tied scores share their average rank."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"auc: expected scores [N] and labels [N], got {scores.shape} and {labels.shape}")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("auc: labels must be 0 or 1")
    n_pos = int((labels == 1).sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"auc: needs both classes, got {n_pos} positives and {n_neg} negatives")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    # average ranks over runs of equal scores
    _, start, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    for s, c in zip(start, counts):
        if c > 1:
            ranks[order[s:s + c]] = s + (c + 1) / 2.0
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def feedback_reward(dense_pred: np.ndarray, clicks: np.ndarray, mix: float = 0.5) -> np.ndarray:
    """SCRL primary reward R_f [N] float32 from dense predictions and sparse real clicks.

        R_f = mix · click + (1 − mix) · dense_pred   where the sample got an impression (click ∈ {0, 1}),
        R_f = dense_pred                             where it did not (click is NaN).

    dense_pred is a click probability in [0, 1], so both terms live on the same scale.
    """
    dense, clicks = np.asarray(dense_pred, dtype=np.float32), np.asarray(clicks, dtype=np.float32)
    if dense.ndim != 1 or clicks.shape != dense.shape:
        raise ValueError(f"feedback_reward: expected dense_pred [N] and clicks [N], "
                         f"got {dense.shape} and {clicks.shape}")
    if not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must be in [0, 1], got {mix}")
    if not np.isfinite(dense).all():
        raise ValueError("feedback_reward: dense_pred has non-finite values")
    seen = ~np.isnan(clicks)
    if not np.isin(clicks[seen], (0.0, 1.0)).all():
        raise ValueError("feedback_reward: clicks must be 0, 1 or NaN")
    return np.where(seen, mix * np.nan_to_num(clicks) + (1.0 - mix) * dense, dense).astype(np.float32)
