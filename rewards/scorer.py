"""Reward scorers: the plug-in contract, the built-in kinds as plug-ins of it, and `RewardScorer`, which loads one
and applies the failure taxonomy.

The contract (README "Reward plug-ins"): a scorer is a class with
- `dims`: the names of what it scores, e.g. ("vq", "mq", "ta");
- `score(batch) -> {dim: float32 [N]}` over the batch the reward pools send: {"ids": [N] str, "videos": uint8
  [N, T, H, W, 3], "prompts": [N] str, plus any extra fields the rollout adds (`rollout.extras`, e.g. "beat")};
- `version`: a string naming the model, recorded with its scores;
- optionally a `device` argument to `__init__`: "cuda" when the actor was given a GPU, else "cpu".
A problem with one sample raises `rewards.errors.DataError(sample_id, why)`: never retried, the sample is named.
Anything else a scorer raises is infrastructure (the reward actor retries the batch elsewhere).

Kinds: "oracle" (the world's ground truth), "videoreward" (the learned VideoAlign-style model, from a
`VideoReward.save` directory), "feedback" (SCRL's primary reward R_f: the engagement predictor mixed with simulated
clicks seeded by (seed, sample id), so a retried or re-batched sample gets the same reward), "python" (any class
named by `callable: "pkg.module:Class"`), "http" (a remote reward service, `rewards.reward_http`), "videoalign" (a
VideoAlign VLM reward checkpoint, `rewards.videoalign.VideoAlignScorer`).
`RewardScorer` checks what goes in (clip shapes, pixel range) and what comes out (the declared dims, [N] each,
finite), so a plug-in's mistake is a DataError naming a sample, not a NaN in the learner.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import zlib
from pathlib import Path

import numpy as np

from rewards import oracle
from rewards.errors import DataError, check_scores, check_videos
from rewards.world import as_prompt

KINDS = ("oracle", "videoreward", "feedback", "python", "http", "videoalign")
BATCH_KEYS = ("ids", "videos", "prompts")  # every batch has them; anything else is an extra field
ENSEMBLE_FILE = "ensemble.json"  # marks a videoreward checkpoint directory holding several models (VideoRewardScorer)


class OracleScorer:
    """The world's ground truth (`rewards.oracle.score_batch`) against each prompt."""

    dims = ("vq", "mq", "ta")
    version = "oracle"

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        _parse_prompts(batch)
        out = oracle.score_batch(batch["videos"], batch["prompts"])
        return {d: out[d] for d in self.dims}


class VideoRewardScorer:
    """The learned VideoAlign-style model (`rewards.reward_model.VideoReward`) from a checkpoint directory, or an
    ensemble of them (a directory with ENSEMBLE_FILE, `orchestrator.reward_training.ensure_reward_ensemble`): the mean
    over its models of (score − mean) / std, with each model's mean and std per dimension from that file."""

    def __init__(self, checkpoint: str | Path, frame_shape=(8, 16, 16, 3), device: str = "cpu"):
        path = _existing(checkpoint, "videoreward")
        self.models, self.mean, self.std = load_videoreward(path, device)
        cfg = self.models[0].cfg  # every member's (load_videoreward checks)
        if (cfg.frames, cfg.size, cfg.size) != tuple(frame_shape[:3]):
            raise ValueError(f"{path}: the reward model scores [{cfg.frames}, {cfg.size}, {cfg.size}, 3] "
                             f"clips, frame_shape is {list(frame_shape)}")
        self.dims = tuple(cfg.dims)
        self.version = f"videoreward:{path.name}"

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        for sid, p in zip(batch["ids"], batch["prompts"]):  # a prompt it cannot read is the sample's fault
            try:
                self.models[0].tokenize([p])
            except ValueError as e:
                raise DataError(sid, f"bad prompt: {e}") from None
        scores = np.mean([(m.score_videos(batch["videos"], batch["prompts"]) - mean) / std
                          for m, mean, std in zip(self.models, self.mean, self.std)], axis=0, dtype=np.float32)
        return {d: scores[:, i] for i, d in enumerate(self.dims)}


def load_videoreward(path: Path, device: str = "cpu") -> tuple[list, np.ndarray, np.ndarray]:
    """A VideoReward directory -> ([model], mean 0, std 1); an ensemble directory (ENSEMBLE_FILE: {"members": {name:
    {"mean": [D], "std": [D]}}}, each member in its subdirectory `name`) -> (models, mean [M, D], std [M, D]).
    Members scoring other dimensions or clips than the first are a ValueError naming them."""
    from rewards.reward_model import VideoReward  # torch loads only for learned models

    if not (path / ENSEMBLE_FILE).is_file():
        model = VideoReward.load(path).eval().to(device)
        return [model], np.zeros((1, len(model.cfg.dims)), np.float32), np.ones((1, len(model.cfg.dims)), np.float32)
    members = json.loads((path / ENSEMBLE_FILE).read_text())["members"]
    models = [VideoReward.load(path / name).eval().to(device) for name in members]
    first = models[0].cfg
    for name, model in zip(members, models):
        if (model.cfg.dims, model.cfg.frames, model.cfg.size) != (first.dims, first.frames, first.size):
            raise ValueError(f"{path}: ensemble member {name} scores {model.cfg.dims} on {model.cfg.frames} x "
                             f"{model.cfg.size}^2 clips, member {next(iter(members))} {first.dims} on {first.frames} "
                             f"x {first.size}^2")
    mean = np.array([members[name]["mean"] for name in members], np.float32)
    std = np.array([members[name]["std"] for name in members], np.float32)
    if mean.shape != (len(models), len(first.dims)) or std.shape != mean.shape or not (std > 0).all():
        raise ValueError(f"{path / ENSEMBLE_FILE}: each member needs a mean and a positive std per dimension "
                         f"({len(first.dims)})")
    return models, mean, std


