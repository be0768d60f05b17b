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
    assert one["bound"] == pytest.approx(1 / 0.15) and four["bound"] == pytest.approx(4 / 0.15)
    assert four["throughput"] > 2.5 * one["throughput"]  # rollout-bound: 4 actors make ~4x the groups
    for n, run in runs.items():
        row, ledger = run["row"], run["ledger"]
        assert 0.6 < row["efficiency"] <= 1.05, (n, row)
        idle = {stage: sum(v.values()) for stage, v in row["idle"].items()}
        assert set(idle) == {"rollout", "reward", "learner"}
        assert idle["rollout"] < 0.4 and idle["reward"] > 0.5 and idle["learner"] > 0.5, (n, row)
        assert row["bottleneck"] == "rollout"
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


@pytest.mark.parametrize("slots", [None, 1, 2])
def test_compute_slots_cap_what_computes_at_once(ray_cluster, slots):
    """4 idle rollout actors and an admission window of 8 groups: uncapped, the first pump starts a call on every actor
    (4 in flight, 5 with the update); with N compute slots at most N calls (rollouts + the update) are ever in flight,
    the update waiting for a slot rather than adding to them, and training still goes on."""
    gps, steps = 4, 4
    rollouts = [simulated_rollout_actor(i, 0.03) for i in range(4)]
    pool = RewardPool("simulated", lambda name: simulated_reward_actor(name, 0.005), 1)
    learner = simulated_learner_actor(0.05)
    ledger = Ledger()
    pipe = Pipeline(rollouts, {"simulated": pool}, {"simulated": ["score"]}, PromptCursor(["p"], 0),
                    StalenessManager(gps, 1), ledger, seed=0, compute_slots=slots)
    try:
        drive(pipe, learner, steps, gps, "score", pool)
        assert ledger.balance(pipe.held())["consumed"] == steps * gps
        if slots is None:
            assert pipe.busy_peak >= 4
        else:
            assert pipe.busy_peak == slots
    finally:
        pipe.close()
        pool.shutdown()
        for handle in [*rollouts, learner]:
            ray.kill(handle, no_restart=True)
    with pytest.raises(ValueError, match="compute_slots"):
        Pipeline([], {}, {}, PromptCursor(["p"], 0), StalenessManager(1, 0), Ledger(), seed=0, compute_slots=0)


