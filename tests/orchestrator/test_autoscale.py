import pytest

from orchestrator.autoscale import AutoscaleConfig, decide


def test_grows_one_at_a_time_up_to_max_under_backlog():
    cfg = AutoscaleConfig(min=1, max=3, target_backlog=2)
    replicas, streak, seen = 1, 0, []
    for _ in range(5):
        replicas, streak = decide(cfg, replicas, in_flight=12, streak=streak)
        seen.append(replicas)
    assert seen == [2, 3, 3, 3, 3]


def test_shrinks_after_patience_calm_steps_down_to_min():
    cfg = AutoscaleConfig(min=1, max=3, target_backlog=2, patience=2)
    replicas, streak, seen = 3, 0, []
    for _ in range(6):
        replicas, streak = decide(cfg, replicas, in_flight=0, streak=streak)
        seen.append(replicas)
    assert seen == [3, 2, 2, 1, 1, 1]


def test_upscale_patience_waits_for_a_lasting_backlog():
    cfg = AutoscaleConfig(min=1, max=3, target_backlog=2, upscale_patience=3)
    replicas, streak, seen = 1, 0, []
    for in_flight in [12, 12, 0, 12, 12, 12, 12, 12, 12]:  # a calm step resets the count
        replicas, streak = decide(cfg, replicas, in_flight=in_flight, streak=streak)
        seen.append(replicas)
    assert seen == [1, 1, 1, 1, 1, 2, 2, 2, 3]


def test_moderate_backlog_holds_steady():
    cfg = AutoscaleConfig(min=1, max=4, target_backlog=2, patience=1)
    assert decide(cfg, 2, in_flight=3, streak=0) == (2, 0)  # backlog 1.5: neither busy nor calm


def test_max_below_min_is_refused():
    with pytest.raises(ValueError, match="autoscale.max"):
        AutoscaleConfig(min=3, max=2)
