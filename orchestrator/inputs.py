"""What a training run needs before its first step, each made once per config and cached:
the base model, preference data, the reward models, and the SCRL calibration of the profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.calibrate import calibrate_base_model
from orchestrator.config import Config, cache_dir
from orchestrator.evaluation import evaluate
from orchestrator.hashing import SAMPLING_CODE, building, code_version, file_sha256, fingerprint
from orchestrator.pretraining import Base, base_policy
from orchestrator.prompts import load_prompt_file
from policy.backend import Policy, video_shape
from rewards.audio_sync import batch_extras
from rewards.calibration import load_profile, profile_taus, read_calibration
from rewards.errors import DataError
from rewards.scorer import RewardScorer
from rewards.world import Prompt, train_prompts


@dataclass
class Inputs:
    base: Base
    reward_checkpoints: dict[str, str | None]  # reward model name -> checkpoint
    reward_dims: dict[str, tuple[str, ...]]  # reward model name -> its score dimensions
    primary: str
    taus: dict[str, float]
    prompts: list[str]
    calibration: Path


WORLD_KINDS = ("oracle", "videoreward", "feedback")  # reward models of the embedded shapes world


def check_rewards_fit(cfg: Config) -> None:
    """The shapes world's reward models score its square clips (at most 21 frames: an object stays in frame); a model
    making other clips needs reward models for real video. Raised before any work starts."""
    frames, height, width = video_shape(cfg.model)
    for name, spec in cfg.rewards.models.items():
        if spec.kind in WORLD_KINDS and (height != width or frames > 21):
            raise ValueError(f"rewards.models.{name} (kind {spec.kind}) scores the shapes world's square clips of at "
                             f"most 21 frames, but the model makes {frames} x {height} x {width} clips: real video "
                             "needs reward models for real video (e.g. a VideoAlign VLM reward)")


def training_prompts(cfg: Config) -> list[str]:
    if cfg.data.prompts is None:
        return [p.text for p in train_prompts()]
    return load_prompt_file(cfg.data.prompts, validate=Prompt.parse)


def reward_checkpoints(cfg: Config, base: Base, progress: bool = True) -> dict[str, str | None]:
    """Checkpoint per reward model: the configured one, else trained (cached) here."""
    cache = cache_dir(cfg)
    out: dict[str, str | None] = {}
    for name, spec in cfg.rewards.models.items():
        if spec.checkpoint or spec.kind not in ("videoreward", "feedback"):  # nothing of ours to train
            out[name] = spec.checkpoint
            continue
        from orchestrator.reward_training import (ensure_engagement_model, ensure_preference_data,
                                                  ensure_reward_ensemble, ensure_reward_model)

        if spec.kind == "videoreward":
            data = ensure_preference_data(cfg.rewards.preference, base, cache, cfg.rollout.mode, cfg.rollout.steps,
                                          shift=cfg.rollout.shift)
            train = ensure_reward_ensemble if cfg.rewards.reward_model.ensemble else ensure_reward_model
            out[name] = str(train(cfg.rewards.reward_model, data, cache, progress=progress))
        else:
            out[name] = str(ensure_engagement_model(cfg.rewards.engagement, base, cache, progress=progress,
                                                    mode=cfg.rollout.mode, steps=cfg.rollout.steps,
                                                    shift=cfg.rollout.shift)[0])
    return out


def scorers(cfg: Config, checkpoints: dict[str, str | None]) -> dict[str, RewardScorer]:
    shape = (*video_shape(cfg.model), 3)
    return {name: RewardScorer(spec.kind, checkpoints[name], shape, **spec.scorer_options())
            for name, spec in cfg.rewards.models.items()}


def score_all(cfg: Config, models: dict[str, RewardScorer], videos: np.ndarray, prompts: list[str],
              ids: list[str] | None = None) -> dict[str, np.ndarray]:
    """{reward name: [N]} from every reward model, in-process (calibration, evaluation). A bad sample raises
    `DataError` naming its id (default ids: clip-<i>)."""
    ids = ids or [f"clip-{i}" for i in range(len(prompts))]
    extras = batch_extras(cfg.rollout.extras, prompts, videos.shape[1])  # what the rollout adds to reward batches
    out = {}
    for name, scorer in models.items():
        scores = scorer.score(videos, prompts, ids, **extras)
        for i, dim in enumerate(scorer.dims):
            out[cfg.rewards.models[name].prefix + dim] = scores[:, i]
    return out


def held_out_reward_means(cfg: Config, checkpoints: dict[str, str | None], model: Policy) -> tuple[dict[str, float], list[str]]:
    """Every reward's mean on the held-out prompts for `model`, sampled the way the calibration sampled
    the base model (the rollout sampler): the value each constraint's τ is compared with after training.
    A clip some reward model rejects (`DataError`) is left out of every mean; returns (means, left-out ids)."""
    r = cfg.rollout
    res = evaluate(model, sampler=r.sampler, eta=r.eta, steps=r.steps, mode=r.mode, shift=r.shift,
                   seeds_per_prompt=cfg.eval.constraint_samples_per_prompt, seed=cfg.eval.seed)
    models = scorers(cfg, checkpoints)
    ids = [f"held-out-{i}" for i in range(len(res.prompts))]
    try:
        scores, skipped = score_all(cfg, models, res.videos, res.prompts, ids), []
    except DataError:  # score clip by clip, leaving out the ones rejected
        parts, skipped = [], []
        for i, sid in enumerate(ids):
            try:
                parts.append(score_all(cfg, models, res.videos[i : i + 1], res.prompts[i : i + 1], [sid]))
            except DataError:
                skipped.append(sid)
        scores = {name: np.concatenate([p[name] for p in parts]) for name in parts[0]} if parts else {}
    means = {name: float(values.mean()) for name, values in scores.items()}
    return means, skipped


def calibration_path(cfg: Config, base: Base, checkpoints: dict[str, str | None]) -> Path:
    """Keyed by the base model and reward checkpoints (their paths carry their own keys), the reward names, the
    calibration settings and rollout sampler, the profiles' text and the calibration code."""
    from rewards.calibration import profiles_dir

    profiles = [f.read_text() for f in sorted(profiles_dir().iterdir(), key=lambda f: f.name) if f.name.endswith(".yaml")]
    if Path(cfg.rewards.profile).is_file():
        profiles.append(Path(cfg.rewards.profile).read_text())
    code = code_version("orchestrator.calibrate", "orchestrator.evaluation", "orchestrator.inputs", "rewards.calibration",
                        "rewards.scorer", "rewards.oracle", "rewards.audio_sync", *SAMPLING_CODE,
                        *(["rewards.videoalign"] if any(s.kind == "videoalign" for s in cfg.rewards.models.values()) else []))
    # only what the measurement depends on: a new training-only key (curriculum, replicas, ...) keeps the cached τ
    r = cfg.rollout
    scoring = {name: (spec.kind, spec.prefix, *([o] if (o := {k: v for k, v in spec.scorer_options().items()
                                                              if k != "retries"}) else []))
               for name, spec in cfg.rewards.models.items()}
    key = fingerprint(scoring, cfg.rewards.calibration, cfg.rewards.profile,
                      (r.sampler, r.eta, r.steps, r.shift, r.mode, *([r.extras] if r.extras else [])),
                      base.key, json.dumps(checkpoints, sort_keys=True), *profiles, code, *_plugin_sources(cfg))
    return cache_dir(cfg) / f"calibration-{key}.json"


