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

The payload holds only what the learner reads (`trajectory_payload`): the clean clip alone for the forward-process
losses (nft, flow_dpo, flow_rwr, sft), every sampler level for ppo (it draws the steps it re-scores per update, so any
may be read), log-probs of the trained chunks only; latents in `payload_dtype` (float16 / bfloat16 halve them; the learner casts back to float32 before any maths).
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from policy.backend import load_policy
from policy.sampling import Guide, Trajectory, guided_velocity, sample

PAYLOAD_DTYPES = ("float32", "float16", "bfloat16")


class RolloutWorker:
    """model_cfg: the run's `model` section (any backend); base: the base weights `load_policy` reads (the learner
    then publishes `trainable_state()` versions: full weights, or only a LoRA adapter on top of this base).
    dtype: the rollout's own model dtype (None = model_cfg's); prompt_table: precomputed text-encoder states.
    frames: streaming long tuning, the longest rollout in latent frames (None: one training clip).
    guidance: {"checkpoint", "dim", "weight", "beta"} of a VideoReward model steering the sampler (None: unguided).
    keep_steps: the payload holds every sampler level and the trained chunks' log-probs (`LearnerConfig.reads_steps`:
    ppo); False: the clean clip only. payload_dtype: how latents are stored (`trajectory_payload`)."""

    def __init__(self, model_cfg, base: str | None, *, mode: str, sampler: str, eta: float, steps: int, shift: float,
                 group_size: int, shared_prefix: bool = True, dtype: str | None = None, prompt_table=None,
                 frames: int | None = None, guidance: dict | None = None, extras: tuple[str, ...] = (),
                 keep_steps: bool = True, payload_dtype: str = "float32"):
        if payload_dtype not in PAYLOAD_DTYPES:
            raise ValueError(f"rollout.payload_dtype must be one of {list(PAYLOAD_DTYPES)}, got {payload_dtype!r}")
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
        self.keep_steps, self.payload_dtype = keep_steps, payload_dtype
        self.version = -1

    def set_weights(self, version: int, weights: dict) -> int:
        self.policy.load_trainable_state(weights)
        self.version = version
        return version

    def generate(self, group_id: str, prompt: str, seed: int) -> tuple[dict, dict, dict]:
        """One group -> (reward batch, trajectory payload, metadata), ready for the object store.

        reward batch: {"ids": [G], "videos": uint8 [G, T', H', W', 3] (decoded), "prompts": [G], the `extras` [G, T']};
        trajectory: `trajectory_payload`'s arrays (latents, log-probs, sigmas: what the learner reads), cond (the
        prompt's conditioning [1, ...], so the learner needs no text encoder), prefix_chunks, mode, sde_type, eta,
        version, group_id, prompt; `trajectory_from_payload` rebuilds the Trajectory. T is the clip's frames, or with
        streaming prefix_chunks * chunk + the clip's frames (the whole video, history included: the learner needs it
        as context); the reward batch is always the last clip.
        metadata: group_id, version, prefix_chunks, seconds, and batch_bytes / payload_bytes (`buffer_bytes`: what
        the two objects put in the object store).
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
            **trajectory_payload(traj, keep_steps=self.keep_steps, dtype=self.payload_dtype),
        }
        meta = {"group_id": group_id, "version": self.version, "prefix_chunks": prefix,
                "seconds": time.perf_counter() - start, "batch_bytes": buffer_bytes(batch),
                "payload_bytes": buffer_bytes(payload)}
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
        from rewards.scorer import ENSEMBLE_FILE

        if (Path(checkpoint) / ENSEMBLE_FILE).is_file():
            raise ValueError(f"guidance takes its gradient through one VideoReward model; {checkpoint} is an ensemble "
                             f"(rewards.reward_model.ensemble): guide with one of its members, a subdirectory")
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


def worker_options(cfg) -> dict:
    """Every RolloutWorker argument a run's config (orchestrator.config.Config) sets, beyond the model and its base
    (a run's actors add the prompt table and the guidance they build)."""
    r = cfg.rollout
    return dict(mode=r.mode, sampler=r.sampler, eta=r.eta, steps=r.steps, shift=r.shift, group_size=r.group_size,
                shared_prefix=r.shared_prefix, dtype=r.dtype, frames=r.frames, extras=tuple(r.extras),
                **payload_options(cfg))


def payload_options(cfg) -> dict:
    """The RolloutWorker arguments a run's config (orchestrator.config.Config) sets for its payloads: keep the sampler
    steps when the learner reads them (learner.loss), store in rollout.payload_dtype."""
    return {"keep_steps": cfg.learner.reads_steps, "payload_dtype": cfg.rollout.payload_dtype}


def buffer_bytes(obj) -> int:
    """Bytes of the numpy / torch buffers in a nested dict / list / tuple (what an object puts in the object store
    beyond its small pickled scalars and strings)."""
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(buffer_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(buffer_bytes(v) for v in obj)
    return 0


def store_array(t: Tensor, dtype: str) -> np.ndarray:
    """A CPU numpy array of t for the payload: float32 keeps the sampler's dtype (float32, or float64 in float64
    checks); float16 rounds to it; bfloat16 is kept as its uint16 bit pattern, because numpy has no bfloat16 and a
    numpy array (unlike a pickled torch tensor) is stored out of band and read zero-copy by Ray."""
    t = t.detach().cpu().contiguous()  # a contiguous array goes to the object store out of band (no pickled copy)
    if dtype == "float32":
        return t.numpy()
    if dtype == "float16":
        return t.to(torch.float16).numpy()
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    raise ValueError(f"rollout.payload_dtype must be one of {list(PAYLOAD_DTYPES)}, got {dtype!r}")


def load_array(a: np.ndarray, dtype: str, device: torch.device | str = "cpu") -> Tensor:
    """Inverse of `store_array`, cast to float32 (float64 stays float64) on `device`. Zero-copy where nothing changes:
    a float32 array read on the CPU is the object store's (read-only) buffer itself."""
    with warnings.catch_warnings():  # read-only: the learner never writes a payload tensor in place
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        t = torch.from_numpy(a.view(np.int16) if dtype == "bfloat16" else a)
    if dtype == "bfloat16":
        t = t.view(torch.bfloat16)
    return t.to(device=device, dtype=torch.promote_types(t.dtype, torch.float32))


def trajectory_payload(traj: Trajectory, *, keep_steps: bool, dtype: str) -> dict:
    """The arrays of one group's Trajectory the learner reads, for the object store.

    keep_steps: all K+1 sigma levels ("levels" = 0..K) and the log-probs of the chunks after the prefix
    [G, n_chunks - prefix_chunks, K] (ppo draws which steps it re-scores at every update, so any level may be read;
    the prefix chunks' are never read); False: the clean clip alone ("levels" = [K]: nft, flow_dpo, flow_rwr and sft
    read x0 only) and no log-probs. latents [G, L, T, C, H, W] in `dtype` (`store_array`); log-probs stay as sampled:
    they are < 0.1 % of the bytes, and PPO's ratio exp(new − old) is held to clip_range (1e-3), finer than a rounded
    log-prob (bfloat16 turned a first, on-policy step's clip fraction from 0 to 0.56 on a test model). A shared
    history stays in all G rows (one copy would save (G-1)/G of its frames, about a third of a tiny.yaml causal clip
    on average, at the cost of the learner rebuilding the rows).
    """
    k = traj.sigmas.shape[0] - 1
    levels = list(range(k + 1)) if keep_steps else [k]
    lat = traj.latents if keep_steps else traj.latents[:, k:]
    n_chunks = traj.log_probs.shape[1]
    return {
        "latents": store_array(lat, dtype),
        "log_probs": store_array(traj.log_probs[:, traj.prefix_chunks :], "float32") if keep_steps else None,
        "levels": levels, "n_chunks": n_chunks, "payload_dtype": dtype, "sigmas": traj.sigmas.numpy(),
        "prefix_chunks": traj.prefix_chunks, "mode": traj.mode, "sde_type": traj.sde_type, "eta": traj.eta,
    }


def trajectory_from_payload(p: dict, device: torch.device | str = "cpu") -> Trajectory:
    """The learner's Trajectory from a `trajectory_payload` (float32 tensors on `device`, the object store's arrays
    read without copies where possible). latents [G, L, T, ...] hold the stored sigma levels p["levels"] (all K+1, or
    only the clean clip); log-probs [G, n_chunks, K] with NaN for the prefix chunks (never read: a read would show),
    or [G, n_chunks, 0] when the payload has none."""
    dtype = p["payload_dtype"]
    latents = load_array(p["latents"], dtype, device)
    g = latents.shape[0]
    k = p["sigmas"].shape[0] - 1
    if p["log_probs"] is None:
        log_probs = torch.zeros(g, p["n_chunks"], 0, device=latents.device, dtype=latents.dtype)
    else:
        trained = load_array(p["log_probs"], "float32", device)
        prefix = torch.full((g, p["n_chunks"] - trained.shape[1], k), float("nan"), device=device, dtype=trained.dtype)
        log_probs = torch.cat([prefix, trained], dim=1) if prefix.shape[1] else trained
    return Trajectory(
        latents=latents, log_probs=log_probs, sigmas=load_array(p["sigmas"], "float32"), videos=latents[:, -1],
        prefix_chunks=int(p["prefix_chunks"]), group_size=g, mode=p["mode"],
        sde_type=p["sde_type"], eta=float(p["eta"]),
    )
