"""RewardScorer: one reward model behind one `score` call, with the failure taxonomy applied.

The reward actors (actors/reward.py) wrap this class; it knows nothing of Ray. Kinds:
- "oracle": the world's ground truth (`rewards.oracle.score_batch`), dims (vq, mq, ta); for
  evaluation and ablations.
- "videoreward": the learned VideoAlign-style model (`rewards.reward_model.VideoReward`), loaded
  from a checkpoint directory written by `VideoReward.save`; dims are the model's (vq, mq, ta).
- "feedback": SCRL's primary reward R_f (`rewards.feedback.feedback_reward`): the dense engagement
  predictor loaded from a safetensors file, mixed with sparse simulated clicks; dims ("feedback",).
  A sample's clicks are drawn from an RNG seeded by (seed, sample id), so a retried or re-batched
  sample gets the same reward: retries on another replica are invisible downstream.

Every problem with one sample (wrong clip shape, bad pixels, unknown prompt words, a non-finite score)
raises `DataError` naming the sample id, so it is never retried and never reaches the learner as NaN.
"""

from __future__ import annotations

import json

import zlib
from pathlib import Path

import numpy as np

from rewards import oracle
from rewards.errors import DataError, check_scores, check_videos
from rewards.world import as_prompt

KINDS = ("oracle", "videoreward", "feedback")


