"""Reward actors behind a RewardPool on a real local Ray cluster: a replica killed mid-batch, data errors
that cross the Ray boundary intact and are not retried, infrastructure errors retried elsewhere, scaling."""
import time

import numpy as np
import pytest
import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from actors.failures import InfraError
from actors.reward import RewardWorker, reward_actor
from orchestrator.reward_pool import RewardPool
from rewards import world
from rewards.errors import DataError
from rewards.scorer import RewardScorer

pytestmark = pytest.mark.slow  # starts actors and a Ray cluster: seconds, not milliseconds


def _batches(n, clips=3, seed=0):
    """n micro-batches {"ids", "videos" uint8 [clips, 8, 16, 16, 3], "prompts"} keyed by batch id."""
    videos, prompts = world.sft_dataset(n * clips, seed=seed)
    videos = world.to_uint8(videos)
    return {f"b{i:02d}": {"ids": [f"b{i:02d}-{j}" for j in range(clips)],
                          "videos": videos[i * clips:(i + 1) * clips],
                          "prompts": [p.text for p in prompts[i * clips:(i + 1) * clips]]}
            for i in range(n)}


def _direct(batches):
    """Scores computed without Ray, for comparison."""
    scorer = RewardScorer("oracle")
    return {bid: scorer.score(b["videos"], b["prompts"], b["ids"]) for bid, b in batches.items()}


def _spawner(delay_s=0.0):
    return lambda name: reward_actor(name, "oracle", num_cpus=0.25, delay_s=delay_s)


def _collect(results):
    """[(batch_id, result)] -> {batch_id: result}, asserting that no batch id came back twice."""
    ids = [bid for bid, _ in results]
    assert len(ids) == len(set(ids)), f"batch ids delivered more than once: {sorted(ids)}"
    return dict(results)


def _assert_each_batch_scored_once(results, batches):
    """Every batch id came back exactly once, with the scores a direct scorer gives it."""
    got, direct = _collect(results), _direct(batches)
    assert sorted(got) == sorted(batches)
    for bid in batches:
        np.testing.assert_array_equal(got[bid], direct[bid])


