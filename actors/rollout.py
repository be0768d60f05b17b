"""Rollout actors: `rollout-<i>`, each a policy copy generating trajectory groups."""

from __future__ import annotations

import ray
import torch

from actors import outputs_of_many
from orchestrator.checkpoint import seed_global_rngs
from policy.parallel import WeightBroadcast
from policy.rollout import RolloutWorker


class RolloutActor(RolloutWorker):
    def __init__(self, *args, prompt_table=None, **kwargs):
        """prompt_table: [ObjectRef] of the text-encoder states (nested, so Ray passes the reference: the driver keeps
        it alive for restarts, and the actor fetches it itself)."""
        torch.set_num_threads(1)  # several actors share the node's cores
        table = ray.get(prompt_table[0]) if prompt_table else None
        super().__init__(*args, prompt_table=table, **kwargs)

    def generate(self, group_id: str, prompt: str, seed: int, version: int | None = None,
                 weights: list | None = None) -> tuple[dict, dict, dict]:
        """`RolloutWorker.generate` on weights `version`: `weights` = [ObjectRef] of that version when this actor may
        not hold it yet (nested, so Ray passes the reference and the actor fetches it only if it needs it). This
        process's global RNGs are seeded from the group seed first: a group is a pure function of (weights version,
        prompt, seed) even where some library draws from them, so a group re-run after a restart or a resume comes
        out the same."""
        if weights is not None and version != self.version:
            self.set_weights(version, ray.get(weights[0]))
        seed_global_rngs(seed)
        return super().generate(group_id, prompt, seed)

    def generate_many(self, groups: list[tuple[str, str, int]], version: int | None = None,
                      weights: list | None = None) -> tuple:
        """`generate` for each (group id, prompt, seed) on weights `version`, in one call (the orchestrator's
        `rollout.groups_per_call`) -> (batch_1 .. batch_k, payload_1 .. payload_k, [meta_1 .. meta_k])."""
        return outputs_of_many([self.generate(*group, version, weights) for group in groups])

    def ping(self) -> int:
        return self.version

    def join_weight_sync(self, address: str, port: int, rank: int, world: int, timeout_s: float) -> None:
        """Join the learner's broadcast group (weights.sync=broadcast) as `rank`."""
        self.sync = WeightBroadcast(address, port, rank, world, timeout_s)

    def receive_weights(self, version: int, bucket_bytes: int) -> int:
        """Take `version` from the broadcast group (queued in order with this actor's generate calls). A failure
        (a member died, this actor restarted outside the group) drops the group: the orchestrator opens a new one."""
        sync, self.sync = getattr(self, "sync", None), None
        if sync is None:
            raise ConnectionError(f"this rollout actor is in no weight broadcast group (it restarted); "
                                  f"version {version} comes from the object store")
        weights = sync.receive(version, self.policy.trainable_state(), bucket_bytes)
        self.sync = sync
        return self.set_weights(version, weights)


def rollout_actor(index: int, model_cfg, base: str | None, rollout_kwargs: dict, *, num_cpus: float,
                  num_gpus: float = 0.0):
    """A named rollout actor that Ray restarts on death (the orchestrator re-sends weights and retries its group).
    It loads the base policy itself (on its GPU when Ray gave it one); versions then arrive as trainable state."""
    cls = ray.remote(RolloutActor).options(
        name=f"rollout-{index}", num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
    )
    return cls.remote(model_cfg, base, **rollout_kwargs)
