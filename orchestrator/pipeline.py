"""The streaming pipeline: rollout actors -> reward pools -> a ready queue, all by object reference.

Guarantees:
- bounded: rollouts start only within the staleness capacity (AReaL), so the reward and ready
  queues hold at most (max_staleness + 1) * groups_per_step groups; a slow learner stalls
  rollout instead of growing queues;
- a group made by version k is handed to the learner only while (learner version - k) <=
  max_staleness; staler ones are dropped and counted;
- a rollout whose actor died is re-run (same group id and seed) on another actor after the
  latest weights are re-sent to the restarted one, and counted as retried; reward batches are
  retried by their pool (each re-run counted as retried too). Every group id is produced, scored and consumed at most once (the
  ledger refuses anything else) and is always somewhere the ledger can see;
- a reward model whose pool gives up (retries spent) on `fail_after[name]` groups in a row, with no batch of it scored
  or refused in between, ends the run: `RewardModelDown` naming the model (a service gone for good would otherwise
  drop every new group forever);
- dynamic grouping (Self-Paced GRPO): a scored group whose trained rewards barely differ is dropped as low_signal
  (its slot given back) and its prompt re-sampled as a new group (new id, new seed), at most max_resamples times
  per prompt; then the next low-signal group of that prompt is trained as it is (counted as low_signal_kept).
The driver only ever holds references and small metadata; payloads stay in the object store.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import ray
from ray.exceptions import RayActorError

from actors.failures import InfraError
from orchestrator.ledger import Ledger
from orchestrator.reward_pool import RewardPool
from orchestrator.staleness import StalenessManager
from rewards.advantages import low_signal_groups
from rewards.errors import DataError


class RewardModelDown(ConnectionError):
    """A reward model failed `fail_after` groups in a row after every retry: the run cannot go on."""


@dataclass
class Group:
    gid: str
    prompt: str
    seed: int
    worker: int = -1
    batch_ref: ray.ObjectRef | None = None  # reward input: ids, uint8 videos, prompts
    payload_ref: ray.ObjectRef | None = None  # learner input: latents, log-probs, ...
    version: int = -1
    prefix_chunks: int = 0
    rewards: dict[str, np.ndarray] = field(default_factory=dict)
    pending_pools: set[str] = field(default_factory=set)
    rollout_seconds: float = 0.0
    resamples: int = 0  # earlier groups of this prompt dropped as low-signal (dynamic grouping)


def is_low_signal(rewards: dict[str, np.ndarray], channels: Sequence[str], min_std: float) -> bool:
    """A group carries no signal when every channel's within-group (unbiased) std is below min_std.
    rewards: {name: [G]}; channels: the names the learner trains on."""
    r = np.stack([rewards[c] for c in channels], axis=1)
    return low_signal_groups(r, np.zeros(len(r), dtype=np.int64), min_std)[0]


class PromptCursor:
    """Endless shuffled passes over the prompt list; its state (epoch, index) is part of checkpoints."""

    def __init__(self, prompts: list[str], seed: int, epoch: int = 0, index: int = 0):
        self.prompts, self.seed, self.epoch, self.index = list(prompts), seed, epoch, index

    def _order(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.prompts))

    def next(self) -> str:
        if self.index == len(self.prompts):
            self.epoch, self.index = self.epoch + 1, 0
        prompt = self.prompts[self._order()[self.index]]
        self.index += 1
        return prompt

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}


class Pipeline:
    def __init__(self, workers: list, pools: dict[str, RewardPool], reward_names: dict[str, list[str]],
                 prompts: PromptCursor, staleness: StalenessManager, ledger: Ledger, seed: int,
                 next_group: int = 0, per_worker: int = 2, group_size: int = 1, dynamic_grouping=None,
                 signal_rewards: Sequence[str] = (), fail_after: dict[str, int] | None = None,
                 describe: dict[str, str] | None = None):
        """dynamic_grouping: `rollout.dynamic_grouping` (min_std, max_resamples) or None; signal_rewards: the reward
        names whose spread counts as signal (the learner's channels); fail_after: {pool: N}, end the run after N
        groups in a row dropped for infrastructure errors of that pool (absent: never); describe: {pool: how errors
        name it}, e.g. its URL."""
        self.workers, self.pools, self.reward_names = workers, pools, reward_names
        self.prompts, self.staleness, self.ledger = prompts, staleness, ledger
        self.seed, self.next_group, self.per_worker, self.group_size = seed, next_group, per_worker, group_size
        self.rolling: dict[ray.ObjectRef, Group] = {}  # meta ref -> group being generated
        self.scoring: dict[str, Group] = {}
        self.ready: deque[Group] = deque()
        self.weights: tuple[int, ray.ObjectRef] | None = None
        self.rollout_busy_s = 0.0
        self.dynamic_grouping, self.signal_rewards = dynamic_grouping, list(signal_rewards)
        self.resample: deque[tuple[str, int]] = deque()  # (prompt, re-samples so far), started before new prompts
        self.fail_after, self.describe = dict(fail_after or {}), dict(describe or {})
        self.failing = dict.fromkeys(pools, 0)  # groups in a row each pool gave up on

    # -- weights ---------------------------------------------------------------------------
    def publish(self, version: int, weights_ref: ray.ObjectRef) -> None:
        """Send version `version` to every rollout actor (one object in the store, fetched by ref)."""
        self.weights = (version, weights_ref)
        for w in self.workers:
            w.set_weights.remote(version, weights_ref)

    # -- the three stages ------------------------------------------------------------------
    def worker_loads(self) -> list[int]:
        load = [0] * len(self.workers)
        for g in self.rolling.values():
            load[g.worker] += 1
        return load

    def _start_rollouts(self, learner_version: int) -> None:
        load = self.worker_loads()
        budget = self.staleness.capacity(learner_version)
        while budget > 0 and min(load) < self.per_worker:
            gid = f"g{self.next_group:06d}"
            prompt, resamples = self.resample.popleft() if self.resample else (self.prompts.next(), 0)
            group = Group(gid, prompt, seed=self.seed * 1_000_003 + self.next_group, resamples=resamples)
            self.next_group += 1
            self.staleness.start()
            budget -= 1
            self._launch(group, load.index(min(load)))
            load[group.worker] += 1

    def _launch(self, group: Group, worker: int) -> None:
        group.worker = worker
        batch, payload, meta = self.workers[worker].generate.options(num_returns=3).remote(group.gid, group.prompt, group.seed)
        group.batch_ref, group.payload_ref = batch, payload
        self.rolling[meta] = group

    def _collect_rollouts(self, timeout: float) -> None:
        if not self.rolling:
            return
        done, _ = ray.wait(list(self.rolling), num_returns=len(self.rolling), timeout=timeout)
        for ref in done:
            group = self.rolling.pop(ref)
            try:
                meta = ray.get(ref)
            except RayActorError:
                self._retry_rollout(group)
                continue
            if meta["version"] < 0:  # a restarted actor ran before its weights came back: not the policy's sample
                self._retry_rollout(group)
                continue
            self.ledger.produce(group.gid)
            group.version, group.prefix_chunks, group.rollout_seconds = meta["version"], meta["prefix_chunks"], meta["seconds"]
            self.rollout_busy_s += meta["seconds"]
            group.pending_pools = set(self.pools)
            self.scoring[group.gid] = group
            for pool in self.pools.values():
                pool.submit(group.gid, group.batch_ref)

    def _retry_rollout(self, group: Group) -> None:
        self.ledger.retried += 1
        dead = self.workers[group.worker]
        if self.weights:  # the restarted actor came back with fresh weights: give it the current ones
            dead.set_weights.remote(*self.weights)
        others = [i for i in range(len(self.workers)) if i != group.worker] or [group.worker]
        self._launch(group, others[self.next_group % len(others)])

    def _collect_scores(self) -> None:
        for name, pool in self.pools.items():
            retried = pool.counters.retried
            results = pool.ready()
            self.ledger.retried += pool.counters.retried - retried  # reward batches re-run after a failure
            for gid, result in results:
                self.failing[name] = self.failing[name] + 1 if isinstance(result, InfraError) else 0
                group = self.scoring.get(gid)
                if group is not None and isinstance(result, (DataError, InfraError)):
                    print(f"dropping group {gid}: {result}")
                    self.ledger.skipped_samples += self.group_size
                    self._drop(gid, "data_error" if isinstance(result, DataError) else "infra_error")
                    del self.scoring[gid]
                if self.failing[name] >= self.fail_after.get(name, float("inf")):
                    raise RewardModelDown(
                        f"reward model {self.describe.get(name, name)} failed {self.failing[name]} groups in a row "
                        f"after its retries ({str(result).splitlines()[0][:300]}); the run stops, its last checkpoint "
                        "is kept")
                if group is None or isinstance(result, (DataError, InfraError)):  # dropped, now or before
                    continue
                for i, reward in enumerate(self.reward_names[name]):
                    group.rewards[reward] = result[:, i]
                group.pending_pools.discard(name)
                if not group.pending_pools:
                    self.ledger.score(gid)
                    self._ready_or_resample(self.scoring.pop(gid))

    def _ready_or_resample(self, group: Group) -> None:
        dg = self.dynamic_grouping
        if dg is None or not is_low_signal(group.rewards, self.signal_rewards, dg.min_std):
            self.ready.append(group)
        elif group.resamples < dg.max_resamples:
            self._drop(group.gid, "low_signal")
            self.resample.append((group.prompt, group.resamples + 1))
        else:  # bounded: the prompt keeps giving identical rewards, train it as it is
            self.ledger.low_signal_kept += 1
            self.ready.append(group)

    def _drop(self, gid: str, reason: str) -> None:
        """A group that will never be trained gives its admission slot back (AReaL counts only accepted rollouts):
        otherwise each drop would shrink the window of groups in flight for good, and after
        (max_staleness + 1) * groups_per_step drops no rollout could start again."""
        self.ledger.drop(gid, reason)
        self.staleness.release()

    def pump(self, learner_version: int, timeout: float = 0.0) -> None:
        self._start_rollouts(learner_version)
        self._collect_rollouts(timeout)
        self._collect_scores()

    # -- what the learner sees ------------------------------------------------------------
    def learner_step(self, learner, version: int, n: int, primary: str, taus: dict[str, float],
                     lambdas: dict[str, float], channel_weights: Callable[[list[Group]], dict[str, float]] | None = None,
                     ) -> tuple[list[Group], dict, float]:
        """One learner step on the next `n` scored groups, rollout and reward moving on meanwhile; then weights
        version + 1 are published and the groups consumed. -> (batch, learner stats, seconds waited for the batch).

        channel_weights: batch -> {reward: weight}, extra advantage channels decided from the batch itself (the
        self-paced curriculum reads its quality); None: the learner's SCRL channels only."""
        t0 = time.perf_counter()
        batch = self.next_batch(n, learner_version=version)
        waited = time.perf_counter() - t0
        extra = {} if channel_weights is None else {"channel_weights": channel_weights(batch)}
        update = learner.train_step.remote([g.payload_ref for g in batch], [g.rewards for g in batch], primary, taus,
                                           lambdas, **extra)
        while not ray.wait([update], timeout=0.02)[0]:
            self.pump(version)
        stats = ray.get(update)
        self.publish(version + 1, learner.weights.remote())
        for g in batch:
            self.ledger.consume(g.gid)
        return batch, stats, waited

    def next_batch(self, n: int, learner_version: int) -> list[Group]:
        """Block until n fresh scored groups are ready; stale ones are dropped on the way."""
        batch: list[Group] = []
        while len(batch) < n:
            while self.ready and len(batch) < n:
                group = self.ready.popleft()
                if self.staleness.is_stale(group.version, learner_version):
                    self._drop(group.gid, "stale")
                else:
                    batch.append(group)
            if len(batch) < n:
                self.pump(learner_version, timeout=0.01)
        return batch

    def depths(self) -> dict[str, int]:
        return {"rollout": len(self.rolling), "reward": len(self.scoring), "ready": len(self.ready)}

    def held(self) -> set[str]:
        """Produced group ids still inside the pipeline (for the ledger's balance)."""
        return set(self.scoring) | {g.gid for g in self.ready}

    def close(self) -> None:
        """End of run: produced but unused groups are dropped (and counted); rollouts in flight are abandoned."""
        for group in [*self.scoring.values(), *self.ready]:
            self.ledger.drop(group.gid, "unused")
        self.scoring.clear()
        self.ready.clear()
        for ref in self.rolling:
            ray.cancel(ref, force=False)
        self.rolling.clear()
