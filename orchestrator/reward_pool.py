"""A pool of replicas of one reward model, fed by object-store references.

Guarantees (tested with a real cluster, killing a replica mid-batch):
- every submitted batch id comes out of `ready()` exactly once, as scores or as a DataError;
- a batch whose replica died, or that raised InfraError, is resubmitted to another live
  replica after a back-off and counted in `retried`; after `max_retries` it comes out of `ready()`
  as an InfraError result (counted in `failed`), so results already collected are never lost;
- a replica Ray is restarting (ActorUnavailableError; Ray restarts replicas without limit) spends none of those
  retries for `restart_wait_s`: under load a restart outlasts the back-offs (6.2 s at the defaults), and a pool
  of one replica has nowhere else to send the batch;
- a DataError (a bad sample, named) is never retried: it fails the same way anywhere;
- `scale_to(n)` adds replicas that take work at once and retires surplus ones only after
  what they hold has finished;
- `version` is the model version that scored the latest batch (replicas return it with the scores), `versions` every
  one seen;
- batches queue in the driver and go out several to a call when replicas are busy (`batch_max`, `calls_per_replica`);
  a bad sample fails only its own batch; a call that fails (replica died, InfraError) retries each of its batches;
- finished batches are taken from a completion queue (`Completions`), never by scanning what is still running;
  `occupancy` integrates how many replicas hold work (a replica without work is waiting for input: nothing
  downstream ever blocks a reward model).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

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
    restarting_since: float | None = None  # when a retry first found its replica restarting


@dataclass
class PoolCounters:
    submitted: int = 0
    scored: int = 0
    failed: int = 0  # data errors, and infrastructure errors past max_retries
    retried: int = 0
    calls: int = 0  # calls sent to replicas (each with one or more batches)


class RewardPool:
    def __init__(self, model: str, spawn: Callable[[str], "ray.actor.ActorHandle"], replicas: int = 1,
                 max_retries: int = 5, backoff_s: float = 0.2, batch_max: int = 4, calls_per_replica: int = 2,
                 restart_wait_s: float = 300.0):
        """batch_max: batches (groups) a replica may get in one call; calls_per_replica: calls a replica holds at most
        (one running, one waiting behind it, so it never idles for a driver round trip). What queues meanwhile goes
        out together as one call: at load, fewer driver calls per group (each costs the driver about as much CPU
        as all its bookkeeping for a group) and bigger batches for a GPU reward model; when idle, one at once."""
        if batch_max < 1 or calls_per_replica < 1:
            raise ValueError(f"need batch_max >= 1 and calls_per_replica >= 1, got {batch_max}, {calls_per_replica}")
        self.model = model
        self.spawn = spawn
        self.max_retries = max_retries
        self.backoff_s, self.restart_wait_s = backoff_s, restart_wait_s
        self.batch_max, self.calls_per_replica = batch_max, calls_per_replica
        self.replicas: dict[str, ray.actor.ActorHandle] = {}
        self.retiring: dict[str, ray.actor.ActorHandle] = {}
        self.load: dict[str, int] = {}  # batches held by each replica
        self.calls_of: dict[str, int] = {}  # calls each replica holds
        self.queue: deque[_Job] = deque()  # submitted, waiting for a replica's free call
        self.calls: dict[ray.ObjectRef, tuple[str, list[_Job]]] = {}  # running call -> (replica, its batches)
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
            self.load[name] = self.calls_of[name] = 0
            self.occupancy.change(units=1)
        for name in sorted(self.replicas, key=lambda r: self.load[r])[: len(self.replicas) - n]:
            self.retiring[name] = self.replicas.pop(name)  # finishes what it holds, then is killed
            self.occupancy.change(units=-1)
        self._reap_retired()
        self._feed()

    def _reap_retired(self) -> None:
        for name in [r for r in self.retiring if self.calls_of[r] == 0]:
            ray.kill(self.retiring.pop(name), no_restart=True)
            del self.load[name], self.calls_of[name]

    @property
    def size(self) -> int:
        return len(self.replicas)

    @property
    def in_flight(self) -> int:
        return len(self.queue) + sum(self.load.values()) + len(self.waiting)

    # -- work -----------------------------------------------------------------------------
    def submit(self, batch_id: str, batch_ref: ray.ObjectRef) -> None:
        self.counters.submitted += 1
        self.queue.append(_Job(batch_id, batch_ref))
        self._feed()

    def _feed(self) -> None:
        """Queued batches to replicas with a free call, the least loaded replica first. A call takes the queue's
        share of one replica (at most batch_max): a call's results come back together when it ends, so a call
        bigger than its share would hold results back that another replica could have given sooner."""
        while self.queue:
            free = [r for r in self.replicas if self.calls_of[r] < self.calls_per_replica]
            if not free:
                return
            replica = min(free, key=lambda r: (self.calls_of[r], self.load[r]))
            share = min(self.batch_max, -(-len(self.queue) // len(self.replicas)))
            self._send(replica, [self.queue.popleft() for _ in range(share)])

    def _send(self, replica: str, jobs: list[_Job]) -> None:
        for job in jobs:
            job.replica = replica
        self.load[replica] += len(jobs)
        self.calls_of[replica] += 1
        self.counters.calls += 1
        if self.calls_of[replica] == 1:
            self.occupancy.change(busy=1)
        ref = self.replicas[replica].score_many.remote(*[job.ref for job in jobs])  # -> ([scores | DataError], version)
        self.calls[ref] = (replica, jobs)
        self.done.watch(ref, ref)

    def ready(self, timeout: float = 0.0) -> list[tuple[str, object]]:
        """Finished batches as (batch_id, scores float32 [N, D], or a DataError / InfraError); waits up to `timeout` s."""
        now = time.monotonic()
        for job in [j for j in self.waiting if j.not_before <= now]:  # a retry goes to another replica, on its own
            self.waiting.remove(job)
            self._send(min([r for r in self.replicas if r != job.replica] or list(self.replicas),
                           key=lambda r: self.load[r]), [job])
        if not self.calls:
            return []
        out = []
        for ref, fut in self.done.take(timeout):
            replica, jobs = self.calls.pop(ref)
            self.load[replica] -= len(jobs)
            self.calls_of[replica] -= 1
            if self.calls_of[replica] == 0:
                self.occupancy.change(busy=-1)
            try:
                results, self.version = fut.result()
            except (RayActorError, InfraError) as e:  # the whole call: every batch in it is retried (or given up)
                for job in jobs:
                    restarting = isinstance(e, ActorUnavailableError) and self._still_restarting(job)
                    if restarting or job.attempt < self.max_retries:
                        self._retry(job, spend=not restarting)
                    else:
                        out.append((job.batch_id, InfraError(f"batch {job.batch_id} failed {job.attempt + 1} times on {self.model}: {e}")))
                        self.counters.failed += 1
                continue
            if self.version not in self.versions:
                self.versions.append(self.version)
            for job, result in zip(jobs, results):
                out.append((job.batch_id, result))
                if isinstance(result, DataError):
                    self.counters.failed += 1
                else:
                    self.counters.scored += 1
        self._reap_retired()
        self._feed()
        return out

    def _retry(self, job: _Job, spend: bool = True) -> None:
        """Back into the queue after a back-off; `spend`: counted against max_retries (else a fixed wait)."""
        if spend:
            job.attempt += 1
            job.not_before = time.monotonic() + self.backoff_s * 2 ** (job.attempt - 1)
        else:
            job.not_before = time.monotonic() + max(self.backoff_s, 0.5)
        self.counters.retried += 1
        self.waiting.append(job)

    def _still_restarting(self, job: _Job) -> bool:
        """Whether `job`'s replica, found restarting, has been so for under restart_wait_s (timed from the first time)."""
        job.restarting_since = job.restarting_since or time.monotonic()
        return time.monotonic() - job.restarting_since < self.restart_wait_s

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
