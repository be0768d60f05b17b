"""The `learner` actor: turns scored trajectory groups into one policy update per call."""

from __future__ import annotations

import numpy as np
import ray
import torch

from orchestrator.checkpoint import optimizer_state_from_tensors, optimizer_state_to_tensors
from policy.backend import load_policy
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.rollout import trajectory_from_payload

COPIES = (("policy", "model"), ("reference", "reference"), ("anchor", "anchor"), ("old", "old"))


class LearnerActor:
    def __init__(self, model_cfg, base: str | None, cfg: dict, total_steps: int, seed: int, threads: int = 1,
                 base_key: str = "", sum_norm: bool = False):
        """cfg: the `learner` config section as a dict; sum_norm: `constraints.sum_norm` (see policy.learner)."""
        torch.set_num_threads(threads)
        policy = load_policy(model_cfg, base, for_training=True)  # on the actor's GPU when Ray gave it one
        self.learner = Learner(policy, LearnerConfig.model_validate(cfg), total_steps, seed, sum_norm=sum_norm)
        self.base, self.base_key = base, base_key  # recorded in checkpoints: adapters only fit the base they grew on

    def train_step(self, payload_refs: list, rewards: list[dict[str, np.ndarray]], primary: str,
                   taus: dict[str, float], lambdas: dict[str, float],
                   channel_weights: dict[str, float] | None = None) -> dict[str, float]:
        """payload_refs: [ObjectRef of a rollout payload] (nested in a list so Ray does not fetch them early).
        channel_weights: extra advantage channels, reward name -> weight (`Learner.step`)."""
        payloads = ray.get(list(payload_refs))
        device = self.learner.model.device
        groups = [ScoredGroup(p["group_id"], p["cond"].to(device), trajectory_from_payload(p, device), r, p["version"])
                  for p, r in zip(payloads, rewards)]
        return self.learner.step(groups, primary, taus, lambdas, channel_weights)

    def weights(self) -> dict[str, torch.Tensor]:
        return self.learner.weights()

    def version(self) -> int:
        return self.learner.version

    def state(self) -> tuple[dict, dict]:
        """Checkpoint groups: the trainable state of the policy and of its reference / anchor / old copies (adapters
        only with LoRA: the base stays where the run's config points) and the optimiser; plus plain state."""
        lrn = self.learner
        opt_tensors, opt_plain = optimizer_state_to_tensors(lrn.opt.state_dict())
        tensors = {name: getattr(lrn, attr).trainable_state() for name, attr in COPIES}
        tensors["optimizer"] = {k: v.detach().cpu().clone() for k, v in opt_tensors.items()}
        tensors["rng"] = {"learner": lrn.generator.get_state()}
        return tensors, {"optimizer": opt_plain, "version": lrn.version, "base": self.base,
                         "base_key": self.base_key, "reference_resets": lrn.reference_resets}

    def load_state(self, tensors: dict, plain: dict) -> None:
        lrn = self.learner
        for name, attr in COPIES:
            getattr(lrn, attr).load_trainable_state(tensors[name])
        lrn.opt.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], plain["optimizer"]))
        lrn.generator.set_state(tensors["rng"]["learner"])
        lrn.version = plain["version"]
        lrn.reference_resets = plain.get("reference_resets", 0)  # checkpoints before moving references have none


def learner_actor(model_cfg, base: str | None, cfg: dict, total_steps: int, seed: int, *,
                  num_cpus: float, num_gpus: float = 0.0, threads: int = 1, base_key: str = "", sum_norm: bool = False):
    return ray.remote(LearnerActor).options(name="learner", num_cpus=num_cpus, num_gpus=num_gpus).remote(
        model_cfg, base, cfg, total_steps, seed, threads, base_key, sum_norm)
