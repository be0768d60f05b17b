"""A pool of replicas of one reward model, fed by object-store references.

Guarantees (tested with a real cluster, killing a replica mid-batch):
- every submitted batch id comes out of `ready()` exactly once, as scores or as a DataError;
- a batch whose replica died, or that raised InfraError, is resubmitted to another live
  replica after a back-off and counted in `retried`; after `max_retries` it comes out of `ready()`
  as an InfraError result (counted in `failed`), so results already collected are never lost;
- a DataError (a bad sample, named) is never retried: it fails the same way anywhere;
- `scale_to(n)` adds replicas that take work at once and retires surplus ones only after
  what they hold has finished;
- `version` is the model version that scored the latest batch (replicas return it with the scores), `versions` every
  one seen;
- finished batches are taken from a completion queue (`Completions`), never by scanning what is still running;
  `occupancy` integrates how many replicas hold work (a replica without work is waiting for input: nothing
  downstream ever blocks a reward model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError

from actors.failures import InfraError
from orchestrator.completions import Completions, Occupancy
from rewards.errors import DataError


@dataclass
class _Job:
    batch_id: str
    ref: ray.ObjectRef  # the batch payload, already in the object store
    attempt: int = 0
    replica: str = ""
    not_before: float = 0.0


@dataclass
class PoolCounters:
    submitted: int = 0
    scored: int = 0
    failed: int = 0  # data errors, and infrastructure errors past max_retries
    retried: int = 0


class RewardPool:
    def __init__(self, model: str, spawn: Callable[[str], "ray.actor.ActorHandle"], replicas: int = 1,
                 max_retries: int = 5, backoff_s: float = 0.2):
        self.model = model
        self.spawn = spawn
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.replicas: dict[str, ray.actor.ActorHandle] = {}
        self.retiring: dict[str, ray.actor.ActorHandle] = {}
        self.load: dict[str, int] = {}
        self.running: dict[ray.ObjectRef, _Job] = {}
        self.waiting: list[_Job] = []  # retries in back-off
        self.counters = PoolCounters()
        self.done = Completions()
        self.occupancy = Occupancy(units=0)
        self.version = ""  # the model version of the latest scored batch
        self.versions: list[str] = []  # every version that scored a batch, in the order first seen
        self._next_index = 0
        self.scale_to(replicas)

    # -- capacity -------------------------------------------------------------------------
    def scale_to(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"reward model {self.model!r} needs at least 1 replica, got {n}")
        while len(self.replicas) < n:
            name = f"reward-{self.model}-{self._next_index}"
            self._next_index += 1
            self.replicas[name] = self.spawn(name)
            self.load[name] = 0
            self.occupancy.change(units=1)
        for name in sorted(self.replicas, key=lambda r: self.load[r])[: len(self.replicas) - n]:
            self.retiring[name] = self.replicas.pop(name)  # finishes what it holds, then is killed
            self.occupancy.change(units=-1)
        self._reap_retired()

    def _reap_retired(self) -> None:
        for name in [r for r in self.retiring if self.load[r] == 0]:
            ray.kill(self.retiring.pop(name), no_restart=True)
            del self.load[name]

    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def in_flight(self) -> int:
        return len(self.running) + len(self.waiting)

    # -- work -----------------------------------------------------------------------------
    def submit(self, batch_id: str, batch_ref: ray.ObjectRef) -> None:
        self.counters.submitted += 1
        self._dispatch(_Job(batch_id, batch_ref))

    def _dispatch(self, job: _Job, avoid: str = "") -> None:
        choices = [r for r in self.replicas if r != avoid] or list(self.replicas)
        job.replica = min(choices, key=lambda r: self.load[r])
        self._load(job.replica, +1)
        ref = self.replicas[job.replica].score_versioned.remote(job.ref)  # -> (scores, model version)
        self.running[ref] = job
        self.done.watch(ref, ref)

    def _load(self, replica: str, delta: int) -> None:
        self.load[replica] += delta
        if self.load[replica] == (1 if delta > 0 else 0):  # the replica got its first batch, or finished its last
            self.occupancy.change(busy=delta)

    def ready(self, timeout: float = 0.0) -> list[tuple[str, object]]:
        """Finished batches as (batch_id, scores float32 [N, D], or a DataError / InfraError); waits up to `timeout` s."""
        now = time.monotonic()
        for job in [j for j in self.waiting if j.not_before <= now]:
            self.waiting.remove(job)
            self._dispatch(job, avoid=job.replica)
        if not self.running:
            return []
        out = []
        for ref, fut in self.done.take(timeout):
            job = self.running.pop(ref)
            self._load(job.replica, -1)
            try:
                scores, self.version = fut.result()
                out.append((job.batch_id, scores))
                self.counters.scored += 1
                if self.version not in self.versions:
                    self.versions.append(self.version)
            except DataError as e:
                out.append((job.batch_id, e))
                self.counters.failed += 1
            except (RayActorError, InfraError) as e:
                if job.attempt >= self.max_retries:
                    out.append((job.batch_id, InfraError(f"batch {job.batch_id} failed {job.attempt + 1} times on {self.model}: {e}")))
                    self.counters.failed += 1
                else:
                    self._retry(job)
        self._reap_retired()
        return out

    def _retry(self, job: _Job) -> None:
        job.attempt += 1
        job.not_before = time.monotonic() + self.backoff_s * 2 ** (job.attempt - 1)
        self.counters.retried += 1
        self.waiting.append(job)

    def drain(self, timeout: float = 60.0) -> list[tuple[str, object]]:
        """Wait for every batch in flight (including retries) and return them."""
        out, deadline = [], time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.in_flight} batches still in flight on {self.model} after {timeout} s")
            out += self.ready(timeout=0.05)
        return out

    def shutdown(self) -> None:
        for handle in [*self.replicas.values(), *self.retiring.values()]:
            ray.kill(handle, no_restart=True)
        self.replicas.clear()
        self.retiring.clear()
