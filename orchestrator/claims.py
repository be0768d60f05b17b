"""`videorl claims [NAME ...] [key.sub=value ...] [--seeds N] [--out DIR] [--jobs J]`: each paper's claim tested over
seeds.

Names and overrides come before the options; the overrides apply to every run (e.g. train.steps=20 for a quick look)
and may not touch a key a variant or the seed sets.

A claim is `configs/claims/<name>.yaml` (files named `_*.yaml` are run configs the claims share, not claims):

    claim: one sentence                 source: the paper(s) it comes from
    base: claims/_base.yaml             a run config, relative to configs/ (or absolute)
    overrides: [key.sub=value, ...]     for every variant: the claim's budget (fewer steps, ...)
    variants: {name: [key.sub=value, ...], ...}
    metric: SPEC                        or  metrics: {name: SPEC, ...}
    seeds: 3                            (--seeds N overrides it)
    decision: RULE
    runner: train                       `videorl train` per run; reward_bench: `videorl reward bench` of the run's
                                        rewards.reward_model.loss (summary.json: that model's bench entry)
    long_eval: {frames: N}              train runs also get `videorl eval --frames N --oracle-only` of their final
                                        policy (long_eval_<N>/long_eval.json), for the long_oracle metric

Runs. Run (variant, seed k) is `base` + `overrides` + command-line overrides + the variant's overrides, then every
key of SEED_KEYS set to k (training, data, pretraining, preference data, reward-model training, calibration,
engagement, chaos). `eval.seed` stays fixed: every run is scored on the same held-out prompts with the same noise,
so variants of one seed differ only by what they change. Every run's config is validated, and every metric and rule
checked against it, before the first run starts. A run is a subprocess of the CLI (a crash or leak ends with it) on
one Ray cluster the sweep starts once. It lives in `<out>/runs/<hash of its resolved config>/` and
`<out>/<claim>/<variant>/seed<k>` links there: runs with equal configs (the default variant several claims share) run
once, and a run whose summary.json is complete is reused, so an interrupted sweep goes on where it stopped (a run
cut short is redone). Code changes do not invalidate finished runs: delete `<out>/runs` to redo them. Inputs (base
model, preference data, reward models, calibration) are cached by content ($VIDEORL_CACHE), so the variants of a
seed share them. A sweep holds `<out>/runs/<hash>.lock` while it runs one, so sweeps side by side on one output
folder split the runs (`--jobs J` starts J - 1 more, then writes the results of all; a cache entry is built once,
under its own lock, whichever asks first).

Metric SPEC, one number per run (only what runs write is accepted: `summary_fields`, `metric_columns`):
  "a.b.c"                               a summary.json field, e.g. oracle.after.overall
  "NAME" or {derived: NAME, param: v}   a DERIVED metric
  {column: C, reduce: R} / {columns: [C, ...], reduce: R}
                                        metrics.parquet column(s), averaged across columns per step, reduced over
                                        steps by R (REDUCERS; NaN steps left out)

Decision RULE. Values are paired by seed (the variants of a seed share base model, reward models and held-out
noise); SE = std of the per-seed differences / √n. Every rule with fewer than 2 seeds is inconclusive.
  {kind: greater, a, b}                 reproduced when mean(a − b) > 2·SE; not reproduced when mean(a − b) < −2·SE
  {kind: at_least, a, b}                not reproduced when mean(b − a) > 2·SE, else reproduced
  {kind: all_positive, variant, threshold: 0}   reproduced when every seed's value > threshold, else not
  {kind: order, variants: [a, b, ...]}  greater(a, b) and greater(b, c) ...
  {kind: all, rules: [RULE, ...]}       not reproduced when one is, reproduced when all are, else inconclusive
  a rule names `metric: NAME` when the claim has several metrics.

Writes `<out>/claims.json` (per claim: claim, source, rule, per-seed values, mean ± std, verdict and why; entries of
claims not run this time are kept), `<out>/claims.html` (the table, one plot per claim embedded; also
`<out>/<claim>/plot.png`) and `<out>/claims.md` (the table in Markdown).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from tqdm import tqdm

from orchestrator.config import Config, ConfigError, configured_dims, load_config, parse_override
from orchestrator.hashing import fingerprint

# the top-level seed sets data, pretraining, preference pairs, reward models, users, calibration and training seeds
SEED_KEYS = ("seed", "train.seed", "data.seed", "pretrain.seed", "rewards.preference.seed", "rewards.reward_model.seed",
             "rewards.calibration.seed", "rewards.engagement.seed", "chaos.seed")
RUNNERS = ("train", "reward_bench")
ORACLE_DIMS = ("vq", "mq", "ta", "overall")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- what runs write

# orchestrator.ledger.Ledger.balance: the integer (and bool) counters; dropped_<reason> appear once something drops
LEDGER_COUNTS = ("produced", "scored", "consumed", "dropped", "pending", "retried", "skipped_samples", "lost",
                 "counted_twice", "balanced")


def _profile_constraints(cfg: Config) -> list[str]:
    from rewards.calibration import load_profile

    return list(load_profile(cfg.rewards.profile).constraints)


def reward_names(cfg: Config) -> list[str]:
    """The run's reward names (model prefix + dimension); a given videoreward checkpoint is taken to have the
    configured dimensions (a different one fails when its metric is read)."""
    return sorted({s.prefix + d for s in cfg.rewards.models.values() for d in configured_dims(s, cfg.rewards)})


def metric_columns(cfg: Config) -> set[str]:
    """The metrics.parquet columns `videorl train` writes for `cfg` (orchestrator.train._metrics_row, the learner's
    stats, the reward pools' scaling row): the columns a claim may reduce. tests/orchestrator/test_claims.py checks
    each one is in a real run's file."""
    pools = list(cfg.rewards.models)
    cols = {"step", "grad_norm", "adv_abs", "loss/policy", "weights/bytes_per_version", "staleness/mean",
            "staleness/max", "throughput/samples_per_s", "throughput/total_samples_per_s",
            *(f"idle/{stage}_{wait}" for stage in ("rollout", "learner", *(f"reward_{p}" for p in pools))
              for wait in ("input", "output")),
            "payload/bytes_per_group", "queue/rollout", "queue/reward", "queue/ready", "chaos/kills",
            *(f"reward/{r}" for r in reward_names(cfg)),
            *(f"{k}/{c}" for c in _profile_constraints(cfg) for k in ("lambda", "tau")),
            *(f"ledger/{k}" for k in LEDGER_COUNTS),
            *(f"replicas/{p}" for p in pools), *(f"throughput/reward_{p}_batches_per_s" for p in pools)}
    if cfg.learner.loss in ("ppo", "nft"):
        cols.add("kl")
    if cfg.learner.loss == "ppo":
        cols |= {"ratio", "clip_fraction"}
    if cfg.rewards.curriculum is not None:
        cols |= {"curriculum/competence", *(f"curriculum/w_{r}" for r in cfg.rewards.curriculum.rewards)}
    return cols


def summary_fields(cfg: Config, runner: str) -> set[str]:
    """Dotted summary.json paths a run of `runner` writes with a number (orchestrator.train.run_training; for
    reward_bench one model's entry of orchestrator.reward_training.reward_bench)."""
    if runner == "reward_bench":
        return {f"{t}.{d}" for t in ("without_ties", "with_ties") for d in ORACLE_DIMS} | {"tie_threshold"}
    cons = _profile_constraints(cfg)
    return {*(f"oracle.{w}.{d}" for w in ("before", "after") for d in ORACLE_DIMS),
            *(f"constraints.{c}.{k}" for c in cons for k in ("tau", "final", "satisfied", "training_batches",
                                                               "skipped_samples")),
            *(f"lambdas.{c}" for c in cons), *(f"ledger.{k}" for k in LEDGER_COUNTS),
            "primary.final", "primary.training_batches", "throughput.samples", "throughput.seconds",
            "throughput.samples_per_s", "steps"}


# ---------------------------------------------------------------- metrics: pure functions of a run's files

def _quarter(n: int) -> int:
    return max(1, n // 4)


REDUCERS = {
    "mean": lambda x: float(np.mean(x)),
    "last": lambda x: float(x[-1]),
    "max": lambda x: float(np.max(x)),
    "min": lambda x: float(np.min(x)),
    "first_quarter_mean": lambda x: float(np.mean(x[: _quarter(len(x))])),
    "last_quarter_mean": lambda x: float(np.mean(x[-_quarter(len(x)):])),
    "std_of_diff": lambda x: float(np.std(np.diff(x))) if len(x) > 1 else math.nan,  # step-to-step jitter
}


@dataclass
class RunFiles:
    """A finished run's directory, read lazily: summary.json, metrics.parquet, rollouts.parquet."""

    dir: Path
    cfg: Config

    @cached_property
    def summary(self) -> dict:
        return json.loads((self.dir / "summary.json").read_text())

    @cached_property
    def metrics(self) -> dict[str, np.ndarray]:
        from orchestrator.metrics import read_metrics

        return read_metrics(self.dir)

    @cached_property
    def rollouts(self) -> dict[str, np.ndarray]:
        import pyarrow.parquet as pq

        table = pq.read_table(self.dir / "rollouts.parquet")
        return {n: table.column(n).to_numpy(zero_copy_only=False) for n in table.column_names}


def summary_value(summary: dict, path: str) -> float:
    node = summary
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"summary.json has no {path}")
        node = node[part]
    return math.nan if node is None else float(node)


def column_mean(m: dict[str, np.ndarray], columns: list[str]) -> np.ndarray:
    """Per-step mean of `columns` of a read_metrics dict, steps where any is NaN left out: [S'] float64."""
    missing = [c for c in columns if c not in m]
    if missing:
        raise KeyError(f"metrics.parquet has no column {missing[0]}")
    x = np.mean(np.stack([m[c] for c in columns]), axis=0)
    return x[np.isfinite(x)]


def oracle_gain(run: RunFiles) -> float:
    """Held-out oracle overall after − before training."""
    o = run.summary["oracle"]
    return o["after"]["overall"] - o["before"]["overall"]


def min_dim_gain(run: RunFiles) -> float:
    """The smallest after − before over the oracle's vq, mq, ta: > 0 means every dimension rose."""
    o = run.summary["oracle"]
    return min(o["after"][d] - o["before"][d] for d in ("vq", "mq", "ta"))


CONTROL_STATS = ("noise", "overshoot", "sign_changes", "smoothed_overshoot", "smoothed_sign_changes", "satisfied_at",
                 "lambda_after", "lambda_max", "lambda_final", "lambda_overshoot")


def control(run: RunFiles, stat: str, smooth: int = 10) -> float:
    """Mean over constraints of one `orchestrator.compare.control_stats` column (the λ loop's behaviour)."""
    from orchestrator.compare import control_stats

    vals = [r[stat] for r in control_stats(run.dir, run.metrics, smooth=smooth)]
    return float(np.mean([math.nan if v is None else float(v) for v in vals]))


def violation_after_met(run: RunFiles, smooth: int = 10) -> float:
    """Mean over constraints of the mean positive smoothed violation max(0, trailing mean of τ − R_c) from the first
    step the trailing mean is below τ on (the whole run when it never is): how far the loop falls back once met."""
    from orchestrator.compare import trailing_mean

    m, out = run.metrics, []
    for c in _profile_constraints(run.cfg):
        trend = trailing_mean(m[f"tau/{c}"] - m[f"reward/{c}"], smooth)
        met = np.flatnonzero(trend < 0)
        out.append(float(np.maximum(trend[met[0] if met.size else 0:], 0.0).mean()))
    return float(np.mean(out))


def samples_to_gain(run: RunFiles, columns: list[str], target: float, smooth: int = 10) -> float:
    """Training samples until the trailing mean (`smooth` steps) of `columns` (e.g. the rollout oracle) first
    reaches its mean over the first `smooth` steps + `target`; a run that never gets there counts all its samples
    (a lower bound). Samples per step = summary throughput.samples / steps."""
    from orchestrator.compare import trailing_mean

    x = column_mean(run.metrics, columns)
    per_step = run.summary["throughput"]["samples"] / max(1, run.summary["steps"])
    hit = np.flatnonzero(trailing_mean(x, smooth)[smooth:] >= x[:smooth].mean() + target)
    return float((smooth + hit[0] + 1) * per_step) if hit.size else float(run.summary["throughput"]["samples"])


def reward_gap(run: RunFiles, learned: list[str], oracle: list[str]) -> float:
    """Reward hacking on the training batches (rollouts.parquet): each reward's rise from the first to the last
    quarter of the steps in units of its per-clip σ over the first quarter, learned minus oracle, averaged over the
    (learned[i], oracle[i]) pairs. Scale-free, so a BT/BTT reward (arbitrary offset and scale) compares with the
    oracle's [0, 1]."""
    r = run.rollouts
    steps = r["step"]
    q = _quarter(len(np.unique(steps)))
    first, last = steps < steps.min() + q, steps > steps.max() - q

    def rise(name: str) -> float:
        x = np.asarray(r[f"reward_{name}"], dtype=np.float64)
        return (x[last].mean() - x[first].mean()) / max(x[first].std(), 1e-8)

    return float(np.mean([rise(a) - rise(b) for a, b in zip(learned, oracle)]))


def long_oracle(run: RunFiles, frames: int, dim: str = "overall", windows: str = "mean") -> float:
    """The held-out oracle `dim` of the run's final policy on `frames`-frame videos (`videorl eval --frames`): the
    mean over every clip-length window, or the last window's."""
    data = json.loads((run.dir / f"long_eval_{frames}" / "long_eval.json").read_text())
    scores = [w["oracle"][dim] for w in data["windows"]]
    return float(np.mean(scores) if windows == "mean" else scores[-1])


# name -> (function, the parameters it takes with their defaults; REQUIRED has none)
REQUIRED = object()
DERIVED = {
    "oracle_gain": (oracle_gain, {}),
    "min_dim_gain": (min_dim_gain, {}),
    "control": (control, {"stat": REQUIRED, "smooth": 10}),
    "violation_after_met": (violation_after_met, {"smooth": 10}),
    "samples_to_gain": (samples_to_gain, {"columns": REQUIRED, "target": REQUIRED, "smooth": 10}),
    "reward_gap": (reward_gap, {"learned": REQUIRED, "oracle": REQUIRED}),
    "long_oracle": (long_oracle, {"dim": "overall", "windows": "mean"}),  # frames: the claim's long_eval
}


def parse_metric(spec) -> dict:
    """A SPEC (module docstring) as {"summary": path} | {"columns": [...], "reduce": R} | {"derived": NAME, **params}."""
    if isinstance(spec, str):
        return parse_metric({"derived": spec}) if spec in DERIVED else {"summary": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"a metric is a summary path, a derived name or a mapping, got {spec!r}")
    spec = dict(spec)
    if "column" in spec:
        spec["columns"] = [spec.pop("column")]
    kinds = ["derived"] if "derived" in spec else [k for k in ("summary", "columns") if k in spec]
    if len(kinds) != 1:
        raise ValueError(f"metric {spec}: give exactly one of summary, column(s), derived")
    if kinds == ["summary"] and set(spec) != {"summary"}:
        raise ValueError(f"metric {spec}: a summary field takes no other keys")
    if kinds == ["columns"]:
        extra = set(spec) - {"columns", "reduce"}
        if extra or spec.get("reduce") not in REDUCERS:
            raise ValueError(f"metric {spec}: reduce must be one of {sorted(REDUCERS)}"
                             + (f"; unknown keys {sorted(extra)}" if extra else ""))
    if kinds == ["derived"]:
        name = spec["derived"]
        if name not in DERIVED:
            raise ValueError(f"unknown derived metric {name!r}; known: {sorted(DERIVED)}")
        params = DERIVED[name][1]
        unknown = sorted(set(spec) - {"derived", *params})
        if unknown:
            raise ValueError(f"metric {name}: unknown parameter {unknown[0]!r} (takes {sorted(params)})")
        missing = [p for p, d in params.items() if d is REQUIRED and p not in spec]
        if missing:
            raise ValueError(f"metric {name}: parameter {missing[0]!r} is required")
        spec = {**{p: d for p, d in params.items() if d is not REQUIRED}, **spec}
    return spec


def check_metric(spec: dict, cfg: Config, runner: str) -> None:
    """ValueError naming what no run of (`cfg`, `runner`) writes."""
    if "summary" in spec:
        known = summary_fields(cfg, runner)
        if spec["summary"] not in known:
            raise ValueError(f"metric {spec['summary']!r}: no {runner} run writes it to summary.json "
                             f"(known: {', '.join(sorted(known))})")
        return
    if runner != "train":
        raise ValueError(f"metric {spec}: a {runner} run writes only summary.json")
    cols = metric_columns(cfg)
    names = spec.get("columns", [])
    if spec.get("derived") == "reward_gap":
        names = [f"reward/{n}" for n in [*spec["learned"], *spec["oracle"]]]
        if len(spec["learned"]) != len(spec["oracle"]):
            raise ValueError("metric reward_gap: learned and oracle pair up: give lists of equal length")
    for c in names:
        if c not in cols:
            raise ValueError(f"metric column {c!r}: no train run of this config writes it "
                             f"(its columns: {', '.join(sorted(cols))})")
    if spec.get("derived") == "control" and spec["stat"] not in CONTROL_STATS:
        raise ValueError(f"metric control: stat must be one of {list(CONTROL_STATS)}, got {spec['stat']!r}")
    if spec.get("derived") == "long_oracle" and (spec["dim"] not in ORACLE_DIMS or spec["windows"] not in ("mean", "last")):
        raise ValueError(f"metric long_oracle: dim must be one of {list(ORACLE_DIMS)} and windows mean or last")
    if spec.get("derived") in ("control", "violation_after_met") and not _profile_constraints(cfg):
        raise ValueError(f"metric {spec['derived']}: the profile has no constraints")


def compute_metric(spec: dict, run: RunFiles) -> float:
    if "summary" in spec:
        return summary_value(run.summary, spec["summary"])
    if "columns" in spec:
        return REDUCERS[spec["reduce"]](column_mean(run.metrics, spec["columns"]))
    fn, _ = DERIVED[spec["derived"]]
    return float(fn(run, **{k: v for k, v in spec.items() if k != "derived"}))


# ---------------------------------------------------------------- decisions: pure functions of per-seed values

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
RULE_KEYS = {"greater": {"a", "b"}, "at_least": {"a", "b"}, "all_positive": {"variant", "threshold"},
             "order": {"variants"}, "all": {"rules"}}


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """a, b {seed: value}: (mean of a − b over seeds finite in both, its standard error, n); SE is NaN for n < 2."""
    d = np.array([a[s] - b[s] for s in a if s in b and math.isfinite(a[s]) and math.isfinite(b[s])])
    if d.size == 0:
        return math.nan, math.nan, 0
    se = float(np.std(d, ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan
    return float(d.mean()), se, int(d.size)


def decide(rule: dict, values: dict[str, dict[str, dict]], metric: str | None = None) -> tuple[str, str]:
    """(verdict, why) of `rule` over values {metric: {variant: {seed: value}}}; `metric`: the claim's only metric."""
    kind, metric = rule["kind"], rule.get("metric", metric)
    if kind == "all" or kind == "order":
        subs = rule["rules"] if kind == "all" else [
            {"kind": "greater", "a": a, "b": b, **({"metric": metric} if metric else {})}
            for a, b in zip(rule["variants"], rule["variants"][1:])]
        parts = [decide(r, values, metric) for r in subs]
        verdicts = [v for v, _ in parts]
        verdict = (NOT_REPRODUCED if NOT_REPRODUCED in verdicts else
                   REPRODUCED if all(v == REPRODUCED for v in verdicts) else INCONCLUSIVE)
        return verdict, "; ".join(why for _, why in parts)
    v = values[metric]
    tag = f"{metric}: " if len(values) > 1 else ""
    if kind == "all_positive":
        x = np.array([x for x in v[rule["variant"]].values() if math.isfinite(x)])
        threshold = float(rule.get("threshold", 0.0))
        if x.size < 2:
            return INCONCLUSIVE, f"{tag}{rule['variant']}: {x.size} seed(s), a claim over seeds needs 2 or more"
        above = int((x > threshold).sum())
        why = f"{tag}{rule['variant']} > {threshold:g} in {above}/{x.size} seeds (min {x.min():+.3g})"
        return (REPRODUCED if above == x.size else NOT_REPRODUCED), why
    a, b = rule["a"], rule["b"]
    mean, se, n = paired_difference(v[a], v[b])
    if n < 2:
        return INCONCLUSIVE, f"{tag}{a} − {b}: {n} paired seed(s), a claim over seeds needs 2 or more"
    why = f"{tag}{a} − {b} = {mean:+.3g} (2·SE {2 * se:.2g}, {n} seeds)"
    if kind == "greater":
        return (REPRODUCED if mean > 2 * se else NOT_REPRODUCED if mean < -2 * se else INCONCLUSIVE), why
    return (NOT_REPRODUCED if -mean > 2 * se else REPRODUCED), why  # at_least


def check_rule(rule, variants: list[str], metrics: list[str], where: str = "decision", metric: str | None = None) -> None:
    """ValueError naming the first problem of a RULE (unknown kind or key, unknown variant or metric);
    `metric`: named by an enclosing `all` rule."""
    if not isinstance(rule, dict) or rule.get("kind") not in RULE_KEYS:
        kind = rule.get("kind") if isinstance(rule, dict) else rule
        raise ValueError(f"{where}: unknown decision kind {kind!r}; known: {sorted(RULE_KEYS)}")
    kind = rule["kind"]
    allowed = RULE_KEYS[kind] | {"kind", "metric"}
    unknown = sorted(set(rule) - allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key {unknown[0]!r} for kind {kind} (takes {sorted(allowed - {'kind'})})")
    missing = sorted(RULE_KEYS[kind] - {"threshold"} - set(rule))
    if missing:
        raise ValueError(f"{where}: kind {kind} needs {missing[0]!r}")
    if "metric" in rule and rule["metric"] not in metrics:
        raise ValueError(f"{where}: unknown metric {rule['metric']!r}; the claim's metrics: {metrics}")
    metric = rule.get("metric", metric)
    if kind == "all":
        if not isinstance(rule["rules"], list) or not rule["rules"]:
            raise ValueError(f"{where}: kind all needs a non-empty list of rules")
        for i, sub in enumerate(rule["rules"]):
            check_rule(sub, variants, metrics, f"{where}.rules[{i}]", metric)
        return
    if metric is None and len(metrics) > 1:
        raise ValueError(f"{where}: the claim has several metrics {metrics}: name one with `metric`")
    names = {"order": rule.get("variants"), "all_positive": [rule.get("variant")]}.get(kind, [rule.get("a"), rule.get("b")])
    if kind == "order" and (not isinstance(names, list) or len(names) < 2):
        raise ValueError(f"{where}: kind order needs a list of at least 2 variants")
    for name in names:
        if name not in variants:
            raise ValueError(f"{where}: unknown variant {name!r}; the claim's variants: {variants}")


# ---------------------------------------------------------------- claims and their runs

class LongEval(BaseModel):
    model_config = ConfigDict(extra="forbid")

    frames: int = Field(gt=0)


class ClaimSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    claim: str = Field(min_length=1)
    source: str = Field(min_length=1)
    base: str
    overrides: list[str] = []
    variants: dict[str, list[str]] = Field(min_length=1)
    metric: str | dict | None = None
    metrics: dict[str, str | dict] | None = None
    seeds: int = Field(3, ge=1)
    decision: dict
    runner: Literal[RUNNERS] = "train"
    long_eval: LongEval | None = None


@dataclass
class Run:
    claim: str
    variant: str
    seed: int
    cfg: Config
    runner: str
    key: str  # hash of the resolved config (run_dir and cache_dir left out) and the runner
    long_frames: int | None = None  # also evaluate the final policy on videos this long

    def files(self, out: Path) -> RunFiles:
        return RunFiles(out / "runs" / self.key, self.cfg)


@dataclass
class Claim:
    name: str
    path: Path
    spec: ClaimSpec
    metrics: dict[str, dict]
    runs: list[Run] = field(default_factory=list)


def default_claims_dir() -> Path:
    local = Path("configs/claims")
    return local if local.is_dir() else Path(str(resources.files("configs") / "claims"))


def available_claims(claims_dir: Path) -> list[str]:
    return sorted(p.stem for p in Path(claims_dir).glob("*.yaml") if not p.name.startswith("_"))


def run_key(cfg: Config, runner: str) -> str:
    d = cfg.model_dump(mode="json")
    d["train"]["run_dir"], d["cache_dir"] = None, None  # where a run lands does not change what it computes
    return fingerprint(runner, json.dumps(d, sort_keys=True))


def seed_overrides(seed: int) -> list[str]:
    return [f"seed={seed}", f"chaos.seed={seed}"]


def read_claim(path: Path) -> Claim:
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    try:
        spec = ClaimSpec.model_validate(raw if isinstance(raw, dict) else {})
    except ValidationError as e:
        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        what = (f"unknown key {key!r}" if err["type"] == "extra_forbidden"
                else f"{key}: {err['msg']} (got {err.get('input')!r})")
        raise ConfigError(f"{path}: {what}") from None
    if (spec.metric is None) == (spec.metrics is None):
        raise ConfigError(f"{path}: give one of metric or metrics")
    try:
        items = spec.metrics.items() if spec.metrics else [(_metric_name(spec.metric), spec.metric)]
        metrics = {name: parse_metric(s) for name, s in items}
        check_rule(spec.decision, list(spec.variants), list(metrics))
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    return Claim(path.stem, path, spec, metrics)


def _metric_name(spec) -> str:
    if isinstance(spec, str):
        return spec
    cols = spec.get("columns") or [spec.get("column", "?")]
    return spec.get("derived") or spec.get("summary") or f"{'+'.join(cols)} {spec.get('reduce')}"


def plan_claim(claim: Claim, claims_dir: Path, seeds: int | None = None, overrides: list[str] = ()) -> None:
    """Fill claim.runs with every (variant, seed) config, validated; metrics checked against each config.
    Raises ConfigError naming the claim file, the variant and the problem."""
    spec = claim.spec
    base = Path(spec.base) if Path(spec.base).is_absolute() else Path(claims_dir).parent / spec.base
    fixed = {".".join(parse_override(o)[0]) for v in spec.variants.values() for o in v} | set(SEED_KEYS)
    for o in overrides:
        if (key := ".".join(parse_override(o)[0])) in fixed:
            raise ConfigError(f"override {o!r}: {claim.name} sets {key} per variant or per seed")
    long = spec.long_eval.frames if spec.long_eval else None
    if long and spec.runner != "train":
        raise ConfigError(f"{claim.path}: long_eval evaluates a trained policy: it needs runner train")
    if any(m.get("derived") == "long_oracle" for m in claim.metrics.values()) and not long:
        raise ConfigError(f"{claim.path}: metric long_oracle reads the long-video evaluation: set long_eval: {{frames: N}}")
    for m in claim.metrics.values():
        if m.get("derived") == "long_oracle":
            m["frames"] = long
    claim.runs = []
    for variant, extra in spec.variants.items():
        where = f"{claim.path}, variant {variant!r}"
        texts = [*spec.overrides, *overrides, *extra]
        try:
            first = load_config(base, texts)
            for k in range(seeds or spec.seeds):
                cfg = load_config(base, [*texts, *seed_overrides(k)])
                claim.runs.append(Run(claim.name, variant, k, cfg, spec.runner, run_key(cfg, spec.runner), long))
            for name, m in claim.metrics.items():
                check_metric(m, first, spec.runner)
            if long and (long < first.model.frames or long % getattr(first.model, "chunk", 1)):
                raise ValueError(f"long_eval.frames={long}: a multiple of model.chunk and at least model.frames "
                                 f"({first.model.frames})")
        except (ConfigError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"{where}: {e}") from None


def load_claims(names: list[str] = (), claims_dir: str | Path | None = None, seeds: int | None = None,
                overrides: list[str] = ()) -> list[Claim]:
    """The named claims (default: all), every run planned and checked: any problem raises before a run starts."""
    claims_dir = Path(claims_dir) if claims_dir else default_claims_dir()
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    available = available_claims(claims_dir)
    for n in names:
        if n not in available:
            raise ValueError(f"unknown claim {n!r}; available in {claims_dir}: {', '.join(available) or 'none'}")
    claims = [read_claim(claims_dir / f"{n}.yaml") for n in (names or available)]
    for c in claims:
        plan_claim(c, claims_dir, seeds, list(overrides))
    return claims


# ---------------------------------------------------------------- running

class RunFailed(RuntimeError):
    pass


def finished(run: Run, out: Path) -> bool:
    """The run's summary.json exists, it was made from this config, and (train) it ran every step: a sweep stopped
    by Ctrl-C also summarises its run, which is then redone."""
    d = out / "runs" / run.key
    try:
        meta = json.loads((d / "claim_run.json").read_text())
        summary = json.loads((d / "summary.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return meta.get("key") == run.key and "seconds" in meta and (
        run.runner != "train" or summary.get("steps") == run.cfg.train.steps)


def long_eval_done(run: Run, out: Path) -> bool:
    return run.long_frames is None or (out / "runs" / run.key / f"long_eval_{run.long_frames}" / "long_eval.json").is_file()


def link(run: Run, out: Path) -> Path:
    """<out>/<claim>/<variant>/seed<k> -> ../../runs/<key>."""
    path = out / run.claim / run.variant / f"seed{run.seed}"
    path.parent.mkdir(parents=True, exist_ok=True)
    target = Path("..") / ".." / "runs" / run.key
    if path.is_symlink():
        if Path(os.readlink(path)) == target:
            return path
        path.unlink()
    elif path.exists():
        raise FileExistsError(f"{path} is not a link made by `videorl claims`; move it away")
    path.symlink_to(target, target_is_directory=True)
    return path


def take_run(run: Run, out: Path) -> bool:
    """Hold <out>/runs/<key>.lock for this process (its pid inside); False while another live process holds it, so
    sweeps started side by side on one output folder split the runs between them instead of redoing them."""
    lock = out / "runs" / f"{run.key}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = lock.read_text()
                if not holder:  # created, its pid not written yet
                    return False
                os.kill(int(holder), 0)  # raises unless the holder is alive (signal 0 only checks)
                return False
            except (ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # a sweep that died holding it: take it over
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True


def execute(run: Run, out: Path, address: str | None) -> float:
    """Run it from scratch in a subprocess of the CLI; output to <run dir>/run.log. Returns seconds."""
    d = (out / "runs" / run.key).resolve()
    if d.exists():
        shutil.rmtree(d)  # a run cut short: its checkpoints and rows would mix with the new ones
    d.mkdir(parents=True)
    raw = run.cfg.model_dump(mode="json")
    raw["train"]["run_dir"] = str(d)
    (d / "claim_config.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    meta = {"key": run.key, "runner": run.runner, "claim": run.claim, "variant": run.variant, "seed": run.seed}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    if run.runner == "train":
        cmd = [*cli, "train", "--config", str(d / "claim_config.yaml"), *(["--address", address] if address else [])]
    else:
        cmd = [*cli, "reward", "bench", "--config", str(d / "claim_config.yaml"), "--out", str(d),
               "--losses", run.cfg.rewards.reward_model.loss]
    start = time.perf_counter()
    _cli(cmd, d / "run.log")
    if run.runner == "reward_bench":  # one model's bench entry, written last: its presence marks the run done
        bench = json.loads((d / "reward_bench.json").read_text())
        entry = bench["models"][run.cfg.rewards.reward_model.loss]
        (d / "summary.json").write_text(json.dumps({**entry, "counts": bench["counts"]}, indent=2) + "\n")
    if not (d / "summary.json").is_file():
        raise RunFailed(f"finished without a summary.json (log: {d / 'run.log'})")
    seconds = time.perf_counter() - start
    (d / "claim_run.json").write_text(json.dumps({**meta, "seconds": round(seconds, 1)}, indent=2) + "\n")
    return seconds


def _child_env() -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH: a child process runs the same code."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _cli(cmd: list[str], log_path: Path) -> None:
    """One CLI command in a subprocess of this checkout's code, its output to `log_path`; RunFailed if it fails."""
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(), cwd=os.getcwd()).returncode
    if rc:
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        raise RunFailed(f"exit {rc}: {lines[-1] if lines else 'no output'} (log: {log_path})")


def execute_long_eval(run: Run, out: Path) -> None:
    """`videorl eval --frames N --oracle-only` of a finished run's final policy into <run dir>/long_eval_<N>/."""
    d = (out / "runs" / run.key).resolve()
    dest = d / f"long_eval_{run.long_frames}"
    _cli([sys.executable, "-m", "orchestrator.cli", "eval", "--config", str(d / "claim_config.yaml"), "--checkpoint",
          str(d / "final"), "--frames", str(run.long_frames), "--oracle-only", "--out", str(dest)],
         d / f"long_eval_{run.long_frames}.log")


def _cluster_address(cfg: Config) -> tuple[str, bool]:
    """The sweep's Ray cluster (ray.address / $RAY_ADDRESS, else a local one): (address for the runs, started here)."""
    import ray

    from orchestrator.cluster import connect

    started = not ray.is_initialized()
    connect(cfg)
    return ray.get_runtime_context().gcs_address, started


def side_sweeps(argv: list[str], out: Path, n: int) -> list[tuple[subprocess.Popen, Path]]:
    """Start `n` more `videorl claims <argv> --out <out>` processes, each writing <out>/sweep-<i>.log: with this
    one they take the runs one at a time in the same order, a run held by one (`take_run`) skipped by the others."""
    out.mkdir(parents=True, exist_ok=True)
    sweeps = []
    for i in range(1, n + 1):
        log = out / f"sweep-{i}.log"
        with open(log, "w") as f:
            sweeps.append((subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "claims", *argv, "--out",
                                             str(out)], stdout=f, stderr=subprocess.STDOUT, env=_child_env()), log))
    return sweeps


def run_claims(claims: list[Claim], out: str | Path, progress: bool | None = None) -> list[str]:
    """Run (or reuse) every planned run, then write claims.json and claims.html after each claim.
    Returns the failed runs, one line each (their values are missing; the sweep goes on)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty() if progress is None else progress
    total = sum(len(c.runs) for c in claims)
    bar = tqdm(total=total, desc="claims", unit="run", disable=not progress)
    address, started, failed = None, False, []
    status: dict[str, str] = {}  # run key -> what happened to it in this sweep, and as which claim's run
    t0 = time.perf_counter()
    try:
        for claim in claims:
            for run in claim.runs:
                link(run, out)
                name = f"{run.claim}/{run.variant}/seed{run.seed}"
                elsewhere = status.get(run.key, "").endswith("(running in another sweep)")
                held = not elsewhere and take_run(run, out)
                if run.key in status:  # the same config in another claim (or variant): one run serves both
                    tqdm.write(f"{name}: the same run as {status[run.key]}")
                elif not held:
                    status[run.key] = f"{name} (running in another sweep)"
                    tqdm.write(f"{name}: running in another sweep; run the sweep again afterwards for its values")
                elif finished(run, out):
                    status[run.key] = f"{name} (reused)"
                    tqdm.write(f"{name}: reused {out / 'runs' / run.key}")
                else:
                    if run.runner == "train" and address is None:
                        address, started = _cluster_address(run.cfg)
                    tqdm.write(f"{name}: running {run.runner} in {out / 'runs' / run.key}")
                    try:
                        seconds = execute(run, out, address)
                        status[run.key] = name
                        tqdm.write(f"{name}: done in {seconds:.0f} s")
                    except RunFailed as e:
                        status[run.key] = f"{name} (FAILED)"
                        failed.append(f"{name}: {e}")
                        tqdm.write(f"{name}: FAILED {e}")
                if held and finished(run, out) and not long_eval_done(run, out):
                    tqdm.write(f"{name}: evaluating {run.long_frames}-frame videos")
                    try:
                        execute_long_eval(run, out)
                    except RunFailed as e:
                        failed.append(f"{name} long eval: {e}")
                        tqdm.write(f"{name}: long eval FAILED {e}")
                if held:
                    (out / "runs" / f"{run.key}.lock").unlink()
                bar.update(1)
            write_results(out, {claim.name: evaluate_claim(claim, out)}, seconds=time.perf_counter() - t0)
    finally:
        bar.close()
        if started:
            import ray

            ray.shutdown()
    return failed


# ---------------------------------------------------------------- results

def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def evaluate_claim(claim: Claim, out: Path) -> dict:
    """Per metric and variant the per-seed values, mean ± std; the verdict by the claim's rule."""
    values: dict[str, dict[str, dict[int, float]]] = {m: {v: {} for v in claim.spec.variants} for m in claim.metrics}
    notes, runs = [], {}
    for run in claim.runs:
        files = run.files(out)
        meta_path = files.dir / "claim_run.json"
        done = finished(run, out) and long_eval_done(run, out)
        meta = json.loads(meta_path.read_text()) if done else {}
        runs.setdefault(run.variant, {})[str(run.seed)] = {"dir": str(files.dir), "done": done,
                                                           "seconds": meta.get("seconds")}
        for name, spec in claim.metrics.items():
            value = math.nan
            if done:
                try:
                    value = compute_metric(spec, files)
                except (KeyError, ValueError, FileNotFoundError, IndexError) as e:
                    notes.append(f"{run.variant}/seed{run.seed} {name}: {e}")
            values[name][run.variant][run.seed] = value
    only = next(iter(claim.metrics)) if len(claim.metrics) == 1 else None
    verdict, why = decide(claim.spec.decision, values, only)
    stats = {}
    for name, per_variant in values.items():
        stats[name] = {"spec": claim.metrics[name], "variants": {}}
        for variant, per_seed in per_variant.items():
            x = np.array([v for v in per_seed.values() if math.isfinite(v)])
            stats[name]["variants"][variant] = {
                "seeds": {str(s): v for s, v in per_seed.items()}, "n": int(x.size),
                "mean": float(x.mean()) if x.size else math.nan,
                "std": float(x.std(ddof=1)) if x.size > 1 else math.nan}
    s = claim.spec
    return _clean({"claim": s.claim, "source": s.source, "file": str(claim.path), "runner": s.runner, "base": s.base,
                   "overrides": s.overrides, "variants": s.variants, "rule": s.decision, "verdict": verdict,
                   "why": why, "metrics": stats, "runs": runs, "notes": notes})


def plot_claim(name: str, entry: dict):
    """One panel per metric: each variant's per-seed values (dots) and mean ± std (bar)."""
    from matplotlib.figure import Figure

    metrics = entry["metrics"]
    fig = Figure(figsize=(3.6 * len(metrics), 3.0), layout="constrained")
    for i, (metric, m) in enumerate(metrics.items()):
        ax = fig.add_subplot(1, len(metrics), i + 1)
        for j, (variant, v) in enumerate(m["variants"].items()):
            seeds = [x for x in v["seeds"].values() if x is not None]
            ax.scatter([j] * len(seeds), seeds, color=f"C{j}", alpha=0.6, s=18)
            if v["mean"] is not None:
                ax.errorbar([j + 0.15], [v["mean"]], yerr=[v["std"] or 0.0], fmt="o", color=f"C{j}", capsize=4)
        ax.set_xticks(range(len(m["variants"])), list(m["variants"]), rotation=20, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: {entry['verdict']}", fontsize=10)
    return fig


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")  # one line, and a | that does not end the cell


def _fmt(v: dict) -> str:
    if v["mean"] is None:
        return "—"
    return f"{v['mean']:.3g} ± {v['std']:.2g}" if v["std"] is not None else f"{v['mean']:.3g} (1 seed)"


def write_results(out: Path, entries: dict[str, dict], seconds: float | None = None) -> Path:
    """Merge `entries` into <out>/claims.json (other claims' entries are kept) and rewrite claims.html and claims.md
    (the same table in Markdown, without the plots: what a README or an issue takes)."""
    path = out / "claims.json"
    data = json.loads(path.read_text()) if path.is_file() else {"claims": {}}
    data["claims"].update(entries)
    if seconds is not None:
        data["last_sweep_seconds"] = round(seconds, 1)
    path.write_text(json.dumps(data, indent=2) + "\n")
    rows, md = [], ["| claim | source | variants (mean ± std over seeds) | verdict |", "|---|---|---|---|"]
    for name, e in data["claims"].items():
        values = "; ".join(f"{metric}: " + ", ".join(f"{v} {_fmt(s)}" for v, s in m["variants"].items())
                           for metric, m in e["metrics"].items())
        md.append("| " + " | ".join(_md_cell(c) for c in (f"`{name}`: {e['claim']}", e["source"], values,
                                                          f"**{e['verdict']}** ({e['why']})")) + " |")
        (out / name).mkdir(parents=True, exist_ok=True)
        plot_claim(name, e).savefig(out / name / "plot.png", dpi=100)
        png = base64.b64encode((out / name / "plot.png").read_bytes()).decode()
        cells = "<br>".join(
            f"<i>{html.escape(metric)}</i>: " + ", ".join(f"{html.escape(v)} {_fmt(s)}" for v, s in m["variants"].items())
            for metric, m in e["metrics"].items())
        rows.append(f"<tr><td><b>{html.escape(name)}</b><br>{html.escape(e['claim'])}</td>"
                    f"<td>{html.escape(e['source'])}</td><td>{cells}</td>"
                    f"<td class='{e['verdict'].replace(' ', '-')}'><b>{e['verdict']}</b><br>"
                    f"<small>{html.escape(e['why'])}</small></td>"
                    f"<td><img src='data:image/png;base64,{png}' width='340'></td></tr>")
    (out / "claims.html").write_text(
        "<!doctype html><meta charset='utf-8'><title>videorl claims</title><style>body{font-family:sans-serif}"
        "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}table{border-collapse:collapse}"
        ".reproduced{background:#dfd}.not-reproduced{background:#fdd}.inconclusive{background:#ffd}</style>"
        "<h1>videorl claims</h1><p>mean ± std over seeds; verdicts by each claim's rule (configs/claims/*.yaml)</p>"
        "<table><tr><th>claim</th><th>source</th><th>variants (mean ± std)</th><th>verdict</th><th>plot</th></tr>"
        + "".join(rows) + "</table>\n")
    (out / "claims.md").write_text("\n".join(md) + "\n")
    return path


def summary_rows(out: Path, names: list[str]) -> list[dict]:
    """Rows for the CLI's table: claim, verdict, why (from claims.json)."""
    data = json.loads((out / "claims.json").read_text())["claims"]
    return [{"claim": n, "verdict": data[n]["verdict"], "why": data[n]["why"]} for n in names if n in data]
