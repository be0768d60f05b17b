"""The infrastructure side of the failure taxonomy (the data side is rewards.errors.DataError)."""

from __future__ import annotations


class InfraError(RuntimeError):
    """An actor, node or device failed; the same work may succeed elsewhere, so it is retried."""


class LearnerCrashLoop(RuntimeError):
    """The learner keeps dying without the run getting anywhere (train.max_learner_restarts): not retried again."""