def _when_back(method, timeout_s=120.0):
    """method.remote()'s value once the actor answers: a restarting actor refuses calls until it is up again
    (ActorUnavailableError), which on a loaded machine can outlast the pool's drain."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(method.remote(), timeout=30)
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_killing_a_replica_mid_batch_loses_nothing_and_counts_nothing_twice(ray_cluster):
    batches = _batches(24)
    # every batch its own call, sent at once (12 queued on each replica, none left in the driver to reach the
    # restarted victim): what a replica holds when it dies is what this test is about
    pool = RewardPool("kill", _spawner(delay_s=0.1), replicas=2, backoff_s=0.05, batch_max=1, calls_per_replica=24)
    try:
        victim = pool.replicas["reward-kill-0"]
        before = ray.get(victim.stats.remote(), timeout=30)
        for bid, b in batches.items():
            pool.submit(bid, ray.put(b))
        results = []
        while not results:  # the first results are back ...
            results += pool.ready(timeout=0.05)
        in_flight_on_victim = pool.load["reward-kill-0"]
        assert in_flight_on_victim >= 3  # ... and the victim still holds work
        ray.kill(victim, no_restart=False)
        results += pool.drain(timeout=60)

        _assert_each_batch_scored_once(results, batches)
        c = pool.counters
        assert c.retried >= in_flight_on_victim - 1 > 0  # the victim's queue was retried (one may have finished)
        assert (c.submitted, c.scored, c.failed) == (24, 24, 0)
        after = _when_back(victim.ping), ray.get(victim.stats.remote(), timeout=30)
        assert after[0] == "reward-kill-0"  # Ray restarted it under the same name and handle ...
        assert after[1]["pid"] != before["pid"] and after[1]["batches"] == 0  # ... as a fresh process
    finally:
        pool.shutdown()


def test_a_data_error_crosses_the_boundary_naming_the_sample_and_is_not_retried(ray_cluster):
    batches = _batches(4)
    bad = dict(batches["b02"])
    bad["videos"] = list(bad["videos"])
    bad["videos"][1] = bad["videos"][1][:, :, :15]  # one clip [8, 16, 15, 3] in the middle of the batch
    batches["b02"] = bad
    pool = RewardPool("data", _spawner(), replicas=2, backoff_s=0.05)
    try:
        ref = ray.put(bad)
        with pytest.raises(DataError) as err:  # straight from the actor: still a DataError, id intact
            ray.get(pool.replicas["reward-data-0"].score.remote(ref), timeout=30)
        assert err.value.sample_id == "b02-1" and not isinstance(err.value, InfraError)
        for bid, b in batches.items():
            pool.submit(bid, ray.put(b))
        got = _collect(pool.drain(timeout=60))
        assert sorted(got) == sorted(batches)
        assert isinstance(got["b02"], DataError) and got["b02"].sample_id == "b02-1"
        assert "(8, 16, 15, 3)" in str(got["b02"])
        direct = _direct({k: v for k, v in batches.items() if k != "b02"})
        for bid, scores in direct.items():
            np.testing.assert_array_equal(got[bid], scores)
        c = pool.counters
        assert (c.submitted, c.scored, c.failed, c.retried) == (4, 3, 1, 0)
    finally:
        pool.shutdown()


class _FaultyDevice:
    """Stands in for a broken accelerator on one replica: any batch whose first id starts with "flaky"
    raises the RuntimeError a CUDA fault would; everything else is scored by the real scorer."""

    def __init__(self, scorer: RewardScorer):
        self.scorer, self.dims = scorer, scorer.dims

    def score(self, videos, prompts, ids):
        if ids[0].startswith("flaky"):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self.scorer.score(videos, prompts, ids)


class _ReplicaWithBadDevice(RewardWorker):
    """A real RewardWorker (its failure classification included) whose replica 0 has a faulty device."""

    def __init__(self, name, kind, checkpoint=None, delay_s=0.0):
        super().__init__(name, kind, checkpoint, delay_s)
        if name.endswith("-0"):
            self.scorer = _FaultyDevice(self.scorer)


class _Restarting(RewardWorker):
    """A real RewardWorker that answers as Ray answers for a replica it is restarting (ActorUnavailableError) for its
    first `restart_s` seconds: what a killed replica does while its new process starts on a busy machine."""

    def __init__(self, name, restart_s):
        super().__init__(name, "oracle")
        self.up_at = time.monotonic() + restart_s

    def score_many(self, *batches):
        if time.monotonic() < self.up_at:
            raise ActorUnavailableError("The actor is temporarily unavailable: IOError: The actor is restarting.", None)
        return super().score_many(*batches)


@pytest.mark.parametrize("restart_wait_s", [300.0, 0.0])
def test_a_replica_slower_to_restart_than_the_back_offs_spends_no_retries(ray_cluster, restart_wait_s):
    """One replica, restarting for 4 s: longer than the pool's back-offs (5 retries, 1.55 s in all). Waiting for a
    restarting replica spends no retry (restart_wait_s), so both batches are scored; without the wait they fail."""
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    spawn = lambda name: ray.remote(_Restarting).options(  # noqa: E731
        name=name, num_cpus=0.25, max_restarts=-1, max_task_retries=0).remote(name, 4.0)
    pool = RewardPool("slow", spawn, replicas=1, backoff_s=0.05, restart_wait_s=restart_wait_s)
    batches = _batches(2, seed=4)
    try:
        for bid, b in batches.items():
            pool.submit(bid, ray.put(b))
        results = pool.drain(timeout=60)
        c = pool.counters
        if restart_wait_s:
            _assert_each_batch_scored_once(results, batches)
            assert (c.scored, c.failed) == (2, 0) and c.retried >= 2 * 2  # each batch waited through several tries
        else:
            got = _collect(results)
            assert sorted(got) == sorted(batches) and all(isinstance(r, InfraError) for r in got.values())
            assert (c.scored, c.failed, c.retried) == (0, 2, 2 * 5)
    finally:
        pool.shutdown()


def test_a_replica_killed_holding_a_call_of_several_batches_has_each_of_them_retried(ray_cluster):
    batches = _batches(24, seed=3)
    pool = RewardPool("multi", _spawner(delay_s=0.3), replicas=2, backoff_s=0.05, batch_max=4)
    try:
        for bid, b in batches.items():
            pool.submit(bid, ray.put(b))
        results, held = [], []
        while not held:  # until the victim holds a call of more than one batch that is still running
            results += pool.ready(timeout=0.02)
            held = [jobs for ref, (replica, jobs) in pool.calls.items()
                    if replica == "reward-multi-0" and len(jobs) > 1 and not ray.wait([ref], timeout=0)[0]]
        ray.kill(pool.replicas["reward-multi-0"], no_restart=False)  # (>= 0.6 s before that call could end)
        results += pool.drain(timeout=60)
        _assert_each_batch_scored_once(results, batches)
        c = pool.counters
        assert c.retried >= len(held[0]) - 1 and (c.submitted, c.scored, c.failed) == (24, 24, 0)
        assert c.calls < c.submitted + c.retried  # several batches per call (retries go out in calls too)
    finally:
        pool.shutdown()


def test_an_infra_error_on_one_replica_is_retried_on_another(ray_cluster):
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import a test module
    spawn = lambda name: ray.remote(_ReplicaWithBadDevice).options(  # noqa: E731
        name=name, num_cpus=0.25, max_restarts=-1, max_task_retries=0).remote(name, "oracle")
    batches = _batches(3, seed=1)
    batches["flaky"] = {**batches.pop("b01"), "ids": ["flaky-0", "flaky-1", "flaky-2"]}
    pool = RewardPool("infra", spawn, replicas=2, backoff_s=0.05)
    try:
        ref = ray.put(batches["flaky"])
        with pytest.raises(InfraError, match="reward-infra-0: RuntimeError: CUDA error") as err:
            ray.get(pool.replicas["reward-infra-0"].score.remote(ref), timeout=30)
        assert not isinstance(err.value, DataError)
        pool.submit("flaky", ref)
        assert [j.replica for _, jobs in pool.calls.values() for j in jobs] == ["reward-infra-0"]  # on the bad device
        for bid in ("b00", "b02"):
            pool.submit(bid, ray.put(batches[bid]))
        got = _collect(pool.drain(timeout=60))
        assert sorted(got) == sorted(batches)
        for bid, scores in _direct(batches).items():
            np.testing.assert_array_equal(got[bid], scores)
        c = pool.counters
        assert (c.submitted, c.scored, c.failed, c.retried) == (3, 3, 0, 1)
        stats = ray.get([h.stats.remote() for h in pool.replicas.values()], timeout=30)
        assert {s["name"]: s["batches"] for s in stats}["reward-infra-1"] >= 1
    finally:
        pool.shutdown()


def test_scaling_up_takes_work_at_once_and_scaling_down_waits_for_in_flight_work(ray_cluster):
    batches = _batches(18, clips=2, seed=2)
    direct = _direct(batches)
    pool = RewardPool("scale", _spawner(delay_s=0.1), replicas=1, backoff_s=0.05)
    try:
        pool.scale_to(3)
        names = ["reward-scale-0", "reward-scale-1", "reward-scale-2"]
        assert sorted(pool.replicas) == names
        assert [ray.get(ray.get_actor(n).ping.remote(), timeout=30) for n in names] == names  # readable names
        first = sorted(batches)[:9]
        for bid in first:
            pool.submit(bid, ray.put(batches[bid]))
        got = _collect(pool.drain(timeout=60))
        stats = ray.get([h.stats.remote() for h in pool.replicas.values()], timeout=30)
        assert sum(s["batches"] for s in stats) == 9 and min(s["batches"] for s in stats) >= 2  # the new ones took work at once

        rest = sorted(batches)[9:]
        for bid in rest:
            pool.submit(bid, ray.put(batches[bid]))
        pool.scale_to(1)  # while every replica holds work
        assert pool.size == 1 and len(pool.retiring) == 2
        retired = dict(pool.retiring)
        assert all(pool.load[n] > 0 for n in retired)  # they are finishing, not dropped
        got.update(_collect(pool.drain(timeout=60)))
        assert sorted(got) == sorted(batches)
        for bid in batches:
            np.testing.assert_array_equal(got[bid], direct[bid])
        assert (pool.counters.scored, pool.counters.retried) == (18, 0)  # nothing lost, nothing redone
        assert not pool.retiring
        for name, handle in retired.items():  # retired only after their work came back: now gone for good
            assert _dies(handle), name
        assert list(pool.replicas) == [n for n in names if n not in retired]
    finally:
        pool.shutdown()


def _dies(handle, within: float = 30.0) -> bool:
    """ray.kill is asynchronous: the actor answers calls queued before the kill lands, then never again."""
    deadline = time.time() + within
    while time.time() < deadline:
        try:
            ray.get(handle.ping.remote(), timeout=5)
        except RayActorError:
            return True
        time.sleep(0.2)
    return False
