"""The named `constraint-controller` actor: calibrated thresholds τ_c and PID (or primal–dual) λ_c(t)."""

from __future__ import annotations

import ray

from rewards.constraints import ConstraintsConfig, ConstraintSet


class ConstraintController:
    """τ and λ per constraint. A restarted controller has lost its state: every update takes the state the
    previous update returned (the training loop keeps it) and resumes from it when its own count differs,
    so λ stays continuous across a controller death."""

    def __init__(self, cfg: dict, taus: dict[str, float]):
        self.set = ConstraintSet.from_config(ConstraintsConfig.model_validate(cfg), taus)
        self.updates = 0

    def update(self, batch_means: dict[str, float], last_state: dict | None = None) -> tuple[dict[str, float], dict]:
        """-> (λ per constraint, the state to hand to the next update)."""
        if last_state is not None and last_state.get("updates", 0) != self.updates:
            self.load_state_dict(last_state)
        lambdas = self.set.update(batch_means)
        self.updates += 1
        return lambdas, self.state_dict()

    def lambdas(self) -> dict[str, float]:
        return self.set.lambdas()

    def taus(self) -> dict[str, float]:
        return self.set.taus

    def state_dict(self) -> dict:
        return {**self.set.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.updates = state.pop("updates", 0)
        self.set.load_state_dict(state)


def controller_actor(cfg: dict, taus: dict[str, float]):
    # a call that meets a dead controller is retried on its restarted self, which resumes from the state it is given
    return ray.remote(ConstraintController).options(name="constraint-controller", num_cpus=0.05, max_restarts=-1,
                                                    max_task_retries=-1).remote(cfg, taus)
