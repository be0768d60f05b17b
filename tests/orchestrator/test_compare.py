"""`videorl compare`: oscillation numbers of λ control loops read back from real run directories."""

import json

import numpy as np
import pytest
import yaml

from orchestrator.cli import main
from orchestrator.compare import control_stats, trailing_mean
from orchestrator.metrics import MetricsLog, read_metrics


def _write_run(run_dir, controller, rewards, lambdas, tau=0.5):
    with MetricsLog(run_dir, tensorboard=False) as log:
        for t, (r, lam) in enumerate(zip(rewards, lambdas)):
            log.log({"step": t, "reward/vq": r, "tau/vq": tau, "lambda/vq": lam})
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"constraints": {"controller": controller}}))
    final = float(np.mean(rewards[-3:]))
    (run_dir / "summary.json").write_text(json.dumps(
        {"constraints": {"vq": {"tau": tau, "final": final, "satisfied": final >= tau}}}))


def test_trailing_mean():
    np.testing.assert_allclose(trailing_mean(np.array([1.0, 3.0, 5.0, 7.0]), 2), [1.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(trailing_mean(np.array([2.0, 4.0]), 5), [2.0, 3.0])
    with pytest.raises(ValueError, match="window"):
        trailing_mean(np.ones(3), 0)


def test_ringing_and_damped_loops_are_told_apart(tmp_path, capsys):
    # violation τ − R: the ringing loop swings ±0.3 around the threshold after crossing it, the damped one settles
    ringing = [0.2, 0.3, 0.4, 0.8, 0.2, 0.8, 0.2, 0.8, 0.2, 0.8]
    damped = [0.2, 0.3, 0.4, 0.5, 0.6, 0.55, 0.55, 0.55, 0.55, 0.55]
    _write_run(tmp_path / "dual", "dual", ringing, [0.1, 0.2, 0.3, 0.4, 0.2, 0.35, 0.2, 0.35, 0.2, 0.35])
    _write_run(tmp_path / "pid", "pid", damped, [0.3, 0.5, 0.6, 0.6, 0.5, 0.45, 0.45, 0.45, 0.45, 0.45])
    (dual,), (pid,) = (control_stats(tmp_path / r, read_metrics(tmp_path / r), smooth=1) for r in ("dual", "pid"))
    assert dual["controller"] == "dual" and pid["controller"] == "pid"
    assert dual["overshoot"] == pytest.approx(0.3) and dual["sign_changes"] == 7  # +0.3 +0.2 +0.1 then ∓0.3 seven times
    assert pid["overshoot"] == pytest.approx(0.1) and pid["sign_changes"] == 1
    assert dual["satisfied_at"] == 3 and pid["satisfied_at"] == 4  # first step below τ
    assert pid["lambda_after"] == pytest.approx(np.mean([0.5, 0.45, 0.45, 0.45, 0.45, 0.45]))
    assert pid["lambda_max"] == pytest.approx(0.6) and pid["lambda_final"] == pytest.approx(0.45)
    assert pid["lambda_overshoot"] == pytest.approx(0.15)
    assert pid["satisfied"] is True and pid["final"] == pytest.approx(0.55)

    out = tmp_path / "cmp"
    assert main(["compare", str(tmp_path / "dual"), str(tmp_path / "pid"), "--smooth", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dual" in printed and "pid" in printed and "sign_changes" in printed
    saved = json.loads((out / "compare.json").read_text())
    assert [r["sign_changes"] for r in saved["rows"]] == [dual["sign_changes"], 1]
    assert (out / "compare_lambda.png").stat().st_size > 1000


def test_compare_refuses_a_missing_run(tmp_path, capsys):
    assert main(["compare", str(tmp_path / "nope")]) == 2
    assert "run directory not found" in capsys.readouterr().err
