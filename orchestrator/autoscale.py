"""Reward-replica autoscaling: a pure decision per reward model, taken once per learner step.

Rule: backlog = batches in flight per replica. After `upscale_patience` consecutive steps above
`target_backlog` the pool grows by one replica (up to `max`); after `patience` consecutive steps
below a quarter of the target it shrinks by one (down to `min`). One replica at a time, and the
delays (Ray Serve's upscale/downscale delays, counted in steps), keep the pool from flapping.
A checkpoint keeps the replica counts, the streaks and the `videorl scale` requests not yet applied
(`scaling_state`), and a resumed run starts from them (`restore_scaling`).
"""

from __future__ import annotations

import ray
from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    target_backlog: float = Field(2.0, gt=0)
    patience: int = Field(3, ge=1)  # calm steps before a replica is removed
    upscale_patience: int = Field(1, ge=1)  # backed-up steps before a replica is added

    @model_validator(mode="after")
    def _order(self) -> AutoscaleConfig:
        if self.max < self.min:
            raise ValueError(f"autoscale.max ({self.max}) must be >= autoscale.min ({self.min})")
        return self


def decide(cfg: AutoscaleConfig, replicas: int, in_flight: int, streak: int) -> tuple[int, int]:
    """-> (new replica count, new streak). streak counts consecutive steps: > 0 backed up, < 0 calm."""
    backlog = in_flight / max(1, replicas)
    if backlog > cfg.target_backlog:
        streak = max(streak, 0) + 1
        if streak >= cfg.upscale_patience and replicas < cfg.max:
            return replicas + 1, 0
    elif backlog < cfg.target_backlog / 4:
        streak = min(streak, 0) - 1
        if -streak >= cfg.patience and replicas > cfg.min:
            return replicas - 1, 0
    else:
        streak = 0
    return replicas, streak


def apply_scaling(pools: dict, requests: dict[str, int], rules: dict[str, AutoscaleConfig | None],
                  streaks: dict[str, int]) -> dict[str, int]:
    """One learner step's reward scaling. pools {name: RewardPool}; requests {name: replicas} from `videorl scale`
    (a request wins over the model's autoscaler for that step); rules {name: AutoscaleConfig or None}; streaks
    {name: `decide`'s streak}, updated in place. Returns {name: replicas}."""
    for name, pool in pools.items():
        if name in requests:
            pool.scale_to(requests[name])
            streaks[name] = 0
        elif rules.get(name) is not None:
            replicas, streaks[name] = decide(rules[name], pool.size, pool.in_flight, streaks.get(name, 0))
            if replicas != pool.size:
                pool.scale_to(replicas)
    return {name: pool.size for name, pool in pools.items()}


def scale_step(control, pools: dict, rules: dict[str, AutoscaleConfig | None], streaks: dict[str, int],
               steps_done: int) -> dict[str, int]:
    """Reward scaling once per learner step, as a running job does it: the `videorl scale` requests waiting at the
    job's control actor, else the autoscaler (`apply_scaling`); the sizes are reported back. -> {name: replicas}."""
    sizes = apply_scaling(pools, ray.get(control.take_requests.remote()), rules, streaks)
    control.report.remote({"steps_done": steps_done, "reward_replicas": sizes})
    return sizes


def scaling_state(control, pools: dict, streaks: dict[str, int]) -> dict:
    """What a checkpoint keeps of reward scaling (plain python): {"replicas": {name: n}, "streaks": {name: streak},
    "requests": the `videorl scale` requests waiting at the control actor, not taken from it}."""
    return {"replicas": {name: pool.size for name, pool in pools.items()}, "streaks": dict(streaks),
            "requests": ray.get(control.pending.remote())}


def restore_scaling(state: dict, control, pools: dict, streaks: dict[str, int]) -> None:
    """Resume: the pools at their saved sizes, the streaks (in place), the unapplied requests sent to the (new) control
    actor, so the next `scale_step` decides as the killed run would have."""
    for name, n in state["replicas"].items():
        pools[name].scale_to(n)
    streaks.update(state["streaks"])
    for name, n in state["requests"].items():
        ray.get(control.scale.remote(name, n))
