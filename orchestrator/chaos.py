"""Chaos: kill a random rollout or reward actor (or the constraint controller) every `kill_every_s` seconds.

For tests, and for users who want to see their cluster survive: the work the victim held is
retried elsewhere and the ledger shows it (retried > 0, lost = 0).
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
    roles: list[Literal["rollout", "reward", "controller"]] = ["rollout", "reward"]
    seed: int = 0


class ChaosMonkey:
    def __init__(self, cfg: ChaosConfig, rollouts: list, pools: dict, controller=None):
        self.cfg, self.rollouts, self.pools, self.controller = cfg, rollouts, pools, controller
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
        return out

    def maybe_kill(self) -> str | None:
        """Called once per learner step; kills one actor when the interval has passed."""
        if self.cfg.kill_every_s is None or time.monotonic() - self.last < self.cfg.kill_every_s:
            return None
        self.last = time.monotonic()
        name, handle = self.rng.choice(self.victims())
        ray.kill(handle, no_restart=False)  # Ray restarts it; its in-flight work fails and is retried
        self.kills.append(name)
        return name
