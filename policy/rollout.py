"""Rollout generation: a policy copy at a known version makes groups of G clips per prompt.

In causal mode every group draws a history length (0 .. n_chunks-1 chunks); the history is
generated once, its rolling KV cache frozen and broadcast to the G candidates (Astrolabe's
shared-prefix group rollout), and only the candidate chunks differ inside the group. Drawing the
history length per group moves the trained window over the whole clip, the first chunk included.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from policy.backend import load_policy
from policy.sampling import Trajectory, sample


class RolloutWorker:
    """model_cfg: the run's `model` section (any backend); base: the base weights `load_policy` reads (the learner
    then publishes `trainable_state()` versions: full weights, or only a LoRA adapter on top of this base).
    dtype: the rollout's own model dtype (None = model_cfg's); prompt_table: precomputed text-encoder states."""

    def __init__(self, model_cfg, base: str | None, *, mode: str, sampler: str, eta: float, steps: int, shift: float,
                 group_size: int, shared_prefix: bool = True, dtype: str | None = None, prompt_table=None):
        if dtype is not None and dtype != model_cfg.dtype:
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
        self.policy = load_policy(model_cfg, base, prompt_table=prompt_table).eval()  # sampling runs under no_grad
        self.mode, self.sampler, self.eta, self.steps, self.shift = mode, sampler, eta, steps, shift
        self.group_size, self.shared_prefix = group_size, shared_prefix
        self.version = -1

    def set_weights(self, version: int, weights: dict) -> int:
        self.policy.load_trainable_state(weights)
        self.version = version
        return version

    def generate(self, group_id: str, prompt: str, seed: int) -> tuple[dict, dict, dict]:
        """One group -> (reward batch, trajectory payload, metadata), ready for the object store.

        reward batch: {"ids": [G], "videos": uint8 [G, T', H', W', 3] (decoded), "prompts": [G]};
        trajectory: latents float32 [G, K+1, T, C, H, W], log_probs [G, n_chunks, K], sigmas [K+1], cond (the prompt's
        conditioning [1, ...], so the learner needs no text encoder), prefix_chunks, mode, sde_type, eta, version,
        group_id, prompt.
        """
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        shape = self.policy.shape
        n_chunks = shape.frames // shape.chunk
        prefix = int(torch.randint(0, n_chunks, (), generator=gen)) if self.mode == "causal" and self.shared_prefix else 0
        cond = self.policy.encode_prompts([prompt])
        traj = sample(self.policy, cond, steps=self.steps, sde_type=self.sampler, eta=self.eta, mode=self.mode,
                      group_size=self.group_size, prefix_chunks=prefix, generator=gen, shift=self.shift)
        g = self.group_size
        batch = {"ids": [f"{group_id}/{j}" for j in range(g)], "videos": self.policy.decode(traj.videos),
                 "prompts": [prompt] * g}
        payload = {
            "group_id": group_id, "prompt": prompt, "version": self.version, "cond": cond.cpu(),
            "latents": traj.latents.cpu().numpy(), "log_probs": traj.log_probs.cpu().numpy(),
            "sigmas": traj.sigmas.numpy(), "prefix_chunks": prefix, "mode": traj.mode, "sde_type": traj.sde_type,
            "eta": traj.eta,
        }
        meta = {"group_id": group_id, "version": self.version, "prefix_chunks": prefix,
                "seconds": time.perf_counter() - start}
        return batch, payload, meta


def trajectory_from_payload(p: dict, device: torch.device | str = "cpu") -> Trajectory:
    latents = torch.from_numpy(np.array(p["latents"])).to(device)  # copy: object-store arrays are read-only
    return Trajectory(
        latents=latents, log_probs=torch.from_numpy(np.array(p["log_probs"])).to(device),
        sigmas=torch.from_numpy(np.array(p["sigmas"])), videos=latents[:, -1],
        prefix_chunks=int(p["prefix_chunks"]), group_size=latents.shape[0], mode=p["mode"],
        sde_type=p["sde_type"], eta=float(p["eta"]),
    )
