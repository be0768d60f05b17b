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

from policy.model import ModelConfig, VideoDiT, model_to_videos
from policy.sampling import Trajectory, sample
from policy.text import WordTokenizer
from rewards.world import to_uint8


class RolloutWorker:
    def __init__(self, model_cfg: dict, *, mode: str, sampler: str, eta: float, steps: int, shift: float,
                 group_size: int, shared_prefix: bool = True):
        self.model = VideoDiT(ModelConfig.model_validate(model_cfg)).eval().requires_grad_(False)
        self.tokenizer = WordTokenizer(self.model.cfg.vocab)
        self.mode, self.sampler, self.eta, self.steps, self.shift = mode, sampler, eta, steps, shift
        self.group_size, self.shared_prefix = group_size, shared_prefix
        self.version = -1

    def set_weights(self, version: int, weights: dict[str, np.ndarray]) -> int:
        self.model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()})  # copy: Ray arrays are read-only
        self.version = version
        return version

    def generate(self, group_id: str, prompt: str, seed: int) -> tuple[dict, dict, dict]:
        """One group -> (reward batch, trajectory payload, metadata); everything numpy, ready for the object store.

        reward batch: {"ids": [G], "videos": uint8 [G, T, H, W, 3], "prompts": [G]};
        trajectory: latents float32 [G, K+1, T, C, H, W], log_probs [G, n_chunks, K], sigmas [K+1], prefix_chunks,
        mode, sde_type, eta, version, group_id, prompt.
        """
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        n_chunks = self.model.cfg.frames // self.model.cfg.chunk
        prefix = int(torch.randint(0, n_chunks, (), generator=gen)) if self.mode == "causal" and self.shared_prefix else 0
        ids = self.tokenizer.encode([prompt])
        traj = sample(self.model, ids, steps=self.steps, sde_type=self.sampler, eta=self.eta, mode=self.mode,
                      group_size=self.group_size, prefix_chunks=prefix, generator=gen, shift=self.shift)
        g = self.group_size
        videos = to_uint8(model_to_videos(traj.videos))
        batch = {"ids": [f"{group_id}/{j}" for j in range(g)], "videos": videos, "prompts": [prompt] * g}
        payload = {
            "group_id": group_id, "prompt": prompt, "version": self.version,
            "latents": traj.latents.numpy(), "log_probs": traj.log_probs.numpy(), "sigmas": traj.sigmas.numpy(),
            "prefix_chunks": prefix, "mode": traj.mode, "sde_type": traj.sde_type, "eta": traj.eta,
        }
        meta = {"group_id": group_id, "version": self.version, "prefix_chunks": prefix,
                "seconds": time.perf_counter() - start}
        return batch, payload, meta


def trajectory_from_payload(p: dict) -> Trajectory:
    latents = torch.from_numpy(np.array(p["latents"]))  # copy: object-store arrays are read-only
    return Trajectory(
        latents=latents, log_probs=torch.from_numpy(np.array(p["log_probs"])),
        sigmas=torch.from_numpy(np.array(p["sigmas"])), videos=latents[:, -1],
        prefix_chunks=int(p["prefix_chunks"]), group_size=latents.shape[0], mode=p["mode"],
        sde_type=p["sde_type"], eta=float(p["eta"]),
    )
