"""The learner: one actor, or a group of ranks over torch.distributed that looks like one actor.

Rank 0 is the actor the orchestrator calls (named "learner"). With `ray.learner_workers` > 1 it publishes its
address and a free port, every rank joins one process group (gloo on CPU, NCCL on GPU) and builds its `Learner`
(`policy.parallel`: DDP replicas or FSDP2 shards); each call rank 0 receives it hands to the other ranks as well,
and they meet in the step's collectives. The ranks sit in one placement group (`ray.placement`).
"""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from orchestrator.checkpoint import optimizer_state_from_tensors, optimizer_state_to_tensors
from policy.backend import load_policy
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.parallel import Ranks, WeightBroadcast, buckets, init_world
from policy.rollout import trajectory_from_payload


class LearnerActor:
    def __init__(self, model_cfg, base: str | None, cfg: dict, total_steps: int, seed: int, threads: int = 1,
                 base_key: str = "", sum_norm: bool = False, rank: int = 0, world: int = 1):
        """cfg: the `learner` config section as a dict; sum_norm: `constraints.sum_norm` (see policy.learner).
        rank / world: this actor's place in the learner group; ranks of a group build their learner in `join`."""
        torch.set_num_threads(threads)
        self.model_cfg, self.cfg = model_cfg, LearnerConfig.model_validate(cfg)
        self.total_steps, self.seed, self.sum_norm = total_steps, seed, sum_norm
        self.base, self.base_key = base, base_key  # recorded in checkpoints: adapters only fit the base they grew on
        self.ranks, self.peers = Ranks(rank, world, self.cfg.parallel), []
        self.sync: WeightBroadcast | None = None  # weights.sync=broadcast: rank 0's group with the rollout actors
        self.sender = ThreadPoolExecutor(1)  # broadcasts in the background, in version order, while training goes on
        self.sent: dict[int, dict[str, torch.Tensor]] = {}  # broadcast versions, kept while groups may run on them
        self.send_seconds = float("nan")  # the last finished broadcast's
        if world == 1:
            self._build()

    def _build(self) -> None:
        policy = load_policy(self.model_cfg, self.base, for_training=True)  # on the actor's GPU when Ray gave it one
        mixed_bf16 = policy.device.type == "cuda" and self.model_cfg.dtype == "bfloat16"
        self.learner = Learner(policy, self.cfg, self.total_steps, self.seed, sum_norm=self.sum_norm,
                               ranks=self.ranks, mixed_bf16=mixed_bf16)

    # -- the group ---------------------------------------------------------------------------------
    def endpoint(self) -> tuple[str, int]:
        """Rank 0: where the group's process group meets (this node's address, a free port)."""
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, address: str, port: int, peers: list | None = None) -> None:
        """Enter the process group and build this rank's learner (sharded with fsdp2). peers: rank 0's handles on
        ranks 1..N-1, to hand them each call."""
        init_world(address, port, self.ranks.rank, self.ranks.world)
        self._build()
        self.peers = list(peers or [])

    def join_weight_sync(self, address: str, port: int, world: int, timeout_s: float) -> None:
        """Rank 0 opens the broadcast group with the rollout actors (it is rank 0 there too; they join at once)."""
        self.sender.submit(lambda: None).result()  # a broadcast on an old group first finishes or fails
        self.sync = WeightBroadcast(address, port, 0, world, timeout_s)

    def _on_peers(self, method: str, *args, collective: bool = True) -> list:
        """Start `method(*args)` on the other ranks (rank 0 only; those that must meet this rank in a collective)."""
        if not self.peers or not collective:
            return []
        return [getattr(p, method).remote(*args) for p in self.peers]

    # -- what the orchestrator calls -----------------------------------------------------------------
    def train_step(self, payload_refs: list, rewards: list[dict[str, np.ndarray]], primary: str,
                   taus: dict[str, float], lambdas: dict[str, float],
                   channel_weights: dict[str, float] | None = None) -> dict[str, float]:
        """payload_refs: [ObjectRef of a rollout payload] (nested in a list so Ray does not fetch them early); each
        rank fetches only the groups it trains. channel_weights: extra advantage channels (`Learner.step`)."""
        args = (payload_refs, rewards, primary, taus, lambdas, channel_weights)
        others = self._on_peers("train_step", *args)
        passes = dict.fromkeys(i for i, _ in self.ranks.passes(len(payload_refs)))
        fetched = dict(zip(passes, ray.get([payload_refs[i] for i in passes])))
        device = self.learner.model.device
        groups = [ScoredGroup(p["group_id"], p["cond"].to(device), trajectory_from_payload(p, device), r, p["version"])
                  if (p := fetched.get(i)) is not None else ScoredGroup(str(i), None, None, r, -1)
                  for i, r in enumerate(rewards)]  # other ranks' groups: their rewards only (advantages)
        stats = self.learner.step(groups, primary, taus, lambdas, channel_weights)
        ray.get(others)
        return stats

    def weights(self) -> dict[str, torch.Tensor] | None:
        others = self._on_peers("weights", collective=self.ranks.sharded)
        weights = self.learner.weights()
        ray.get(others)
        return weights if self.ranks.rank == 0 else None  # the other ranks only helped gather

    def broadcast_weights(self, version: int, keep: int, bucket_bytes: int) -> dict[str, float]:
        """Publish `version` (the current weights) over the broadcast group: whole tensors are gathered now (a
        collective with fsdp2) and sent from a background thread, so the next step need not wait for the rollout
        actors to take them. Keeps the last `keep` versions for `weights_of`. -> the version's bytes and buckets, the
        gather's seconds and the last finished send's."""
        start = time.perf_counter()
        state = self.weights()
        self.sent = {v: w for v, w in self.sent.items() if v > version - keep} | {version: state}
        gathered = time.perf_counter() - start
        if self.sync is None:  # a send failed (a rollout actor died): the orchestrator opens a new group
            raise ConnectionError(f"weight broadcast group is down; version {version} kept for the object store")
        self.sender.submit(self._send, self.sync, version, state, bucket_bytes)
        return {"weights/broadcast_bytes": float(sum(t.numel() * t.element_size() for t in state.values())),
                "weights/broadcast_buckets": float(len(buckets(list(state.values()), bucket_bytes))),
                "weights/gather_seconds": gathered, "weights/broadcast_seconds": self.send_seconds}

    def _send(self, sync: WeightBroadcast, version: int, state: dict, bucket_bytes: int) -> None:
        start = time.perf_counter()
        try:
            sync.send(version, state, bucket_bytes)
        except Exception as e:  # a rollout actor died mid-broadcast: the orchestrator opens a new group
            print(f"weight broadcast of version {version} failed: {e}")
            if self.sync is sync:
                self.sync = None  # dropping it closes its connections: members waiting on it fail at once
            return
        self.send_seconds = time.perf_counter() - start

    def weights_of(self, version: int) -> dict[str, torch.Tensor]:
        """A broadcast version again, through the object store (a restarted rollout actor, a re-queued group)."""
        if version not in self.sent:
            raise KeyError(f"weights version {version} is no longer kept (kept: {sorted(self.sent)})")
        return self.sent[version]

    def version(self) -> int:
        return self.learner.version

    def state(self) -> tuple[dict, dict] | None:
        """Checkpoint groups: the trainable state of the policy and of its reference / anchor / old copies (adapters
        only with LoRA: the base stays where the run's config points) and the optimiser, whole tensors (any number
        of ranks can load them); plus plain state."""
        others = self._on_peers("state", collective=self.ranks.sharded)
        lrn = self.learner
        tensors = lrn.copy_states()
        opt_tensors, opt_plain = optimizer_state_to_tensors(lrn.optimizer_state())
        ray.get(others)
        if self.ranks.rank:
            return None
        tensors["optimizer"] = {k: v.detach().cpu().clone() for k, v in opt_tensors.items()}
        return tensors, {"optimizer": opt_plain, "version": lrn.version, "base": self.base,
                         "base_key": self.base_key, "reference_resets": lrn.reference_resets,
                         "learner_workers": self.ranks.world}

    def load_state(self, tensors: dict, plain: dict) -> None:
        others = self._on_peers("load_state", tensors, plain)  # every rank: DDP replicas and FSDP2 shards alike
        lrn = self.learner
        lrn.load_copy_states(tensors)
        lrn.load_optimizer_state(optimizer_state_from_tensors(tensors["optimizer"], plain["optimizer"]))
        lrn.version = plain["version"]
        lrn.reference_resets = plain.get("reference_resets", 0)  # checkpoints before moving references have none
        ray.get(others)


