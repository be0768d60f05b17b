"""Wan policies on the stock diffusers `WanTransformer3DModel`: bidirectional (`wan`) and chunk-causal with videorl's
rolling KV cache (`wan_causal`, Self-Forcing / CausVid style). No fork, no patched library function: three
instance-level swaps on the loaded model.

1. `transformer.rope = FrameRope(...)`: the same 3-axis rotary tables, but indexed by ABSOLUTE latent-frame positions
   (diffusers' rope always starts at frame 0), computed in float64. It returns the (cos, sin) pair as a
   `RotaryCall` that also carries the call's attention state (cache, mask, history detach, key collection). The
   model passes rotary_emb unchanged into every block, and gradient checkpointing saves it as a block input, so the
   recomputation in backward sees exactly the forward's state (a side channel read at call time would not).
2. `blocks[i].attn1.processor = CachedSelfAttention(i)`: q/k/v with the module's own to_q/to_k/to_v/norm_q/norm_k
   (so peft's LoRA layers apply), rotary, then attention over [cached keys/values ; own] through diffusers'
   `dispatch_attention_fn` (backend selectable).
3. `condition_embedder.timesteps_proj = Float64Timesteps(...)`: diffusers' float32 sinusoid of t ~ 1000 moves the
   velocities by ~1e-5; Self-Forcing computes it in float64.
A float64 policy (exactness checks) also runs the blocks under `KeepFloat64`, a scoped torch function mode in which
`Tensor.float()` leaves float64 tensors as they are: diffusers' blocks upcast with `.float()` (right for bf16), which
would otherwise put float32 steps inside a float64 run.

Timesteps are 1000 * sigma computed in float32, as the Wan / Self-Forcing schedulers do (sigma = 5/6 gives
833.3333129882812, not 833.33...). Tensors follow videorl's `[B, T, C, H, W]`; the transformer's `[B, C, T, H, W]`
is used only inside `_forward`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from policy.backend import PolicyShape, check_chunk, check_dtype, frame_sigma, portable
from policy.kv_cache import RollingKVCache
from policy.model import causal_frame_mask
from policy.wan.config import WanConfig
from policy.wan.loading import (build_transformer, cast_like_diffusers, load_strict, read_safetensors_dir,
                                read_self_forcing, transformer_config, transformer_dir)
from policy.wan.text import PromptStates
from policy.wan.vae import PixelSpace, WanVAE

POLICY_FILE = "videorl_policy.json"  # what `WanPolicy.save` wrote: a full transformer or a LoRA adapter
ADAPTER_FILE = "adapter.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
DENSE_TOKENS = 16384  # teacher forcing with a dense [L, L] mask up to this many tokens, chunk by chunk beyond


# --- the three swaps --------------------------------------------------------------------------------------------


@dataclass
class AttentionCall:
    """Per-call attention state. frame_ids: absolute latent frame of each input frame [F]; cached: per layer, the
    cache's (keys, values) `[P, G, heads, M, head_dim]` the new tokens also attend to, as the cache held them at call
    time (a later append cannot change what a gradient-checkpointed recomputation reads), or None; mask: bool [L, L]
    over the call's own tokens (teacher forcing);
    detach_from: tokens before this index are history whose keys/values carry no gradient; collect: filled with each
    layer's new (keys, values) `[B, heads, L, head_dim]` (after rotary) when the call writes the cache."""

    frame_ids: Tensor
    cached: list[tuple[Tensor, Tensor] | None] | None = None
    mask: Tensor | None = None
    detach_from: int | None = None
    collect: dict[int, tuple[Tensor, Tensor]] | None = None


class RotaryCall(tuple):
    """(cos, sin) `[1, L, 1, head_dim // 2]` per rotary pair, plus the call's AttentionCall."""

    def __new__(cls, cos: Tensor, sin: Tensor, call: AttentionCall):
        out = super().__new__(cls, (cos, sin))
        out.call = call
        return out


