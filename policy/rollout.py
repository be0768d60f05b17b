"""Rollout generation: a policy copy at a known version makes groups of G clips per prompt.

In causal mode every group draws a history length (0 .. n_chunks-1 chunks); the history is
generated once, its rolling KV cache frozen and broadcast to the G candidates (Astrolabe's
shared-prefix group rollout), and only the candidate chunks differ inside the group. Drawing the
history length per group moves the trained window over the whole clip, the first chunk included.

Streaming long tuning (Astrolabe, `frames` > the training clip): a group's history is 0 .. (frames − clip)/chunk
chunks and the G candidates generate exactly one training clip (model frames) after it, so the window position covers
[0, frames − clip]; the rolling cache evicts once history + window exceed the attention window. The reward models
score that last clip window (the length they were trained on); the learner trains its chunks, history detached.

Reward guidance (VideoAlign): `RewardGuide` steers every sampler step with a differentiable VideoReward model.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import Tensor

from policy.backend import load_policy
from policy.sampling import Guide, Trajectory, guided_velocity, sample


class RolloutWorker:
    """model_cfg: the run's `model` section (any backend); base: the base weights `load_policy` reads (the learner
    then publishes `trainable_state()` versions: full weights, or only a LoRA adapter on top of this base).
    dtype: the rollout's own model dtype (None = model_cfg's); prompt_table: precomputed text-encoder states.
    frames: streaming long tuning, the longest rollout in latent frames (None: one training clip).
    guidance: {"checkpoint", "dim", "weight", "beta"} of a VideoReward model steering the sampler (None: unguided)."""

    def __init__(self, model_cfg, base: str | None, *, mode: str, sampler: str, eta: float, steps: int, shift: float,
                 group_size: int, shared_prefix: bool = True, dtype: str | None = None, prompt_table=None,
                 frames: int | None = None, guidance: dict | None = None, extras: tuple[str, ...] = ()):
        if dtype is not None and dtype != model_cfg.dtype:
            model_cfg = model_cfg.model_copy(update={"dtype": dtype})
        self.policy = load_policy(model_cfg, base, prompt_table=prompt_table).eval()  # sampling runs under no_grad
        self.mode, self.sampler, self.eta, self.steps, self.shift = mode, sampler, eta, steps, shift
        self.group_size, self.shared_prefix = group_size, shared_prefix
        shape = self.policy.shape
        if frames is not None and (mode != "causal" or frames % shape.chunk or frames < shape.frames):
            raise ValueError(f"rollout frames={frames}: streaming needs causal mode and a multiple of chunk "
                             f"{shape.chunk} of at least the clip's {shape.frames} frames")
        self.frames = frames
        self.extras = tuple(extras)  # extra reward-batch fields (`rewards.audio_sync.EXTRAS`), e.g. "beat"
        self.guide = None if guidance is None else RewardGuide.from_checkpoint(
            guidance["checkpoint"], guidance["dim"], guidance["weight"], guidance["beta"], device=self.policy.device)
        self.version = -1

    def set_weights(self, version: int, weights: dict) -> int:
        self.policy.load_trainable_state(weights)
        self.version = version
        return version

    def generate(self, group_id: str, prompt: str, seed: int) -> tuple[dict, dict, dict]:
        """One group -> (reward batch, trajectory payload, metadata), ready for the object store.

        reward batch: {"ids": [G], "videos": uint8 [G, T', H', W', 3] (decoded), "prompts": [G], the `extras` [G, T']};
        trajectory: latents float32 [G, K+1, T, C, H, W], log_probs [G, n_chunks, K], sigmas [K+1], cond (the prompt's
        conditioning [1, ...], so the learner needs no text encoder), prefix_chunks, mode, sde_type, eta, version,
        group_id, prompt. T is the clip's frames, or with streaming prefix_chunks * chunk + the clip's frames (the
        whole video, history included: the learner needs it as context); the reward batch is always the last clip.
        """
        start = time.perf_counter()
        gen = torch.Generator().manual_seed(seed)
        shape = self.policy.shape
        if self.frames is None:
            n_chunks, length = shape.frames // shape.chunk, shape.frames
            prefix = int(torch.randint(0, n_chunks, (), generator=gen)) if self.mode == "causal" and self.shared_prefix else 0
        else:  # streaming: history of 0 .. (frames - clip) / chunk chunks, then one clip of candidates
            prefix = int(torch.randint(0, (self.frames - shape.frames) // shape.chunk + 1, (), generator=gen))
            length = prefix * shape.chunk + shape.frames
        cond = self.policy.encode_prompts([prompt])
        guide = None if self.guide is None else self.guide.for_prompts([prompt])
        traj = sample(self.policy, cond, steps=self.steps, sde_type=self.sampler, eta=self.eta, mode=self.mode,
                      num_frames=length, group_size=self.group_size, prefix_chunks=prefix, generator=gen,
                      shift=self.shift, guide=guide)
        g = self.group_size
        clip = traj.videos[:, length - shape.frames :]  # the reward models score the current clip window
        batch = {"ids": [f"{group_id}/{j}" for j in range(g)], "videos": self.policy.decode(clip),
                 "prompts": [prompt] * g}
        if self.extras:
            from rewards.audio_sync import batch_extras

            batch.update(batch_extras(self.extras, batch["prompts"], batch["videos"].shape[1]))
        payload = {
            "group_id": group_id, "prompt": prompt, "version": self.version, "cond": cond.cpu(),
            "latents": traj.latents.cpu().numpy(), "log_probs": traj.log_probs.cpu().numpy(),
            "sigmas": traj.sigmas.numpy(), "prefix_chunks": prefix, "mode": traj.mode, "sde_type": traj.sde_type,
            "eta": traj.eta,
        }
        meta = {"group_id": group_id, "version": self.version, "prefix_chunks": prefix,
                "seconds": time.perf_counter() - start}
        return batch, payload, meta


class RewardGuide:
    """Reward-guided sampling (VideoAlign, MATH.md §3): at every sampler step v' = v − (t/(1−t))·(w/β)·∇_{x_t} r(x̂0),
    r = one dimension of a VideoReward model on the predicted clean clip x̂0 = x_t − t·v.

    The policy must work in pixel space (VideoDiT: latents are the video in [-1, 1], [B, T, 3, H, W], the layout
    VideoReward reads), so r(x̂0) is differentiable end to end; x̂0 is clamped to [-1, 1] as `decode` clamps it.
    v is held fixed (no backward through the policy: ∂x̂0/∂x_t ≈ I). The reward scores clips of its `frames`: the
    last `frames` frames of [clean history; x̂0 of the frames being denoised]. A causal chunk that ends before the
    first full clip (fewer frames generated than the reward reads) is left unguided.
    """

    def __init__(self, reward_model, dim: str, weight: float, beta: float):
        dims = list(reward_model.cfg.dims)
        if dim not in dims:
            raise ValueError(f"guidance: the reward model scores {dims}, not {dim!r}")
        if beta <= 0 or weight < 0:
            raise ValueError(f"guidance needs weight >= 0 and beta > 0, got weight {weight}, beta {beta}")
        self.model = reward_model.eval().requires_grad_(False)
        self.index, self.weight, self.beta, self.frames = dims.index(dim), weight, beta, reward_model.cfg.frames

    @classmethod
    def from_checkpoint(cls, checkpoint: str, dim: str, weight: float, beta: float,
                        device: torch.device | str = "cpu") -> RewardGuide:
        from rewards.reward_model import VideoReward

        return cls(VideoReward.load(checkpoint).to(device), dim, weight, beta)

    def reward(self, clip: Tensor, prompts: list[str]) -> Tensor:
        """The guiding reward of clips [N, frames, 3, H, W] in [-1, 1] -> [N] (differentiable)."""
        return self.model(clip.clamp(-1, 1).float(), prompts)[:, self.index]

    def for_prompts(self, prompts: list[str]) -> Guide:
        """The `guide` sample() calls for P prompts (its rows are P or P*G, prompt-major)."""
        def guide(x_t: Tensor, sigma: Tensor, v: Tensor, history: Tensor) -> Tensor:
            if history.shape[1] + x_t.shape[1] < self.frames:  # no full clip yet: nothing to score
                return v
            texts = [p for p in prompts for _ in range(x_t.shape[0] // len(prompts))]
            with torch.enable_grad():
                x = x_t.detach().requires_grad_(True)
                x0 = x - sigma.to(x.dtype).view(-1, 1, 1, 1, 1) * v.detach()
                clip = torch.cat([history.to(x0.dtype), x0], dim=1)[:, -self.frames :]
                (grad,) = torch.autograd.grad(self.reward(clip, texts).sum(), x)
            return guided_velocity(v, sigma, grad, self.weight, self.beta)

        return guide


def trajectory_from_payload(p: dict, device: torch.device | str = "cpu") -> Trajectory:
    latents = torch.from_numpy(np.array(p["latents"])).to(device)  # copy: object-store arrays are read-only
    return Trajectory(
        latents=latents, log_probs=torch.from_numpy(np.array(p["log_probs"])).to(device),
        sigmas=torch.from_numpy(np.array(p["sigmas"])), videos=latents[:, -1],
        prefix_chunks=int(p["prefix_chunks"]), group_size=latents.shape[0], mode=p["mode"],
        sde_type=p["sde_type"], eta=float(p["eta"]),
    )
