"""`videorl bench pipeline` on a real local Ray cluster: simulated stages (sleeps) and the real tiny model.

Stage durations are sleeps inside the actors, so throughputs are set by them, not by this machine's
load; the bounds below leave wide margins and no test asserts on a wall-clock time.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray

from actors.simulated import simulated_learner_actor, simulated_reward_actor, simulated_rollout_actor
from orchestrator.autoscale import AutoscaleConfig
from orchestrator.bench import drive, real_pipeline, simulated_pipeline
from orchestrator.config import load_config
from orchestrator.ledger import Ledger
from orchestrator.pipeline import Pipeline, PromptCursor
from orchestrator.reward_pool import RewardPool
from orchestrator.staleness import StalenessManager

pytestmark = pytest.mark.slow


def test_simulated_throughput_rises_with_rollout_actors(ray_cluster):
    runs = {n: simulated_pipeline(n, rollout_s=0.15, reward_s=0.01, reward_replicas=1, learner_s=0.02, groups_per_step=4,
                                  max_staleness=2, steps=5, warmup_steps=1) for n in (1, 4)}
    one, four = runs[1]["row"], runs[4]["row"]
    assert one["bound_groups_per_s"] == pytest.approx(1 / 0.15) and four["bound_groups_per_s"] == pytest.approx(4 / 0.15)
    assert four["groups_per_s"] > 2.5 * one["groups_per_s"]  # rollout-bound: 4 actors make ~4x the groups
    for n, run in runs.items():
        row, ledger = run["row"], run["ledger"]
        assert 0.6 < row["efficiency"] <= 1.05, (n, row)
        assert 0.6 < row["util_rollout"] <= 1.05 and row["util_reward"] < 0.3 and row["util_learner"] < 0.5, (n, row)
        assert row["balanced"] and ledger["lost"] == 0 and ledger["counted_twice"] == 0
        assert row["driver_ms_per_group"] > 0  # measured (process CPU time), not asserted against a budget
        assert ledger["consumed"] == 5 * 4 and ledger["produced"] == ledger["consumed"] + ledger["dropped"]
        assert [s["step"] for s in run["steps"]] == list(range(5))
    with pytest.raises(ValueError, match="scale_at"):
        simulated_pipeline(1, steps=3, scale_at={5: 2})
    with pytest.raises(ValueError, match="rollout_s"):
        simulated_pipeline(1, rollout_s=0.0)


# reward is the bottleneck: one replica scores 1 / 0.2 s = 5 groups/s against 40 for the two rollout actors
REWARD_BOUND = {"rollout_s": 0.05, "reward_s": 0.2, "reward_replicas": 1, "learner_s": 0.01, "groups_per_step": 4,
                "max_staleness": 2}


def _throughput_by_replicas(run: dict) -> dict[int, float]:
    return {seg["reward_replicas"]: seg["reward_groups_per_s"] for seg in run["reward_scaling"]}


def test_a_scale_request_mid_run_raises_reward_throughput(ray_cluster):
    """scale_at sends the control actor the request `videorl scale --reward simulated=3` sends."""
    run = simulated_pipeline(2, steps=10, warmup_steps=1, scale_at={3: 3}, **REWARD_BOUND)
    assert [s["reward_replicas"] for s in run["steps"]] == [1, 1, 1] + [3] * 7
    one, three = run["reward_scaling"]
    assert (one["first_step"], one["last_step"], three["first_step"], three["last_step"]) == (0, 2, 3, 9)
    assert three["measured_from_step"] <= 8
    assert one["reward_groups_per_s"] < 5.5  # one replica cannot beat 1 / 0.2 s
    assert three["reward_groups_per_s"] > 1.8 * one["reward_groups_per_s"]
    assert run["row"]["balanced"] and run["ledger"]["consumed"] == 10 * 4


def test_the_autoscaler_grows_a_backed_up_reward_pool_to_its_max(ray_cluster):
    rule = AutoscaleConfig(min=1, max=3, target_backlog=1.0, upscale_patience=3)
    run = simulated_pipeline(2, steps=14, warmup_steps=1, autoscale=rule, **REWARD_BOUND)
    replicas = [s["reward_replicas"] for s in run["steps"]]
    assert replicas[:5] == [1, 1, 1, 2, 2] and replicas[-1] == 3  # after 3 backed-up steps, one at a time
    assert replicas == sorted(replicas) and all(b - a <= 1 for a, b in zip(replicas, replicas[1:]))
    rates = _throughput_by_replicas(run)
    assert rates[1] < 5.5 and rates[3] > 1.8 * rates[1]
    assert run["row"]["balanced"]


def test_videorl_scale_from_another_process_resizes_a_running_pool(ray_cluster, tmp_path):
    """The by-hand path end to end: the real `videorl scale` CLI in a subprocess finds the run's named control
    actor on this cluster and the running pool grows at the next step."""
    result = {}
    runner = threading.Thread(target=lambda: result.update(simulated_pipeline(
        2, steps=60, warmup_steps=1, named_control=True, **{**REWARD_BOUND, "reward_s": 0.1})), daemon=True)
    runner.start()
    deadline = time.monotonic() + 60
    while _run_step() < 3 and time.monotonic() < deadline:  # let the run go a few steps at one replica
        time.sleep(0.1)
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "scale", "--address", address,
                          "--reward", "simulated=3"], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    assert "requested {'simulated': 3}" in out.stdout
    runner.join(timeout=120)
    assert not runner.is_alive()
    replicas = [s["reward_replicas"] for s in result["steps"]]
    assert replicas[0] == 1 and replicas[-1] == 3, replicas
    rates = _throughput_by_replicas(result)
    assert rates[3] > 1.8 * rates[1]
    assert not _control_exists()  # the run's control actor is gone with the run


def _control_exists() -> bool:
    from actors.control import NAME, NAMESPACE

    try:
        ray.get_actor(NAME, namespace=NAMESPACE)
    except ValueError:
        return False
    return True


def _run_step() -> int:
    """Learner steps the running job has reported done (-1 before its first report)."""
    from actors.control import find_control

    try:
        return ray.get(find_control().get_status.remote()).get("steps_done", -1)
    except ValueError:
        return -1


def test_dropped_groups_give_their_admission_slot_back(ray_cluster):
    """Every third group holds a bad sample and is dropped. Each drop must free its admission slot: otherwise the
    window of (max_staleness + 1) * groups_per_step = 4 groups shrinks with every drop, and after 3 drops a batch
    of 2 can never fill again (next_batch waits forever; checked against the pre-fix Pipeline)."""
    gps, max_staleness, steps = 2, 1, 8
    rollouts = [simulated_rollout_actor(i, 0.02) for i in range(2)]
    pool = RewardPool("flaky", lambda name: simulated_reward_actor(name, 0.005, bad_every=3), 1)
    learner = simulated_learner_actor(0.005)
    ledger = Ledger()
    pipe = Pipeline(rollouts, {"flaky": pool}, {"flaky": ["score"]}, PromptCursor(["p"], 0),
                    StalenessManager(gps, max_staleness), ledger, seed=0)
    runner = threading.Thread(target=drive, args=(pipe, learner, steps, gps, "score", pool), daemon=True)
    try:
        runner.start()
        runner.join(timeout=30)
        balance = ledger.balance(pipe.held())
        assert not runner.is_alive(), f"pipeline stalled: {balance}"
        assert balance["dropped_data_error"] >= (max_staleness + 1) * gps + 1
        assert balance["consumed"] == steps * gps and balance["balanced"]
        assert balance["skipped_samples"] == balance["dropped_data_error"]  # groups of one clip
    finally:
        pool.shutdown()
        for handle in [*rollouts, learner]:
            ray.kill(handle, no_restart=True)


def test_real_mode_times_both_loops(ray_cluster):
    cfg = load_config(None, ["model.dim=16", "model.depth=1", "rollout.steps=2", "rollout.group_size=2",
                             "train.groups_per_step=2", "ray.rollout_workers=1", "ray.rollout_cpus=0.2",
                             "ray.learner_cpus=0.2"])
    res = real_pipeline(cfg, steps=3, warmup_steps=1)
    sync, actor = res["rows"]
    assert sync["loop"] == "synchronous" and actor["loop"] == "actor pipeline"
    assert sync["clips_per_s"] > 0 and actor["clips_per_s"] > 0
    assert res["ratio"] == pytest.approx(actor["clips_per_s"] / sync["clips_per_s"])
    assert sync["clips"] == actor["clips"] == 2 * 2 * 2  # measured steps x groups x clips: the same work both ways
    assert res["pipeline"]["ledger"]["consumed"] == 3 * 2 and res["pipeline"]["ledger"]["balanced"]
    assert set(res["synchronous"]["stage_seconds_per_step"]) == {"rollout", "reward", "learner"}
    with pytest.raises(ValueError, match="warmup_steps"):
        real_pipeline(cfg, steps=2, warmup_steps=2)
