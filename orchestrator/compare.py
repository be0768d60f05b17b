"""`videorl compare RUN_DIR ...`: how the λ control loops of finished runs behave, side by side.

Made for the PID vs primal–dual ablation (configs/ablation_pid.yaml, configs/ablation_dual.yaml):
per run and constraint, `rewards.constraints.oscillation_stats` of the λ trace and the violation
Δ_t = τ − batch mean R_c from metrics.parquet, on the raw batch means and on a trailing mean of
`smooth` steps. Raw batch means of a few groups carry sampling noise (`noise`: the per-step σ of Δ,
estimated from step-to-step differences), so raw sign changes mostly count noise crossings; the
smoothed count ignores entries within the trailing mean's own noise (noise / √smooth) of τ and so
counts the loop's real swings between violated and satisfied. `satisfied_at` is the first step at which
the trailing mean is below τ, `lambda_after` the mean λ from then on (multiplier wound up beyond need).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from matplotlib.figure import Figure

from rewards.constraints import oscillation_stats

COLUMNS = ["run", "controller", "constraint", "noise", "overshoot", "sign_changes", "smoothed_overshoot",
           "smoothed_sign_changes", "satisfied_at", "lambda_after", "lambda_max", "lambda_final", "lambda_overshoot",
           "tau", "final", "satisfied"]


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Mean of the last `window` entries at every t (fewer at the start): [T] -> [T]."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = np.cumsum(np.concatenate([[0.0], np.asarray(x, dtype=np.float64)]))
    t = np.arange(1, len(x) + 1)
    lo = np.maximum(0, t - window)
    return (c[t] - c[lo]) / (t - lo)


def control_stats(run_dir: str | Path, m: dict[str, np.ndarray], smooth: int = 10) -> list[dict]:
    """One COLUMNS row per constraint of a finished (or running) run; m = `read_metrics(run_dir)`."""
    run_dir = Path(run_dir)
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
    names = sorted(k.removeprefix("lambda/") for k in m if k.startswith("lambda/"))
    if not names:
        raise ValueError(f"{run_dir}: metrics.parquet has no lambda/<constraint> columns (a run without constraints)")
    rows = []
    for c in names:
        lam, violation = m[f"lambda/{c}"], m[f"tau/{c}"] - m[f"reward/{c}"]
        noise = float(np.std(np.diff(violation)) / np.sqrt(2)) if len(violation) > 2 else 0.0
        raw = oscillation_stats(lam, violation)
        trend = trailing_mean(violation, smooth)
        smoothed = oscillation_stats(lam, trend, tol=noise / np.sqrt(smooth))
        met = np.flatnonzero(trend < 0)
        end = (summary.get("constraints") or {}).get(c, {})
        rows.append({"run": run_dir.name, "controller": (config.get("constraints") or {}).get("controller"),
                     "constraint": c, "noise": noise, "overshoot": raw["overshoot"], "sign_changes": raw["sign_changes"],
                     "smoothed_overshoot": smoothed["overshoot"], "smoothed_sign_changes": smoothed["sign_changes"],
                     "satisfied_at": int(m["step"][met[0]]) if met.size else None,
                     "lambda_after": float(lam[met[0]:].mean()) if met.size else None,
                     "lambda_max": float(lam.max()), "lambda_final": float(lam[-1]),
                     "lambda_overshoot": raw["lambda_overshoot"], "tau": end.get("tau"), "final": end.get("final"),
                     "satisfied": end.get("satisfied")})
    return rows


def plot_lambdas(metrics: dict[str, dict[str, np.ndarray]], smooth: int = 10) -> Figure:
    """One panel per constraint: every run's λ (solid) and smoothed violation (dotted, right axis);
    metrics {run name: `read_metrics(run_dir)`}."""
    names = sorted({k.removeprefix("lambda/") for m in metrics.values() for k in m if k.startswith("lambda/")})
    fig = Figure(figsize=(4.5 * len(names), 3.2), layout="constrained")
    for i, c in enumerate(names):
        ax = fig.add_subplot(1, len(names), i + 1)
        ax2 = ax.twinx()
        for j, (run, m) in enumerate(metrics.items()):
            if f"lambda/{c}" not in m:
                continue
            ax.plot(m["step"], m[f"lambda/{c}"], color=f"C{j}", label=f"λ {run}")
            ax2.plot(m["step"], trailing_mean(m[f"tau/{c}"] - m[f"reward/{c}"], smooth), color=f"C{j}", linestyle=":")
        ax2.axhline(0.0, color="grey", linewidth=0.8)
        ax.set(title=f"constraint {c}", xlabel="learner step", ylabel="λ")
        ax2.set_ylabel(f"τ − R (mean of {smooth}), dotted")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return fig