class FeedbackScorer:
    """SCRL's R_f: the dense engagement prediction, mixed with a simulated click where one was drawn.
    `users_seed`, `n_users`, `impression_rate`, `mix` left None come from the checkpoint's engagement.json (the
    population whose click logs trained the predictor), else 0, 100, 0.3 and 0.5."""

    dims = ("feedback",)

    def __init__(self, checkpoint: str | Path, device: str = "cpu", users_seed: int | None = None,
                 n_users: int | None = None, impression_rate: float | None = None, mix: float | None = None):
        from rewards.feedback import UserPopulation

        for name, value in (("impression_rate", impression_rate), ("mix", mix)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"impression_rate and mix must lie in [0, 1], got {name}={value}")
        path = _existing(checkpoint, "feedback")
        self.model = _load_engagement(path).to(device)
        logged = _engagement_config(path)
        self.users_seed = logged.get("seed", 0) if users_seed is None else users_seed
        self.impression_rate = logged.get("impression_rate", 0.3) if impression_rate is None else impression_rate
        self.mix = logged.get("mix", 0.5) if mix is None else mix
        self.users = UserPopulation(self.users_seed, logged.get("n_users", 100) if n_users is None else n_users)
        self.version = f"feedback:{path.name}"

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        from rewards.feedback import feedback_reward

        videos, prompts, ids = batch["videos"], batch["prompts"], batch["ids"]
        dense = self.model.predict(videos)
        if not np.isfinite(dense).all():  # name the sample (feedback_reward would raise a plain ValueError)
            i = int(np.flatnonzero(~np.isfinite(dense))[0])
            raise DataError(ids[i], f"non-finite feedback score {dense[i]} (dense engagement prediction)")
        clicks = np.empty(len(ids), np.float32)
        for i, sid in enumerate(ids):  # per-sample RNG: a sample's reward does not depend on its batch
            rng = np.random.default_rng([self.users_seed, zlib.crc32(sid.encode())])
            clicks[i] = self.users.impressions(videos[i:i + 1], prompts[i:i + 1], rng, self.impression_rate)[0]
        return {"feedback": feedback_reward(dense, clicks, self.mix)}


