"""Bounded off-policy-ness (AReaL's capacity rule).

Guarantee: a trajectory group made by policy version k is trained on only while
(learner version - k) <= max_staleness. Admission keeps the rollout side at most
`max_staleness` versions ahead: with `groups_per_step` groups consumed per learner step,
the n-th group (0-based) may start only once the learner has reached version
n // groups_per_step - max_staleness. Groups that arrive staler anyway (a slow actor, a
retry after a failure) are dropped at consumption and counted in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StalenessManager:
    groups_per_step: int
    max_staleness: int
    started: int = 0

    def __post_init__(self) -> None:
        if self.groups_per_step < 1 or self.max_staleness < 0:
            raise ValueError(f"need groups_per_step >= 1 and max_staleness >= 0, got {self.groups_per_step}, {self.max_staleness}")

    def capacity(self, learner_version: int) -> int:
        """How many more groups may start now."""
        limit = (learner_version + self.max_staleness + 1) * self.groups_per_step
        return max(0, limit - self.started)

    def start(self, n: int = 1) -> None:
        self.started += n

    def release(self, n: int = 1) -> None:
        """A started group was dropped (stale, bad data): its slot goes back, or the window would shrink for good."""
        self.started -= n

    def is_stale(self, group_version: int, learner_version: int) -> bool:
        return learner_version - group_version > self.max_staleness
