"""The named `constraint-controller` actor: calibrated thresholds τ_c and PID (or primal–dual) λ_c(t)."""

from __future__ import annotations

import ray

from rewards.constraints import ConstraintsConfig, ConstraintSet


class ConstraintController:
    def __init__(self, cfg: dict, taus: dict[str, float]):
        self.set = ConstraintSet.from_config(ConstraintsConfig.model_validate(cfg), taus)

    def update(self, batch_means: dict[str, float]) -> dict[str, float]:
        return self.set.update(batch_means)

    def lambdas(self) -> dict[str, float]:
        return self.set.lambdas()

    def taus(self) -> dict[str, float]:
        return self.set.taus

    def state_dict(self) -> dict:
        return self.set.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.set.load_state_dict(state)


def controller_actor(cfg: dict, taus: dict[str, float]):
    return ray.remote(ConstraintController).options(name="constraint-controller", num_cpus=0.05, max_restarts=-1).remote(cfg, taus)
