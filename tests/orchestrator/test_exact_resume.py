"""Exact resume: a `train.deterministic` run whose driver is SIGKILLed right after a checkpoint and resumed with
`videorl train --resume` ends with the uninterrupted run's weights, metrics, rollouts and ledger; below it, the
pipeline's re-queue and the reward scaling state on their own (real actors, the bench's simulated device time)."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
from safetensors.torch import load_file

from actors.control import control_actor
from actors.simulated import SIM_CPUS, SimulatedLearner, SimulatedReward, SimulatedRollout
from orchestrator.autoscale import restore_scaling, scale_step, scaling_state
from orchestrator.checkpoint import load_checkpoint
from orchestrator.config import DynamicGroupingConfig, load_config
from orchestrator.ledger import Ledger
from orchestrator.pipeline import Pipeline, PromptCursor
from orchestrator.reward_pool import RewardPool
from orchestrator.staleness import StalenessManager
from orchestrator.train import run_training

ROOT = Path(__file__).resolve().parents[2]
STEPS, KILL_AFTER = 6, 3  # checkpoints at steps 3 and 6; the driver dies right after the first
TINY = [
    "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
    "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
    "rewards.calibration.samples_per_prompt=2", "train.groups_per_step=2", "train.max_staleness=1",
    "ray.rollout_workers=2", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=3", "eval.seeds_per_prompt=1",
    "eval.constraint_samples_per_prompt=2", "train.deterministic=true", f"train.steps={STEPS}",
    f"train.checkpoint_every={KILL_AFTER}",
]
# Wall-clock measurements cannot repeat: samples/s and batches/s per step (throughput/*), the share of a step the
# learner waited for its batch and the rollout actors sat idle (idle/*). Every other column must be equal.
TIMING = ("throughput/", "idle/")


def _args(root: Path, run_dir: Path) -> list[str]:
    (root / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 3.0}\n")  # strict: λ rises every step
    return [*TINY, f"rewards.profile={root / 'profile.yaml'}", f"cache_dir={root / 'cache'}", f"train.run_dir={run_dir}"]


def _train(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", "train", "--address", ray.get_runtime_context().gcs_address, *args]


def _wait_until_actors_gone(timeout: float = 60) -> None:
    """Ray reaps a dead driver's actors (the named control actor and learner among them) on its own; a resumed job
    started before that would find the names taken."""
    deadline = time.time() + timeout
    while any(a["namespace"] == "videorl" for a in ray.util.list_named_actors(all_namespaces=True)):
        assert time.time() < deadline, "the killed driver's actors are still alive"
        time.sleep(0.2)


def _row(row: dict, keys: list[str]) -> dict:
    """The row's values under `keys`, NaN spelled "nan" (NaN != NaN)."""
    return {k: "nan" if isinstance(row[k], float) and np.isnan(row[k]) else row[k] for k in keys}