def _plugin_sources(cfg: Config) -> list[str]:
    """Content hashes of the python plug-ins' source files: an edited scorer is recalibrated, though its callable and
    kwargs are the same."""
    import inspect

    from rewards.scorer import load_callable

    return [file_sha256(inspect.getsourcefile(load_callable(s.callable, s.pythonpath)))
            for s in cfg.rewards.models.values() if s.kind == "python"]


def ensure_calibration(cfg: Config, base: Base, checkpoints: dict[str, str | None], force: bool = False,
                       seed: int | None = None, out: Path | None = None,
                       models: dict[str, RewardScorer] | None = None) -> Path:
    """τ for every shipped profile (and the configured one), measured on the base model's rollouts. models: the
    run's scorers when the caller has built them already (a large reward model loads once)."""
    path = out or calibration_path(cfg, base, checkpoints)
    with building(path):
        if path.is_file() and not force:
            return path
        return _calibrate(cfg, base, checkpoints, path, seed, models)


def _calibrate(cfg: Config, base: Base, checkpoints: dict[str, str | None], path: Path, seed: int | None,
               models: dict[str, RewardScorer] | None) -> Path:
    from rewards.calibration import available_profiles

    models = models or scorers(cfg, checkpoints)
    rewards = {cfg.rewards.models[n].prefix + d for n, m in models.items() for d in m.dims}
    profiles = [load_profile(cfg.rewards.profile)]
    profiles += [p for p in map(load_profile, available_profiles())  # every shipped profile these rewards can serve
                 if p.name != profiles[0].name and {p.primary, *p.constraints} <= rewards]
    c, r = cfg.rewards.calibration, cfg.rollout
    calibrate_base_model(base.load(), lambda v, p: score_all(cfg, models, v, p), profiles,
                         samples_per_prompt=c.samples_per_prompt, seed=c.seed if seed is None else seed,
                         sampler=r.sampler, eta=r.eta, steps=r.steps, shift=r.shift, mode=r.mode, out_path=path,
                         source=str(base.path or cfg.model.path))
    return path


def prepare(cfg: Config, progress: bool = True) -> Inputs:
    prompts = training_prompts(cfg)  # a bad prompt file fails here, before any training
    base = base_policy(cfg, prompts, progress=progress)
    checkpoints = reward_checkpoints(cfg, base, progress)
    models = scorers(cfg, checkpoints)
    dims = {name: s.dims for name, s in models.items()}
    profile = load_profile(cfg.rewards.profile)
    cal = ensure_calibration(cfg, base, checkpoints, models=models)
    taus = profile_taus(read_calibration(cal), profile.name)
    return Inputs(base, checkpoints, dims, profile.primary, taus, prompts, cal)