class LearnerGroup:
    """The learner's actors and the placement group they sit in; `head` (rank 0) is what the orchestrator calls."""

    def __init__(self, ranks: list, pg=None):
        self.ranks, self.pg = ranks, pg

    @property
    def head(self):
        return self.ranks[0]

    def alive(self, timeout_s: float = 10.0) -> bool:
        """Every rank answers (a rank stuck in a collective with a dead one does not)."""
        try:
            ray.get([r.version.remote() for r in self.ranks], timeout=timeout_s)
            return True
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return False

    def shutdown(self) -> None:
        for handle in self.ranks:
            ray.kill(handle, no_restart=True)
        if self.pg is not None:
            remove_placement_group(self.pg)


def learner_group(model_cfg, base: str | None, cfg: dict, total_steps: int, seed: int, *, workers: int = 1,
                  placement: str = "pack", num_cpus: float, num_gpus: float = 0.0, threads: int = 1,
                  base_key: str = "", sum_norm: bool = False, name: str = "learner") -> LearnerGroup:
    """Start the learner: one actor, or `workers` ranks in one placement group ("pack": as few nodes as possible,
    "spread": one per node where it can), joined into one process group before this returns. Actor names: `name`
    for rank 0, `name`-<rank> for the others."""
    args = (model_cfg, base, cfg, total_steps, seed, threads, base_key, sum_norm)
    if workers == 1:
        return LearnerGroup([ray.remote(LearnerActor).options(name=name, num_cpus=num_cpus,
                                                              num_gpus=num_gpus).remote(*args)])
    bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    pg = placement_group([bundle] * workers, strategy=placement.upper())
    ray.get(pg.ready())
    ranks = [ray.remote(LearnerActor).options(
        name=name if r == 0 else f"{name}-{r}", num_cpus=num_cpus, num_gpus=num_gpus,
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)).remote(
            *args, rank=r, world=workers) for r in range(workers)]
    address, port = ray.get(ranks[0].endpoint.remote())
    ray.get([rank.join.remote(address, port, ranks[1:] if r == 0 else None) for r, rank in enumerate(ranks)])
    return LearnerGroup(ranks, pg)
