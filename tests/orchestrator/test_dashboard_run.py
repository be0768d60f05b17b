"""During a real training run, the dashboard's Prometheus endpoint carries queue depths per actor, λ and throughput."""

import threading
import time
import urllib.request

import pytest

from orchestrator.config import load_config
from orchestrator.train import run_training

pytestmark = pytest.mark.slow


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()


def has(text: str, name: str, **labels: str) -> bool:
    return any(line.split("{")[0].split(" ")[0] == name and all(f'{k}="{v}"' in line for k, v in labels.items())
               for line in text.splitlines())


def test_prometheus_shows_queues_lambda_and_throughput_during_a_run(tmp_path, ray_cluster):
    (tmp_path / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 2.0}\n")
    cfg = load_config(None, [
        "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=30", "pretrain.batch_size=8",
        "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
        f"rewards.profile={tmp_path / 'profile.yaml'}", "rewards.calibration.samples_per_prompt=2", "train.steps=400",
        "train.groups_per_step=2", "ray.rollout_workers=2", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2",
        "eval.steps=2", "eval.seeds_per_prompt=1", f"cache_dir={tmp_path / 'cache'}", "train.checkpoint_every=100",
    ])
    errors, stop = [], threading.Event()
    thread = threading.Thread(target=lambda: _run(cfg, tmp_path / "run", errors, stop), daemon=True)
    thread.start()
    port = ray_cluster.nodes()[0]["MetricsExportPort"]
    want = {
        "rollout queue": ("ray_videorl_queue_depth", {"stage": "rollout", "actor": "rollout-0"}),
        "reward queue": ("ray_videorl_queue_depth", {"stage": "reward", "actor": "reward-oracle-0"}),
        "lambda": ("ray_videorl_lambda_vq", {}),
        "throughput": ("ray_videorl_throughput_samples_per_s", {}),
        "policy version": ("ray_videorl_policy_version", {}),
    }
    found, deadline = set(), time.time() + 240
    while thread.is_alive() and time.time() < deadline and len(found) < len(want):
        text = scrape(port)
        found |= {k for k, (name, labels) in want.items() if has(text, name, **labels)}
        time.sleep(1)
    running = thread.is_alive()
    stop.set()  # end the run after its current step
    thread.join(timeout=300)
    assert not errors, errors
    assert found == set(want), f"missing {set(want) - found}"
    assert running, "metrics must be visible while the run is going"


def _run(cfg, run_dir, errors, stop):
    try:
        run_training(cfg, run_dir, progress=False, stop=stop)
    except Exception as e:  # surfaced by the test
        errors.append(repr(e))
