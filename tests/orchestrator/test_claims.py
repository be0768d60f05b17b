"""`videorl claims`: decision rules and metrics on known numbers, bad claim files named before any run, and one
real sweep through the CLI (two claims sharing a run, one with the long-video evaluation, 1 seed; two sweeps side by
side, `--jobs 2`) that a second invocation reuses."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.claims import (INCONCLUSIVE, NOT_REPRODUCED, REPRODUCED, RunFiles, available_claims,
                                 compute_metric, decide, default_claims_dir, load_claims, long_oracle, metric_columns,
                                 parse_metric, reward_gap, samples_to_gain, summary_fields, violation_after_met)
from orchestrator.cli import main
from orchestrator.config import ConfigError, load_config
from orchestrator.metrics import MetricsLog, read_metrics

REPO = Path(__file__).resolve().parents[2]


def values(**variants):
    return {"m": {v: dict(enumerate(x)) for v, x in variants.items()}}


# ---------------------------------------------------------------- decision rules

def test_greater_is_decided_by_twice_the_paired_standard_error():
    rule = {"kind": "greater", "a": "x", "b": "y"}
    # differences 0.5, 0.4, 0.5: mean 0.467, SE 0.0333
    assert decide(rule, values(x=[1.0, 1.2, 1.1], y=[0.5, 0.8, 0.6]), "m")[0] == REPRODUCED
    assert decide(rule, values(x=[0.5, 0.8, 0.6], y=[1.0, 1.2, 1.1]), "m")[0] == NOT_REPRODUCED
    # differences 0.5, -0.4, 0.3: mean 0.133 < 2 SE = 0.55
    verdict, why = decide(rule, values(x=[1.0, 0.4, 0.9], y=[0.5, 0.8, 0.6]), "m")
    assert verdict == INCONCLUSIVE and "+0.133" in why and "2·SE 0.55" in why
    assert decide(rule, values(x=[2.0], y=[0.0]), "m")[0] == INCONCLUSIVE  # one seed: no spread to judge by


def test_values_are_paired_by_seed():
    # seeds move both variants alike (spread 1.0) while x beats y by exactly 0.1 in each: unpaired, 0.1 is far
    # inside the seed-to-seed noise; paired, it is certain
    x = [1.0, 2.0, 3.0]
    assert decide({"kind": "greater", "a": "x", "b": "y"}, values(x=x, y=[v - 0.1 for v in x]), "m")[0] == REPRODUCED
    # a seed missing (a failed run, NaN) in one variant drops out of the pairs
    verdict, why = decide({"kind": "greater", "a": "x", "b": "y"}, values(x=[1.0, 2.0, math.nan], y=[0.9, 1.9, 0.0]), "m")
    assert verdict == REPRODUCED and "2 seeds" in why


def test_at_least_all_positive_order_and_all():
    at_least = {"kind": "at_least", "a": "x", "b": "y"}
    assert decide(at_least, values(x=[0.80, 0.82, 0.81], y=[0.81, 0.81, 0.80]), "m")[0] == REPRODUCED  # a tie is ≥
    assert decide(at_least, values(x=[0.70, 0.72, 0.71], y=[0.81, 0.81, 0.80]), "m")[0] == NOT_REPRODUCED
    pos = {"kind": "all_positive", "variant": "x"}
    assert decide(pos, values(x=[0.1, 0.2, 0.05]), "m")[0] == REPRODUCED
    assert decide(pos, values(x=[0.1, -0.01, 0.2]), "m")[0] == NOT_REPRODUCED  # the claim is "in every seed"
    assert decide({**pos, "threshold": 0.1}, values(x=[0.1, 0.2, 0.3]), "m")[0] == NOT_REPRODUCED
    assert decide(pos, values(x=[0.3]), "m")[0] == INCONCLUSIVE
    order = {"kind": "order", "variants": ["a", "b", "c"]}
    good = values(a=[3.0, 3.1, 3.2], b=[2.0, 2.1, 2.2], c=[1.0, 1.1, 1.2])
    assert decide(order, good, "m")[0] == REPRODUCED
    assert decide(order, values(a=[3.0, 3.1, 3.2], b=[2.0, 2.1, 2.2], c=[2.5, 2.6, 2.7]), "m")[0] == NOT_REPRODUCED
    assert decide(order, values(a=[3.0, 3.1, 3.2], b=[2.0, 2.1, 2.2], c=[2.0, 2.5, 1.7]), "m")[0] == INCONCLUSIVE
    both = {"kind": "all", "rules": [{"kind": "greater", "a": "a", "b": "b", "metric": "m"},
                                     {"kind": "greater", "a": "c", "b": "b", "metric": "n"}]}
    two = {"m": good["m"], "n": good["m"]}
    assert decide(both, two)[0] == NOT_REPRODUCED  # on n, c < b
    assert decide({"kind": "all", "rules": both["rules"][:1]}, two)[0] == REPRODUCED


# ---------------------------------------------------------------- metrics of a run's files

def _fake_run(tmp_path: Path, profile: Path):
    """A run directory with known numbers: 40 steps, one constraint vq (τ = 0.5), the oracle and a learned reward."""
    cfg = load_config(None, [f"rewards.profile={profile}", "train.groups_per_step=2", "rollout.group_size=4"])
    steps = 40
    reward_vq = np.where(np.arange(steps) < 20, 0.3, 0.6)  # violated for 20 steps, then met by 0.1
    reward_vq[30] = 0.45  # one relapse: the trailing mean of 1 step shows it
    with MetricsLog(tmp_path, tensorboard=False) as log:
        for t in range(steps):
            oracle = 0.5 + 0.01 * t  # the rollout oracle rises 0.01 a step
            log.log({"step": t, "reward/oracle_vq": oracle, "reward/oracle_mq": oracle, "reward/oracle_ta": oracle,
                     "reward/vq": reward_vq[t], "tau/vq": 0.5, "lambda/vq": 0.0,
                     "reward/feedback": float(t % 2)})
    rows = []
    for t in range(steps):
        for j in range(8):
            noise = 1.0 if j % 2 else -1.0  # per-clip σ 1 in each reward at every step
            rows.append({"step": t, "reward_vq": (2.0 if t >= 30 else 0.0) + noise,  # learned: +2σ
                         "reward_oracle_vq": (0.5 if t >= 30 else 0.0) + noise})       # oracle: +0.5σ
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "rollouts.parquet")
    summary = {"oracle": {"before": {"vq": 0.5, "mq": 0.4, "ta": 0.6, "overall": 0.5},
                          "after": {"vq": 0.7, "mq": 0.35, "ta": 0.75, "overall": 0.6}},
               "throughput": {"samples": steps * 8}, "steps": steps}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    return RunFiles(tmp_path, cfg)


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "profile.yaml"
    path.write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    return path


def test_metrics_from_summary_columns_and_rollouts(tmp_path, profile):
    (tmp_path / "run").mkdir()
    run = _fake_run(tmp_path / "run", profile)
    assert compute_metric(parse_metric("oracle_gain"), run) == pytest.approx(0.1)
    assert compute_metric(parse_metric("min_dim_gain"), run) == pytest.approx(-0.05)  # mq fell
    assert compute_metric(parse_metric("oracle.after.ta"), run) == 0.75
    # feedback alternates 0, 1: 39 step-to-step differences, 20 of +1 and 19 of −1 (mean 1/39)
    jitter = compute_metric(parse_metric({"column": "reward/feedback", "reduce": "std_of_diff"}), run)
    assert jitter == pytest.approx(np.sqrt(1 - (1 / 39) ** 2))
    oracle = ["reward/oracle_vq", "reward/oracle_mq", "reward/oracle_ta"]
    assert compute_metric(parse_metric({"columns": oracle, "reduce": "first_quarter_mean"}), run) == pytest.approx(0.545)
    # start = mean of steps 0..9 = 0.545; the 10-step trailing mean first reaches it + 0.045 at step 14 (mean of
    # steps 5..14 = 0.595; step 13's is 0.585): 15 steps x 8 samples
    assert samples_to_gain(run, oracle, target=0.045, smooth=10) == 15 * 8
    assert samples_to_gain(run, oracle, target=5.0, smooth=10) == 40 * 8  # never reached: every sample (lower bound)
    windows = [{"oracle": {"overall": v}} for v in (0.6, 0.5, 0.4, 0.3)]
    (run.dir / "long_eval_32").mkdir()
    (run.dir / "long_eval_32" / "long_eval.json").write_text(json.dumps({"windows": windows}))
    assert long_oracle(run, frames=32) == pytest.approx(0.45)
    assert long_oracle(run, frames=32, windows="last") == pytest.approx(0.3)
    # learned vq rose 2σ, the oracle 0.5σ (first quarter: steps 0..9, last: 30..39)
    assert reward_gap(run, ["vq"], ["oracle_vq"]) == pytest.approx(1.5)
    # smooth 1: met from step 20 on (violation −0.1), one relapse at step 30 by 0.05: mean positive violation 0.05/20
    assert violation_after_met(run, smooth=1) == pytest.approx(0.05 / 20)


# ---------------------------------------------------------------- bad input, named before any run

def _claim(root: Path, name: str, **fields) -> Path:
    spec = {"claim": "x beats y", "source": "a paper", "base": str(REPO / "configs" / "tiny.yaml"),
            "variants": {"x": ["learner.advantage=gdpo"], "y": ["learner.advantage=grpo"]},
            "metric": "oracle_gain", "decision": {"kind": "greater", "a": "x", "b": "y"}, **fields}
    root.mkdir(exist_ok=True)
    (root / f"{name}.yaml").write_text(json.dumps(spec))
    return root


@pytest.mark.parametrize("fields, message", [
    ({"variants": {"x": ["learner.nope=1"], "y": []}}, r"variant 'x'.*unknown config key 'learner.nope'"),
    ({"metric": "oracle.after.nope"}, r"metric 'oracle.after.nope': no train run writes it"),
    ({"metric": {"column": "reward/nope", "reduce": "mean"}}, r"metric column 'reward/nope': no train run"),
    ({"metric": {"column": "reward/vq", "reduce": "median"}}, r"reduce must be one of"),
    ({"metric": {"derived": "control", "stat": "wobble"}}, r"stat must be one of"),
    ({"decision": {"kind": "better", "a": "x", "b": "y"}}, r"unknown decision kind 'better'"),
    ({"decision": {"kind": "greater", "a": "x", "b": "z"}}, r"unknown variant 'z'"),
    ({"budget": "1 h"}, r"unknown key 'budget'"),
    ({"runner": "reward_bench", "metric": {"column": "reward/vq", "reduce": "mean"}}, r"writes only summary.json"),
    ({"metric": "long_oracle"}, r"metric long_oracle reads the long-video evaluation: set long_eval"),
    ({"metric": "long_oracle", "long_eval": {"frames": 9}}, r"long_eval.frames=9: a multiple of model.chunk"),
    ({"long_eval": {"frames": 32}, "runner": "reward_bench", "metric": "with_ties.vq"}, r"needs runner train"),
])
def test_a_bad_claim_is_named_before_any_run(tmp_path, fields, message):
    claims_dir = _claim(tmp_path / "claims", "bad", **fields)
    with pytest.raises(ConfigError, match=message):
        load_claims(["bad"], claims_dir)


def test_cli_names_unknown_claims_and_bad_files_and_runs_nothing(tmp_path, capsys):
    claims_dir = _claim(tmp_path / "claims", "good")
    _claim(claims_dir, "bad", metric="oracle.after.nope")
    out = tmp_path / "out"
    assert main(["claims", "nope", "--claims-dir", str(claims_dir), "--out", str(out)]) == 2
    assert "unknown claim 'nope'; available in" in capsys.readouterr().err
    assert main(["claims", "good", "--jobs", "0", "--claims-dir", str(claims_dir), "--out", str(out)]) == 2
    assert "--jobs must be at least 1, got 0" in capsys.readouterr().err
    # the good claim comes first, but nothing runs: every claim is checked before the first run
    assert main(["claims", "good", "bad", "--claims-dir", str(claims_dir), "--out", str(out)]) == 2
    assert "bad.yaml" in capsys.readouterr().err and not out.exists()
    # a command-line override may not undo what a variant or a seed sets
    with pytest.raises(ConfigError, match="sets learner.advantage per variant"):
        load_claims(["good"], claims_dir, overrides=["learner.advantage=grpo"])
    with pytest.raises(ConfigError, match="sets train.seed per variant or per seed"):
        load_claims(["good"], claims_dir, overrides=["train.seed=3"])


def test_seeds_vary_every_random_choice_but_the_held_out_evaluation(tmp_path):
    claims_dir = _claim(tmp_path / "claims", "good")
    runs = load_claims(["good"], claims_dir, seeds=2)[0].runs
    assert [(r.variant, r.seed) for r in runs] == [("x", 0), ("x", 1), ("y", 0), ("y", 1)]
    a, b = runs[0].cfg, runs[1].cfg
    for key in ("train", "data", "pretrain", "chaos"):
        assert (getattr(a, key).seed, getattr(b, key).seed) == (0, 1)
    for section in ("preference", "reward_model", "calibration", "engagement"):
        assert (getattr(a.rewards, section).seed, getattr(b.rewards, section).seed) == (0, 1)
    assert a.eval.seed == b.eval.seed
    assert len({r.key for r in runs}) == 4


def test_a_run_another_live_sweep_holds_is_left_to_it_and_a_dead_sweeps_lock_is_taken_over(tmp_path, capsys):
    """Two sweeps on one output folder split the runs: a run whose lock a live process holds is skipped (nothing runs
    and the lock stays), a lock whose process has ended is taken over."""
    import os
    import subprocess
    import sys

    from orchestrator.claims import run_claims, take_run

    claims_dir = _claim(tmp_path / "claims", "good")
    claim = load_claims(["good"], claims_dir, seeds=1)[0]
    out = tmp_path / "out"
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        for run in claim.runs:
            (out / "runs").mkdir(parents=True, exist_ok=True)
            (out / "runs" / f"{run.key}.lock").write_text(str(other.pid))
        assert run_claims([claim], out, progress=False) == []
        printed = capsys.readouterr().out
        assert printed.count("running in another sweep") == len(claim.runs) == 2 and "running train" not in printed
        assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(f"{r.key}.lock" for r in claim.runs)
    finally:
        other.kill()
        other.wait()
    run = claim.runs[0]
    assert take_run(run, out)  # its holder is gone
    assert (out / "runs" / f"{run.key}.lock").read_text() == str(os.getpid())
    assert not take_run(run, out)  # held (by this live process)


def test_shipped_claims_validate():
    names = available_claims(default_claims_dir())
    assert {"rl_gain", "pid_vs_primal_dual", "btt_bt_regression", "nft_vs_ppo_samples"} <= set(names)
    for claim in load_claims():
        assert len(claim.runs) >= 3 * len(claim.spec.variants)  # every claim at 3 seeds or more


# ---------------------------------------------------------------- a real sweep

@pytest.mark.slow
def test_claims_run_write_a_table_and_are_reused(tmp_path, ray_cluster, profile, capsys):
    out = tmp_path / "out"
    tiny = ["model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=50", "pretrain.batch_size=8",
            "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
            f"rewards.profile={profile}", "rewards.calibration.samples_per_prompt=2", "train.steps=3",
            "train.groups_per_step=2", "ray.rollout_workers=1", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2",
            "eval.steps=3", "eval.seeds_per_prompt=1", "eval.constraint_samples_per_prompt=1",
            f"cache_dir={tmp_path / 'cache'}"]
    argv = ["claims", "rl_gain", "streaming_long", *tiny, "--seeds", "1", "--out", str(out)]
    assert main([*argv, "--jobs", "2"]) == 0  # a second sweep beside this one: each takes one of the 2 runs
    first = capsys.readouterr().out + (out / "sweep-1.log").read_text()
    assert first.count("running in another sweep") >= 1  # the run the other sweep held was left to it
    data = json.loads((out / "claims.json").read_text())["claims"]
    for name in ("rl_gain", "streaming_long"):
        assert data[name]["verdict"] == INCONCLUSIVE
        assert "1 seed(s)" in data[name]["why"] or "1 paired seed(s)" in data[name]["why"]
    assert math.isfinite(data["rl_gain"]["metrics"]["oracle_gain"]["variants"]["rl"]["seeds"]["0"])
    # rl_gain's run is streaming_long's clip run (equal configs; the long-video evaluation is added to the finished
    # run): 2 runs made, 3 used
    shared = (out / "rl_gain/rl/seed0").resolve()
    assert shared == (out / "streaming_long/clip/seed0").resolve()
    assert len(list((out / "runs").iterdir())) == 2 and first.count(": running train") == 2  # none twice
    assert first.count("evaluating 32-frame videos") == 2
    long = data["streaming_long"]["metrics"]["long_overall"]["variants"]
    assert 0 < long["clip"]["seeds"]["0"] < 1 and 0 < long["streaming"]["seeds"]["0"] < 1
    assert len(json.loads((shared / "long_eval_32" / "long_eval.json").read_text())["windows"]) == 4
    page = (out / "claims.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "inconclusive" in page and "Astrolabe" in page
    table = (out / "claims.md").read_text().splitlines()  # the same table in Markdown: header, rule, one row a claim
    assert len(table) == 4 and table[1] == "|---|---|---|---|" and all(row.count(" | ") == 3 for row in table[2:])
    assert table[2].startswith("| `rl_gain`: ") and "**inconclusive**" in table[2] and "Astrolabe" in table[3]
    # every column and summary field the claims may name is in what the real run wrote
    run_dir = shared
    cfg = load_config(run_dir / "claim_config.yaml")
    assert metric_columns(cfg) <= set(read_metrics(run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())

    def paths(node, prefix=""):
        return [p for k, v in node.items() for p in (paths(v, f"{prefix}{k}.") if isinstance(v, dict) else [prefix + k])]

    assert summary_fields(cfg, "train") <= set(paths(summary))
    # a second invocation reuses both runs: nothing is trained again
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert main(argv) == 0
    second = capsys.readouterr().out
    assert "running" not in second and "evaluating" not in second and second.count(": reused ") == 2
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")} == mtimes
