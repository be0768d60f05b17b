"""The ledger: where every trajectory group is, so "nothing lost, nothing counted twice" is checkable.

A group moves produced -> scored -> consumed, or leaves as dropped (stale, a data error,
low_signal: scored but re-sampled by dynamic grouping, or unused at the end of the run). A group the
pipeline held at a checkpoint is re-queued on resume (`requeue`: it was never trained, so it leaves
produced/scored and is produced again, identically, from its id, prompt, seed and weights version). `retried`
counts re-executions after an actor failure; a retry never moves a group twice because each
transition is keyed by the group id. `low_signal_kept` counts low-signal groups trained anyway
(their prompt was re-sampled as often as allowed).

Invariant (`balance(held)`): every produced id is consumed, dropped, or still held by the
pipeline (`held`: the ids in its queues), in exactly one of those; `lost` counts produced ids
in none of them and must be 0.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Ledger:
    produced: set[str] = field(default_factory=set)
    scored: set[str] = field(default_factory=set)
    consumed: set[str] = field(default_factory=set)
    dropped: dict[str, str] = field(default_factory=dict)  # id -> reason
    retried: int = 0
    skipped_samples: int = 0  # single samples removed for data errors (their group goes on)
    low_signal_kept: int = 0

    def _move(self, gid: str, into: set[str], requires: set[str], what: str) -> None:
        if gid in into:
            raise ValueError(f"group {gid} {what} twice")
        if gid not in requires or gid in self.dropped:
            raise ValueError(f"group {gid} {what} out of order")
        into.add(gid)

    def produce(self, gid: str) -> None:
        if gid in self.produced:
            raise ValueError(f"group {gid} produced twice")
        self.produced.add(gid)

    def score(self, gid: str) -> None:
        self._move(gid, self.scored, self.produced, "scored")

    def consume(self, gid: str) -> None:
        self._move(gid, self.consumed, self.scored, "consumed")

    def requeue(self, gid: str) -> None:
        """A produced group that was neither consumed nor dropped is generated again (resume from a checkpoint)."""
        if gid not in self.produced or gid in self.consumed or gid in self.dropped:
            raise ValueError(f"group {gid} re-queued but it was never produced, or was already used or dropped")
        self.produced.discard(gid)
        self.scored.discard(gid)

    def drop(self, gid: str, reason: str) -> None:
        if gid not in self.produced or gid in self.consumed or gid in self.dropped:
            raise ValueError(f"group {gid} dropped twice or after use")
        self.dropped[gid] = reason

    def balance(self, held: set[str] = frozenset()) -> dict:
        """Counters for summary.json; `held` = group ids still in the pipeline's queues."""
        reasons = Counter(self.dropped.values())
        placed = [self.consumed, set(self.dropped), set(held)]
        lost = self.produced - set().union(*placed)
        twice = sum(len(a & b) for i, a in enumerate(placed) for b in placed[i + 1 :])
        return {
            "produced": len(self.produced),
            "scored": len(self.scored),
            "consumed": len(self.consumed),
            "dropped": len(self.dropped),
            **{f"dropped_{r}": n for r, n in sorted(reasons.items())},
            "pending": len(held),
            "retried": self.retried,
            "skipped_samples": self.skipped_samples,
            "low_signal": reasons.get("low_signal", 0),  # re-samples (dynamic grouping), 0 when off
            "low_signal_kept": self.low_signal_kept,
            "lost": len(lost),
            "counted_twice": twice,
            "balanced": not lost and not twice and set(held) <= self.produced,
        }

    def state_dict(self) -> dict:
        return {"produced": sorted(self.produced), "scored": sorted(self.scored), "consumed": sorted(self.consumed),
                "dropped": dict(self.dropped), "retried": self.retried, "skipped_samples": self.skipped_samples,
                "low_signal_kept": self.low_signal_kept}

    @classmethod
    def from_state_dict(cls, d: dict) -> Ledger:
        return cls(set(d["produced"]), set(d["scored"]), set(d["consumed"]), dict(d["dropped"]),
                   d["retried"], d["skipped_samples"], d.get("low_signal_kept", 0))  # older checkpoints lack it
