"""The `learner` actor: turns scored trajectory groups into one policy update per call."""

from __future__ import annotations

import numpy as np
import ray
import torch

from orchestrator.checkpoint import optimizer_state_from_tensors, optimizer_state_to_tensors
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.model import ModelConfig, VideoDiT
from policy.rollout import trajectory_from_payload
from policy.text import WordTokenizer


class LearnerActor:
    def __init__(self, model_cfg: dict, weights_path: str, cfg: dict, total_steps: int, seed: int, threads: int = 1):
        torch.set_num_threads(threads)
        model = VideoDiT.load(weights_path, ModelConfig.model_validate(model_cfg))
        self.learner = Learner(model, LearnerConfig.model_validate(cfg), total_steps, seed)
        self.tokenizer = WordTokenizer(model.cfg.vocab)

    def train_step(self, payload_refs: list, rewards: list[dict[str, np.ndarray]], primary: str,
                   taus: dict[str, float], lambdas: dict[str, float]) -> dict[str, float]:
        """payload_refs: [ObjectRef of a rollout payload] (nested in a list so Ray does not fetch them early)."""
        payloads = ray.get(list(payload_refs))
        groups = [ScoredGroup(p["group_id"], self.tokenizer.encode([p["prompt"]]), trajectory_from_payload(p), r, p["version"])
                  for p, r in zip(payloads, rewards)]
        return self.learner.step(groups, primary, taus, lambdas)

    def weights(self) -> dict[str, np.ndarray]:
        return self.learner.weights()

    def version(self) -> int:
        return self.learner.version

    def state(self) -> tuple[dict, dict]:
        """Checkpoint groups: policy, reference, anchor, old (NFT) weights and the optimiser; plus plain state."""
        lrn = self.learner
        opt_tensors, opt_plain = optimizer_state_to_tensors(lrn.opt.state_dict())
        tensors = {name: {k: v.detach().clone() for k, v in getattr(lrn, attr).state_dict().items()}
                   for name, attr in (("policy", "model"), ("reference", "reference"), ("anchor", "anchor"), ("old", "old"))}
        tensors["optimizer"] = {k: v.clone() for k, v in opt_tensors.items()}
        tensors["rng"] = {"learner": lrn.generator.get_state()}
        return tensors, {"optimizer": opt_plain, "version": lrn.version}

    def load_state(self, tensors: dict, plain: dict) -> None:
        lrn = self.learner
        for name, attr in (("policy", "model"), ("reference", "reference"), ("anchor", "anchor"), ("old", "old")):
            getattr(lrn, attr).load_state_dict(tensors[name])
        lrn.opt.load_state_dict(optimizer_state_from_tensors(tensors["optimizer"], plain["optimizer"]))
        lrn.generator.set_state(tensors["rng"]["learner"])
        lrn.version = plain["version"]


def learner_actor(model_cfg: dict, weights_path: str, cfg: dict, total_steps: int, seed: int, *,
                  num_cpus: float, num_gpus: float = 0.0, threads: int = 1):
    return ray.remote(LearnerActor).options(name="learner", num_cpus=num_cpus, num_gpus=num_gpus).remote(
        model_cfg, weights_path, cfg, total_steps, seed, threads)