def load_callable(target: str, pythonpath: list[str] | tuple[str, ...] = ()) -> type:
    """"pkg.module:Class" -> the class, which must look like a scorer (has `score`); `pythonpath` directories are put
    first on sys.path. ValueError naming the target when it does not import or is not a scorer."""
    module_name, sep, attr = str(target).partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"callable {target!r} is not of the form 'pkg.module:Class'")
    for d in reversed([str(p) for p in pythonpath]):
        if d not in sys.path:
            sys.path.insert(0, d)
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a user's module may fail in any way while importing
        raise ValueError(f"callable {target!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"callable {target!r}: module {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not isinstance(obj, type) or not callable(getattr(obj, "score", None)):
        raise ValueError(f"callable {target!r} is not a scorer: expected a class with `dims` and `score(batch)`")
    return obj


def declared_dims(cls: type) -> tuple[str, ...] | None:
    """A scorer class's `dims` when it declares them on the class (known before it is built), else None."""
    dims = getattr(cls, "dims", None)
    if isinstance(dims, (list, tuple)) and dims and all(isinstance(d, str) for d in dims):
        return tuple(dims)
    return None


def build_plugin(kind: str, checkpoint: str | Path | None = None, frame_shape=(8, 16, 16, 3), *,
                 device: str | None = None, **options):
    """The scorer object of a kind. options: "feedback": users_seed, n_users, impression_rate, mix; "python":
    callable, kwargs, pythonpath; "http": url and the client's settings (`rewards.reward_http.HttpScorer`);
    "videoalign": `rewards.videoalign.VideoAlignScorer`'s (fps, num_frames, max_pixels, aggregate, normalize, ...)."""
    if kind == "oracle":
        return OracleScorer()
    if kind == "videoreward":
        return VideoRewardScorer(_needs(checkpoint, kind), frame_shape, _device(device))
    if kind == "feedback":
        return FeedbackScorer(_needs(checkpoint, kind), _device(device), **options)
    if kind == "python":
        cls = load_callable(options["callable"], options.get("pythonpath") or ())
        kwargs = dict(options.get("kwargs") or {})
        if "device" in inspect.signature(cls).parameters:
            kwargs.setdefault("device", _device(device))
        return cls(**kwargs)
    if kind == "http":
        from rewards.reward_http import HttpScorer

        return HttpScorer(**options)
    if kind == "videoalign":
        from rewards.videoalign import VideoAlignScorer

        return VideoAlignScorer(_existing(_needs(checkpoint, kind), kind), device=_device(device), **options)
    raise ValueError(f"unknown reward kind {kind!r}; expected one of {list(KINDS)}")


class RewardScorer:
    """One reward plug-in behind one `score` call with the failure taxonomy applied; see the module docstring.

    frame_shape: the clip shape every sample must have, (T, H, W, 3).
    device: where a learned model runs; None = "cuda" when a GPU is visible (Ray shows an actor only the
    GPUs it asked for), else "cpu". Scores come back as numpy either way. options: see `build_plugin`.
    """

    def __init__(self, kind: str, checkpoint: str | Path | None = None,
                 frame_shape: tuple[int, int, int, int] = (8, 16, 16, 3), *, device: str | None = None, **options):
        if kind not in KINDS:
            raise ValueError(f"unknown reward kind {kind!r}; expected one of {list(KINDS)}")
        frame_shape = tuple(int(x) for x in frame_shape)
        if len(frame_shape) != 4 or frame_shape[3] != 3 or min(frame_shape) < 1:
            raise ValueError(f"frame_shape must be (T, H, W, 3), got {frame_shape}")
        self.kind = kind
        self.frame_shape = frame_shape
        self.plugin = build_plugin(kind, checkpoint, frame_shape, device=device, **options)
        dims = getattr(self.plugin, "dims", None)
        if isinstance(dims, str) or not isinstance(dims, (list, tuple)) or not dims or \
                not all(isinstance(d, str) for d in dims) or len(set(dims)) != len(dims):
            raise ValueError(f"reward kind {kind!r}: {type(self.plugin).__name__}.dims must be a non-empty list of "
                             f"distinct names, got {dims!r}")
        self.dims: tuple[str, ...] = tuple(dims)

    @property
    def version(self) -> str:
        """The plug-in's model version (an http service reports it with every reply)."""
        return str(getattr(self.plugin, "version", "") or self.kind)

    @property
    def model(self):
        return getattr(self.plugin, "model", None)

    def score(self, videos, prompts: list[str], ids: list[str], **extras) -> np.ndarray:
        """videos uint8 [N, T, H, W, 3] (or float in [0, 1], or a list of N clips), N prompts, N ids, extra batch
        fields -> scores float32 [N, len(dims)], all finite. A bad sample raises DataError naming its id."""
        ids = [str(i) for i in ids]
        check_videos(videos, ids, self.frame_shape)
        if isinstance(prompts, str) or len(prompts) != len(ids):
            raise DataError(ids[0] if ids else "?", f"batch has {len(ids)} ids but {len(prompts)} prompts")
        videos = np.stack([np.asarray(v) for v in videos]) if len(ids) else np.zeros((0, *self.frame_shape), np.uint8)
        if videos.dtype != np.uint8:
            for sid, v in zip(ids, videos):
                if v.min() < 0.0 or v.max() > 1.0:
                    raise DataError(sid, f"{v.dtype} video outside [0, 1] (min {v.min():.3g}, max {v.max():.3g})")
        if not ids:
            return np.zeros((0, len(self.dims)), np.float32)
        out = self.plugin.score({"ids": ids, "videos": videos, "prompts": [str(p) for p in prompts], **extras})
        return check_scores(self._columns(out, ids), ids, self.dims)

    def _columns(self, out, ids: list[str]) -> np.ndarray:
        """{dim: [N]} -> [N, D] in `dims` order; wrong dims or shapes are the batch's DataError (first sample)."""
        who = f"{type(self.plugin).__name__}.score"
        if not isinstance(out, dict) or set(out) != set(self.dims):
            got = sorted(out) if isinstance(out, dict) else type(out).__name__
            raise DataError(ids[0], f"{who} returned dims {got}, expected {list(self.dims)}")
        cols = []
        for d in self.dims:
            try:
                col = np.asarray(out[d], dtype=np.float32)
            except (TypeError, ValueError) as e:
                raise DataError(ids[0], f"{who} returned {d} that is not numbers ({e})") from None
            if col.shape != (len(ids),):
                raise DataError(ids[0], f"{who} returned {d} of shape {list(col.shape)}, expected [{len(ids)}]")
            cols.append(col)
        return np.stack(cols, axis=1)


def _parse_prompts(batch: dict) -> None:
    for sid, p in zip(batch["ids"], batch["prompts"]):
        try:
            as_prompt(p)
        except ValueError as e:
            raise DataError(sid, f"bad prompt: {e}") from None


def _needs(checkpoint, kind: str):
    if checkpoint is None:
        raise ValueError(f"reward kind {kind!r} needs a checkpoint")
    return checkpoint


def _existing(checkpoint, kind: str) -> Path:
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"reward checkpoint for {kind!r} not found: {path}")
    return path


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
