"""`ray start --head` + `ray job submit --working-dir . -- videorl train ...` with token authentication on."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def submit(address: str, env: dict, entrypoint: list[str]) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".",
           "--runtime-env-json", json.dumps({"excludes": [".venv", ".git", "runs", "*.egg-info"]}), "--", *entrypoint]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def submit_when_up(address: str, env: dict, entry: list[str]) -> subprocess.CompletedProcess:
    """The head node and its dashboard agent take a few seconds to accept jobs."""
    deadline = time.time() + 120
    while True:
        out = submit(address, env, entry)
        starting = any(s in out.stdout + out.stderr for s in ("No available agent", "Failed to connect"))
        if not starting or time.time() > deadline:
            return out
        time.sleep(3)


def test_tiny_config_runs_as_a_ray_job(head_node, tmp_path):
    address, env = head_node
    (tmp_path / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    run_dir = tmp_path / "run"
    entry = ["videorl", "train", "--config", "configs/tiny.yaml", "model.dim=32", "model.depth=2", "data.sft_clips=256",
             "pretrain.steps=30", "pretrain.batch_size=8", "rollout.steps=3", "rollout.group_size=4",
             "rewards.models={oracle: {kind: oracle}}", f"rewards.profile={tmp_path / 'profile.yaml'}",
             "rewards.calibration.samples_per_prompt=2", "train.steps=3", "train.groups_per_step=2",
             "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=3", "eval.seeds_per_prompt=1",
             f"train.run_dir={run_dir}", f"cache_dir={tmp_path / 'cache'}", "driver_threads=2"]
    out = submit_when_up(address, env, entry)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "succeeded" in out.stdout + out.stderr
    assert "train: 100%" in out.stdout + out.stderr  # the job's logs show progress
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["ledger"]["balanced"]
    assert (run_dir / "metrics.parquet").exists() and (run_dir / "report.html").exists()
    # the base was pretrained on driver_threads, not on the RL loop's `threads` (1)
    (record,) = (tmp_path / "cache").glob("base-*/pretrain.json")
    assert json.loads(record.read_text())["threads"] == 2


def test_submission_without_the_token_is_refused(head_node):
    address, env = head_node
    no_token = {**env, "RAY_AUTH_MODE": "disabled", "RAY_AUTH_TOKEN_PATH": "/nonexistent"}
    out = submit_when_up(address, no_token, ["python", "-c", "print(1)"])
    assert out.returncode != 0
    assert "authentication" in (out.stdout + out.stderr).lower()
