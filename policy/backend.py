"""The policy interface the samplers, rollout workers and the learner use, and the one loader behind it.

A policy is a flow-matching velocity model over latent videos `[B, T, C, H, W]` (x_t = (1 - t) x0 + t eps,
v = eps - x0, sigma in [0, 1]) with three attention patterns from one set of weights:
- `velocity`: bidirectional over the whole clip;
- `velocity_chunk` / `append_to_cache`: chunk-autoregressive streaming with a `RollingKVCache`
  (sink + window, keys after rotary encoding at absolute frame positions, MATH.md §7);
- `velocity_causal`: the teacher-forced equivalent of streaming (training, log-prob recomputation).
Prompts are conditioning tensors `[P, ...]` (batch first) from `encode_prompts`; `decode` turns latents into the
uint8 clips reward models score. What moves from learner to rollout is `trainable_state()` (a LoRA adapter when
LoRA is on, all weights otherwise).

Backends (`model.kind`): `videodit` (policy.model.VideoDiT, the embedded world's model), `wan` (bidirectional
Wan2.1/2.2 T2V) and `wan_causal` (Self-Forcing-style causal Wan), both on the stock diffusers
`WanTransformer3DModel` (policy.wan). Nothing outside `policy/` names a model class: it calls `load_policy`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from policy.kv_cache import RollingKVCache

KINDS = ("videodit", "wan", "wan_causal")
ROLES = ("reference", "anchor", "old")  # the frozen copies a learner keeps (MATH.md §3)


@dataclass(frozen=True)
class PolicyShape:
    """Shapes a policy works in. Latent frames/channels/height/width are what samplers draw noise for;
    chunk/window/sink are latent frames (window counts the chunk itself); video_* is what `decode` returns for a
    clip of `frames` latent frames (the VAE's scale factors; pixel-space models decode 1:1)."""

    frames: int
    channels: int
    height: int
    width: int
    chunk: int
    window: int
    sink: int
    tokens_per_frame: int
    video_frames: int
    video_height: int
    video_width: int
    temporal_scale: int = 1  # video frames per latent frame after the first (Wan VAE: 4)


@runtime_checkable
class Policy(Protocol):
    """What `policy.sampling`, `policy.rollout`, `policy.learner` and `policy.pretrain` call."""

    shape: PolicyShape

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> conditioning `[P, ...]` (token ids or text-encoder states), on the policy's device."""

    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        """Bidirectional velocity of x `[B, T, C, H, W]`; sigma `[B]` or `[B, T]`; cond `[B, ...]`."""

    def velocity_chunk(self, x_chunk: Tensor, sigma: Tensor, cond: Tensor, cache: RollingKVCache,
                       start_frame: int) -> Tensor:
        """Streaming velocity of one noisy chunk at absolute frames start_frame.. against the cache (read only)."""

    def append_to_cache(self, x_clean_chunk: Tensor, cond: Tensor, cache: RollingKVCache, start_frame: int) -> None:
        """Run a finished chunk at sigma 0 and append its keys/values to the cache (which then evicts)."""

    def velocity_causal(self, x_noisy: Tensor, sigma: Tensor, x_clean: Tensor, cond: Tensor,
                        detach_history: bool = False) -> Tensor:
        """Teacher-forced chunk-causal velocity: noisy chunk j sees the clean frames the cache would hold."""

    def new_cache(self) -> RollingKVCache: ...

    def decode(self, latents: Tensor) -> np.ndarray:
        """Latents `[N, T, C, H, W]` -> uint8 clips `[N, T', H', W', 3]` for reward models."""

    def trainable_state(self) -> dict[str, Tensor]:
        """What the learner publishes per version: adapter tensors with LoRA, every weight otherwise."""

    def load_trainable_state(self, state: Mapping[str, Tensor | np.ndarray]) -> None: ...

    def trainable_parameters(self) -> list[torch.nn.Parameter]: ...

    def frozen_copy(self, role: str) -> Policy:
        """A no-grad policy for `role` in ROLES, starting from the current trainable weights ("reference" with
        LoRA: the adapters switched off, i.e. the base model)."""

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write what `load_policy(cfg, out_dir)` reads back; returns the directory."""

    def fsdp_units(self) -> tuple[torch.nn.Module, list[torch.nn.Module], tuple[str, ...]]:
        """What FSDP2 shards (`policy.parallel.shard`): the root module, its transformer blocks (one unit each), and
        the root's methods other than forward() that run the model (they gather the root's own weights)."""

    def train(self, mode: bool = True): ...

    def eval(self): ...


def frame_sigma(sigma, b: int, t: int, device: torch.device) -> Tensor:
    """sigma [B] (one per clip) or [B, T] (one per frame) -> [B, T] float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=device)
    if sigma.shape == (b,):
        return sigma[:, None].expand(b, t)
    if sigma.shape == (b, t):
        return sigma
    raise ValueError(f"sigma must be [B]=[{b}] or [B, T]=[{b}, {t}], got shape {list(sigma.shape)}")


