"""Reward actors: one Ray actor per reward-model replica (one per GPU when GPUs exist).

The actor is a thin shell around `rewards.scorer.RewardScorer` (any scorer plug-in: a built-in kind, a python
class, an http service): it fetches a batch by object-store reference, scores it (extra batch fields go to the
scorer as they are), and sorts failures before they cross the Ray boundary:
`DataError` (a bad sample, named) passes through unchanged, anything else becomes
`InfraError` so the pool retries the batch on another replica.
"""

from __future__ import annotations

import os
import time

import numpy as np
import ray

from actors.failures import InfraError
from rewards.errors import DataError, score_each
from rewards.scorer import BATCH_KEYS, RewardScorer


class RewardWorker:
    def __init__(self, name: str, kind: str, checkpoint: str | None = None, delay_s: float = 0.0,
                 frame_shape: tuple[int, int, int, int] = (8, 16, 16, 3), options: dict | None = None):
        """options: the kind's settings (`RewardModelSpec.scorer_options()`: callable, kwargs, url, ...)."""
        self.name = name
        self.scorer = RewardScorer(kind, checkpoint, frame_shape, **(options or {}))
        self.delay_s = delay_s  # simulated device time per batch (benchmarks, tests)
        self.batches = 0

    def dims(self) -> tuple[str, ...]:
        return self.scorer.dims

    def score(self, batch: dict) -> np.ndarray:
        """batch: {"ids": [N] str, "videos": uint8 [N, T, H, W, 3], "prompts": [N] str, extra fields} -> float32 [N, D]."""
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            extras = {k: v for k, v in batch.items() if k not in BATCH_KEYS}
            scores = self.scorer.score(batch["videos"], batch["prompts"], batch["ids"], **extras)
        except DataError:
            raise
        except Exception as e:  # anything not about the data is the machine's fault: retry elsewhere
            raise InfraError(f"{self.name}: {type(e).__name__}: {e}") from e
        self.batches += 1
        return scores

    def score_many(self, *batches: dict) -> tuple[list, str]:
        """`score` on each batch -> ([its scores, or the DataError naming its bad sample], the model version that gave
        them: an http service's may change between calls). One call for several groups; an InfraError fails the call."""
        return score_each(self.score, batches), str(getattr(self.scorer, "version", ""))

    def ping(self) -> str:
        return self.name

    def stats(self) -> dict:
        """{"name", "pid", "batches": batches scored by this process, "version": the model's}; a restart starts a new
        process at 0."""
        return {"name": self.name, "pid": os.getpid(), "batches": self.batches,
                "version": getattr(self.scorer, "version", "")}


def reward_actor(name: str, kind: str, checkpoint: str | None = None, *, num_cpus: float = 0.25,
                 num_gpus: float = 0.0, delay_s: float = 0.0, frame_shape=(8, 16, 16, 3), options: dict | None = None):
    """Start one named reward replica; Ray restarts it if it dies (the pool retries its work)."""
    cls = ray.remote(RewardWorker).options(
        name=name, num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
        lifetime=None,
    )
    return cls.remote(name, kind, checkpoint, delay_s, tuple(frame_shape), options)
