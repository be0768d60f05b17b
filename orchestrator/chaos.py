"""Chaos: kill a random rollout or reward actor (or the constraint controller, or a learner rank) every
`kill_every_s` seconds.

For tests, and for users who want to see their cluster survive: the work the victim held is
retried elsewhere and the ledger shows it (retried > 0, lost = 0); a killed learner rank takes its group down, and
the run goes on from the latest checkpoint with a new one (summary.json `learner.restarts`).
"""

from __future__ import annotations

import random
import time
from typing import Literal

import ray
from pydantic import BaseModel, ConfigDict, Field


class ChaosConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kill_every_s: float | None = Field(None, gt=0)  # None: no chaos
    roles: list[Literal["rollout", "reward", "controller", "learner"]] = ["rollout", "reward"]
    seed: int = 0


class ChaosMonkey:
    def __init__(self, cfg: ChaosConfig, rollouts: list, pools: dict, controller=None, learners: list = ()):
        """learners: the learner group's ranks (Ray does not restart them: the run starts a new group)."""
        self.cfg, self.rollouts, self.pools, self.controller = cfg, rollouts, pools, controller
        self.learners = list(learners)
        self.rng = random.Random(cfg.seed)
        self.last = time.monotonic()
        self.kills: list[str] = []

    def victims(self) -> list[tuple[str, object]]:
        out = []
        if "rollout" in self.cfg.roles:
            out += [(f"rollout-{i}", h) for i, h in enumerate(self.rollouts)]
        if "reward" in self.cfg.roles:
            out += [(name, h) for pool in self.pools.values() for name, h in pool.replicas.items()]
        if "controller" in self.cfg.roles and self.controller is not None:
            out.append(("constraint-controller", self.controller))
        if "learner" in self.cfg.roles:
            out += [(f"learner-rank-{r}", h) for r, h in enumerate(self.learners)]
        return out

    def maybe_kill(self) -> str | None:
        """Called once per learner step; kills one actor when the interval has passed."""
        if self.cfg.kill_every_s is None or time.monotonic() - self.last < self.cfg.kill_every_s:
            return None
        self.last = time.monotonic()
        name, handle = self.rng.choice(self.victims())
        # Ray restarts it and its in-flight work fails and is retried; a learner rank stays dead (the run restarts
        # the whole group: its process group cannot take a newcomer)
        ray.kill(handle, no_restart=name.startswith("learner"))
        self.kills.append(name)
        return name
