"""Preference data for the reward models: oracle-labelled pairs of videos of one prompt (VideoAlign style).

The pool holds, per world prompt, videos of four sources:
- "base": clips of the base (SFT) generator, `samples_per_prompt` per configured sampler (sde_type, eta);
- "truth": one true render (`rewards.world.render`, random start);
- "degraded": `degraded_per_prompt` true renders (each its own random start) corrupted by
  `rewards.world.degrade`, kinds drawn without repetition per prompt (cycling when more are asked
  than there are kinds), strength uniform in `strength`.
- "damaged": `damaged_per_prompt` base clips of the prompt corrupted the same way (the clips taken in a
  random order, cycling): the flaws RL drifts into (a vanishing object, a second object, a changed shape or
  colour, a larger or faster object) shown on the base model's own kind of video, so a reward model learns
  them where the policy samples, not only on crisp true renders.
Every pool video is stored as uint8 and scored by the oracle (`rewards.oracle.score_batch`) AS STORED,
so labels describe exactly the pixels a reward model will see.

Pairs (`make_pairs`) join two distinct videos of the same prompt; their kinds mix
base-base (samples of one prompt, any samplers), base-degraded, degraded-degraded (different
kinds/strengths), truth-base, truth-degraded and base-damaged in the proportions of `pair_mix`.

Labels (`label_pairs`), per dimension d in (VQ, MQ, TA), with Δ = oracle_a[d] - oracle_b[d]:
+1 (a better) if Δ >= tie_margin, -1 if Δ <= -tie_margin, 0 (tie) if |Δ| < tie_margin.
Annotator noise: each (pair, dimension) label is, independently with probability `label_noise`,
replaced by one of the OTHER two labels chosen uniformly (so exactly a `label_noise` share of labels
is wrong in expectation, and a wrong label is as often a tie as a reversed preference).

Splits are by prompt (`split_of`): "heldout" = `rewards.world.heldout_prompts()` (combinations the
generator never trained on), "val" = a fixed share of the training prompts, the rest "train".
Held-out pairs are "expert annotated": their labels are the noise-free oracle labels. Train and val
carry annotator noise (val measures what a trainer sees; held-out measures the truth).

On disk (`write_preference_data`, one directory, written atomically):
- videos.npy: the pool, uint8 [N, T, H, W, 3] (np.save);
- pool.parquet: one row per pool video: index, prompt, source, sampler, eta, degradation, strength,
  vq, mq, ta, overall (oracle, float32);
- pairs.parquet: one row per pair: pair_id, prompt, split, kind, index_a, index_b, source_a, source_b,
  vq_a, mq_a, ta_a, vq_b, mq_b, ta_b (oracle, float32), label_vq, label_mq, label_ta (int8, what
  annotators said) and oracle_label_vq/mq/ta (int8, the noise-free labels); the generating config is in
  the schema metadata.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewards.oracle import score_batch
from rewards.world import DEGRADATIONS, as_prompt, degrade, heldout_prompts, random_start, render, to_uint8, train_prompts

DIMS = ("vq", "mq", "ta")
SOURCES = ("base", "truth", "degraded", "damaged")
SPLITS = ("train", "val", "heldout")
PairKind = Literal["base-base", "base-degraded", "degraded-degraded", "truth-base", "truth-degraded",
                   "base-damaged"]
PAIR_KINDS: tuple[str, ...] = PairKind.__args__
DEFAULT_MIX = {"base-base": 0.3, "base-degraded": 0.25, "degraded-degraded": 0.2, "truth-base": 0.15,
               "truth-degraded": 0.1}  # make_pairs' default
# PreferenceDataConfig's default: truth-degraded and degraded-degraded pairs are where one property (colour,
# direction, speed, smoothness) differs while the others do not; a learned reward model needs many of them
# to learn alignment rather than "clean looks good" (orchestrator/reward_training.py's benchmark measures it).
# base-damaged pairs (only with damaged_per_prompt > 0, off by default) put the same flaws on base samples: they
# lift the bench's base-base accuracy on persistence, colour and shape, but RL did not gain more (README).
DATA_MIX = {"base-base": 0.15, "base-degraded": 0.15, "degraded-degraded": 0.25, "truth-base": 0.1,
            "truth-degraded": 0.35, "base-damaged": 0.2}
# The same names as policy.sde.SDE_TYPES, spelled out so this module needs no torch.
SDEType = Literal["ode", "flow_grpo", "dance_grpo", "sage", "cps"]
POOL_COLUMNS = ("prompt", "source", "sampler", "eta", "degradation", "strength", "vq", "mq", "ta", "overall")
META_KEY = b"videorl.preference_config"


class SamplerSpec(BaseModel):
    """One way to sample the base model. YAML: `{sde_type: sage, eta: 0.7}` or `[sage, 0.7]`."""

    model_config = ConfigDict(extra="forbid")

    sde_type: SDEType
    eta: float = Field(0.0, ge=0.0, le=10.0, description="SDE noise level (the sampler's temperature)")

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value):
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"a sampler is [sde_type, eta] or {{sde_type: ..., eta: ...}}, got {value!r}")
            return {"sde_type": value[0], "eta": value[1]}
        return value

    @model_validator(mode="after")
    def _ode_is_deterministic(self) -> "SamplerSpec":
        if self.sde_type == "ode" and self.eta != 0:
            raise ValueError(f"the ode sampler is deterministic: eta must be 0, got {self.eta}")
        return self


class PreferenceDataConfig(BaseModel):
    """What `videorl reward data` builds (see the module docstring). Defaults: 168 prompts x 23 videos
    (6 base samples, 1 true and 16 degraded renders, no damaged copies), 48 pairs per prompt (8064 pairs); about
    half a minute on 2 CPU cores with the default base model."""

    model_config = ConfigDict(extra="forbid")

    samples_per_prompt: int = Field(2, ge=1, description="base-model clips per prompt per sampler")
    samplers: list[SamplerSpec] = Field(
        default_factory=lambda: [SamplerSpec(sde_type="ode", eta=0.0), SamplerSpec(sde_type="sage", eta=0.7),
                                 SamplerSpec(sde_type="flow_grpo", eta=1.0)],
        min_length=1, description="base-model samplers, each [sde_type, eta]")
    degraded_per_prompt: int = Field(16, ge=0, description="degraded true renders per prompt")
    damaged_per_prompt: int = Field(0, ge=0, description="degraded copies of base samples per prompt")
    degradations: list[Literal[DEGRADATIONS]] = Field(default_factory=lambda: list(DEGRADATIONS), min_length=1,
                                                       description="degradation kinds to draw from")
    strength: tuple[float, float] = Field((0.25, 1.0), description="degradation strength range [low, high]")
    pairs_per_prompt: int = Field(48, ge=1, description="pairs per prompt (fewer if the pool has fewer)")
    pair_mix: dict[PairKind, float] = Field(default_factory=lambda: dict(DATA_MIX),
                                            description="relative share of each pair kind")
    tie_margin: float = Field(0.05, ge=0.0, lt=1.0, description="|oracle difference| below this is a tie")
    label_noise: float = Field(0.1, ge=0.0, le=0.5, description="annotator noise rate (train/val only)")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="share of training prompts used for validation")
    seed: int = 0

    @field_validator("samplers")
    @classmethod
    def _distinct_samplers(cls, value: list[SamplerSpec]) -> list[SamplerSpec]:
        keys = [(s.sde_type, s.eta) for s in value]
        if len(set(keys)) != len(keys):
            raise ValueError(f"samplers repeat: {keys}")
        return value

    @field_validator("strength")
    @classmethod
    def _strength_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not 0.0 <= value[0] <= value[1] <= 1.0:
            raise ValueError(f"strength must be [low, high] with 0 <= low <= high <= 1, got {list(value)}")
        return value

    @field_validator("pair_mix")
    @classmethod
    def _mix(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not (w >= 0 and np.isfinite(w)) for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError(f"pair_mix weights must be finite, >= 0 and not all 0, got {value}")
        return value


# ---------------------------------------------------------------- labels and splits

def label_pairs(scores_a: np.ndarray, scores_b: np.ndarray, tie_margin: float, label_noise: float,
                rng: np.random.Generator) -> np.ndarray:
    """Preference labels from oracle scores [N, D] of a and b -> int8 [N, D] in {+1, -1, 0}.

    Δ = a - b; +1 if Δ >= tie_margin, -1 if Δ <= -tie_margin, else 0 (tie; Δ = 0 is a tie even at
    tie_margin 0). Then, independently per
    entry with probability `label_noise`, the label is replaced by one of the other two, uniformly.
    """
    a, b = np.asarray(scores_a, dtype=np.float64), np.asarray(scores_b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"expected scores_a and scores_b of one shape [N, D], got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores contain NaN or inf")
    if not 0.0 <= tie_margin:
        raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise}")
    delta = a - b
    labels = np.where(np.abs(delta) < tie_margin, 0, np.sign(delta)).astype(np.int64)  # Δ = 0 is always a tie
    if label_noise > 0:
        flip = rng.random(labels.shape) < label_noise
        shift = rng.integers(1, 3, size=labels.shape)  # +1 or +2 (mod 3): one of the other two labels
        labels = np.where(flip, (labels + 1 + shift) % 3 - 1, labels)
    return labels.astype(np.int8)


@lru_cache(maxsize=None)
def _val_prompts(val_fraction: float) -> frozenset[str]:
    """round(val_fraction x 144) training prompts: those whose text has the smallest sha256 (no RNG)."""
    texts = sorted((p.text for p in train_prompts()), key=lambda t: hashlib.sha256(t.encode()).hexdigest())
    return frozenset(texts[: int(round(val_fraction * len(texts)))])


def split_of(prompt, val_fraction: float = 0.1) -> str:
    """"heldout" for `heldout_prompts()`, "val" for a fixed `val_fraction` of the training prompts, else "train"."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    p = as_prompt(prompt)
    if p in set(heldout_prompts()):
        return "heldout"
    return "val" if p.text in _val_prompts(float(val_fraction)) else "train"