@pytest.mark.slow
def test_killed_and_resumed_run_equals_the_uninterrupted_run(tmp_path, ray_cluster):
    # the uninterrupted run (in this process); it also builds the cached base model and calibration both runs share
    whole = tmp_path / "whole"
    run_training(load_config(None, _args(tmp_path, whole)), whole, progress=False)

    # the same config in a `videorl train` process, SIGKILLed as soon as its step-3 checkpoint is in place
    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train(*_args(tmp_path, cut)), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = cut / "checkpoints" / f"step-{KILL_AFTER:06d}"
    deadline = time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert ckpt.exists(), "the run never reached its first checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "summary.json").exists()
    saved = load_checkpoint(ckpt)
    in_flight = saved.state["pipeline"]["in_flight"]
    # max_staleness 1: the next step's groups were generating on the previous version when the driver died, so the
    # resume must re-queue them on weights the checkpoint holds besides the current ones
    assert [g["version"] for g in in_flight] == [KILL_AFTER - 1] * 2
    assert f"in_flight_weights_v{KILL_AFTER - 1}" in saved.tensors
    _wait_until_actors_gone()

    out = subprocess.run(_train("--resume", str(cut)), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed {cut} at step {KILL_AFTER}" in out.stdout and "re-queued 2 groups" in out.stdout
    assert "rollout_workers: 1" in (cut / "config.yaml").read_text()  # deterministic: one rollout actor, whatever asked

    # final weights and optimiser state (the learner's last checkpoint) equal
    for group in ("policy", "optimizer"):
        final = f"checkpoints/step-{STEPS:06d}/{group}.safetensors"
        a, b = load_file(whole / final), load_file(cut / final)
        assert a.keys() == b.keys()
        diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        assert diff <= 1e-6, (group, diff)

    # metrics row for row, every column but wall-clock ones
    ma, mb = pq.read_table(whole / "metrics.parquet").to_pylist(), pq.read_table(cut / "metrics.parquet").to_pylist()
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == list(range(STEPS))
    assert ma[0].keys() == mb[0].keys()
    compared = [k for k in ma[0] if not k.startswith(TIMING)]
    assert len(compared) > 20 and "lambda/vq" in compared and "loss/policy" in compared
    for ra, rb in zip(ma, mb):
        assert _row(ra, compared) == _row(rb, compared), ra["step"]
    assert ma[-1]["lambda/vq"] > 0  # λ moved, so equal λ columns mean something

    # every clip trained on, and the ledger
    assert pq.read_table(whole / "rollouts.parquet").equals(pq.read_table(cut / "rollouts.parquet"))
    la, lb = (json.loads((d / "summary.json").read_text())["ledger"] for d in (whole, cut))
    assert la == lb and la["balanced"] and la["consumed"] == STEPS * 2
    assert np.isfinite(ma[-1]["reward/ta"])


PROMPTS = ["p0", "p1", "p2", "p3", "p4"]


def _sim_pool() -> RewardPool:
    """Scores every clip 0: under dynamic grouping every group is low-signal, so prompts wait to be re-sampled."""
    return RewardPool("sim", lambda name: ray.remote(SimulatedReward).options(num_cpus=SIM_CPUS).remote(name, 0.005))


def _sim_pipeline(ledger: Ledger, cursor: PromptCursor, step: int, next_group: int = 0) -> Pipeline:
    rollouts = [ray.remote(SimulatedRollout).options(num_cpus=SIM_CPUS).remote(0.005)]
    return Pipeline(rollouts, {"sim": _sim_pool()}, {"sim": ["score"]}, cursor, StalenessManager(2, 1, started=step * 2),
                    ledger, seed=3, next_group=next_group, dynamic_grouping=DynamicGroupingConfig(min_std=0.01,
                    max_resamples=1), signal_rewards=["score"], in_order=True)


def _steps(pipe: Pipeline, learner, first: int, last: int) -> list[list[tuple]]:
    """Learner steps first..last-1 -> per step, the batch's (group id, prompt, seed, weights version)."""
    out = []
    for v in range(first, last):
        batch, _, _ = pipe.learner_step(learner, v, 2, "score", {}, {})
        out.append([(g.gid, g.prompt, g.seed, g.version) for g in batch])
    return out


def _shut(pipe: Pipeline, learner) -> None:
    pipe.close()
    for pool in pipe.pools.values():
        pool.shutdown()
    for handle in [*pipe.workers, learner]:
        ray.kill(handle, no_restart=True)


def test_requeued_groups_come_back_as_they_would_have(ray_cluster):
    """In order, a pipeline stopped after step 3 and rebuilt from its state_dict, weights in flight, ledger and cursor
    trains steps 3-5 on exactly the groups (ids, prompts, seeds, versions) the uninterrupted pipeline trains."""
    learner = ray.remote(SimulatedLearner).options(num_cpus=SIM_CPUS).remote(0.0)
    whole = _sim_pipeline(Ledger(), PromptCursor(PROMPTS, 0), 0)
    whole.publish(0, learner.weights.remote())
    expected = _steps(whole, learner, 0, 6)
    balance = whole.ledger.balance(whole.held())
    _shut(whole, learner)

    learner = ray.remote(SimulatedLearner).options(num_cpus=SIM_CPUS).remote(0.0)
    cut = _sim_pipeline(Ledger(), PromptCursor(PROMPTS, 0), 0)
    cut.publish(0, learner.weights.remote())
    assert _steps(cut, learner, 0, 3) == expected[:3]
    state, cursor, ledger = cut.state_dict(), cut.prompts.state_dict(), cut.ledger.state_dict()
    weights = {v: ray.get(ref) for v, ref in cut.weights_in_flight().items()}
    next_group, current = cut.next_group, ray.get(cut.weights[1])
    assert [g["version"] for g in state["in_flight"]] == [2, 2] and list(weights) == [2]  # launched before step 3
    assert any(g["resamples"] for g in state["in_flight"])  # a re-sample goes back as one (kept, not dropped again)
    _shut(cut, learner)

    learner = ray.remote(SimulatedLearner).options(num_cpus=SIM_CPUS).remote(0.0)
    resumed = _sim_pipeline(Ledger.from_state_dict(ledger), PromptCursor(PROMPTS, 0, **cursor), 3, next_group)
    resumed.publish(3, ray.put(current))
    resumed.requeue(state, {v: ray.put(w) for v, w in weights.items()})
    assert _steps(resumed, learner, 3, 6) == expected[3:]
    assert resumed.ledger.balance(resumed.held()) == balance
    _shut(resumed, learner)


def test_reward_scaling_survives_a_resume(ray_cluster):
    """Replica counts, autoscaler streaks and a `videorl scale` request not yet applied reach the resumed job."""
    control, pool, streaks = control_actor(["sim"], named=False), _sim_pool(), {"sim": -2}
    pool.scale_to(2)
    ray.get(control.scale.remote("sim", 3))
    state = scaling_state(control, {"sim": pool}, streaks)
    assert state == {"replicas": {"sim": 2}, "streaks": {"sim": -2}, "requests": {"sim": 3}}
    assert ray.get(control.pending.remote()) == {"sim": 3}  # saving takes nothing from the running job
    pool.shutdown()
    ray.kill(control, no_restart=True)

    control, pool, streaks = control_actor(["sim"], named=False), _sim_pool(), {"sim": 0}  # the resumed job's
    restore_scaling(state, control, {"sim": pool}, streaks)
    assert pool.size == 2 and streaks == {"sim": -2}
    assert scale_step(control, {"sim": pool}, {"sim": None}, streaks, 3) == {"sim": 3}  # the request, applied next step
    pool.shutdown()
    ray.kill(control, no_restart=True)


def test_ledger_requeue_forgets_a_held_group_until_it_is_produced_again():
    ledger = Ledger()
    for gid in ("g0", "g1", "g2"):
        ledger.produce(gid)
        ledger.score(gid)
    ledger.consume("g0")
    ledger.drop("g1", "stale")
    ledger.requeue("g2")  # held at the checkpoint: generated again after the resume
    assert ledger.balance()["balanced"] and ledger.balance()["produced"] == 2
    ledger.produce("g2")
    ledger.score("g2")
    ledger.consume("g2")
    for used in ("g0", "g1", "g9"):  # trained, dropped, never produced: nothing to re-queue
        with pytest.raises(ValueError, match=f"group {used} re-queued"):
            ledger.requeue(used)
