"""Self-Paced GRPO's curriculum (MATH.md §6): a running competence estimate moves the reward emphasis from visual
fidelity (VQ) to temporal coherence (MQ) to semantic alignment (TA).

Competence is an EMA of the generator's quality, where a step's quality q_t is the mean of the batch's learned
reward values over the curriculum rewards (mean over rewards of each reward's batch mean, reward units):
    c_0 = q_0;   c_t = decay·c_{t−1} + (1 − decay)·q_t
It starts at the first batch's quality, not 0, so the schedule has no warm-up bias. The weights a step trains with
are `self_paced_weights(c_t, thresholds, stages)`: c_t already includes that step's batch (its rewards are known
before the update). Pure python state (one float), so it goes through msgpack into checkpoints.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewards.advantages import SELF_PACED_STAGES, self_paced_weights


class CurriculumConfig(BaseModel):
    """`rewards.curriculum`: stage i (a weight per reward in `rewards`) is in force from competence thresholds[i]."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["self_paced"] = "self_paced"
    thresholds: list[float] = Field(min_length=1)  # competence levels (reward units), strictly increasing
    stages: list[list[float]] = Field(default_factory=lambda: [list(s) for s in SELF_PACED_STAGES])
    rewards: list[str] = Field(default_factory=lambda: ["vq", "mq", "ta"], min_length=1)  # each a GDPO channel
    decay: float = Field(0.9, ge=0, lt=1)  # EMA decay of the competence per step

    @model_validator(mode="after")
    def _consistent(self) -> CurriculumConfig:
        if len(set(self.rewards)) != len(self.rewards):
            raise ValueError(f"rewards repeats a reward: {self.rewards}")
        if len(self.stages) != len(self.thresholds):
            raise ValueError(f"{len(self.stages)} stages for {len(self.thresholds)} thresholds (one stage per "
                             "threshold)")
        for i, stage in enumerate(self.stages):
            if len(stage) != len(self.rewards):
                raise ValueError(f"stages[{i}] has {len(stage)} weights for the "
                                 f"{len(self.rewards)} rewards {self.rewards}")
        self_paced_weights(self.thresholds[0], self.thresholds, self.stages)  # names bad thresholds / stages
        return self


def check_curriculum_rewards(cfg: CurriculumConfig, known: set[str]) -> None:
    """Every curriculum reward must be a reward of the run (`known`: the reward models' names)."""
    missing = [r for r in cfg.rewards if r not in known]
    if missing:
        raise ValueError(f"rewards.curriculum.rewards {missing} are not rewards of this run; its reward models give "
                         f"{sorted(known)}")


class SelfPacedCurriculum:
    """The competence EMA and the channel weights it implies (see the module docstring)."""

    def __init__(self, cfg: CurriculumConfig):
        self.cfg = cfg
        self.competence: float | None = None  # None until the first batch

    def update(self, batch_means: dict[str, float]) -> dict[str, float]:
        """batch_means: {reward: mean over the batch} (at least the curriculum rewards) -> {reward: weight}."""
        quality = float(np.mean([batch_means[r] for r in self.cfg.rewards]))
        d = self.cfg.decay
        self.competence = quality if self.competence is None else d * self.competence + (1 - d) * quality
        return self.weights()

    def weights(self) -> dict[str, float]:
        w = self_paced_weights(self.competence, self.cfg.thresholds, self.cfg.stages)
        return {r: float(x) for r, x in zip(self.cfg.rewards, w)}

    def state_dict(self) -> dict:
        return {"competence": self.competence}

    def load_state_dict(self, state: dict) -> None:
        self.competence = state["competence"]