def test_real_mode_times_both_loops(ray_cluster):
    cfg = load_config(None, ["model.dim=16", "model.depth=1", "rollout.steps=2", "rollout.group_size=2",
                             "train.groups_per_step=2", "ray.rollout_workers=1", "ray.rollout_cpus=0.2",
                             "ray.learner_cpus=0.2", "rollout.groups_per_call=2"])
    res = real_pipeline(cfg, steps=3, warmup_steps=1)
    assert res["settings"]["groups_per_call"] == 2 and res["pipeline"]["rollout_calls_per_group"] < 1
    # ray.compute_slots=auto on this CPU-only 2-CPU cluster: 2 slots, and a third row runs without the cap
    assert res["settings"]["compute_slots"] == 2
    sync, actor, uncapped = res["rows"]
    assert sync["loop"] == "synchronous" and actor["loop"] == "actor pipeline (2 compute slots)"
    assert uncapped["loop"] == "actor pipeline (no cap)" and uncapped["clips"] == actor["clips"]
    assert actor["busy_peak"] == res["pipeline"]["busy_peak"] <= 2
    assert sync["clips_per_s"] > 0 and actor["clips_per_s"] > 0 and uncapped["clips_per_s"] > 0
    assert res["ratio"] == pytest.approx(actor["clips_per_s"] / sync["clips_per_s"])
    assert sync["clips"] == actor["clips"] == 2 * 2 * 2  # measured steps x groups x clips: the same work both ways
    assert res["pipeline"]["ledger"]["consumed"] == 3 * 2 and res["pipeline"]["ledger"]["balanced"]
    stages = res["synchronous"]["stage_seconds_per_step"]
    assert set(stages) == {"rollout", "reward", "learner"}
    cores = ray.cluster_resources()["CPU"]  # one torch thread per process
    slowest = max(stages["rollout"], stages["reward"], stages["learner"], sum(stages.values()) / cores)
    assert res["bound_clips_per_s"] == pytest.approx(2 * 2 / slowest)  # the slowest stage's, or the cores', rate
    assert res["efficiency"] == pytest.approx(actor["clips_per_s"] / res["bound_clips_per_s"])
    # CPU per step by process: the loop does everything in this process, the pipeline in its actors. The cluster's
    # own processes ("ray": raylet, GCS, dashboard) tick on beside a loop this small, so they are left out here.
    sync_cpu, pipe_cpu = res["synchronous"]["cpu_seconds_per_step"], res["pipeline"]["cpu_seconds_per_step"]
    actors_cpu = sum(sync_cpu.get(role, 0.0) for role in ("rollout", "reward", "learner"))
    assert sync_cpu["driver"] > 0 and actors_cpu < 0.1 * sync_cpu["driver"]
    assert {"driver", "rollout", "reward", "learner", "ray"} <= set(pipe_cpu)  # the reward actor's few ms may round to 0
    assert pipe_cpu["rollout"] > 0 and pipe_cpu["learner"] > 0
    assert pipe_cpu["driver"] < pipe_cpu["rollout"] + pipe_cpu["learner"]
    for cpu in (sync_cpu, pipe_cpu):
        assert cpu["total"] == pytest.approx(sum(v for k, v in cpu.items() if k != "total"))
    assert res["cpu_ratio"] == pytest.approx(pipe_cpu["total"] / sync_cpu["total"])
    assert res["cpu_bound_clips_per_s"] == pytest.approx(2 * 2 * cores / pipe_cpu["total"])
    tax = res["sharing_tax"]  # CPU per group of a rollout actor alone and beside another one
    assert tax["alone_ms_per_group"] > 0 and tax["tax"] == pytest.approx(tax["together_ms_per_group"] / tax["alone_ms_per_group"])
    assert res["tax_bound_clips_per_s"] == pytest.approx(2 * 2 * cores / (sync_cpu["total"] * tax["tax"]))
    with pytest.raises(ValueError, match="warmup_steps"):
        real_pipeline(cfg, steps=2, warmup_steps=2)


def test_balanced_sweep_with_sync_from_the_cli(ray_cluster, tmp_path):
    """`videorl bench pipeline --mode simulated --balanced --sync` in this process (the session's cluster): with no
    stage the bottleneck, the synchronous loop runs the three stages one after another (bound 3x) and the pipeline
    overlaps them; every row has the keys the issue names, and the JSON holds the same rows."""
    from orchestrator.cli import main

    assert main(["bench", "pipeline", "--mode", "simulated", "--actors", "4", "--balanced", "--sync", "--rollout-s",
                 "0.2", "--measure-s", "3", "--per-worker", "2", "--out", str(tmp_path)]) == 0
    import json

    sweep = json.loads((tmp_path / "bench_pipeline.json").read_text())["simulated"]
    [row] = sweep["rows"]
    assert sweep["runs"][0]["settings"]["per_worker"] == 2
    assert {"actors", "throughput", "bound", "efficiency", "stale_fraction", "driver_ms_per_group", "idle"} <= set(row)
    assert row["actors"] == 4 and row["bound"] == pytest.approx(20.0)  # 4 actors / 0.2 s
    assert row["efficiency"] > 0.8 and row["stale_fraction"] == 0.0
    assert 1.8 < row["speedup"] <= 3.3  # three equal stages: at most 3x
    assert row["sync_throughput"] < row["bound"] / 2.5


