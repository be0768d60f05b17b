"""Parity with upstream Self-Forcing: replay a reference fixture through videorl's own `wan_causal` path.

A fixture (e.g. shared/fixtures/self_forcing_tiny.{safetensors,json}) holds a random tiny generator in Self-Forcing's
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
    """velocities [chunk, step, batch, frame, C, H, W]; clean_latents [B, T, C, H, W]; after the last chunk's
    context run, the cache's frames, keys and values per layer `[B, heads, tokens, head_dim]` (keys after rotary)."""

    velocities: Tensor
    clean_latents: Tensor
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


def self_forcing_rollout(fixture_path: str | Path) -> SelfForcingRun:
    from diffusers import WanTransformer3DModel

    tensors_path, meta = fixture_files(fixture_path)
    c = meta["config"]
    inputs = {k: v for k, v in load_file(str(tensors_path)).items() if not k.startswith("generator")}
    kwargs = dict(c["diffusers_WanTransformer3DModel_kwargs"])
    kwargs["patch_size"] = tuple(kwargs["patch_size"])
    with torch.device("meta"):
        transformer = install_swaps(WanTransformer3DModel(**kwargs))
    load_strict(transformer, read_self_forcing(tensors_path, use_ema=True), str(tensors_path))
    cast_like_diffusers(transformer, torch.float64)

    chunk, n_chunks = c["num_frame_per_block"], c["num_chunks"]
    frames, h, w = c["latent_frames"], c["latent_height"], c["latent_width"]
    ph, pw = kwargs["patch_size"][1:]
    channels = kwargs["in_channels"]
    shape = PolicyShape(frames=frames, channels=channels, height=h, width=w, chunk=chunk, window=c["local_attn_size"],
                        sink=c["sink_size"], tokens_per_frame=(h // ph) * (w // pw), video_frames=frames,
                        video_height=h, video_width=w)
    cfg = WanConfig(kind="wan_causal", path=str(tensors_path.parent), dtype="float64", frames=frames, height=h,
                    width=w, chunk=chunk, window=shape.window, sink=shape.sink, text_len=c["text_len"])
    policy = WanPolicy(transformer, cfg, shape, latents=None, prompts=None).eval()

    text = inputs["inputs.text_embedding"]  # [B, L, text_dim] before padding
    cond = torch.stack([pad_states([t], c["text_len"])[0] for t in text])
    initial, fresh = inputs["inputs.initial_noise"], inputs["inputs.fresh_noise"]  # [j, B, c, ...], [j, k, B, c, ...]
    steps = fresh.shape[1] + 1
    b = text.shape[0]
    noise = torch.zeros(b, steps + 1, frames, channels, h, w, dtype=torch.float64)
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
    with torch.no_grad():
        traj = sample(policy, cond, steps=steps, sde_type="cps", eta=1.0, mode="causal", num_frames=frames,
                      noise=noise, sigmas=sigmas, on_chunk=lambda j, cache: caches.append(cache))
        cache = caches[-1]  # the context run of the last chunk, as upstream does after its last step
        last = slice((n_chunks - 1) * chunk, frames)
        policy.append_to_cache(traj.videos[:, last], cond, cache, (n_chunks - 1) * chunk)
    v = torch.stack(velocities).view(n_chunks, steps, b, chunk, channels, h, w)
    layers = range(cache.num_layers)
    return SelfForcingRun(v, traj.videos, list(cache.frame_positions),
                          [cache.keys[i].flatten(0, 1) for i in layers], [cache.values[i].flatten(0, 1) for i in layers])


def self_forcing_velocities(fixture_path: str) -> Tensor:
    """videorl's wan_causal velocities for a Self-Forcing fixture: float64 [chunk, step, batch, frame, C, H, W], the
    shape of its `expected.velocities` (see `self_forcing_rollout`)."""
    return self_forcing_rollout(fixture_path).velocities
