"""`videorl calibrate`: SCRL constraint thresholds measured on the base (SFT) model (MATH.md §5).

Sample the base model on the world's held-out prompts (the same sampling loop as
`orchestrator.evaluation.evaluate`), score every clip with every reward through one `score`
callable, then write τ_c = μ_c + k_c·σ_c of every profile into one JSON file, with the seed and a
summary of each reward's scores. How scores are produced (oracle, learned reward models, a Ray
reward pool) is the caller's business: `score(videos uint8 [N, T, H, W, 3], prompts [N]) ->
{reward: float [N]}`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np

from orchestrator.evaluation import evaluate
from policy.backend import Policy
from rewards.calibration import Profile, calibrate, summarize_scores, write_calibration

ScoreFn = Callable[[np.ndarray, list[str]], dict[str, np.ndarray]]


def score_in_batches(score: ScoreFn, videos: np.ndarray, prompts: list[str], batch_size: int) -> dict[str, np.ndarray]:
    """Call `score` on slices of at most `batch_size` clips and join the results into {reward: float64 [N]}.

    Every call must return the same rewards, each an array [len(slice)]; anything else is a ValueError.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    parts: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(prompts), batch_size):
        n = len(prompts[start : start + batch_size])
        out = score(videos[start : start + n], prompts[start : start + n])
        if not isinstance(out, dict) or not out:
            raise ValueError(f"score must return a non-empty dict {{reward: [N]}}, got {type(out).__name__}")
        if parts and set(out) != set(parts):
            raise ValueError(f"score returned rewards {sorted(out)} for clips {start}.., but {sorted(parts)} before")
        for name, values in out.items():
            values = np.asarray(values, dtype=np.float64)
            if values.shape != (n,):
                raise ValueError(f"score returned {name!r} with shape {list(values.shape)}, expected [{n}] "
                                 f"(clips {start}..{start + n - 1})")
            parts.setdefault(name, []).append(values)
    return {name: np.concatenate(v) for name, v in parts.items()}


def calibrate_base_model(
    base: Policy,
    score: ScoreFn,
    profiles: list[Profile],
    *,
    samples_per_prompt: int,
    seed: int,
    sampler: str,
    eta: float,
    steps: int,
    mode: str,
    out_path: str | os.PathLike,
    source: str = "<in-memory policy>",
    batch_size: int = 64,
    shift: float = 1.0,
) -> dict:
    """Calibrate every profile on the base model and write one JSON file to `out_path` (atomic).

    base: the base policy (`orchestrator.pretraining.Base.load()`); `source` names it in the output.
    N = 24 held-out prompts x samples_per_prompt clips, drawn with fixed noise from `seed`; the
    sampler arguments are those of `policy.sampling.sample`. Returns what it wrote:
    {"seed", "base_checkpoint", "sampler", "eta", "steps", "mode", "samples_per_prompt", "n", "prompts",
     "scores": {reward: {mean, std, min, max, n}}, "profiles": {name: `rewards.calibration.calibrate(...)`},
     "seconds": {"sample", "score"}}.
    """
    if not profiles:
        raise ValueError("no profiles to calibrate")
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ValueError(f"profile names must be unique, got {names}")
    if samples_per_prompt < 1:
        raise ValueError(f"samples_per_prompt must be >= 1, got {samples_per_prompt}")
    model = base.eval()

    start = time.perf_counter()
    samples = evaluate(model, sampler=sampler, eta=eta, steps=steps, mode=mode, shift=shift,
                       seeds_per_prompt=samples_per_prompt, seed=seed, batch_size=batch_size, desc="calibrate: base samples")
    sampled = time.perf_counter()
    scores = score_in_batches(score, samples.videos, samples.prompts, batch_size=max(batch_size, 256))
    scored = time.perf_counter()

    result = {
        "seed": seed, "base_checkpoint": source, "sampler": sampler, "eta": eta, "steps": steps, "shift": shift, "mode": mode,
        "samples_per_prompt": samples_per_prompt, "n": len(samples.prompts),
        "prompts": list(dict.fromkeys(samples.prompts)),
        "scores": summarize_scores(scores),
        "profiles": {p.name: calibrate(scores, p) for p in profiles},
        "seconds": {"sample": round(sampled - start, 3), "score": round(scored - sampled, 3)},
    }
    write_calibration(out_path, result)
    return result