def check_chunk(shape: PolicyShape, num_layers: int, x: Tensor, cache: RollingKVCache, start_frame: int) -> None:
    """A streaming call's chunk x [B, chunk, ...] must continue `cache` at its next frame, for this model."""
    b, c = x.shape[:2]
    if c != shape.chunk:
        raise ValueError(f"a chunk has {shape.chunk} frames, got {c}")
    if cache.chunk != shape.chunk or cache.num_layers != num_layers:
        raise ValueError("cache was made for a different model (chunk or depth differ); use policy.new_cache()")
    if start_frame != cache.next_frame:
        raise ValueError(f"start_frame must be {cache.next_frame} (the next uncached frame), got {start_frame}")
    if cache.batch and cache.batch != b:
        raise ValueError(f"cache holds batch {cache.batch}, the chunk has batch {b}")


def is_wan(model_cfg) -> bool:
    return model_cfg.kind in ("wan", "wan_causal")


def video_shape(model_cfg) -> tuple[int, int, int]:
    """(frames, height, width) of the clips a policy of this config decodes for reward models."""
    if model_cfg.kind == "videodit":
        return model_cfg.frames, model_cfg.size, model_cfg.size
    return model_cfg.frames, model_cfg.height, model_cfg.width


def uses_lora(model_cfg) -> bool:
    """True when the model trains LoRA adapters (what the learner publishes and checkpoints)."""
    return is_wan(model_cfg) and model_cfg.lora is not None


def without_adapters(model_cfg):
    """The same model with no LoRA (pretraining trains every weight)."""
    return model_cfg.model_copy(update={"lora": None}) if is_wan(model_cfg) else model_cfg