# ---------------------------------------------------------------- the pool and its pairs

def _cycled(items: list, n: int, rng: np.random.Generator) -> list:
    """At least n of `items`: random orders of all of them, one after another (none twice before all once)."""
    return [x for _ in range(-(-n // len(items))) for x in rng.permutation(items)]


def render_references(prompts: list[str], degraded_per_prompt: int, rng: np.random.Generator, frames: int = 8,
                      size: int = 16, kinds=DEGRADATIONS, strength: tuple[float, float] = (0.25, 1.0)):
    """Per prompt one true render and `degraded_per_prompt` degraded renders (module docstring).

    Returns (uint8 [P x (1 + degraded_per_prompt), frames, size, size, 3], pool columns without oracle scores:
    prompt, source, sampler "", eta 0, degradation (kind or ""), strength (0 for the truth)).
    """
    kinds = list(kinds)
    videos, meta = [], {k: [] for k in POOL_COLUMNS[:6]}
    for text in prompts:
        prompt = as_prompt(text)
        order = _cycled(kinds, degraded_per_prompt, rng)
        for j in range(1 + degraded_per_prompt):
            clip = render(prompt, random_start(prompt, rng, frames, size), frames, size)
            kind, s = ("", 0.0) if j == 0 else (str(order[j - 1]), float(rng.uniform(*strength)))
            videos.append(to_uint8(clip if j == 0 else degrade(clip, kind, s, rng)))
            for key, value in zip(meta, (prompt.text, "truth" if j == 0 else "degraded", "", 0.0, kind, s)):
                meta[key].append(value)
    shape = (0, frames, size, size, 3)
    return (np.stack(videos) if videos else np.zeros(shape, np.uint8)), meta


def damage_base(videos: np.ndarray, prompts: list[str], per_prompt: int, rng: np.random.Generator,
                kinds=DEGRADATIONS, strength: tuple[float, float] = (0.25, 1.0)):
    """Per prompt, `per_prompt` of its base clips (a random order, cycling) corrupted by `rewards.world.degrade`,
    kinds drawn without repetition (cycling), strength uniform in `strength`.

    videos: uint8 [N, T, H, W, 3], prompts: N texts. Returns (uint8 [P x per_prompt, T, H, W, 3], pool columns
    prompt, source "damaged", sampler "", eta 0, degradation, strength).
    """
    kinds = list(kinds)
    by_prompt: dict[str, list[int]] = {}
    for i, text in enumerate(prompts):
        by_prompt.setdefault(text, []).append(i)
    out, meta = [], {k: [] for k in POOL_COLUMNS[:6]}
    for text, rows in by_prompt.items():
        order, clips = _cycled(kinds, per_prompt, rng), _cycled(rows, per_prompt, rng)
        for j in range(per_prompt):
            s = float(rng.uniform(*strength))
            out.append(to_uint8(degrade(videos[clips[j]], str(order[j]), s, rng)))
            for key, value in zip(meta, (text, "damaged", "", 0.0, str(order[j]), s)):
                meta[key].append(value)
    return (np.stack(out) if out else np.zeros((0, *np.shape(videos)[1:]), np.uint8)), meta


def score_pool(videos: np.ndarray, pool: dict) -> dict:
    """Pool columns with the oracle's vq, mq, ta, overall (float32 [N]) of the uint8 videos [N, T, H, W, 3] added."""
    scores = score_batch(videos, list(pool["prompt"]))
    return {**pool, **{k: scores[k].astype(np.float32) for k in ("vq", "mq", "ta", "overall")}}


def _allocate(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of `total` over kinds in proportion to `weights` (ties: PAIR_KINDS order)."""
    w = np.array([weights.get(k, 0.0) for k in PAIR_KINDS], dtype=np.float64)
    if w.sum() <= 0:
        return dict.fromkeys(PAIR_KINDS, 0)
    exact = total * w / w.sum()
    count = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - count), kind="stable")[: total - count.sum()]:
        count[i] += 1
    return dict(zip(PAIR_KINDS, count.tolist()))


def make_pairs(prompts, sources, pairs_per_prompt: int, rng: np.random.Generator,
               mix: dict[str, float] | None = None) -> tuple[np.ndarray, list[str]]:
    """Pairs of distinct pool videos of the same prompt -> (int64 [M, 2] pool indices (a, b), kind per pair).

    prompts, sources: per pool video (sources in SOURCES). Per prompt (first-appearance order),
    `pairs_per_prompt` distinct unordered pairs: the count is split over pair kinds by `mix` (largest
    remainder); kinds the prompt's pool cannot fill hand their share to the others' unused candidates;
    with fewer candidates than asked, all are taken. Within a pair, a/b order is a fair coin.
    """
    prompts, sources = list(prompts), list(sources)
    if len(prompts) != len(sources):
        raise ValueError(f"expected one source per video: {len(prompts)} prompts, {len(sources)} sources")
    if bad := sorted(set(sources) - set(SOURCES)):
        raise ValueError(f"unknown sources {bad}; expected {list(SOURCES)}")
    if pairs_per_prompt < 1:
        raise ValueError(f"pairs_per_prompt must be >= 1, got {pairs_per_prompt}")
    mix = DEFAULT_MIX if mix is None else mix
    if bad := sorted(set(mix) - set(PAIR_KINDS)):
        raise ValueError(f"unknown pair kinds {bad}; expected {list(PAIR_KINDS)}")
    by_prompt: dict[str, dict[str, list[int]]] = {}
    for i, (p, s) in enumerate(zip(prompts, sources)):
        by_prompt.setdefault(p, {k: [] for k in SOURCES})[s].append(i)
    out, kinds = [], []
    for groups in by_prompt.values():
        cands = {}
        for kind in PAIR_KINDS:
            a, b = kind.split("-")
            pool = itertools.combinations(groups[a], 2) if a == b else itertools.product(groups[a], groups[b])
            cands[kind] = [tuple(c) for c in rng.permutation(list(pool))] if mix.get(kind, 0) > 0 else []
        quota = _allocate(pairs_per_prompt, {k: mix.get(k, 0.0) for k in PAIR_KINDS if cands[k]})
        chosen = [(k, c) for k in PAIR_KINDS for c in cands[k][: quota[k]]]
        spare = [(k, c) for k in PAIR_KINDS for c in cands[k][quota[k]:]]
        short = pairs_per_prompt - len(chosen)
        if short > 0 and spare:
            chosen += [spare[i] for i in sorted(rng.choice(len(spare), min(short, len(spare)), replace=False))]
        for kind, (i, j) in chosen:
            out.append((i, j) if rng.random() < 0.5 else (j, i))
            kinds.append(kind)
    return np.asarray(out, dtype=np.int64).reshape(-1, 2), kinds


def pair_table(pool: dict, cfg: PreferenceDataConfig) -> dict:
    """Pairs of a scored pool with labels: {"index": int64 [M, 2], "kind": [M], "split": [M],
    "labels": int8 [M, 3] (annotated: noisy on train/val, noise-free on heldout), "oracle_labels": int8 [M, 3]}."""
    index, kinds = make_pairs(pool["prompt"], pool["source"], cfg.pairs_per_prompt,
                              np.random.default_rng([cfg.seed, 1]), cfg.pair_mix)
    scores = np.stack([np.asarray(pool[d], dtype=np.float32) for d in DIMS], 1)
    split_by_prompt = {p: split_of(p, cfg.val_fraction) for p in set(pool["prompt"])}
    split = np.array([split_by_prompt[pool["prompt"][i]] for i in index[:, 0]], dtype=object)
    rng = np.random.default_rng([cfg.seed, 2])
    clean = label_pairs(scores[index[:, 0]], scores[index[:, 1]], cfg.tie_margin, 0.0, rng)
    labels = clean.copy()
    annotated = split != "heldout"  # held-out pairs are expert annotated: no noise
    labels[annotated] = label_pairs(scores[index[annotated, 0]], scores[index[annotated, 1]],
                                    cfg.tie_margin, cfg.label_noise, rng)
    return {"index": index, "kind": kinds, "split": split.tolist(), "labels": labels, "oracle_labels": clean}


# ---------------------------------------------------------------- disk format

def _check_pool(videos: np.ndarray, pool: dict) -> int:
    if not (isinstance(videos, np.ndarray) and videos.dtype == np.uint8 and videos.ndim == 5 and videos.shape[-1] == 3):
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got {getattr(videos, 'dtype', type(videos))} "
                         f"{getattr(videos, 'shape', '')}")
    missing = [c for c in POOL_COLUMNS if c not in pool]
    if missing:
        raise ValueError(f"pool metadata lacks columns {missing}; expected {list(POOL_COLUMNS)}")
    for c in POOL_COLUMNS:
        if len(pool[c]) != len(videos):
            raise ValueError(f"pool column {c!r} has {len(pool[c])} rows, expected {len(videos)} (one per video)")
    return len(videos)


def write_preference_data(out_dir, videos: np.ndarray, pool: dict, pairs: dict,
                          config: PreferenceDataConfig | None = None) -> Path:
    """Write videos.npy, pool.parquet and pairs.parquet (module docstring) into `out_dir`, atomically.

    videos: uint8 [N, T, H, W, 3]; pool: columns POOL_COLUMNS, N rows each (`score_pool`);
    pairs: `pair_table` output. The directory appears complete or not at all (temp dir + rename);
    an existing `out_dir` is replaced.
    """
    n = _check_pool(videos, pool)
    index = np.asarray(pairs["index"], dtype=np.int64)
    m = len(index)
    labels, clean = np.asarray(pairs["labels"]), np.asarray(pairs["oracle_labels"])
    if index.shape != (m, 2) or labels.shape != (m, 3) or clean.shape != (m, 3):
        raise ValueError(f"pairs: expected index [M, 2] and labels [M, 3], got {index.shape} and {labels.shape}")
    if m and (index.min() < 0 or index.max() >= n):
        raise ValueError(f"pairs: indices must lie in [0, {n}), got [{index.min()}, {index.max()}]")
    if not (np.isin(labels, (-1, 0, 1)).all() and np.isin(clean, (-1, 0, 1)).all()):
        raise ValueError("pairs: labels must be -1, 0 or +1")
    if len(pairs["split"]) != m or len(pairs["kind"]) != m or not set(pairs["split"]) <= set(SPLITS):
        raise ValueError(f"pairs: need a split in {list(SPLITS)} and a kind for each of the {m} pairs")
    prompt = np.asarray(pool["prompt"], dtype=object)
    if m and (prompt[index[:, 0]] != prompt[index[:, 1]]).any():
        raise ValueError("pairs: both videos of a pair must answer the same prompt")
    source = np.asarray(pool["source"], dtype=object)

    pool_table = pa.table({"index": pa.array(np.arange(n), pa.int64()),
                           **{c: pa.array(list(pool[c]), pa.string()) for c in POOL_COLUMNS[:3]},
                           "eta": pa.array(np.asarray(pool["eta"], np.float32)),
                           "degradation": pa.array(list(pool["degradation"]), pa.string()),
                           **{c: pa.array(np.asarray(pool[c], np.float32)) for c in POOL_COLUMNS[5:]}})
    columns = {"pair_id": pa.array(np.arange(m), pa.int64()),
               "prompt": pa.array(prompt[index[:, 0]].tolist(), pa.string()),
               "split": pa.array(list(pairs["split"]), pa.string()),
               "kind": pa.array(list(pairs["kind"]), pa.string()),
               "index_a": pa.array(index[:, 0]), "index_b": pa.array(index[:, 1]),
               "source_a": pa.array(source[index[:, 0]].tolist(), pa.string()),
               "source_b": pa.array(source[index[:, 1]].tolist(), pa.string())}
    for side, col in (("a", 0), ("b", 1)):
        for d in DIMS:
            columns[f"{d}_{side}"] = pa.array(np.asarray(pool[d], np.float32)[index[:, col]])
    for j, d in enumerate(DIMS):
        columns[f"label_{d}"] = pa.array(labels[:, j].astype(np.int8))
    for j, d in enumerate(DIMS):
        columns[f"oracle_label_{d}"] = pa.array(clean[:, j].astype(np.int8))
    meta = {META_KEY: (config.model_dump_json() if config is not None else "null").encode()}
    pairs_table = pa.table(columns).replace_schema_metadata(meta)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        np.save(tmp / "videos.npy", videos)
        pq.write_table(pool_table, tmp / "pool.parquet")
        pq.write_table(pairs_table, tmp / "pairs.parquet")
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
        tmp.rename(out_dir)  # readers see the old directory or the new one, never half of one
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


PAIR_COLUMNS = ("pair_id", "prompt", "split", "kind", "index_a", "index_b", "source_a", "source_b",
                *(f"{d}_{s}" for s in "ab" for d in DIMS), *(f"label_{d}" for d in DIMS),
                *(f"oracle_label_{d}" for d in DIMS))


def _read_table(path: Path, required) -> pa.Table:
    if not path.is_file():
        raise ValueError(f"preference data: missing file {path}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"preference data: corrupt file {path}: {e}") from e
    missing = [c for c in required if c not in table.column_names]
    if missing:
        raise ValueError(f"preference data: {path} lacks columns {missing}")
    return table


def _read_videos(path: Path, rows: int) -> np.ndarray:
    if not path.is_file():
        raise ValueError(f"preference data: missing file {path}")
    try:
        videos = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"preference data: corrupt file {path}: {e}") from e
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3 or len(videos) != rows:
        raise ValueError(f"preference data: {path} must hold uint8 [N={rows}, T, H, W, 3] (one per pool row), "
                         f"got {videos.dtype} {videos.shape}")
    return videos


@dataclass
class PairSet:
    """Labelled pairs of one split, N pairs (the fields `rewards.reward_model.PreferencePairs` takes).

    video_a, video_b: uint8 [N, T, H, W, 3], gathered from the pool by index (copies).
    prompts: N prompt texts (both videos answer it). labels: int8 [N, 3] (VQ, MQ, TA) in {+1: a better,
    -1: b better, 0: tie}, as annotated (noise on train/val). score_a, score_b: float32 [N, 3] oracle scores.
    oracle_labels: int8 [N, 3], the noise-free labels. pair_id, source_a, source_b, kind: bookkeeping.
    Also a read-only mapping of its fields, so `dict(pairset)` and `PreferencePairs(**...)` work.
    """

    video_a: np.ndarray
    video_b: np.ndarray
    prompts: list[str]
    labels: np.ndarray
    score_a: np.ndarray
    score_b: np.ndarray
    oracle_labels: np.ndarray
    pair_id: np.ndarray
    source_a: list[str]
    source_b: list[str]
    kind: list[str]

    def __len__(self) -> int:
        return len(self.prompts)

    def keys(self) -> list[str]:
        return [f.name for f in fields(self)]

    def __getitem__(self, name: str):
        if name not in self.keys():
            raise KeyError(name)
        return getattr(self, name)


def read_preference_data(out_dir, split: Literal["train", "val", "heldout", "all"]) -> PairSet:
    """Pairs of `split` ("all" for every pair) from a directory written by `write_preference_data`.

    A missing or corrupt file, a missing column, an index outside the pool or a label outside
    {-1, 0, 1} is a ValueError naming the file.
    """
    if split not in (*SPLITS, "all"):
        raise ValueError(f"split must be one of {[*SPLITS, 'all']}, got {split!r}")
    out_dir = Path(out_dir)
    pairs_path, pool_path = out_dir / "pairs.parquet", out_dir / "pool.parquet"
    table = _read_table(pairs_path, PAIR_COLUMNS)
    pool = _read_table(pool_path, ("index", *POOL_COLUMNS))
    videos = _read_videos(out_dir / "videos.npy", pool.num_rows)
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS}
    keep = np.ones(table.num_rows, bool) if split == "all" else cols["split"] == split
    cols = {c: v[keep] for c, v in cols.items()}
    ia, ib = cols["index_a"].astype(np.int64), cols["index_b"].astype(np.int64)
    if len(ia) and (min(ia.min(), ib.min()) < 0 or max(ia.max(), ib.max()) >= len(videos)):
        raise ValueError(f"preference data: {pairs_path} has pool indices outside [0, {len(videos)})")
    labels = np.stack([cols[f"label_{d}"] for d in DIMS], 1).astype(np.int8)
    clean = np.stack([cols[f"oracle_label_{d}"] for d in DIMS], 1).astype(np.int8)
    if not (np.isin(labels, (-1, 0, 1)).all() and np.isin(clean, (-1, 0, 1)).all()):
        raise ValueError(f"preference data: {pairs_path} has labels outside {{-1, 0, 1}}")
    score_a = np.stack([cols[f"{d}_a"] for d in DIMS], 1).astype(np.float32)
    score_b = np.stack([cols[f"{d}_b"] for d in DIMS], 1).astype(np.float32)
    if not (np.isfinite(score_a).all() and np.isfinite(score_b).all()):
        raise ValueError(f"preference data: {pairs_path} has non-finite oracle scores")
    return PairSet(video_a=videos[ia], video_b=videos[ib], prompts=cols["prompt"].tolist(), labels=labels,
                   score_a=score_a, score_b=score_b, oracle_labels=clean, pair_id=cols["pair_id"].astype(np.int64),
                   source_a=cols["source_a"].tolist(), source_b=cols["source_b"].tolist(), kind=cols["kind"].tolist())


def summary(out_dir) -> dict:
    """Counts and rates of a preference data directory (JSON-ready).

    pairs / prompts: per split; tie_rate: per split and dimension, share of noise-free labels that are ties;
    noise_rate: configured, and observed per split (share of labels differing from the oracle's);
    sources: pool videos per source; kinds: pairs per kind; videos: pool size.
    """
    out_dir = Path(out_dir)
    table = _read_table(out_dir / "pairs.parquet", PAIR_COLUMNS)
    pool = _read_table(out_dir / "pool.parquet", ("index", *POOL_COLUMNS))
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in PAIR_COLUMNS}
    raw = (table.schema.metadata or {}).get(META_KEY, b"null")
    config = json.loads(raw)
    labels = np.stack([cols[f"label_{d}"] for d in DIMS], 1)
    clean = np.stack([cols[f"oracle_label_{d}"] for d in DIMS], 1)
    out = {"videos": pool.num_rows, "pairs": {}, "prompts": {}, "tie_rate": {},
           "noise_rate": {"configured": None if config is None else config["label_noise"], "observed": {}},
           "sources": {}, "kinds": {}}
    for s in SPLITS:
        rows = cols["split"] == s
        out["pairs"][s] = int(rows.sum())
        out["prompts"][s] = len(set(cols["prompt"][rows].tolist()))
        out["tie_rate"][s] = {d: float((clean[rows, j] == 0).mean()) if rows.any() else None
                              for j, d in enumerate(DIMS)}
        out["noise_rate"]["observed"][s] = float((labels[rows] != clean[rows]).mean()) if rows.any() else None
    sources = pool.column("source").to_pylist()
    out["sources"] = {s: sources.count(s) for s in SOURCES}
    kinds = cols["kind"].tolist()
    out["kinds"] = {k: kinds.count(k) for k in PAIR_KINDS}
    return out
