"""Parity with upstream Self-Forcing: replay a reference fixture through videorl's own `wan_causal` path.

A fixture (e.g. tests/fixtures/self_forcing_tiny.{safetensors,json}) holds a random tiny generator in Self-Forcing's
checkpoint layout ("generator_ema.model.<Wan name>"), the inputs of one causal rollout (text states, the initial noise
of every chunk, the fresh noise of every re-noising) and what upstream's CausalWanModel computed with its rolling KV
cache, in float64. `self_forcing_rollout` loads the checkpoint with the same loader users get
(`policy.wan.loading.read_self_forcing`, strict), builds the stock diffusers WanTransformer3DModel with videorl's
swaps, and samples with videorl's own sampler (`cps` at eta = 1 is Self-Forcing's step: x' = (1 - s') x0_hat + s' eps)
and rolling cache (sink + window), in float64. Everything is read from the fixture: sizes, chunk, window, sink,
schedule, non-square latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from policy.backend import PolicyShape
from policy.sampling import sample
from policy.wan.config import WanConfig
from policy.wan.loading import cast_like_diffusers, load_strict, read_self_forcing
from policy.wan.policy import WanPolicy, install_swaps
from policy.wan.text import pad_states


@dataclass
class SelfForcingRun:
    """velocities [chunk, step, batch, frame, C, H, W]; clean_latents [B, T, C, H, W]; latents [B, K+1, T, C, H, W] (every
    level of the rollout); cond [B, text_len, text_dim]; after the last chunk's context run, the cache's frames, keys
    and values per layer `[B, heads, tokens, head_dim]` (keys after rotary)."""

    velocities: Tensor
    clean_latents: Tensor
    latents: Tensor
    cond: Tensor
    cache_frames: list[int]
    cache_keys: list[Tensor]
    cache_values: list[Tensor]


def fixture_files(path: str | Path) -> tuple[Path, dict]:
    """(the .safetensors, the parsed .json) of a fixture given by either file or their common stem."""
    path = Path(path)
    tensors, meta = path.with_suffix(".safetensors"), path.with_suffix(".json")
    for f in (tensors, meta):
        if not f.is_file():
            raise FileNotFoundError(f"fixture file not found: {f}")
    return tensors, json.loads(meta.read_text())


def fixture_policy(fixture_path: str | Path) -> WanPolicy:
    """The fixture's generator as a float64 wan_causal policy: its checkpoint through `read_self_forcing`, strict, into
    the stock WanTransformer3DModel of the fixture's config, with the window and sink of its cache."""
    from diffusers import WanTransformer3DModel

    tensors_path, meta = fixture_files(fixture_path)
    c = meta["config"]
    kwargs = dict(c["diffusers_WanTransformer3DModel_kwargs"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    with torch.device("meta"):
        transformer = install_swaps(WanTransformer3DModel(**kwargs))
    load_strict(transformer, read_self_forcing(tensors_path, use_ema=True), str(tensors_path), assign=True)
    cast_like_diffusers(transformer, torch.float64)
    frames, h, w = c["latent_frames"], c["latent_height"], c["latent_width"]
    ph, pw = kwargs["patch_size"][1:]
    shape = PolicyShape(frames=frames, channels=kwargs["in_channels"], height=h, width=w, chunk=c["num_frame_per_block"],
                        window=c["local_attn_size"], sink=c["sink_size"], tokens_per_frame=(h // ph) * (w // pw),
                        video_frames=frames, video_height=h, video_width=w)
    cfg = WanConfig(kind="wan_causal", path=str(tensors_path.parent), dtype="float64", frames=frames, height=h,
                    width=w, chunk=shape.chunk, window=shape.window, sink=shape.sink, text_len=c["text_len"])
    return WanPolicy(transformer, cfg, shape, latents=None, prompts=None).eval()


def replay(policy, fixture_path: str | Path) -> SelfForcingRun:
    """Sample the fixture's rollout with `policy` (any wan_causal policy of the fixture's shapes): its text states,
    its initial and fresh noise, its schedule; record every velocity the sampler asks for."""
    tensors_path, meta = fixture_files(fixture_path)
    c = meta["config"]
    inputs = {k: v for k, v in load_file(str(tensors_path)).items() if not k.startswith("generator")}
    chunk, n_chunks, frames = c["num_frame_per_block"], c["num_chunks"], c["latent_frames"]
    text = inputs["inputs.text_embedding"]  # [B, L, text_dim] before padding
    cond = torch.stack([pad_states([t], c["text_len"])[0] for t in text]).to(policy.dtype)
    initial, fresh = inputs["inputs.initial_noise"], inputs["inputs.fresh_noise"]  # [j, B, c, ...], [j, k, B, c, ...]
    steps, b = fresh.shape[1] + 1, text.shape[0]
    noise = torch.zeros(b, steps + 1, frames, *initial.shape[3:], dtype=torch.float64)
    for j in range(n_chunks):
        fr = slice(j * chunk, (j + 1) * chunk)
        noise[:, 0, fr] = initial[j]
        noise[:, 1:steps, fr] = fresh[j].transpose(0, 1)  # noise of step k re-noises to sigma_{k+1}; none after the last
    sigmas = torch.cat([inputs["schedule.sigmas"], torch.zeros(1, dtype=torch.float64)])

    velocities, caches = [], []
    chunk_velocity = policy.velocity_chunk

    def recorded(*args, **kwargs):
        v = chunk_velocity(*args, **kwargs)
        velocities.append(v.detach().clone())
        return v

    policy.velocity_chunk = recorded  # this object's own method, wrapped to record what the sampler asked for
    try:
        with torch.no_grad():
            traj = sample(policy, cond, steps=steps, sde_type="cps", eta=1.0, mode="causal", num_frames=frames,
                          noise=noise, sigmas=sigmas, on_chunk=lambda j, cache: caches.append(cache))
            cache = caches[-1]  # the context run of the last chunk, as upstream does after its last step
            policy.append_to_cache(traj.videos[:, (n_chunks - 1) * chunk:], cond, cache, (n_chunks - 1) * chunk)
    finally:
        del policy.velocity_chunk
    v = torch.stack(velocities).view(n_chunks, steps, b, chunk, *initial.shape[3:])
    layers = range(cache.num_layers)
    return SelfForcingRun(v, traj.videos, traj.latents, cond, list(cache.frame_positions),
                          [cache.keys[i].flatten(0, 1) for i in layers], [cache.values[i].flatten(0, 1) for i in layers])


def self_forcing_rollout(fixture_path: str | Path) -> SelfForcingRun:
    return replay(fixture_policy(fixture_path), fixture_path)


def self_forcing_velocities(fixture_path: str) -> Tensor:
    """videorl's wan_causal velocities for a Self-Forcing fixture: float64 [chunk, step, batch, frame, C, H, W], the
    shape of its `expected.velocities` (see `fixture_policy` and `replay`)."""
    return self_forcing_rollout(fixture_path).velocities