def test_a_reward_bound_pipeline_names_the_reward_pool(ray_cluster):
    """Reward capacity 5 groups/s against 40 for rollout: the report must say so from idle time alone -- the pool
    never waits, the rollout actors mostly do (held back by the staleness capacity: blocked on output)."""
    row = simulated_pipeline(2, steps=8, warmup_steps=2, **REWARD_BOUND)["row"]
    assert row["bottleneck"] == "reward"
    assert sum(row["idle"]["reward"].values()) < 0.1
    assert row["idle"]["rollout"]["output"] > 0.5 and sum(row["idle"]["rollout"].values()) > 0.7
    assert row["efficiency"] > 0.8


def test_weights_travel_with_the_work(ray_cluster):
    """No per-version call to every rollout actor: an actor loads a version only when it starts a group on one it
    does not hold. 8 actors, 2 groups per step: most actors never see most versions."""
    gps, steps = 2, 6
    rollouts = [simulated_rollout_actor(i, 0.02) for i in range(8)]
    pool = RewardPool("r", lambda name: simulated_reward_actor(name, 0.005), 1)
    learner = simulated_learner_actor(0.005)
    try:
        ledger = Ledger()
        pipe = Pipeline(rollouts, {"r": pool}, {"r": ["score"]}, PromptCursor(["p"], 0),
                        StalenessManager(gps, 1), ledger, seed=0)
        drive(pipe, learner, steps, gps, "score", pool)
        counts = ray.get([r.stats.remote() for r in rollouts])  # (calls run in order: after every generate sent)
        generated, loads = sum(c["generated"] for c in counts), sum(c["weight_loads"] for c in counts)
        assert len(ledger.produced) <= generated <= pipe.next_group  # groups started, some still running at the end
        assert all(c["weight_loads"] <= c["generated"] for c in counts)
        # one set_weights per actor per version would have been 8 * (steps + 1) = 56 calls
        assert loads <= generated <= (steps + 2) * gps < 8 * (steps + 1) / 2
    finally:
        pool.shutdown()
        for handle in [*rollouts, learner]:
            ray.kill(handle, no_restart=True)


def test_weights_from_a_dead_learner_end_the_pipeline_instead_of_re_running_forever(ray_cluster):
    """Rollout actors fetch a version's weights themselves: when the learner died making that version, every
    generate fails on it. The pipeline must raise the learner's death (the run restarts the learner) rather than
    re-run the groups on the same broken weights for ever (CI hung this way in test_faults once)."""
    rollouts = [simulated_rollout_actor(i, 0.01) for i in range(2)]
    pool = RewardPool("r", lambda name: simulated_reward_actor(name, 0.005), 1)
    learner = simulated_learner_actor(0.005)
    try:
        pipe = Pipeline(rollouts, {"r": pool}, {"r": ["score"]}, PromptCursor(["p"], 0), StalenessManager(2, 1),
                        Ledger(), seed=0)
        ray.get(learner.ping.remote())
        ray.kill(learner, no_restart=True)
        deadline = time.monotonic() + 120  # a bound on waiting, not a timing assertion: a loaded machine starts actors slowly
        # ray.kill is asynchronous: a call made just after it may still run (then version 0 would be good weights)
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                ray.get(learner.ping.remote())
        pipe.publish(0, learner.weights.remote())  # fails: its learner is gone
        with pytest.raises(ray.exceptions.RayActorError):
            while time.monotonic() < deadline:
                pipe.pump(0, timeout=0.05)
        assert pipe.ledger.retried <= 2  # at most the groups in flight when it was noticed
    finally:
        pool.shutdown()
        for handle in rollouts:
            ray.kill(handle, no_restart=True)


@pytest.mark.parametrize("per_worker", [1, 2])
def test_per_worker_is_the_rollouts_each_actor_holds(ray_cluster, per_worker):
    """`--per-worker` / Pipeline(per_worker): with room in the staleness capacity, each actor gets that many groups."""
    rollouts = [simulated_rollout_actor(i, 0.5) for i in range(2)]
    pool = RewardPool("r", lambda name: simulated_reward_actor(name, 0.005), 1)
    try:
        pipe = Pipeline(rollouts, {"r": pool}, {"r": ["score"]}, PromptCursor(["p"], 0), StalenessManager(8, 1),
                        Ledger(), seed=0, per_worker=per_worker)
        pipe.pump(0)
        assert pipe.worker_loads() == [per_worker, per_worker] and pipe.next_group == 2 * per_worker
        pipe.close()
    finally:
        pool.shutdown()
        for handle in rollouts:
            ray.kill(handle, no_restart=True)


