"""Simulated actors for `videorl bench pipeline --simulated`: each stage's device time is a given sleep.

They have the method names the Pipeline, RewardPool and training loop call, so the real
orchestration (admission, staleness, ledger, reward pools, weight publishing) runs unchanged
while the stages cost exactly `rollout_s` / `reward_s` / `learner_s` seconds of wall time and
almost no CPU. What the benchmark then measures is orchestration overhead, not CPU contention.
Payloads are tiny arrays; no torch is imported, so an actor process starts quickly.
"""

from __future__ import annotations

import time

import numpy as np
import ray

from actors import outputs_of_many
from rewards.errors import DataError, score_each

SIM_CPUS = 0.01  # so 16 rollout actors, the reward replicas and the learner fit on a 2-CPU node


class SimulatedRollout:
    """Generates a group of `group_size` clips in `rollout_s` seconds (slept)."""

    def __init__(self, rollout_s: float, group_size: int = 1):
        if rollout_s < 0 or group_size < 1:
            raise ValueError(f"need rollout_s >= 0 and group_size >= 1, got {rollout_s}, {group_size}")
        self.rollout_s, self.group_size, self.version = rollout_s, group_size, -1
        self.generated = self.weight_loads = 0

    def set_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        self.version = version
        self.weight_loads += 1
        return version

    def generate(self, group_id: str, prompt: str, seed: int, version: int | None = None,
                 weights: list | None = None) -> tuple[dict, dict, dict]:
        """(reward batch, trajectory payload, metadata), shaped like actors.rollout.RolloutActor.generate's."""
        start = time.perf_counter()
        if weights is not None and version != self.version:
            self.set_weights(version, ray.get(weights[0]))
        time.sleep(self.rollout_s)
        g = self.group_size
        batch = {"ids": [f"{group_id}/{j}" for j in range(g)], "videos": np.zeros((g, 1, 2, 2, 3), np.uint8),
                 "prompts": [prompt] * g}
        payload = {"group_id": group_id, "prompt": prompt, "version": self.version, "latents": np.zeros((g, 4), np.float32)}
        meta = {"group_id": group_id, "version": self.version, "prefix_chunks": 0, "seconds": time.perf_counter() - start}
        self.generated += 1
        return batch, payload, meta

    def generate_many(self, groups: list[tuple[str, str, int]], version: int | None = None,
                      weights: list | None = None) -> tuple:
        """As actors.rollout.RolloutActor.generate_many: one call, `rollout_s` per group."""
        return outputs_of_many([self.generate(*group, version, weights) for group in groups])

    def stats(self) -> dict[str, int]:
        """{"generated": groups made, "weight_loads": versions taken} by this actor."""
        return {"generated": self.generated, "weight_loads": self.weight_loads}

    def ping(self) -> int:
        return self.version


class SimulatedReward:
    """Scores a batch in `reward_s` seconds (slept); every score is 0. Returns float32 [N, 1].
    bad_every = k > 0: every k-th batch this replica sees holds a bad sample (DataError naming it), a
    simulated data-error rate."""

    def __init__(self, name: str, reward_s: float, bad_every: int = 0):
        if reward_s < 0 or bad_every < 0:
            raise ValueError(f"need reward_s >= 0 and bad_every >= 0, got {reward_s}, {bad_every}")
        self.name, self.reward_s, self.bad_every, self.batches = name, reward_s, bad_every, 0

    def score(self, batch: dict) -> np.ndarray:
        time.sleep(self.reward_s)
        self.batches += 1
        if self.bad_every and self.batches % self.bad_every == 0:
            raise DataError(batch["ids"][0], "simulated bad sample")
        return np.zeros((len(batch["ids"]), 1), np.float32)

    def score_many(self, *batches: dict) -> tuple[list, str]:
        """Each batch takes `reward_s`, as actors.reward.RewardWorker.score_many does them one after another."""
        return score_each(self.score, batches), "simulated"

    def ping(self) -> str:
        return self.name


class SimulatedLearner:
    """One update takes `learner_s` seconds (slept); `weights()` is a small dict stamped with the version."""

    def __init__(self, learner_s: float):
        if learner_s < 0:
            raise ValueError(f"need learner_s >= 0, got {learner_s}")
        self.learner_s, self.version = learner_s, 0

    def train_step(self, payload_refs: list, rewards: list[dict[str, np.ndarray]], primary: str,
                   taus: dict[str, float], lambdas: dict[str, float]) -> dict[str, float]:
        """Same signature as actors.learner.LearnerActor.train_step; payloads are fetched, as a real learner would."""
        ray.get(list(payload_refs))
        time.sleep(self.learner_s)
        self.version += 1
        return {"groups": float(len(payload_refs)), "version": self.version}

    def weights(self) -> dict[str, np.ndarray]:
        return {"w": np.full(4, self.version, np.float32)}

    def ping(self) -> int:
        return self.version


def simulated_rollout_actor(index: int, rollout_s: float, group_size: int = 1):
    return ray.remote(SimulatedRollout).options(name=f"sim-rollout-{index}", num_cpus=SIM_CPUS).remote(rollout_s, group_size)


def simulated_reward_actor(name: str, reward_s: float, bad_every: int = 0):
    """A spawn function for orchestrator.reward_pool.RewardPool: `lambda name: simulated_reward_actor(name, 0.02)`."""
    return ray.remote(SimulatedReward).options(name=name, num_cpus=SIM_CPUS).remote(name, reward_s, bad_every)


def simulated_learner_actor(learner_s: float):
    return ray.remote(SimulatedLearner).options(name="sim-learner", num_cpus=SIM_CPUS).remote(learner_s)
