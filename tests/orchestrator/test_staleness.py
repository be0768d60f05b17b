import pytest

from orchestrator.staleness import StalenessManager


def simulate(max_staleness: int, groups_per_step: int = 4, steps: int = 6) -> list[int]:
    """Start groups greedily, consume them in order; return the staleness of every consumed group."""
    sm = StalenessManager(groups_per_step, max_staleness)
    queue, seen = [], []
    for version in range(steps):
        n = sm.capacity(version)
        sm.start(n)
        queue += [version] * n
        batch, queue = queue[:groups_per_step], queue[groups_per_step:]
        seen += [version - v for v in batch]
    return seen


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_greedy_rollout_never_exceeds_max_staleness(eta):
    seen = simulate(eta)
    assert max(seen) == eta  # the bound is reached (rollout runs ahead) and never exceeded
    assert len(seen) == 6 * 4  # the learner never starves


def test_capacity_and_stale_check():
    sm = StalenessManager(groups_per_step=2, max_staleness=1)
    assert sm.capacity(0) == 4
    sm.start(4)
    assert sm.capacity(0) == 0 and sm.capacity(1) == 2
    assert not sm.is_stale(3, 4) and sm.is_stale(2, 4)
    with pytest.raises(ValueError):
        StalenessManager(0, 1)
