"""SCRL constraint thresholds calibrated on the base (SFT) model, and the reward profiles that name them.

MATH.md §5: on the base model's held-out samples, each constraint reward c gets
    τ_c = μ_c + k_c·σ_c        (μ mean, σ unbiased std over the N calibration samples)
so "R_c ≥ τ_c" asks the post-trained policy to beat the base model by k_c standard deviations.
A `Profile` (SCRL's "module") names the primary reward and the k of every constraint; the YAML
files in `configs/profiles/` mirror SCRL: video generation (every reward, k = 1.1), instruction
(alignment, k = 0.8), retrieval (alignment, k = 0.3); all three have the feedback reward as primary.

Pure numpy: scores come in as {reward name: [N]} arrays, however they were produced.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path
from typing import Annotated

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Profile(BaseModel):
    """Which reward is primary and which are constraints (name -> k_c >= 0) for one SCRL module."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str = Field(min_length=1)
    primary: str = Field(min_length=1, description="the reward maximised (SCRL: user feedback)")
    constraints: dict[str, Annotated[float, Field(ge=0)]] = Field(
        min_length=1, description="constraint reward -> strictness k_c >= 0")

    @model_validator(mode="after")
    def _check(self) -> Profile:
        for reward in self.constraints:
            if not reward:
                raise ValueError("constraints: a reward name is empty")
        if self.primary in self.constraints:
            raise ValueError(f"primary reward {self.primary!r} is also a constraint; a reward is one or the other")
        return self


def profiles_dir():
    """The folder of the shipped profiles: `configs/profiles/` next to the installed `configs` package."""
    return resources.files("configs") / "profiles"


def available_profiles() -> list[str]:
    """Names of the shipped profiles (file stems of `configs/profiles/*.yaml`), sorted."""
    folder = profiles_dir()
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def load_profile(name_or_path: str | os.PathLike) -> Profile:
    """A shipped profile by name ("video_generation") or any profile YAML by path.

    The profile's name is the file stem unless the YAML sets `name`. Unknown name -> ValueError
    listing the shipped ones; missing file -> FileNotFoundError; bad YAML or fields -> ValueError naming the file.
    """
    text = str(name_or_path)
    is_path = isinstance(name_or_path, os.PathLike) or text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text
    if is_path:
        file = Path(text)
        if not file.is_file():
            raise FileNotFoundError(f"profile file not found: {file}")
        raw, stem = file.read_text(), file.stem
    else:
        file = profiles_dir() / f"{text}.yaml"
        if not file.is_file():
            raise ValueError(f"unknown profile {text!r}; available: {available_profiles()} "
                             "(or pass a path to a YAML file)")
        raw, stem = file.read_text(), text
    try:
        data = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"profile {file}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"profile {file}: expected a mapping with primary and constraints, got {type(data).__name__}")
    data.setdefault("name", stem)
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'profile'}: {err['msg']}" for err in e.errors())
        raise ValueError(f"profile {file}: {problems}") from None


def _checked_scores(scores: dict[str, np.ndarray], names: list[str]) -> dict[str, np.ndarray]:
    """float64 [N] arrays for `names`, all finite and of one length N >= 2; ValueError naming the culprit."""
    missing = [n for n in names if n not in scores]
    if missing:
        raise ValueError(f"no scores for reward(s) {missing}; scores given: {sorted(scores)}")
    out: dict[str, np.ndarray] = {}
    for name in names:
        x = np.asarray(scores[name], dtype=np.float64)
        if x.ndim != 1:
            raise ValueError(f"scores[{name!r}] must be [N], got shape {list(x.shape)}")
        if x.shape[0] < 2:
            raise ValueError(f"scores[{name!r}] has {x.shape[0]} sample(s); an unbiased std needs at least 2")
        bad = np.flatnonzero(~np.isfinite(x))
        if bad.size:
            raise ValueError(f"reward {name!r}: non-finite score {x[bad[0]]} at sample {int(bad[0])}")
        out[name] = x
    lengths = {n: x.shape[0] for n, x in out.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"rewards scored different numbers of samples: {lengths}")
    return out


def summarize_scores(scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """{reward: {mean, std (unbiased), min, max, n}} of every reward in `scores` (checked as in `calibrate`)."""
    checked = _checked_scores(scores, list(scores))
    return {n: {"mean": float(x.mean()), "std": float(x.std(ddof=1)), "min": float(x.min()), "max": float(x.max()),
                "n": int(x.shape[0])} for n, x in checked.items()}


def calibrate(scores: dict[str, np.ndarray], profile: Profile) -> dict:
    """SCRL thresholds τ_c = μ_c + k_c·σ_c (MATH.md §5) of one profile from base-model scores {reward: [N]}.

    Returns {"profile": name, "primary": {"name", "mu", "sigma", "n"},
             "constraints": {c: {"mu", "sigma", "k", "tau", "n"}}}, σ unbiased (ddof = 1), floats.
    """
    names = [profile.primary, *profile.constraints]
    x = _checked_scores(scores, names)
    p = x[profile.primary]
    result = {"profile": profile.name,
              "primary": {"name": profile.primary, "mu": float(p.mean()), "sigma": float(p.std(ddof=1)), "n": len(p)},
              "constraints": {}}
    for c, k in profile.constraints.items():
        mu, sigma = float(x[c].mean()), float(x[c].std(ddof=1))
        result["constraints"][c] = {"mu": mu, "sigma": sigma, "k": float(k), "tau": mu + k * sigma, "n": len(x[c])}
    return result


def profile_taus(calibration: dict, profile: str) -> dict[str, float]:
    """{constraint: τ} of one profile from a calibration file's content (`read_calibration`); feeds
    `rewards.constraints.ConstraintSet.from_config`."""
    profiles = calibration.get("profiles") if isinstance(calibration, dict) else None
    if not isinstance(profiles, dict) or profile not in profiles:
        have = sorted(profiles) if isinstance(profiles, dict) else []
        raise ValueError(f"calibration has no profile {profile!r}; it has {have}")
    try:
        taus = {c: float(v["tau"]) for c, v in profiles[profile]["constraints"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"calibration profile {profile!r} is malformed: {e!r}") from None
    bad = [c for c, t in taus.items() if not math.isfinite(t)]
    if bad:
        raise ValueError(f"calibration profile {profile!r}: non-finite tau for {bad}")
    return taus


def write_calibration(path: str | os.PathLike, result: dict) -> Path:
    """Write `result` as JSON atomically (temp file + rename: a reader never sees half a file). NaN is refused."""
    path = Path(path)
    try:
        text = json.dumps(result, indent=2, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"calibration for {path} holds a non-finite number: {e}") from None
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _refuse_constant(token: str):
    raise ValueError(f"non-finite number {token}")


def read_calibration(path: str | os.PathLike) -> dict:
    """The JSON object written by `write_calibration`; FileNotFoundError / ValueError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"calibration file not found: {path} (run `videorl calibrate` first)")
    try:
        data = json.loads(path.read_text(), parse_constant=_refuse_constant)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, NaN/Infinity
        raise ValueError(f"calibration file {path} is corrupt (not valid finite JSON): {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"calibration file {path} is corrupt: expected a JSON object, got {type(data).__name__}")
    return data
