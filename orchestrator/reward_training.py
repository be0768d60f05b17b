"""`videorl reward train` / `videorl reward bench`: learned rewards from the preference data and simulated users.

- `ensure_preference_data`: oracle-labelled pairs (`orchestrator.reward_data.build_preference_dataset`),
  cached per (data config, base checkpoint content, sampling mode and steps).
- `ensure_reward_model`: a `VideoReward` trained with one loss (regression, BT or BTT) on the TRAIN split,
  cached per (data content, train config, loss). The directory holds `model.safetensors` + `config.json`
  (`VideoReward.save`) and `train.json` (seconds, losses).
- `ensure_reward_ensemble` (`rewards.reward_model.ensemble`): the `loss` model and one per further loss in one
  directory, with each model's mean and std over the data's clips; `rewards.scorer` averages the standardised scores.
- `ensure_videoalign_model`: a tiny VideoAlign VLM reward (`rewards.videoalign`) trained the same way, cached alike.
- `reward_bench`: VideoAlign's reward benchmark on the HELD-OUT split (prompts no model trained on; labels
  noise-free): pairwise accuracy per dimension and overall, without ties and with ties, of either model.
- `reward_bench_seeds`: the same over several seeds (own data and models per seed): mean ± std per loss and dimension.
- `ensure_engagement_model`: simulated users' sparse click logs on base samples, true and degraded renders
  train the dense engagement predictor (SCRL's primary reward); held-out AUC against a constant and the
  users' true click probability.
Every cached artefact is written to a temporary directory and renamed into place: readers see it whole or not at all.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from orchestrator.hashing import SAMPLING_CODE, building, code_version, file_sha256, fingerprint
from rewards import losses, oracle
from rewards.feedback import ClickLog, UserPopulation, auc, train_engagement
from rewards.preference import (DIMS, META_KEY, PreferenceDataConfig, SamplerSpec, read_preference_data,
                                render_references)
from rewards.reward_model import (PreferencePairs, RewardModelConfig, VideoReward, preference_accuracy,
                                  score_differences, train_reward_model)
from rewards.scorer import ENSEMBLE_FILE, load_videoreward
from rewards.world import all_prompts, heldout_prompts

Loss = Literal["regression", "bt", "btt"]
LOSSES: tuple[str, ...] = Loss.__args__
RAO_KUPPER_K = 5.0  # the BTT tie parameter the losses use (MATH.md §6)


class RewardTrainConfig(BaseModel):
    """How a VideoReward is trained (`rewards.reward_model.train_reward_model`). About 6 minutes per loss at
    the defaults on one (shared) CPU core. 2500 steps, not 1000: at 1000 the model underfits (held-out TA 0.81-0.86
    by seed; 0.90 at 2500 on the same data), and RL exploits what it gets wrong."""

    model_config = ConfigDict(extra="forbid")

    loss: Loss = "btt"
    steps: int = Field(2500, ge=1, description="optimiser steps")
    batch_size: int = Field(32, ge=1, description="pairs per step")
    lr: float = Field(3e-3, gt=0, le=1, description="peak AdamW learning rate (warm-up, then cosine to 0)")
    augment: bool = Field(True, description="random label-preserving world symmetries (colour permutations, mirror)")
    seed: int = 0
    model: RewardModelConfig = Field(default_factory=RewardModelConfig)
    # further losses, one model each on the same data: the run scores with the mean of every model's standardised
    # scores (`ensure_reward_ensemble`); [] = the `loss` model alone
    ensemble: list[Loss] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct_members(self):
        members = [self.loss, *self.ensemble]
        if len(set(members)) != len(members):
            raise ValueError(f"rewards.reward_model.ensemble must name losses other than loss ({self.loss}) and each "
                             f"once, got {self.ensemble}")
        return self


class VideoAlignTrainConfig(BaseModel):
    """How `videorl reward train --model videoalign` fine-tunes a VideoAlign-style VLM reward on the same preference
    data: a tiny random Qwen2-VL (`rewards.videoalign.build_tiny_videoalign`, seeded by `seed`: a 2-layer text model of
    width 64 and one vision block, 0.22 M parameters; the world's 16 x 16 frames upsampled to 56 x 56, every frame,
    VideoAlign's rubric prompt), trained whole with `rewards.videoalign.train_videoalign`. About 3 minutes on one
    shared CPU core at the defaults (0.14 s a step); lr 3e-3 does not learn."""

    model_config = ConfigDict(extra="forbid")

    loss: Loss = "btt"
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(16, ge=1, description="pairs per step")
    lr: float = Field(1e-3, gt=0, le=1, description="peak AdamW learning rate (warm-up, then cosine to 0)")
    seed: int = Field(0, description="the random model and the batches")


class EngagementConfig(BaseModel):
    """Simulated users' click logs and the dense engagement predictor fitted to them (`rewards.feedback`)."""

    model_config = ConfigDict(extra="forbid")

    n_users: int = Field(100, ge=1, description="simulated users (tastes drawn around the population's)")
    log_clips: int = Field(6048, ge=168, description="clips shown to users: base samples + renders + degraded renders")
    impression_rate: float = Field(0.3, gt=0, le=1, description="chance a logged clip got an impression (a click or not)")
    steps: int = Field(400, ge=1, description="predictor training steps")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(3e-3, gt=0, le=1)
    seed: int = Field(0, description="users, clips, impressions and training")
    mix: float = Field(0.5, ge=0, le=1, description="weight of a real click against the dense prediction in R_f")


# ---------------------------------------------------------------- cache keys

def _data_key(data_dir: Path) -> str:
    """Content hash of a preference data directory (what a model trained on it depends on)."""
    return fingerprint(*(file_sha256(data_dir / name) for name in ("pairs.parquet", "pool.parquet", "videos.npy")))


def _publish(tmp: Path, out: Path) -> Path:
    """Rename a finished temporary directory into place, replacing an old `out`."""
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(out)
    return out


def _write_train_json(tmp: Path, train_cfg, loss: str, pairs: int, seconds: float, history: list[float],
                      data_dir: Path) -> None:
    """train.json of a trained reward model: {loss, steps, pairs, seconds, loss_first, loss_final (means over the
    first/last 20 steps), data, config}."""
    (tmp / "train.json").write_text(json.dumps({
        "loss": loss, "steps": train_cfg.steps, "pairs": pairs, "seconds": round(seconds, 1),
        "loss_first": float(np.mean(history[:20])), "loss_final": float(np.mean(history[-20:])),
        "data": str(data_dir), "config": train_cfg.model_copy(update={"loss": loss}).model_dump(mode="json"),
    }, indent=2))


def _fresh_tmp(out: Path) -> Path:
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


# ---------------------------------------------------------------- preference data

def ensure_preference_data(pref_cfg: PreferenceDataConfig, base, cache: Path, mode: str = "causal",
                           steps: int = 8, force: bool = False, progress: bool = True, shift: float = 1.0) -> Path:
    """Directory of oracle-labelled pairs (`rewards.preference` format) for this data config, base policy
    (`orchestrator.pretraining.Base`, by content key), sampling mode and step count; built on first use, then reused."""
    from orchestrator.reward_data import build_preference_dataset  # loads the policy model code

    code = code_version("rewards.preference", "rewards.oracle", "rewards.world", "orchestrator.reward_data", *SAMPLING_CODE)
    out = Path(cache) / f"prefdata-{fingerprint(pref_cfg, base.key, mode, steps, shift, code)}"
    with building(out):
        if force or not (out / "pairs.parquet").is_file():
            start = time.perf_counter()
            # write_preference_data is itself atomic (temp dir + rename)
            info = build_preference_dataset(pref_cfg, base.load().eval(), out, mode=mode, steps=steps,
                                            progress=progress, shift=shift)
            (out / "summary.json").write_text(json.dumps({**info, "seconds": round(time.perf_counter() - start, 1),
                                                          "base_checkpoint": str(base.path)}, indent=2))
    return out


def _split_pairs(data_dir: Path, split: str) -> PreferencePairs:
    ps = read_preference_data(data_dir, split)
    return PreferencePairs(ps.video_a, ps.video_b, ps.prompts, ps.labels, ps.score_a, ps.score_b)


# ---------------------------------------------------------------- reward models

def reward_model_dir(train_cfg: RewardTrainConfig, data_dir: Path, cache: Path, loss: str | None = None) -> Path:
    """Where `ensure_reward_model` keeps the model for (data content, train config, loss)."""
    cfg = train_cfg.model_copy(update={"loss": loss or train_cfg.loss})
    code = code_version("rewards.reward_model", "rewards.losses")
    key = cfg.model_dump(mode="json", exclude={"ensemble"})  # which models a run averages changes none of them
    return Path(cache) / f"reward-{cfg.loss}-{fingerprint(_data_key(Path(data_dir)), key, code)}"


def ensure_reward_model(train_cfg: RewardTrainConfig, data_dir: Path, cache: Path, loss: str | None = None,
                        force: bool = False, progress: bool = True) -> Path:
    """Train (or reuse) a VideoReward on the train split of `data_dir` with `loss` (default train_cfg.loss).

    Returns the model directory: model.safetensors + config.json (`VideoReward.load` reads them) and
    train.json {loss, steps, seconds, loss_first, loss_final (means over the first/last 20 steps), pairs}.
    """
    loss = loss or train_cfg.loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    data_dir = Path(data_dir)
    out = reward_model_dir(train_cfg, data_dir, cache, loss)
    with building(out):
        if not force and (out / "model.safetensors").is_file() and (out / "train.json").is_file():
            return out
        train = _split_pairs(data_dir, "train")
        torch.manual_seed(train_cfg.seed)
        model = VideoReward(train_cfg.model)
        start = time.perf_counter()
        history = train_reward_model(model, train, loss, steps=train_cfg.steps, batch_size=train_cfg.batch_size,
                                     lr=train_cfg.lr, seed=train_cfg.seed, progress=progress, augment=train_cfg.augment)
        seconds = time.perf_counter() - start
        tmp = _fresh_tmp(out)
        model.save(tmp)
        _write_train_json(tmp, train_cfg, loss, len(train), seconds, history, data_dir)
        return _publish(tmp, out)


def ensure_reward_ensemble(train_cfg: RewardTrainConfig, data_dir: Path, cache: Path, force: bool = False,
                           progress: bool = True) -> Path:
    """The `loss` model and one model per `ensemble` loss (each `ensure_reward_model`), copied into one directory
    that `rewards.scorer` reads as one reward: the mean over models of (score − mean) / std, each model's mean and
    std per dimension taken over every clip of the preference data. Cached per member models."""
    data_dir = Path(data_dir)
    members = {loss: ensure_reward_model(train_cfg, data_dir, cache, loss, force=force, progress=progress)
               for loss in (train_cfg.loss, *train_cfg.ensemble)}
    out = Path(cache) / f"reward-ensemble-{fingerprint(*(m.name for m in members.values()))}"
    with building(out):
        if not force and (out / ENSEMBLE_FILE).is_file():
            return out
        prompts = pq.read_table(data_dir / "pool.parquet", columns=["prompt"]).column("prompt").to_pylist()
        videos = np.load(data_dir / "videos.npy")
        tmp, stats = _fresh_tmp(out), {}
        for loss, member in members.items():
            shutil.copytree(member, tmp / loss)
            scores = VideoReward.load(member).score_videos(videos, prompts)
            stats[loss] = {"mean": scores.mean(0).tolist(), "std": scores.std(0).tolist()}
        (tmp / ENSEMBLE_FILE).write_text(json.dumps({"members": stats, "clips": len(prompts)}, indent=2))
        return _publish(tmp, out)


def videoalign_model_dir(train_cfg: VideoAlignTrainConfig, data_dir: Path, cache: Path, loss: str | None = None) -> Path:
    """Where `ensure_videoalign_model` keeps the model for (data content, train config, loss)."""
    cfg = train_cfg.model_copy(update={"loss": loss or train_cfg.loss})
    code = code_version("rewards.videoalign", "rewards.losses", "rewards.reward_model")  # its warm-up schedule, pair batches
    return Path(cache) / f"videoalign-{cfg.loss}-{fingerprint(_data_key(Path(data_dir)), cfg, code)}"


def ensure_videoalign_model(train_cfg: VideoAlignTrainConfig, data_dir: Path, cache: Path, loss: str | None = None,
                            force: bool = False, progress: bool = True) -> Path:
    """Train (or reuse) a tiny VideoAlign VLM reward (see `VideoAlignTrainConfig`) on the train split of `data_dir`.

    Returns the directory in VideoAlign's layout (`save_videoalign_checkpoint`: model.pth, config.json, tokenizer,
    model_config.json), what `kind: videoalign` loads, plus train.json as `ensure_reward_model` writes it."""
    from rewards.videoalign import build_tiny_videoalign, save_videoalign_checkpoint, train_videoalign

    loss = loss or train_cfg.loss
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
    data_dir = Path(data_dir)
    out = videoalign_model_dir(train_cfg, data_dir, cache, loss)
    with building(out):
        if not force and (out / "model.pth").is_file() and (out / "train.json").is_file():
            return out
        train = read_preference_data(data_dir, "train")
        model = build_tiny_videoalign(seed=train_cfg.seed)
        start = time.perf_counter()
        history = train_videoalign(model, train, loss, steps=train_cfg.steps, batch_size=train_cfg.batch_size,
                                   lr=train_cfg.lr, k=RAO_KUPPER_K, seed=train_cfg.seed, progress=progress)
        seconds = time.perf_counter() - start
        tmp = _fresh_tmp(out)
        save_videoalign_checkpoint(model, tmp, base_name="tiny-random-qwen2_vl")
        _write_train_json(tmp, train_cfg, loss, len(train), seconds, history, data_dir)
        return _publish(tmp, out)


@torch.no_grad()
def fit_tie_threshold(delta: np.ndarray, labels: np.ndarray) -> float:
    """The |Δ| threshold that maximises with-ties accuracy on (delta, labels) [N, D]: for a model without a tie
    model of its own (plain BT), fitted on the VALIDATION split. Candidates: 0 and the midpoints of sorted |Δ|."""
    a = np.sort(np.abs(np.asarray(delta, dtype=np.float64)).ravel())
    candidates = np.concatenate([[0.0], (a[1:] + a[:-1]) / 2.0 if len(a) > 1 else a])
    candidates = np.unique(np.quantile(candidates, np.linspace(0, 1, 201)))  # 201 candidates are plenty
    acc = [preference_accuracy(delta, labels, True, float(t))[1] for t in candidates]
    return float(candidates[int(np.argmax(acc))])


def _tie_threshold(loss: str, deltas, data_dir: Path) -> tuple[float, str]:
    """Each loss's own notion of a tie (see `reward_bench`); deltas: PreferencePairs -> r_a - r_b [N, 3]."""
    if loss == "btt":
        return losses.tie_threshold(RAO_KUPPER_K), f"Rao-Kupper k={RAO_KUPPER_K:g}: ln((k^2-2)/k)"
    if loss == "regression":
        raw = (pq.read_schema(data_dir / "pairs.parquet").metadata or {}).get(META_KEY, b"null")
        config = json.loads(raw)
        margin = (config or {}).get("tie_margin", PreferenceDataConfig().tie_margin)
        return float(margin), "the data's tie_margin (regression predicts oracle-scale scores)"
    val = read_preference_data(data_dir, "val")
    if len(val) == 0:
        return 0.0, "no validation pairs: 0"
    pairs = PreferencePairs(val.video_a, val.video_b, val.prompts, val.labels)
    return fit_tie_threshold(deltas(pairs), val.labels), "fitted on the validation split (annotated labels)"


def _scorer(kind: str, directory: Path):
    """A bench model's PreferencePairs -> r_a - r_b [N, 3] (float64)."""
    if kind == "videoalign":
        from rewards import videoalign

        model = videoalign.load_videoalign(directory, device="cpu")
        return lambda pairs: videoalign.score_differences(model, pairs, batch_size=32)
    models, _, std = load_videoreward(Path(directory))  # one model (std 1), or an ensemble's standardised members
    if tuple(models[0].cfg.dims) != DIMS:
        raise ValueError(f"{directory}: the benchmark scores dims {DIMS}, the model has {models[0].cfg.dims}")
    return lambda pairs: np.mean([np.asarray(score_differences(m, pairs, batch_size=256)) / s
                                  for m, s in zip(models, std)], axis=0)


def bench_dirs(train_cfg: RewardTrainConfig, data_dir: Path, cache: Path, losses=LOSSES,
               progress: bool = True) -> dict[str, Path]:
    """The models `reward_bench` compares: {loss: `ensure_reward_model`} for each of `losses`, and "ensemble" (the
    run's reward, `ensure_reward_ensemble`) when `train_cfg.ensemble` names one."""
    dirs = {loss: ensure_reward_model(train_cfg, data_dir, cache, loss=loss, progress=progress) for loss in losses}
    if train_cfg.ensemble:
        dirs["ensemble"] = ensure_reward_ensemble(train_cfg, data_dir, cache, progress=progress)
    return dirs


def reward_bench(model_dirs: dict[str, Path], data_dir: Path, progress: bool = True,
                 videoalign_dirs: dict[str, Path] | None = None) -> tuple[list[dict], dict]:
    """VideoAlign's reward benchmark on the held-out split of `data_dir` for each trained loss.

    model_dirs: {loss: VideoReward directory from `ensure_reward_model`}; videoalign_dirs: {loss: VideoAlign VLM
    directory from `ensure_videoalign_model`}, benched alike (JSON key "videoalign-<loss>"). Returns (rows, result):
    rows, one per (model, loss, ties) with vq, mq, ta, overall (pairwise accuracy); result (JSON-ready) with the same
    numbers, the tie threshold of each model and how it was chosen, accuracy per pair kind and, within a kind, per
    oracle term that decides the pair (`_decisive_terms`), and pair counts.
    Without ties: only pairs whose label is not a tie count; right when sign(Δ) matches. With ties: every
    pair counts; the model predicts a tie when |Δ| is under its tie threshold: BTT's Rao–Kupper threshold,
    regression's data tie margin (its scores are oracle-scale), BT's fitted on the validation split.
    """
    data_dir = Path(data_dir)
    held = read_preference_data(data_dir, "heldout")
    if len(held) == 0:
        raise ValueError(f"{data_dir}: the held-out split has no pairs")
    pairs = PreferencePairs(held.video_a, held.video_b, held.prompts, held.labels)
    kinds = np.asarray(held.kind)
    counts = {"pairs": len(held), "prompts": len(set(held.prompts)),
              "non_tie": {d: int((held.labels[:, j] != 0).sum()) for j, d in enumerate(DIMS)},
              "tie": {d: int((held.labels[:, j] == 0).sum()) for j, d in enumerate(DIMS)},
              "kinds": {k: int((kinds == k).sum()) for k in sorted(set(held.kind))}}
    decisive = _decisive_terms(held)
    rows, models = [], {}
    benched = [("videoreward", loss, d) for loss, d in model_dirs.items()]
    benched += [("videoalign", loss, d) for loss, d in (videoalign_dirs or {}).items()]
    for kind, loss, directory in tqdm(benched, desc="reward bench", unit="model", disable=not progress):
        deltas = _scorer(kind, Path(directory))
        delta = deltas(pairs)
        threshold, source = _tie_threshold(loss, deltas, data_dir)
        entry = {"model": kind, "loss": loss, "dir": str(directory), "tie_threshold": threshold,
                 "tie_threshold_from": source}
        train_info = Path(directory) / "train.json"
        if train_info.is_file():
            entry["train"] = {k: v for k, v in json.loads(train_info.read_text()).items() if k != "config"}
        for with_ties in (False, True):
            per_dim, overall = preference_accuracy(delta, held.labels, with_ties, threshold)
            acc = {**{d: float(a) for d, a in zip(DIMS, per_dim)}, "overall": float(overall)}
            entry["with_ties" if with_ties else "without_ties"] = acc
            rows.append({"model": kind, "loss": loss, "ties": "with" if with_ties else "without", **acc})
        entry["without_ties_by_kind"], entry["without_ties_by_kind_term"] = {}, {}
        for k in counts["kinds"]:
            per_dim, overall = preference_accuracy(delta[kinds == k], held.labels[kinds == k], False, threshold)
            entry["without_ties_by_kind"][k] = {**{d: _json_float(a) for d, a in zip(DIMS, per_dim)},
                                                "overall": _json_float(overall)}
            entry["without_ties_by_kind_term"][k] = _accuracy_by_term(delta, held.labels, decisive, kinds == k)
        models[loss if kind == "videoreward" else f"{kind}-{loss}"] = entry
    return rows, {"data": str(data_dir), "split": "heldout", "counts": counts, "models": models}


def _decisive_terms(held) -> dict[str, np.ndarray]:
    """{dim: [N] index into `oracle.TERMS[dim]`}: the oracle term whose value differs most between a pair's clips,
    the one that decides the pair's label on that dimension (e.g. speed for most MQ pairs of two base samples)."""
    a, b = oracle.score_terms(held.video_a, held.prompts), oracle.score_terms(held.video_b, held.prompts)
    return {d: np.stack([np.abs(a[t] - b[t]) for t in oracle.TERMS[d]], 1).argmax(1) for d in DIMS}


def _accuracy_by_term(delta: np.ndarray, labels: np.ndarray, decisive: dict[str, np.ndarray],
                      rows: np.ndarray) -> dict[str, dict[str, dict]]:
    """{dim: {term: {"accuracy", "pairs"}}} over the non-tie pairs in `rows` that the term decides (accuracy None
    where it decides none)."""
    out = {}
    for j, d in enumerate(DIMS):
        out[d] = {}
        for i, term in enumerate(oracle.TERMS[d]):
            m = rows & (decisive[d] == i)
            per_dim, _ = preference_accuracy(delta[m], labels[m], False, 0.0)
            out[d][term] = {"accuracy": _json_float(per_dim[j]), "pairs": int((labels[m, j] != 0).sum())}
    return out


def _json_float(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def seed_summary(per_seed_rows: list[list[dict]]) -> list[dict]:
    """Rows of `reward_bench` from several seeds -> one row per (loss, ties) with, for each of vq, mq, ta and
    overall, `<dim>_mean`, `<dim>_std` (sample std, ddof = 1; 0 for one seed) and `<dim>_min` over the seeds.
    Every seed must have the same (loss, ties) rows in the same order."""
    if not per_seed_rows:
        raise ValueError("seed_summary: no seeds")
    keys = [(r["loss"], r["ties"]) for r in per_seed_rows[0]]
    if any([(r["loss"], r["ties"]) for r in rows] != keys for rows in per_seed_rows):
        raise ValueError("seed_summary: every seed must bench the same losses")
    out = []
    for i, (loss, ties) in enumerate(keys):
        row = {"loss": loss, "ties": ties, "seeds": len(per_seed_rows)}
        for d in (*DIMS, "overall"):
            values = np.array([rows[i][d] for rows in per_seed_rows], dtype=np.float64)
            row[f"{d}_mean"] = float(values.mean())
            row[f"{d}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
            row[f"{d}_min"] = float(values.min())
        out.append(row)
    return out


def reward_bench_seeds(rewards_cfg, base, cache: Path, seeds: int, losses=LOSSES, mode: str = "causal",
                       steps: int = 8, shift: float = 1.0, progress: bool = True) -> tuple[list[dict], dict]:
    """`reward_bench` over `seeds` seeds: seed i (0, 1, ...) builds its own preference data
    (`rewards_cfg.preference.seed + i`: pool renders, degradations, pairs, annotator noise) and trains its own
    models (`rewards_cfg.reward_model.seed + i`: init, batches, augmentation); the base model is shared (its
    pretraining is the expensive part). Seed 0 is exactly the single-seed bench, cached alike.

    rewards_cfg: an `orchestrator.config.RewardsConfig`. Returns (summary rows of `seed_summary`, result):
    result = {"seeds": [{"preference_seed", "reward_model_seed", "rows", **reward_bench's result}, ...],
    "summary": the summary rows}, JSON-ready.
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    per_seed, runs = [], []
    for i in range(seeds):
        pref = rewards_cfg.preference.model_copy(update={"seed": rewards_cfg.preference.seed + i})
        train = rewards_cfg.reward_model.model_copy(update={"seed": rewards_cfg.reward_model.seed + i})
        data = ensure_preference_data(pref, base, cache, mode, steps, progress=progress, shift=shift)
        rows, result = reward_bench(bench_dirs(train, data, cache, losses, progress), data, progress=progress)
        per_seed.append(rows)
        runs.append({"preference_seed": pref.seed, "reward_model_seed": train.seed, "rows": rows, **result})
    summary = seed_summary(per_seed)
    return summary, {"seeds": runs, "summary": summary}


# ---------------------------------------------------------------- engagement predictor

def engagement_logs(eng_cfg: EngagementConfig, base, mode: str = "causal", steps: int = 8,
                    progress: bool = True, shift: float = 1.0) -> dict:
    """The clips shown to users and what they did: {"videos": uint8 [N, T, H, W, 3], "prompts": [N],
    "heldout": bool [N] (clip of a held-out prompt), "clicks": float32 [N] (1/0, NaN = no impression),
    "users": int [N] (-1 = none), "p_click": float [N] (that user's true click probability, NaN = none)}.

    Per world prompt, about a third of its clips are base-model samples (the rollout sampler, sage η 0.7,
    and ode), one is a true render and the rest degraded renders; N ≈ log_clips (rounded to whole prompts).
    """
    from orchestrator.reward_data import sample_base_pool

    prompts = [p.text for p in all_prompts()]
    per_prompt = max(3, -(-eng_cfg.log_clips // len(prompts)))
    n_base = max(2, per_prompt // 3) // 2 * 2  # an even count: half per sampler
    pool_cfg = PreferenceDataConfig(samples_per_prompt=n_base // 2, seed=eng_cfg.seed,
                                    samplers=[SamplerSpec(sde_type="sage", eta=0.7), SamplerSpec(sde_type="ode")])
    model = base.load().eval()
    samples, base_meta = sample_base_pool(model, prompts, pool_cfg, mode=mode, steps=steps, progress=progress,
                                          shift=shift)
    rng = np.random.default_rng([eng_cfg.seed, 7])
    refs, ref_meta = render_references(prompts, per_prompt - n_base - 1, rng, model.shape.video_frames,
                                       model.shape.video_height)
    videos = np.concatenate([samples, refs])
    texts = base_meta["prompt"] + ref_meta["prompt"]
    users = UserPopulation(seed=eng_cfg.seed, n_users=eng_cfg.n_users)
    # impressions() draws who saw what; redo its draw here to also keep the user and their click probability
    shown = rng.random(len(videos)) < eng_cfg.impression_rate
    who = np.full(len(videos), -1)
    who[shown] = rng.integers(0, users.n_users, size=int(shown.sum()))
    p_click = np.full(len(videos), np.nan)
    clicks = np.full(len(videos), np.nan, dtype=np.float32)
    if shown.any():
        p_click[shown] = users.click_probability(videos[shown], who[shown])
        clicks[shown] = (rng.random(int(shown.sum())) < p_click[shown]).astype(np.float32)
    held = {p.text for p in heldout_prompts()}
    return {"videos": videos, "prompts": texts, "heldout": np.array([t in held for t in texts]), "clicks": clicks,
            "users": who, "p_click": p_click}


def ensure_engagement_model(eng_cfg: EngagementConfig, base, cache: Path, force: bool = False,
                            progress: bool = True, mode: str = "causal", steps: int = 8,
                            shift: float = 1.0) -> tuple[Path, dict]:
    """Fit (or reuse) the dense engagement predictor on click logs of clips of TRAINING prompts and measure it on
    the logs of held-out prompts. Returns (directory with model.safetensors and engagement.json, metrics):
    held-out ROC AUC of the predictor, of a constant predictor (0.5 by construction, computed with `auc`),
    of the true click probability of the user who saw each clip (the ceiling), and of the population-average
    click probability (the ceiling for a predictor that does not know the user), plus counts and seconds.
    """
    code = code_version("rewards.feedback", "rewards.world", "rewards.preference", "orchestrator.reward_data",
                        "orchestrator.reward_training", *SAMPLING_CODE)
    out = Path(cache) / f"engagement-{fingerprint(eng_cfg, base.key, mode, steps, shift, code)}"
    with building(out):
        if not force and (out / "model.safetensors").is_file() and (out / "engagement.json").is_file():
            return out, json.loads((out / "engagement.json").read_text())
        start = time.perf_counter()
        logs = engagement_logs(eng_cfg, base, mode, steps, progress, shift)
        seen = ~np.isnan(logs["clicks"])
        train, test = seen & ~logs["heldout"], seen & logs["heldout"]
        if len(set(logs["clicks"][test].tolist())) < 2 or len(set(logs["clicks"][train].tolist())) < 2:
            raise ValueError("engagement logs need clicks and non-clicks in both the training and held-out impressions; "
                             "raise log_clips or impression_rate")
        predictor = train_engagement(ClickLog(logs["videos"][train], logs["clicks"][train]), steps=eng_cfg.steps,
                                     batch_size=eng_cfg.batch_size, lr=eng_cfg.lr, seed=eng_cfg.seed, progress=progress)
        labels = logs["clicks"][test].astype(np.int64)
        metrics = {
            "auc_predictor": auc(predictor.predict(logs["videos"][test]), labels),
            "auc_constant": auc(np.full(len(labels), 0.5), labels),
            "auc_true_probability": auc(logs["p_click"][test], labels),
            # the best a predictor that does not know WHICH user saw the clip can hope for
            "auc_population_probability": auc(UserPopulation(eng_cfg.seed, eng_cfg.n_users).click_probability(
                logs["videos"][test]), labels),
            "train_impressions": int(train.sum()), "heldout_impressions": int(test.sum()),
            "clips": len(logs["clicks"]), "click_rate": float(np.nanmean(logs["clicks"])),
            "seconds": round(time.perf_counter() - start, 1), "mix": eng_cfg.mix,
            "config": eng_cfg.model_dump(mode="json"), "base_checkpoint": str(base.path),
        }
        tmp = _fresh_tmp(out)
        predictor.save(tmp / "model.safetensors")
        (tmp / "engagement.json").write_text(json.dumps(metrics, indent=2))
        return _publish(tmp, out), metrics