class RewardScorer:
    """Scores world videos against prompts with one reward model; see the module docstring.

    frame_shape: the clip shape every sample must have, (T, H, W, 3).
    device: where a learned model runs; None = "cuda" when a GPU is visible (Ray shows an actor only the
    GPUs it asked for), else "cpu". Scores come back as numpy either way.
    For "feedback": `users_seed` and `n_users` fix the simulated user population, `impression_rate` the
    chance a sample is shown to a user, `mix` the weight of a real click against the dense prediction.
    Left as None they come from the checkpoint directory's engagement.json (the population whose click
    logs trained the predictor), else 0, 100, 0.3 and 0.5.
    """

    def __init__(self, kind: str, checkpoint: str | Path | None = None,
                 frame_shape: tuple[int, int, int, int] = (8, 16, 16, 3), *,
                 device: str | None = None, users_seed: int | None = None, n_users: int | None = None,
                 impression_rate: float | None = None, mix: float | None = None):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {list(KINDS)}")
        frame_shape = tuple(int(x) for x in frame_shape)
        if len(frame_shape) != 4 or frame_shape[3] != 3 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (T, H, W, 3), got {frame_shape}")
        for name, value in (("impression_rate", impression_rate), ("mix", mix)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"impression_rate and mix must lie in [0, 1], got {name}={value}")
        self.kind = kind
        self.frame_shape = frame_shape
        self.model = None
        if kind == "oracle":
            self.dims: tuple[str, ...] = ("vq", "mq", "ta")
            return
        if checkpoint is None:
            raise ValueError(f"reward kind {kind!r} needs a checkpoint")
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"reward checkpoint for {kind!r} not found: {path}")
        if kind == "videoreward":
            from rewards.reward_model import VideoReward  # torch loads only for learned models

            self.model = VideoReward.load(path).eval().to(_device(device))
            cfg = self.model.cfg
            if (cfg.frames, cfg.size, cfg.size) != frame_shape[:3]:
                raise ValueError(f"{path}: the reward model scores [{cfg.frames}, {cfg.size}, {cfg.size}, 3] "
                                 f"clips, frame_shape is {list(frame_shape)}")
            self.dims = tuple(cfg.dims)
        else:  # "feedback"
            from rewards.feedback import UserPopulation

            self.model = _load_engagement(path).to(_device(device))
            logged = _engagement_config(path)
            self.users_seed = logged.get("seed", 0) if users_seed is None else users_seed
            self.impression_rate = logged.get("impression_rate", 0.3) if impression_rate is None else impression_rate
            self.mix = logged.get("mix", 0.5) if mix is None else mix
            self.users = UserPopulation(self.users_seed, logged.get("n_users", 100) if n_users is None else n_users)
            self.dims = ("feedback",)

    def score(self, videos, prompts: list[str], ids: list[str]) -> np.ndarray:
        """videos uint8 [N, T, H, W, 3] (or float in [0, 1], or a list of N clips), N prompts, N ids
        -> scores float32 [N, len(dims)], all finite. A bad sample raises DataError naming its id."""
        ids = [str(i) for i in ids]
        check_videos(videos, ids, self.frame_shape)
        if isinstance(prompts, str) or len(prompts) != len(ids):
            raise DataError(ids[0] if ids else "?", f"batch has {len(ids)} ids but {len(prompts)} prompts")
        videos = np.stack([np.asarray(v) for v in videos]) if len(ids) else np.zeros((0, *self.frame_shape), np.uint8)
        if videos.dtype != np.uint8:
            for sid, v in zip(ids, videos):
                if v.min() < 0.0 or v.max() > 1.0:
                    raise DataError(sid, f"{v.dtype} video outside [0, 1] (min {v.min():.3g}, max {v.max():.3g})")
        prompts = [str(p) for p in prompts]
        if not ids:
            return np.zeros((0, len(self.dims)), np.float32)
        self._check_prompts(prompts, ids)
        if self.kind == "oracle":
            out = oracle.score_batch(videos, prompts)
            scores = np.stack([out[d] for d in self.dims], axis=1)
        elif self.kind == "videoreward":
            scores = self.model.score_videos(videos, prompts)
        else:
            scores = self._feedback(videos, prompts, ids)[:, None]
        return check_scores(scores, ids, self.dims)

    def _check_prompts(self, prompts: list[str], ids: list[str]) -> None:
        """A prompt the model cannot read is the sample's fault: DataError, not a retry."""
        if self.kind == "feedback":
            return  # the users' taste ignores the prompt
        for sid, p in zip(ids, prompts):
            try:
                self.model.tokenize([p]) if self.kind == "videoreward" else as_prompt(p)
            except ValueError as e:
                raise DataError(sid, f"bad prompt: {e}") from None

    def _feedback(self, videos: np.ndarray, prompts: list[str], ids: list[str]) -> np.ndarray:
        """R_f [N]: dense predicted click probability, mixed with a simulated click where one was drawn."""
        from rewards.feedback import feedback_reward

        dense = self.model.predict(videos)
        if not np.isfinite(dense).all():  # name the sample (feedback_reward would raise a plain ValueError)
            i = int(np.flatnonzero(~np.isfinite(dense))[0])
            raise DataError(ids[i], f"non-finite feedback score {dense[i]} (dense engagement prediction)")
        clicks = np.empty(len(ids), np.float32)
        for i, sid in enumerate(ids):  # per-sample RNG: a sample's reward does not depend on its batch
            rng = np.random.default_rng([self.users_seed, zlib.crc32(sid.encode())])
            clicks[i] = self.users.impressions(videos[i:i + 1], prompts[i:i + 1], rng, self.impression_rate)[0]
        return feedback_reward(dense, clicks, self.mix)


def _device(device: str | None) -> str:
    import torch

    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _engagement_config(path: Path) -> dict:
    """The EngagementConfig a predictor directory was trained with ({} for a bare weights file)."""
    meta = path / "engagement.json" if path.is_dir() else path.with_name("engagement.json")
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text()).get("config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{meta}: not a readable engagement.json ({e})") from None


def _load_engagement(path: Path):
    """EngagementPredictor from a safetensors file (or a directory holding `model.safetensors`);
    the conv width is read from the weights (`EngagementPredictor.load`)."""
    from rewards.feedback import EngagementPredictor

    file = path / "model.safetensors" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"engagement predictor weights not found: {file}")
    return EngagementPredictor.load(file)
