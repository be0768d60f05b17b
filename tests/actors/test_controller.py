"""The named constraint-controller actor on a real local Ray cluster: λ survives the actor's death."""

import time

import pytest
import ray

from actors.controller import controller_actor
from rewards.constraints import ConstraintsConfig, ConstraintSet

TAUS = {"vq": 0.7, "ta": 0.4}
MEANS = [{"vq": 0.5, "ta": 0.3}, {"vq": 0.6, "ta": 0.5}, {"vq": 0.75, "ta": 0.2}, {"vq": 0.8, "ta": 0.45},
         {"vq": 0.65, "ta": 0.1}, {"vq": 0.55, "ta": 0.6}]


def _kill_and_wait_for_restart(handle, timeout=60.0):
    """ray.kill is asynchronous: wait until the restarted controller (fresh state, 0 updates) answers."""
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + timeout
    while ray.get(handle.state_dict.remote())["updates"] != 0:
        assert time.monotonic() < deadline, "the controller did not restart"
        time.sleep(0.05)


def test_a_killed_controller_resumes_from_the_state_the_loop_holds(ray_cluster):
    reference = ConstraintSet.from_config(ConstraintsConfig(), TAUS)
    handle = controller_actor(ConstraintsConfig().model_dump(), TAUS)
    state = ray.get(handle.state_dict.remote())
    for t, means in enumerate(MEANS):
        if t in (2, 4):
            _kill_and_wait_for_restart(handle)
        lambdas, state = ray.get(handle.update.remote(means, state))
        expected = reference.update(means)
        assert lambdas == pytest.approx(expected, abs=1e-12), t
    assert state["updates"] == len(MEANS)
    ray.kill(handle, no_restart=True)


def test_without_the_state_a_restart_would_lose_lambda(ray_cluster):
    """The failure the state hand-back prevents: a restarted controller alone starts again from λ = 0."""
    handle = controller_actor(ConstraintsConfig().model_dump(), TAUS)
    for means in MEANS[:3]:
        before, _ = ray.get(handle.update.remote(means))
    _kill_and_wait_for_restart(handle)
    after, state = ray.get(handle.update.remote(MEANS[3]))
    fresh = ConstraintSet.from_config(ConstraintsConfig(), TAUS).update(MEANS[3])
    assert state["updates"] == 1 and after == pytest.approx(fresh, abs=1e-12) and after != pytest.approx(before)
    ray.kill(handle, no_restart=True)