def test_the_ceiling_is_measured_beside_the_bare_ray_calls(ray_cluster, tmp_path):
    """`--ceiling`: the pipeline with every stage ~0 s and the same Ray calls without orchestration, in one process."""
    import json

    from orchestrator.cli import main

    assert main(["bench", "pipeline", "--mode", "simulated", "--actors", "2", "--rollout-s", "0.05", "--measure-s",
                 "0.2", "--ceiling", "--out", str(tmp_path)]) == 0
    top = json.loads((tmp_path / "bench_pipeline.json").read_text())["ceiling"]
    pipe, floor = top["pipeline"], top["ray_calls_only"]
    assert pipe["balanced"] and top["settings"]["per_worker"] == 2 and top["settings"]["rollout_s"] < 1e-3
    assert pipe["driver_ms_per_group"] >= pipe["driver_main_ms_per_group"] > 0 and floor["driver_ms_per_group"] > 0
    assert top["orchestration_ms_per_group"] == pytest.approx(pipe["driver_ms_per_group"] - floor["driver_ms_per_group"])
    assert 0 < pipe["machine_cpu_util"] <= 1.05 and floor["groups_per_s"] > 0  # all cores busy at most (10 ms ticks)


def test_groups_per_call_carries_several_groups_in_one_generate_call(ray_cluster, tmp_path):
    """Pipeline(groups_per_call=3) / `--groups-per-call 3`: each call carries up to 3 groups (fewer only when the
    staleness capacity has fewer left), every group is produced, scored and consumed once, and the actors generate
    as many groups as with one call per group."""
    kw = dict(rollout_s=0.03, reward_s=0.005, reward_replicas=1, learner_s=0.01, groups_per_step=6, max_staleness=2,
              steps=5, warmup_steps=1)
    one, three = (simulated_pipeline(2, groups_per_call=k, **kw) for k in (1, 3))
    assert one["row"]["rollout_calls_per_group"] == 1.0 and one["settings"]["groups_per_call"] == 1
    assert 1 / 3 <= three["row"]["rollout_calls_per_group"] <= 0.5 and three["settings"]["groups_per_call"] == 3
    for run in (one, three):
        ledger = run["ledger"]
        assert run["row"]["balanced"] and ledger["lost"] == 0 and ledger["counted_twice"] == 0
        assert ledger["consumed"] == 5 * 6 and ledger["produced"] == ledger["consumed"] + ledger["dropped"]
    import json

    from orchestrator.cli import main

    assert main(["bench", "pipeline", "--mode", "simulated", "--actors", "2", "--rollout-s", "0.03", "--reward-s",
                 "0.005", "--reward-replicas", "1", "--learner-s", "0.01", "--groups-per-step", "6", "--max-staleness",
                 "2", "--measure-s", "0.5", "--groups-per-call", "3", "--reward-batch-max", "2", "--out",
                 str(tmp_path)]) == 0
    run = json.loads((tmp_path / "bench_pipeline.json").read_text())["simulated"]["runs"][0]
    assert run["settings"]["groups_per_call"] == 3 and run["settings"]["reward_batch_max"] == 2
    assert run["row"]["rollout_calls_per_group"] <= 0.5 and run["row"]["reward_calls_per_group"] >= 0.5
    with pytest.raises(ValueError, match="groups_per_call"):
        Pipeline([], {}, {}, PromptCursor(["p"], 0), StalenessManager(2, 1), Ledger(), seed=0, groups_per_call=0)
    with pytest.raises(ValueError, match="groups_per_call must be 1"):
        Pipeline([], {}, {}, PromptCursor(["p"], 0), StalenessManager(2, 1), Ledger(), seed=0, groups_per_call=2,
                 in_order=True)
