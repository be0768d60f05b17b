"""Reward-replica autoscaling: a pure decision per reward model, taken once per learner step.

Rule: backlog = batches in flight per replica. Above `target_backlog` the pool grows by one
replica (up to `max`); after `patience` consecutive steps below a quarter of the target it
shrinks by one (down to `min`). One replica at a time keeps the controller from oscillating.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AutoscaleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min: int = Field(1, ge=1)
    max: int = Field(1, ge=1)
    target_backlog: float = Field(2.0, gt=0)
    patience: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _order(self) -> AutoscaleConfig:
        if self.max < self.min:
            raise ValueError(f"autoscale.max ({self.max}) must be >= autoscale.min ({self.min})")
        return self


def decide(cfg: AutoscaleConfig, replicas: int, in_flight: int, calm_steps: int) -> tuple[int, int]:
    """-> (new replica count, new calm-step counter)."""
    backlog = in_flight / max(1, replicas)
    if backlog > cfg.target_backlog and replicas < cfg.max:
        return replicas + 1, 0
    calm_steps = calm_steps + 1 if backlog < cfg.target_backlog / 4 else 0
    if calm_steps >= cfg.patience and replicas > cfg.min:
        return replicas - 1, 0
    return replicas, calm_steps