def rotary_angles(positions: Tensor, dim: int, theta: float) -> Tensor:
    """Angles [L, dim // 2] of integer positions for one rotary axis of `dim` channels (Wan/RoFormer frequencies
    theta^(-2k/dim)), float64."""
    freqs = theta ** (-torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device)[: dim // 2] / dim)
    return positions.to(torch.float64)[:, None] * freqs[None]


class FrameRope(nn.Module):
    """Replaces `transformer.rope`: Wan's 3-axis rotary (time, row, column; h = w = 2 (head_dim // 6) channels, time
    the rest) with the time axis at `pending.frame_ids`. No parameters or buffers: state_dict keys are unchanged."""

    def __init__(self, head_dim: int, patch_size: Sequence[int], theta: float = 10000.0):
        super().__init__()
        self.h_dim = self.w_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - 2 * self.h_dim
        self.patch_size, self.theta = tuple(patch_size), theta
        self.pending: AttentionCall | None = None

    def forward(self, hidden_states: Tensor) -> RotaryCall:
        call = self.pending
        _, _, f, h, w = hidden_states.shape
        pt, ph, pw = self.patch_size
        f, h, w = f // pt, h // ph, w // pw
        if call.frame_ids.numel() != f:
            raise ValueError(f"{call.frame_ids.numel()} frame positions for {f} frames")
        dev = hidden_states.device
        ang_t = rotary_angles(call.frame_ids.to(dev), self.t_dim, self.theta)[:, None, None].expand(f, h, w, -1)
        ang_h = rotary_angles(torch.arange(h, device=dev), self.h_dim, self.theta)[None, :, None].expand(f, h, w, -1)
        ang_w = rotary_angles(torch.arange(w, device=dev), self.w_dim, self.theta)[None, None, :].expand(f, h, w, -1)
        ang = torch.cat([ang_t, ang_h, ang_w], dim=-1).reshape(1, f * h * w, 1, -1)
        dtype = torch.promote_types(hidden_states.dtype, torch.float32)
        return RotaryCall(ang.cos().to(dtype), ang.sin().to(dtype), call)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate consecutive channel pairs (2k, 2k+1) of x [B, L, heads, D] (Wan's interleaved layout)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


class CachedSelfAttention:
    """Self-attention processor of block `layer`: attends over [cached frames ; this call's frames]."""

    def __init__(self, layer: int, backend: str | None = None):
        self.layer, self.backend = layer, backend

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        call: AttentionCall = rotary_emb.call
        q = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))  # [B, L, H, D]
        k = attn.norm_k(attn.to_k(hidden_states)).unflatten(2, (attn.heads, -1))
        v = attn.to_v(hidden_states).unflatten(2, (attn.heads, -1))
        q, k = apply_rotary(q, *rotary_emb), apply_rotary(k, *rotary_emb)
        if call.collect is not None:
            call.collect[self.layer] = (k.transpose(1, 2), v.transpose(1, 2))
        if call.detach_from is not None:  # history keys/values: no gradient into past frames
            n = call.detach_from
            k = torch.cat([k[:, :n].detach(), k[:, n:]], dim=1)
            v = torch.cat([v[:, :n].detach(), v[:, n:]], dim=1)
        cached = call.cached[self.layer] if call.cached is not None else None
        if cached is not None:  # [P, G, H, M, D] -> [B, M, H, D], prepended (an expanded prefix is read, not copied)
            ck, cv = (t.flatten(0, 1).transpose(1, 2).to(k.dtype) for t in cached)
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
        out = dispatch_attention_fn(q, k, v, attn_mask=call.mask, backend=self.backend)
        out = out.flatten(2, 3).type_as(q)
        return attn.to_out[1](attn.to_out[0](out))


