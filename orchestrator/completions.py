"""Finished Ray calls, delivered in the order they finish, at O(1) driver cost per call.

`ray.wait(refs)` looks at every reference it is given each time it is called: a driver that polls all its
rollouts and reward batches that way does work proportional to what is in flight on every event (at 64 rollout
actors, most of the driver's time). Here each watched reference gets a completion callback (Ray's
`ObjectRef.future()`) that queues it; the driver blocks on one `threading.Event` shared by every queue of the loop
(the pipeline's and each reward pool's), and takes only what has finished.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray


class Completions:
    def __init__(self, wake: threading.Event | None = None):
        """wake: set whenever a watched call finishes (shared by several Completions: one wait covers them all)."""
        self.wake = wake or threading.Event()
        self._done: queue.SimpleQueue = queue.SimpleQueue()

    def watch(self, ref: ray.ObjectRef, tag) -> None:
        """Queue (tag, future) once `ref` has finished; the future holds its value or its error."""
        ref.future().add_done_callback(lambda fut: (self._done.put((tag, fut)), self.wake.set()))

    def take(self, timeout: float = 0.0) -> list[tuple[object, object]]:
        """What has finished since the last take, oldest first; waits up to `timeout` s for the first one."""
        out = []
        try:
            out.append(self._done.get(timeout=timeout) if timeout > 0 else self._done.get_nowait())
            while True:
                out.append(self._done.get_nowait())
        except queue.Empty:
            return out


@dataclass
class Occupancy:
    """How busy a stage of `units` (actors, replicas) has been, as time integrals updated in O(1) per change: busy
    unit-seconds, unit-seconds that existed, and idle unit-seconds spent blocked on output. `idle_is` says what an
    idle unit is waiting for right now: "input" (nothing to work on yet) or "output" (work may not start, or its
    result is still being handed on)."""

    units: int = 1
    busy: int = 0
    idle_is: str = "input"
    busy_s: float = 0.0
    unit_s: float = 0.0
    output_s: float = 0.0
    clock: Callable[[], float] = time.perf_counter

    def __post_init__(self) -> None:
        self.t = self.clock()

    def change(self, busy: int = 0, units: int = 0, idle_is: str | None = None) -> None:
        now = self.clock()
        dt, self.t = now - self.t, now
        self.busy_s += min(self.busy, self.units) * dt
        self.unit_s += self.units * dt
        if self.idle_is == "output":
            self.output_s += max(0, self.units - self.busy) * dt
        self.busy += busy
        self.units += units
        self.idle_is = idle_is or self.idle_is

    def totals(self) -> tuple[float, float, float]:
        """(busy, existing, blocked on output) unit-seconds so far."""
        self.change()
        return self.busy_s, self.unit_s, self.output_s


def idle_split(before: tuple[float, float, float], after: tuple[float, float, float]) -> dict[str, float]:
    """Idle fractions of a stage between two `Occupancy.totals()`: {"input": waiting for input, "output": blocked
    on output}."""
    busy, units, output = (b - a for a, b in zip(before, after))
    if units <= 0:
        return {"input": 0.0, "output": 0.0}
    idle = min(1.0, max(0.0, 1.0 - busy / units))
    output = min(idle, output / units)
    return {"input": idle - output, "output": output}