def base_model_config(model_cfg):
    """What the base weights and their samples depend on: the model without LoRA and without the learner's
    execution choices (gradient checkpointing, attention backend)."""
    model_cfg = without_adapters(model_cfg)
    if not is_wan(model_cfg):
        return model_cfg
    return model_cfg.model_copy(update={"gradient_checkpointing": False, "attention_backend": None})


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads at `n` inside the block, as they were after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_device() -> torch.device:
    """The GPU Ray gave this process (an actor sees only the devices it asked for), else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def init_policy(model_cfg, *, device: str | torch.device | None = None) -> Policy:
    """The policy `model_cfg` describes before any training: VideoDiT randomly initialised; Wan from model.path
    (plus model.checkpoint, a Self-Forcing generator), with fresh LoRA adapters when model.lora is set."""
    return load_policy(model_cfg, None, device=device)


def load_policy(model_cfg, weights: str | os.PathLike | None, *, device: str | torch.device | None = None,
                prompt_table: Mapping[str, Tensor | np.ndarray] | None = None, for_training: bool = False) -> Policy:
    """The single loader. `weights`: what `Policy.save` wrote (a VideoDiT model.safetensors or its directory; a Wan
    directory with a full transformer or a LoRA adapter), or None for `init_policy`'s starting point.

    prompt_table: precomputed text-encoder states per prompt (Wan), so this process never loads the text encoder
    for those prompts. for_training: gradient checkpointing as configured (model.gradient_checkpointing).
    Errors name the problem: FileNotFoundError for a missing file, ValueError for a corrupt or mismatching one.
    """
    device = torch.device(device) if device is not None else default_device()
    if model_cfg.kind == "videodit":
        from policy.model import VideoDiT

        if weights is None:
            policy = VideoDiT(model_cfg)
        else:  # the architecture saved beside the weights (model.json) when there is one, else the config's
            path = Path(weights)
            path = path / "model.safetensors" if path.is_dir() else path
            policy = VideoDiT.load(path, None if path.with_suffix(".json").is_file() else model_cfg)
        check_dtype(model_cfg.dtype, device)
        return policy.to(device=device, dtype=getattr(torch, model_cfg.dtype))
    if is_wan(model_cfg):
        from policy.wan.policy import load_wan_policy

        return load_wan_policy(model_cfg, weights, device=device, prompt_table=prompt_table, for_training=for_training)
    raise ValueError(f"unknown model.kind {model_cfg.kind!r}; expected one of {list(KINDS)}")


def check_policy_config(model_cfg, device: torch.device | None = None) -> None:
    """Checks that need the model's files but not its weights (run before any actor starts): for Wan the model
    directory's layout, the frames the VAE can take, LoRA targets that match modules; with `device` (where this
    process will run the model) that its dtype and attention backend run there. Raises ValueError /
    FileNotFoundError naming the problem."""
    if is_wan(model_cfg):
        from policy.wan.policy import check_attention_backend, check_wan_config

        check_wan_config(model_cfg)
        if device is not None and model_cfg.attention_backend:
            check_attention_backend(model_cfg.attention_backend)
    if device is not None:
        check_dtype(model_cfg.dtype, device)


def cpu_supports_bfloat16() -> bool:
    """Native bfloat16 on this CPU (AVX-512 BF16 / AMX), as oneDNN reports it."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def check_dtype(dtype: str, device: str | torch.device, cpu_bf16: bool | None = None, key: str = "model.dtype") -> None:
    """Refuse bfloat16 where the device cannot run it (a CPU without native bf16 runs it 10-100x slower); `key` is
    the config key the error names."""
    if dtype != "bfloat16":
        return
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_bf16_supported():
            raise ValueError(f"{key}=bfloat16: GPU {torch.cuda.get_device_name(device)} has no bfloat16 support")
        return
    if device.type == "cpu" and not (cpu_supports_bfloat16() if cpu_bf16 is None else cpu_bf16):
        raise ValueError(f"{key}=bfloat16 needs a CPU with native bfloat16 (AVX-512 BF16 or AMX) or a GPU; "
                         f"this CPU reports {torch.backends.cpu.get_cpu_capability()} without it: use {key}=float32")


def encode_prompt_table(model_cfg, prompts: Sequence[str]) -> dict[str, np.ndarray] | None:
    """Text-encoder states for every prompt, computed once here (Wan), so rollout actors get them by reference
    instead of each loading the text encoder. None for backends whose prompt encoding is a cheap lookup."""
    if not is_wan(model_cfg):
        return None
    from policy.wan.text import PromptEncoder

    encoder = PromptEncoder.from_model_dir(model_cfg.path, text_len=model_cfg.text_len, dtype=model_cfg.dtype)
    return encoder.table(list(dict.fromkeys(prompts)))


def trainable_shapes(model_cfg) -> dict[str, Tensor]:
    """Meta tensors shaped like `init_policy(model_cfg).trainable_state()`: what a checkpoint must hold to fit the
    configured model, found without reading or allocating any weights."""
    with torch.device("meta"):
        return init_policy(model_cfg, device="meta").trainable_state()


def portable(t: Tensor) -> Tensor:
    """A detached CPU copy for the object store or a checkpoint (meta tensors stay meta: shape checks)."""
    return t.detach() if t.is_meta else t.detach().to("cpu", copy=True)


def trainable_bytes(state: Mapping[str, Tensor | np.ndarray]) -> int:
    """Bytes of one published version (what crosses the object store per weight update)."""
    return int(sum(t.nbytes if isinstance(t, np.ndarray) else t.numel() * t.element_size() for t in state.values()))