class KeepFloat64(TorchFunctionMode):
    """Inside: `t.float()` of a float64 tensor returns it unchanged (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is Tensor.float and args[0].dtype == torch.float64:
            return args[0]
        return func(*args, **(kwargs or {}))


def install_swaps(transformer, attention_backend: str | None = None):
    """The three instance swaps of the module docstring (idempotent). The swapped-out rope holds only non-persistent
    buffers, so a model built on the meta device needs nothing else re-created."""
    if not isinstance(transformer.rope, FrameRope):
        transformer.rope = FrameRope(transformer.config.attention_head_dim, transformer.config.patch_size)
    transformer.condition_embedder.timesteps_proj = Float64Timesteps(transformer.config.freq_dim)
    for i, block in enumerate(transformer.blocks):
        block.attn1.set_processor(CachedSelfAttention(i, attention_backend))
    return transformer


class Float64Timesteps(nn.Module):
    """Replaces `condition_embedder.timesteps_proj`: Wan's sinusoid [cos, sin] of t with frequencies
    10000^(-i / (n/2)), in float64 (the caller casts to the time embedder's dtype)."""

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, t: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
        args = t.to(torch.float64)[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return nn.functional.pad(emb, (0, self.num_channels % 2))


# --- the policy -------------------------------------------------------------------------------------------------


class WanPolicy(nn.Module):
    """policy.backend.Policy on a WanTransformer3DModel (+ VAE or pixel space, + prompt states).

    causal: the `wan_causal` streaming interface (velocity_chunk, append_to_cache, velocity_causal); a bidirectional
    `wan` policy only has `velocity`. adapter: with LoRA, the peft adapter this object evaluates and trains
    ("default"; frozen copies are views on the same transformer with their own adapter, "reference" = adapters off).

    Position planes: a transformer with in_channels = out_channels + 2 reads two more input channels, the row and
    the column of each latent pixel in [-1, 1] (channel concatenation, as Wan's image-to-video models take their
    condition). RoPE gives attention relative positions only, so a stock Wan cannot place what it draws at an
    absolute position of the frame; the shapes world needs that (an object asked to move left starts on the right).
    """

    def __init__(self, transformer, cfg: WanConfig, shape: PolicyShape, latents, prompts: PromptStates):
        super().__init__()
        self.transformer, self.cfg, self.shape = transformer, cfg, shape
        self.latents, self.prompts = latents, prompts
        self.causal = cfg.kind == "wan_causal"
        self.adapter: str | None = "default" if cfg.lora is not None else None
        self.base_weights: str | None = None  # the directory the base transformer came from (None: model.path)
        self._masks: dict[tuple[int, str], Tensor] = {}
        install_swaps(transformer, cfg.attention_backend)
        self.rope: FrameRope = transformer.rope
        self.planes = position_planes(shape.height, shape.width) if transformer.config.in_channels > shape.channels else None

    # -- what the samplers see --

    @property
    def device(self) -> torch.device:
        return self.transformer.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.patch_embedding.weight.dtype

    def encode_prompts(self, prompts: Sequence[str]) -> Tensor:
        """Prompts -> text-encoder states [P, text_len, text_dim], zero-padded (see policy.wan.text)."""
        return self.prompts(list(prompts)).to(self.device)

    def decode(self, latents: Tensor) -> np.ndarray:
        return self.latents.decode(latents)

    def new_cache(self) -> RollingKVCache:
        s = self.shape
        return RollingKVCache(len(self.transformer.blocks), s.chunk, s.window, s.sink)

    def velocity(self, x: Tensor, sigma: Tensor, cond: Tensor) -> Tensor:
        """Bidirectional pass over the whole clip x [B, T, C, h, w]; sigma [B] or [B, T]."""
        self._check_video(x)
        b, t = x.shape[:2]
        if t > self.shape.frames and not self.causal:
            raise ValueError(f"bidirectional clips have at most {self.shape.frames} latent frames, got {t}")
        call = AttentionCall(torch.arange(t, device=x.device))
        return self._forward(x, self._timesteps(sigma, b, t), cond, call)

    def velocity_chunk(self, x_chunk: Tensor, sigma: Tensor, cond: Tensor, cache: RollingKVCache,
                       start_frame: int) -> Tensor:
        """Streaming pass of one noisy chunk at frames start_frame.. against the cache (read, not written)."""
        b = self._check_chunk(x_chunk, cache, start_frame)
        call = AttentionCall(torch.arange(start_frame, start_frame + x_chunk.shape[1]), cached=self._snapshot(cache))
        return self._forward(x_chunk, self._timesteps(sigma, b, x_chunk.shape[1]), cond, call)

    def append_to_cache(self, x_clean_chunk: Tensor, cond: Tensor, cache: RollingKVCache, start_frame: int) -> None:
        """Self-Forcing's context re-run: the clean chunk at t = 0; its keys/values join the cache (which evicts)."""
        b = self._check_chunk(x_clean_chunk, cache, start_frame)
        c = x_clean_chunk.shape[1]
        call = AttentionCall(torch.arange(start_frame, start_frame + c), cached=self._snapshot(cache), collect={})
        self._forward(x_clean_chunk, torch.zeros(b, device=x_clean_chunk.device), cond, call)
        layers = range(len(self.transformer.blocks))
        cache.append(list(range(start_frame, start_frame + c)), [call.collect[i][0] for i in layers],
                     [call.collect[i][1] for i in layers])

    @staticmethod
    def _snapshot(cache: RollingKVCache) -> list:
        return [cache.read(i) for i in range(cache.num_layers)]

    def velocity_causal(self, x_noisy: Tensor, sigma: Tensor, x_clean: Tensor, cond: Tensor,
                        detach_history: bool = False) -> Tensor:
        """Teacher forcing over [clean frames 0..T-c-1 at t = 0 ; noisy frames 0..T-1] with the rolling cache's
        frame mask (policy.model.causal_frame_mask) and per-token timesteps. -> v of the noisy frames.

        With detach_history and more than DENSE_TOKENS tokens, the same values come chunk by chunk through a cache
        built from the clean frames without gradient (`velocity_causal_streamed`): a 480 x 832 clip of 21 latent
        frames would need a 60,840-token dense mask (3.4 GiB, and no flash kernel)."""
        self._require_causal("velocity_causal")
        if detach_history and (2 * x_noisy.shape[1] - self.shape.chunk) * self.shape.tokens_per_frame > DENSE_TOKENS:
            return self.velocity_causal_streamed(x_noisy, sigma, x_clean, cond)
        self._check_video(x_noisy)
        if x_clean.shape != x_noisy.shape:
            raise ValueError(f"x_clean must match x_noisy: expected {list(x_noisy.shape)}, got {list(x_clean.shape)}")
        b, t = x_noisy.shape[:2]
        c = self.shape.chunk
        if t % c:
            raise ValueError(f"number of frames ({t}) must be a multiple of chunk ({c})")
        per_frame = frame_sigma(sigma, b, t, self.device)
        sig = torch.cat([torch.zeros_like(per_frame[:, c:]), per_frame], dim=1)  # [B, 2T - c]
        frames = torch.arange(t, device=x_noisy.device)
        n_clean = (t - c) * self.shape.tokens_per_frame
        call = AttentionCall(torch.cat([frames[: t - c], frames]), mask=self._mask(t, x_noisy.device),
                             detach_from=n_clean if detach_history else None)
        x = torch.cat([x_clean[:, : t - c], x_noisy], dim=1)
        return self._forward(x, self._token_timesteps(sig), cond, call)[:, t - c:]

    def velocity_causal_streamed(self, x_noisy: Tensor, sigma: Tensor, x_clean: Tensor, cond: Tensor) -> Tensor:
        """`velocity_causal(..., detach_history=True)` one chunk at a time: the clean history enters a rolling cache
        under no_grad, each noisy chunk attends to it with gradient. Memory: one chunk plus the window."""
        self._require_causal("velocity_causal_streamed")
        b, t = x_noisy.shape[:2]
        c = self.shape.chunk
        per_frame = frame_sigma(sigma, b, t, self.device)
        cache, out = self.new_cache(), []
        for start in range(0, t, c):
            fr = slice(start, start + c)
            out.append(self.velocity_chunk(x_noisy[:, fr], per_frame[:, fr], cond, cache, start))
            if start + c < t:
                with torch.no_grad():
                    self.append_to_cache(x_clean[:, fr], cond, cache, start)
        return torch.cat(out, dim=1)

    # -- internals --

    def _forward(self, x: Tensor, timestep: Tensor, cond: Tensor, call: AttentionCall) -> Tensor:
        """x [B, F, C, h, w] -> v, same shape. timestep [B] or per token [B, L] (1000 sigma, float32)."""
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has batch {cond.shape[0]}, the video has {x.shape[0]}")
        if self.planes is not None:
            planes = self.planes.to(x.device, x.dtype)
            x = torch.cat([x, planes.expand(*x.shape[:2], *planes.shape)], dim=2)
        self.rope.pending = call
        try:
            with self._active_adapter(), (KeepFloat64() if self.dtype == torch.float64 else contextlib.nullcontext()):
                out = self.transformer(x.to(self.dtype).permute(0, 2, 1, 3, 4), timestep, cond.to(self.dtype),
                                       return_dict=False)[0]
        finally:
            self.rope.pending = None
        return out.permute(0, 2, 1, 3, 4)

    @contextlib.contextmanager
    def _active_adapter(self):
        """With LoRA, activate this view's adapter for the call (and give "default" back after)."""
        if self.adapter is None or self.adapter == "default":
            yield
        elif self.adapter == "reference":
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()
        else:
            self.transformer.set_adapter(self.adapter)
            try:
                yield
            finally:
                self.transformer.set_adapter("default")

    def _timesteps(self, sigma: Tensor, b: int, t: int) -> Tensor:
        """1000 sigma in float32 (the schedulers' arithmetic): [B] when shared by all frames, else per token."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=self.device)
        if sigma.shape == (b,):
            return sigma * 1000.0
        return self._token_timesteps(frame_sigma(sigma, b, t, self.device))

    def _token_timesteps(self, sigma_bt: Tensor) -> Tensor:
        return (sigma_bt.float() * 1000.0).repeat_interleave(self.shape.tokens_per_frame, dim=1)

    def _mask(self, t: int, device: torch.device) -> Tensor:
        key = (t, str(device))
        if key not in self._masks:
            s = self.shape
            frame_mask = causal_frame_mask(t, s.chunk, s.window, s.sink)
            n = s.tokens_per_frame
            self._masks[key] = frame_mask.repeat_interleave(n, 0).repeat_interleave(n, 1).to(device)
        return self._masks[key]

    def _require_causal(self, what: str) -> None:
        if not self.causal:
            raise ValueError(f"{what} needs model.kind=wan_causal (kind wan attends over the whole clip)")

    def _check_video(self, x: Tensor) -> None:
        s = self.shape
        if x.dim() != 5 or tuple(x.shape[2:]) != (s.channels, s.height, s.width):
            raise ValueError(f"latents must be [B, T, {s.channels}, {s.height}, {s.width}], got shape {list(x.shape)}")

    def _check_chunk(self, x: Tensor, cache: RollingKVCache, start_frame: int) -> int:
        self._require_causal("streaming")
        self._check_video(x)
        check_chunk(self.shape, len(self.transformer.blocks), x, cache, start_frame)
        return x.shape[0]

    # -- what moves between learner and rollout --

    def _adapter_params(self) -> list[tuple[str, nn.Parameter]]:
        marker = f".{self.adapter}."
        return [(n, p) for n, p in self.transformer.named_parameters() if "lora_" in n and marker in n]

    def trainable_parameters(self) -> list[nn.Parameter]:
        if self.adapter is None:
            return list(self.transformer.parameters())
        return [p for _, p in self._adapter_params()] if self.adapter != "reference" else []

    def trainable_state(self) -> dict[str, Tensor]:
        """Full weights, or this view's LoRA adapter (peft's keys, without the adapter name), as CPU copies."""
        if self.adapter is None:
            return {k: portable(v) for k, v in self.transformer.state_dict().items()}
        if self.adapter == "reference":
            return {}  # the base itself: nothing of its own to publish or save
        from peft.utils import get_peft_model_state_dict

        return {k: portable(v) for k, v in get_peft_model_state_dict(self.transformer, adapter_name=self.adapter).items()}

    def load_trainable_state(self, state: Mapping[str, Tensor | np.ndarray]) -> None:
        state = {k: v if isinstance(v, Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()}
        if self.adapter is None:
            load_strict(self.transformer, state, "trainable state")
            return
        if self.adapter == "reference":
            if state:
                raise ValueError("the reference policy (adapters off) has no trainable state")
            return
        own = self.trainable_state()
        if set(state) != set(own):
            raise ValueError(f"adapter state does not fit: missing {sorted(set(own) - set(state))[:4]}, "
                             f"unexpected {sorted(set(state) - set(own))[:4]}")
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.transformer, state, adapter_name=self.adapter)

    def frozen_copy(self, role: str) -> WanPolicy:
        """Full weights: a deep copy. LoRA: a view on the same transformer ("reference": adapters off; "anchor",
        "old": an adapter of their own, starting as a copy of "default")."""
        if self.adapter is None:
            out = copy.deepcopy(self)
            out.transformer.requires_grad_(False)
            return out.eval()
        view = copy.copy(self)  # shares the transformer, prompts and VAE; nn.Module state dicts are shared too
        view.adapter = role
        if role != "reference" and role not in self.transformer.peft_config:
            with warnings.catch_warnings():  # peft warns that a model with an adapter gets a second one: intended
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                self.transformer.add_adapter(lora_config(self.cfg.lora), adapter_name=role)
            self.transformer.set_adapter("default")  # add_adapter leaves the new adapter active and trainable
            view.load_trainable_state(self.trainable_state())
            for _, p in view._adapter_params():
                p.requires_grad_(False)
        return view

    def fsdp_units(self) -> tuple[nn.Module, list[nn.Module], tuple[str, ...]]:
        """The diffusers transformer and its WanTransformerBlocks (every call goes through its forward)."""
        return self.transformer, list(getattr(self.transformer, "blocks", [])), ()

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Full weights: out_dir/transformer (diffusers save_pretrained). LoRA: out_dir/adapter.safetensors and, in
        videorl_policy.json, the LoRA config and a pointer to the base weights (null: model.path / model.checkpoint)."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.adapter is None:
            self.transformer.save_pretrained(out / "transformer")
            info = {"format": "full"}
        else:
            save_file(self.trainable_state(), str(out / ADAPTER_FILE))
            info = {"format": "lora", "lora": self.cfg.lora.model_dump(), "base": self.base_weights}
        (out / POLICY_FILE).write_text(json.dumps({"kind": self.cfg.kind, "model_path": self.cfg.path, **info}, indent=2))
        return out


def lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules),
                      init_lora_weights=True)  # B = 0: a fresh adapter leaves the base model unchanged


def position_planes(height: int, width: int) -> Tensor:
    """[2, height, width]: each pixel's row and column, from -1 (first) to 1 (last)."""
    rows, cols = torch.linspace(-1, 1, height), torch.linspace(-1, 1, width)
    return torch.stack([rows[:, None].expand(height, width), cols[None, :].expand(height, width)])


# --- loading ----------------------------------------------------------------------------------------------------


def latent_codec(cfg: WanConfig, device: torch.device):
    """The model directory's VAE (normalised latents), or pixel space when it has none."""
    if (Path(cfg.path) / "vae").is_dir():
        return WanVAE.from_model_dir(cfg.path, device) if device.type != "meta" else _MetaVAE(cfg.path)
    return PixelSpace()


class _MetaVAE:
    """Scale factors of a VAE read from its config only (shape checks on the meta device)."""

    def __init__(self, path: str):
        vae_cfg = json.loads((Path(path) / "vae" / "config.json").read_text())
        self.channels = vae_cfg.get("z_dim", 16)
        self.temporal_scale = vae_cfg.get("scale_factor_temporal", 4)
        self.spatial_scale = vae_cfg.get("scale_factor_spatial", 8)


def policy_shape(cfg: WanConfig, tcfg: dict, codec) -> PolicyShape:
    """Latent and decoded shapes of `cfg`'s clips on this model; ValueError names a size the model cannot take."""
    st, ss = codec.temporal_scale, codec.spatial_scale
    pt, ph, pw = tcfg.get("patch_size", (1, 2, 2))
    if tcfg.get("out_channels") != codec.channels or tcfg.get("in_channels") not in (codec.channels, codec.channels + 2):
        raise ValueError(f"{cfg.path}: the transformer takes {tcfg.get('in_channels')} channels and makes "
                         f"{tcfg.get('out_channels')}, but the {'VAE makes' if st > 1 else 'pixel frames have'} "
                         f"{codec.channels} (in_channels may be 2 more: position planes, see WanPolicy)")
    if (cfg.frames - 1) % st:
        raise ValueError(f"model.frames={cfg.frames}: the Wan VAE takes 4k + 1 frames (e.g. 9, 33, 81)")
    for name, size, p in (("height", cfg.height, ph), ("width", cfg.width, pw)):
        if size % (ss * p):
            raise ValueError(f"model.{name}={size} must be a multiple of {ss * p} (VAE scale {ss} x patch {p})")
    if pt != 1:
        raise ValueError(f"{cfg.path}: temporal patch size {pt}; videorl's frame-level cache needs 1")
    frames = (cfg.frames - 1) // st + 1 if st > 1 else cfg.frames
    chunk = cfg.chunk if cfg.kind == "wan_causal" else frames
    if frames % chunk:
        raise ValueError(f"model.frames={cfg.frames} gives {frames} latent frames, not a multiple of model.chunk={chunk}")
    window = cfg.window or frames
    h, w = cfg.height // ss, cfg.width // ss
    return PolicyShape(frames=frames, channels=codec.channels, height=h, width=w, chunk=chunk, window=window,
                       sink=cfg.sink, tokens_per_frame=(h // ph) * (w // pw), video_frames=cfg.frames,
                       video_height=cfg.height, video_width=cfg.width, temporal_scale=st)


def load_wan_policy(cfg: WanConfig, weights: str | os.PathLike | None, *, device: torch.device,
                    prompt_table: Mapping | None = None, for_training: bool = False) -> WanPolicy:
    """See policy.backend.load_policy. weights: None (model.path's transformer, or model.checkpoint's Self-Forcing
    generator), a directory `WanPolicy.save` wrote with a full transformer, or one with a LoRA adapter (whose base
    it names)."""
    check_dtype(cfg.dtype, device)
    dtype = DTYPES[cfg.dtype]
    saved = _read_policy_file(weights)
    if saved.get("format") == "lora":
        base_weights = saved.get("base")
        if saved.get("lora") != (cfg.lora.model_dump() if cfg.lora else None):
            raise ValueError(f"{weights}: adapter made with lora {saved.get('lora')}, the config has {cfg.lora}")
    else:
        base_weights = None if weights is None else str(weights)
    transformer = install_swaps(build_transformer(cfg.path, device="meta"), cfg.attention_backend)
    if device.type != "meta":
        if base_weights is not None:
            state, source = read_safetensors_dir(Path(base_weights) / "transformer"), f"{base_weights}/transformer"
        elif cfg.checkpoint:
            state, source = read_self_forcing(cfg.checkpoint, cfg.use_ema), cfg.checkpoint
        else:
            state, source = read_safetensors_dir(transformer_dir(cfg.path)), f"{cfg.path}/transformer"
        load_strict(transformer, state, source, assign=True)
        cast_like_diffusers(transformer, dtype).to(device)
    if cfg.lora is not None:
        _add_lora(transformer, cfg)
    if for_training and cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    if cfg.attention_backend is not None:
        check_attention_backend(cfg.attention_backend, runnable=device.type != "meta")
    codec = latent_codec(cfg, device)
    shape = policy_shape(cfg, dict(transformer.config), codec)
    policy = WanPolicy(transformer, cfg, shape, codec, PromptStates(cfg.path, cfg.text_len, cfg.dtype, prompt_table))
    policy.base_weights = base_weights
    if saved.get("format") == "lora" and device.type != "meta":
        from safetensors.torch import load_file

        policy.load_trainable_state(load_file(str(Path(weights) / ADAPTER_FILE)))
    return policy


def _read_policy_file(weights) -> dict:
    if weights is None:
        return {}
    path = Path(weights)
    if not path.is_dir():
        raise FileNotFoundError(f"policy weights directory not found: {path}")
    info = path / POLICY_FILE
    if not info.is_file():
        raise ValueError(f"{path} holds no {POLICY_FILE}: not a directory written by videorl (pretraining or a run's "
                         "final/); for downloaded weights set model.path")
    try:
        return json.loads(info.read_text())
    except ValueError as e:
        raise ValueError(f"corrupt {info}: {e}") from e


def _add_lora(transformer, cfg: WanConfig) -> None:
    """A fresh adapter (B = 0), its random A drawn from a fixed seed: every process that loads this config (learner
    ranks, rollout actors, a resumed run) starts from the same one."""
    _check_lora_targets(transformer, cfg)
    with torch.random.fork_rng():  # CPU and CUDA generators restored after
        torch.manual_seed(0)
        transformer.add_adapter(lora_config(cfg.lora), adapter_name="default")
    transformer.set_adapter("default")


def _check_lora_targets(transformer, cfg: WanConfig) -> None:
    names = [n for n, _ in transformer.named_modules()]
    for target in cfg.lora.target_modules:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"model.lora.target_modules: {target!r} matches no module of the transformer (Wan: "
                             "attention to_q, to_k, to_v, to_out.0; feed-forward ffn.net.0.proj, ffn.net.2)")


def check_attention_backend(name: str, runnable: bool = True) -> None:
    """A backend diffusers knows; with `runnable`, one that runs in this process (flash-attn installed, a GPU, ...).
    Checked in the driver before a run (it runs the model too) and where each actor loads it."""
    from diffusers.models import attention_dispatch as dispatch

    names = [b.value for b in dispatch.AttentionBackendName]
    if name not in names:
        raise ValueError(f"model.attention_backend={name!r}; diffusers knows {names}")
    check = getattr(dispatch, "_check_attention_backend_requirements", None)  # diffusers' own requirement check
    try:
        if runnable and check is not None:
            check(dispatch.AttentionBackendName(name))
    except RuntimeError as e:
        raise ValueError(f"model.attention_backend={name!r} cannot run here: {e}") from None


def check_wan_config(cfg: WanConfig) -> None:
    """The cheap checks of load_wan_policy (files, shapes, LoRA targets, attention backend) on the meta device.
    A missing model.path with model.init set is written first (policy.wan.init)."""
    if cfg.init is not None and not Path(cfg.path).exists():
        from policy.wan.init import write_random_model

        write_random_model(cfg.path, preset=cfg.init.preset, seed=cfg.init.seed, kind=cfg.kind)
    transformer_config(cfg.path)
    for sub in ("tokenizer", "text_encoder"):
        if not (Path(cfg.path) / sub).is_dir():
            raise ValueError(f"model directory {cfg.path} has no {sub}/: Wan prompts need the tokenizer and text encoder")
    if cfg.checkpoint and not Path(cfg.checkpoint).is_file():
        raise FileNotFoundError(f"Self-Forcing checkpoint not found: {cfg.checkpoint}")
    load_wan_policy(cfg, None, device=torch.device("meta"))

