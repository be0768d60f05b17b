"""Rollout actors: `rollout-<i>`, each a policy copy generating trajectory groups."""

from __future__ import annotations

import ray
import torch

from policy.rollout import RolloutWorker


class RolloutActor(RolloutWorker):
    def __init__(self, *args, **kwargs):
        torch.set_num_threads(1)  # several actors share the node's cores
        super().__init__(*args, **kwargs)

    def ping(self) -> int:
        return self.version


def rollout_actor(index: int, model_cfg, base: str | None, rollout_kwargs: dict, *, num_cpus: float,
                  num_gpus: float = 0.0):
    """A named rollout actor that Ray restarts on death (the orchestrator re-sends weights and retries its group).
    It loads the base policy itself (on its GPU when Ray gave it one); versions then arrive as trainable state."""
    cls = ray.remote(RolloutActor).options(
        name=f"rollout-{index}", num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=-1, max_task_retries=0,
    )
    return cls.remote(model_cfg, base, **rollout_kwargs)
