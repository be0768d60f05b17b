"""Completion queues (finished Ray calls in finishing order) and per-stage idle accounting."""

import pytest
import ray

from orchestrator.completions import Completions, Occupancy, idle_split


def test_finished_calls_arrive_in_finishing_order_with_their_values_and_errors(ray_cluster):
    @ray.remote(num_cpus=0.01)
    def after(first: list, value):
        """Finishes after `first` ([ref], nested so an error in it does not propagate): an order set by data
        dependencies, not by sleeps a loaded machine may reorder."""
        ray.wait(first, num_returns=len(first))
        if isinstance(value, Exception):
            raise value
        return value

    done = Completions()
    fast = after.remote([], 1)
    bad = after.remote([fast], KeyError("k"))
    slow = after.remote([bad], 3)
    for tag, ref in (("slow", slow), ("fast", fast), ("bad", bad)):  # watched in another order than they finish
        done.watch(ref, tag)
    got = []
    while len(got) < 3:
        assert done.wake.wait(30)
        done.wake.clear()
        got += done.take()
    assert [tag for tag, _ in got] == ["fast", "bad", "slow"]
    assert got[0][1].result() == 1 and got[2][1].result() == 3
    with pytest.raises(KeyError):
        got[1][1].result()
    assert done.take() == [] and done.take(timeout=0.01) == []


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_occupancy_splits_idle_time_into_waiting_for_input_and_blocked_on_output():
    clock = Clock()
    stage = Occupancy(units=4, clock=clock)
    start = stage.totals()
    clock.now = 10.0  # 10 s, nothing to do: 40 unit-seconds idle, waiting for input
    stage.change(busy=3)
    clock.now = 20.0  # 3 of 4 busy for 10 s; the fourth waits for input
    stage.change(idle_is="output")
    clock.now = 30.0  # 3 busy, the fourth held back (blocked on output) for 10 s
    stage.change(busy=-3, units=-2)
    clock.now = 35.0  # 2 units left, both blocked for 5 s
    end = stage.totals()
    assert end == (60.0, 130.0, 20.0)  # busy, existing, blocked unit-seconds
    split = idle_split(start, end)
    assert split["output"] == pytest.approx(20 / 130) and split["input"] == pytest.approx(50 / 130)
    assert idle_split(end, end) == {"input": 0.0, "output": 0.0}
