"""VideoDiT: a small text-to-video diffusion transformer predicting flow-matching velocities.

Tokens are patch x patch x C pixel patches of each frame with a learned spatial position embedding;
time enters through a rotary embedding of the ABSOLUTE frame index on queries and keys (so cached
keys carry their position and streaming can run past the training length). Each block is adaLN-Zero
(DiT, Peebles & Xie 2023) conditioned per frame on prompt embedding + embedding of that frame's sigma.
The prompt embedding is a mean of word embeddings through an MLP (a bag of words: held-out
colour/shape/motion combinations are sums of seen parts).

One set of weights, three attention patterns:
- `velocity`: bidirectional over the whole clip.
- `velocity_causal`: teacher-forced chunk-causal pass over [clean; noisy] frames; the mask follows
  `attended_frames` (MATH.md §7), the same rule the rolling cache uses.
- `velocity_chunk` / `append_to_cache`: streaming generation with a `RollingKVCache`.

Model tensors are `[B, T, C, H, W]` in [-1, 1] (float32 unless `dtype` says otherwise); sigma is the flow-matching time in [0, 1]
(x_t = (1 - t) x0 + t eps, v = eps - x0).
"""

from __future__ import annotations

import copy
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from policy.backend import PolicyShape, check_chunk, frame_sigma, portable
from policy.kv_cache import RollingKVCache, attended_frames
from policy.text import WordTokenizer


class ModelConfig(BaseModel):
    """Architecture of a VideoDiT. Defaults fit CPU pretraining of the embedded 8 x 16 x 16 world."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["videodit"] = "videodit"
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="weights and activations; SDE steps and log-probs are float32 or wider regardless")
    frames: int = Field(8, ge=1, description="training clip length; also the longest bidirectional clip")
    size: int = Field(16, ge=1, description="frame height = width in pixels")
    channels: int = Field(3, ge=1)
    patch: int = Field(4, ge=1, description="pixels per patch side")
    # dim 64 / heads 2 / mlp 2: a batch-32 bidirectional train step costs ~115 ms on one CPU core
    dim: int = Field(64, ge=8)
    depth: int = Field(4, ge=1)
    heads: int = Field(2, ge=1)
    mlp_ratio: float = Field(2.0, gt=0)
    chunk: int = Field(2, ge=1, description="frames per autoregressive chunk")
    window: int | None = Field(None, ge=1, description="frames one chunk attends to, itself included; None = frames")
    sink: int = Field(0, ge=0, description="first frames kept in the cache forever")
    vocab: list[str] = Field(min_length=1)
    max_words: int = Field(8, ge=1)
    rope_base: float = Field(10000.0, gt=1)
    text_attention: bool = Field(True, description="prompt words are extra keys/values in every attention layer")
    qk_norm: bool = Field(False, description="RMS-normalise queries and keys per head")
    spatial_rope: bool = Field(True, description="3D rotary: half of each head rotates by frame, a quarter each by patch row/column")
    sincos_pos: bool = Field(True, description="initialise the spatial position embedding with 2D sin-cos")

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.window is None:
            self.window = self.frames
        if self.size % self.patch:
            raise ValueError(f"size ({self.size}) must be divisible by patch ({self.patch})")
        if self.frames % self.chunk:
            raise ValueError(f"frames ({self.frames}) must be divisible by chunk ({self.chunk})")
        if self.window < self.chunk + self.sink:
            raise ValueError(f"window ({self.window}) must be >= chunk + sink ({self.chunk} + {self.sink})")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim ({self.dim}) must split into {self.heads} heads of even size (rotary pairs)")
        if len(set(self.vocab)) != len(self.vocab):
            raise ValueError("vocab has duplicate words")
        return self

    @property
    def tokens_per_frame(self) -> int:
        return (self.size // self.patch) ** 2


# --- small pure pieces -------------------------------------------------------------------------------


def timestep_embedding(sigma: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of sigma*1000 (DDPM/DiT convention). sigma [...] -> [..., dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=sigma.device) / half)
    args = sigma.float()[..., None] * 1000.0 * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rotary_angles(positions: Tensor, pairs: int, base: float) -> Tensor:
    """RoFormer (Su et al. 2021) angles of integer positions [L] for `pairs` rotation pairs -> [L, pairs]."""
    inv = base ** (-torch.arange(pairs, dtype=torch.float32, device=positions.device) / pairs)
    return positions.float()[:, None] * inv[None]


def rotary_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """Angles for integer positions [L] -> cos, sin [L, head_dim] (rotate-half layout)."""
    ang = rotary_angles(positions, head_dim // 2, base)
    ang = torch.cat([ang, ang], dim=-1)
    return ang.cos(), ang.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (i, i + d/2) of x [B, heads, L, d] by the angles of each position (rotate-half form)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_frame_mask(num_frames: int, chunk: int, window: int, sink: int) -> Tensor:
    """Frame-level boolean mask [T - chunk + T, T - chunk + T] (True = may attend) for the sequence
    [clean frames 0..T-chunk-1; noisy frames 0..T-1] (the last clean chunk is nobody's history, so it is left out).

    Clean chunk j sees the clean frames attended_frames(...)[j] (its own included); noisy chunk j sees
    the same clean frames minus its own, plus its own noisy frames. Exactly what streaming with the
    rolling cache computes (MATH.md §7).
    """
    t, n_clean = num_frames, num_frames - chunk
    mask = torch.zeros(n_clean + t, n_clean + t, dtype=torch.bool)
    for j, seen in enumerate(attended_frames(t, chunk, window, sink)):
        own = list(range(j * chunk, (j + 1) * chunk))
        history = [f for f in seen if f not in own]
        for q in own:
            if q < n_clean:
                mask[q, seen] = True  # clean query
            mask[n_clean + q, history] = True  # noisy query -> clean history
            mask[n_clean + q, [n_clean + f for f in own]] = True  # noisy query -> own noisy chunk
    return mask


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos position code (MAE, He et al. 2022) of a grid x grid patch layout -> [grid*grid, dim]:
    the first half of the channels encodes the row, the second half the column."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    pos = torch.arange(grid, dtype=torch.float32)[:, None] * freqs  # [grid, dim/4]
    code = torch.cat([pos.sin(), pos.cos()], dim=1)  # [grid, dim/2]
    rows, cols = code[:, None].expand(grid, grid, -1), code[None, :].expand(grid, grid, -1)
    out = torch.cat([rows, cols], dim=-1).reshape(grid * grid, -1)
    return F.pad(out, (0, dim - out.shape[1]))


def videos_to_model(videos: np.ndarray) -> Tensor:
    """World videos numpy [N, T, H, W, C] in [0, 1] (float; uint8 0..255 also accepted)
    -> torch float32 [N, T, C, H, W] in [-1, 1]."""
    if not isinstance(videos, np.ndarray) or videos.ndim != 5:
        raise ValueError(f"videos must be a numpy array [N, T, H, W, C], got {getattr(videos, 'shape', type(videos))}")
    x = torch.from_numpy(np.ascontiguousarray(videos))
    x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"videos must lie in [0, 1], got range [{x.min().item():.3f}, {x.max().item():.3f}]")
    return (2.0 * x - 1.0).permute(0, 1, 4, 2, 3).contiguous()


def to_uint8(videos: np.ndarray) -> np.ndarray:
    """Videos in [0, 1] (any float dtype) -> uint8 0..255 (clipped, rounded; as rewards.world.to_uint8)."""
    return np.round(np.clip(np.asarray(videos, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def model_to_videos(x: Tensor) -> np.ndarray:
    """Model tensor [N, T, C, H, W] in [-1, 1] -> numpy float32 [N, T, H, W, C] in [0, 1] (clamped)."""
    if x.dim() != 5:
        raise ValueError(f"expected a model tensor [N, T, C, H, W], got shape {list(x.shape)}")
    return ((x.detach().float().clamp(-1, 1) + 1.0) / 2.0).permute(0, 1, 3, 4, 2).cpu().numpy()


# --- the network ---------------------------------------------------------------------------------------


class Block(nn.Module):
    """adaLN-Zero transformer block; modulation (shift, scale, gate) x (attn, mlp) is per frame."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, text_attention: bool = False, qk_norm: bool = False):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.text_kv = nn.Linear(dim, 2 * dim) if text_attention else None
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, dim))
        self.ada = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.ada.weight)
        nn.init.zeros_(self.ada.bias)

    def forward(self, x, cond, cos, sin, mask=None, cached=None, detach_from=None, words=None):
        """x [B, N, D] tokens of F frames (N = F*n); cond [B, F, D]; cos/sin [N, d_head].

        mask: optional bool [N, keys]. cached: optional (k, v) [P, G, heads, M, d_head] the tokens also
        attend to (placed before the new keys). detach_from: tokens before this index are history whose
        keys/values get no gradient. words: (embeddings [B, L, D], real-word mask [B, 1, 1, L]) read by a
        cross-attention with the same queries (its own softmax over the words; needs text_attention).
        Returns (x, (k, v)) with this block's new keys (after rotary) and values [B, heads, N, d_head].
        """
        b, n, d = x.shape
        f = cond.shape[1]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond)).unsqueeze(2).chunk(6, dim=-1)
        h = modulate(self.norm1(x), shift1, scale1, f)
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(self.q_norm(q), cos, sin), apply_rotary(self.k_norm(k), cos, sin)
        new_kv = (k, v)
        if detach_from is not None:  # keys/values of the history frames carry no gradient
            k = torch.cat([k[:, :, :detach_from].detach(), k[:, :, detach_from:]], dim=2)
            v = torch.cat([v[:, :, :detach_from].detach(), v[:, :, detach_from:]], dim=2)
        if cached is not None:
            ck, cv = cached
            p, g = ck.shape[:2]
            k = torch.cat([ck, k.reshape(p, g, *k.shape[1:])], dim=3).flatten(0, 1)
            v = torch.cat([cv, v.reshape(p, g, *v.shape[1:])], dim=3).flatten(0, 1)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if self.text_kv is not None:  # every token reads the prompt words (no position: a bag of words)
            emb, real = words
            tk, tv = self.text_kv(emb).view(b, -1, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = a + F.scaled_dot_product_attention(q, self.k_norm(tk), tv, attn_mask=real)
        x = x + gate(self.proj(a.transpose(1, 2).reshape(b, n, d)), gate1, f)
        x = x + gate(self.mlp(modulate(self.norm2(x), shift2, scale2, f)), gate2, f)
        return x, new_kv


def modulate(x: Tensor, shift: Tensor, scale: Tensor, frames: int) -> Tensor:
    """x [B, F*n, D] with per-frame shift/scale [B, F, 1, D]: x * (1 + scale) + shift."""
    b, n, d = x.shape
    return torch.addcmul(shift, x.view(b, frames, n // frames, d), 1 + scale).view(b, n, d)


def gate(x: Tensor, g: Tensor, frames: int) -> Tensor:
    b, n, d = x.shape
    return (x.view(b, frames, n // frames, d) * g).view(b, n, d)


class VideoDiT(nn.Module):
    """Flow-matching velocity model v(x_t, sigma, prompt) for videos [B, T, C, H, W] in [-1, 1]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        d, p, c = cfg.dim, cfg.patch, cfg.channels
        self.patch_embed = nn.Linear(p * p * c, d)
        g = cfg.size // p
        self.pos_embed = nn.Parameter(sincos_2d(g, d) if cfg.sincos_pos else torch.randn(g * g, d) * 0.02)
        self.word_embed = nn.Embedding(len(cfg.vocab) + 1, d, padding_idx=0)
        self.text_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.time_mlp = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.mlp_ratio, cfg.text_attention, cfg.qk_norm) for _ in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Linear(d, 2 * d)
        self.out = nn.Linear(d, p * p * c)
        for zero in (self.ada_out, self.out):  # adaLN-Zero: the model starts as v = 0
            nn.init.zeros_(zero.weight)
            nn.init.zeros_(zero.bias)
        self._masks: dict[tuple[int, torch.device], Tensor] = {}

    # -- shapes and conditioning --

    def _check_video(self, x: Tensor, name: str) -> None:
        cfg = self.cfg
        if x.dim() != 5 or tuple(x.shape[2:]) != (cfg.channels, cfg.size, cfg.size):
            raise ValueError(
                f"{name} must be [B, T, {cfg.channels}, {cfg.size}, {cfg.size}], got shape {list(x.shape)}"
            )

    def _frame_sigma(self, sigma: Tensor, b: int, t: int) -> Tensor:
        return frame_sigma(sigma, b, t, self.device)

    def prompt_embedding(self, prompt_ids: Tensor) -> Tensor:
        """prompt_ids LongTensor [B, L] (0 = pad) -> [B, D]: mean of word embeddings through an MLP."""
        if prompt_ids.dim() != 2 or prompt_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompt_ids must be integer [B, L], got {prompt_ids.dtype} {list(prompt_ids.shape)}")
        if prompt_ids.shape[1] > self.cfg.max_words:
            raise ValueError(f"prompt_ids has {prompt_ids.shape[1]} words, more than max_words={self.cfg.max_words}")
        if prompt_ids.numel() and (prompt_ids.min() < 0 or prompt_ids.max() > len(self.cfg.vocab)):
            raise ValueError(f"prompt_ids must lie in [0, {len(self.cfg.vocab)}]")
        present = (prompt_ids != 0).float().unsqueeze(-1)
        pooled = ((self.word_embed(prompt_ids.long()) * present).sum(1) / present.sum(1).clamp_min(1.0)).to(self.dtype)
        return self.text_mlp(pooled)

    def _words(self, prompt_ids: Tensor) -> tuple[Tensor, Tensor] | None:
        """(word embeddings [B, L, D], bool [B, 1, 1, L] True for real words) for text attention, else None."""
        if not self.cfg.text_attention:
            return None
        return self.word_embed(prompt_ids.long()), (prompt_ids != 0)[:, None, None, :]

    def _cond(self, prompt_ids: Tensor, sigma_bt: Tensor) -> Tensor:
        """Per-frame conditioning [B, T, D] = prompt embedding + timestep embedding."""
        if prompt_ids.shape[0] != sigma_bt.shape[0]:
            raise ValueError(f"prompt_ids has batch {prompt_ids.shape[0]}, the video has {sigma_bt.shape[0]}")
        text = self.prompt_embedding(prompt_ids)
        time = self.time_mlp(timestep_embedding(sigma_bt, self.cfg.dim).to(self.dtype))
        return text[:, None] + time

    def _embed(self, x: Tensor) -> Tensor:
        """[B, T, C, H, W] -> tokens [B, T*n, D] (frame-major, row-major patches)."""
        b, t, c, h, w = x.shape
        p = self.cfg.patch
        patches = x.to(self.dtype).reshape(b, t, c, h // p, p, w // p, p).permute(0, 1, 3, 5, 4, 6, 2).reshape(b, t, -1, p * p * c)
        return (self.patch_embed(patches) + self.pos_embed).reshape(b, -1, self.cfg.dim)

    def _unembed(self, tok: Tensor, cond: Tensor) -> Tensor:
        """tokens [B, T*n, D] -> velocity [B, T, C, H, W]."""
        cfg = self.cfg
        b, t = cond.shape[:2]
        shift, scale = self.ada_out(F.silu(cond)).unsqueeze(2).chunk(2, dim=-1)
        out = self.out(modulate(self.norm_out(tok), shift, scale, t))
        p, g = cfg.patch, cfg.size // cfg.patch
        out = out.reshape(b, t, g, g, p, p, cfg.channels).permute(0, 1, 6, 2, 4, 3, 5)
        return out.reshape(b, t, cfg.channels, cfg.size, cfg.size)

    def _rotary(self, frame_positions: Tensor) -> tuple[Tensor, Tensor]:
        """Absolute frame index per frame [F] -> cos, sin per token [F*n, d_head]."""
        cfg = self.cfg
        pos = frame_positions.repeat_interleave(cfg.tokens_per_frame)
        head_dim = cfg.dim // cfg.heads
        if not cfg.spatial_rope:
            return tuple(t.to(self.dtype) for t in rotary_cos_sin(pos, head_dim, cfg.rope_base))
        # 3D rotary (as in video DiTs): pairs split time : row : column = 2 : 1 : 1
        g = cfg.size // cfg.patch
        cell = torch.arange(cfg.tokens_per_frame, device=pos.device).repeat(len(frame_positions))
        pairs = head_dim // 2
        space = pairs // 4
        ang = torch.cat([
            rotary_angles(pos, pairs - 2 * space, cfg.rope_base),
            rotary_angles(cell // g, space, 100.0),
            rotary_angles(cell % g, space, 100.0),
        ], dim=-1)
        ang = torch.cat([ang, ang], dim=-1)
        return ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    # -- the three attention patterns --

    def velocity(self, x: Tensor, sigma: Tensor, prompt_ids: Tensor) -> Tensor:
        """Bidirectional pass. x [B, T, C, H, W] with 1 <= T <= cfg.frames; sigma [B] or [B, T]. -> v, x's shape."""
        self._check_video(x, "x")
        b, t = x.shape[:2]
        if not 1 <= t <= self.cfg.frames:
            raise ValueError(f"bidirectional clips have 1..{self.cfg.frames} frames (use causal mode beyond), got {t}")
        cond = self._cond(prompt_ids, self._frame_sigma(sigma, b, t))
        cos, sin = self._rotary(torch.arange(t, device=x.device))
        tok = self._embed(x)
        words = self._words(prompt_ids)
        for blk in self.blocks:
            tok, _ = blk(tok, cond, cos, sin, words=words)
        return self._unembed(tok, cond)

    def causal_mask(self, num_frames: int) -> Tensor:
        """Token-level boolean mask over [clean frames 0..T-chunk-1; noisy frames 0..T-1] (cached per T, device)."""
        device = self.device
        if (num_frames, device) not in self._masks:
            cfg = self.cfg
            frame_mask = causal_frame_mask(num_frames, cfg.chunk, cfg.window, cfg.sink)
            n = cfg.tokens_per_frame
            mask = frame_mask.repeat_interleave(n, 0).repeat_interleave(n, 1)
            self._masks[(num_frames, device)] = mask.to(device)
        return self._masks[(num_frames, device)]

    def velocity_causal(
        self, x_noisy: Tensor, sigma: Tensor, x_clean: Tensor, prompt_ids: Tensor, detach_history: bool = False
    ) -> Tensor:
        """Teacher-forced chunk-causal pass (training, and recomputing log-probs of cached rollouts).

        x_noisy, x_clean [B, T, C, H, W], T a multiple of cfg.chunk (any length: positions are absolute);
        sigma [B, T] or [B] for the noisy frames (constant within a chunk); the clean frames run at sigma 0.
        Noisy chunk j attends to its own noisy frames and to the clean frames the rolling cache would hold
        (attended_frames); clean frames attend by the same rule. detach_history: no gradient through the
        clean frames' keys/values (streaming long tuning). Returns v for the noisy frames, x_noisy's shape.
        """
        self._check_video(x_noisy, "x_noisy")
        if x_clean.shape != x_noisy.shape:
            raise ValueError(f"x_clean must match x_noisy: expected {list(x_noisy.shape)}, got {list(x_clean.shape)}")
        b, t = x_noisy.shape[:2]
        if t % self.cfg.chunk:
            raise ValueError(f"number of frames ({t}) must be a multiple of chunk ({self.cfg.chunk})")
        sig = self._frame_sigma(sigma, b, t)
        c = self.cfg.chunk
        # [clean frames 0..T-c-1 at sigma 0; noisy frames 0..T-1]: the last clean chunk is never attended
        cond = self._cond(prompt_ids, torch.cat([torch.zeros_like(sig[:, c:]), sig], dim=1))
        frames = torch.arange(t, device=x_noisy.device)
        cos, sin = self._rotary(torch.cat([frames[: t - c], frames]))
        tok = self._embed(torch.cat([x_clean[:, : t - c], x_noisy], dim=1))
        words, mask = self._words(prompt_ids), self.causal_mask(t)
        n_clean = (t - c) * self.cfg.tokens_per_frame
        for blk in self.blocks:
            tok, _ = blk(tok, cond, cos, sin, mask=mask, detach_from=n_clean if detach_history else None, words=words)
        return self._unembed(tok[:, n_clean:], cond[:, t - c :])

    def new_cache(self) -> RollingKVCache:
        """An empty rolling cache with this model's depth, chunk, window and sink."""
        return RollingKVCache(self.cfg.depth, self.cfg.chunk, self.cfg.window, self.cfg.sink)

    def _chunk_pass(self, x, sigma, prompt_ids, cache, start_frame, write):
        self._check_video(x, "x_chunk")
        check_chunk(self.shape, self.cfg.depth, x, cache, start_frame)
        b, c = x.shape[:2]
        cond = self._cond(prompt_ids, self._frame_sigma(sigma, b, c))
        cos, sin = self._rotary(torch.arange(start_frame, start_frame + c, device=x.device))
        tok = self._embed(x)
        words = self._words(prompt_ids)
        new_k, new_v = [], []
        for layer, blk in enumerate(self.blocks):
            tok, (k, v) = blk(tok, cond, cos, sin, cached=cache.read(layer), words=words)
            new_k.append(k)
            new_v.append(v)
        if write:
            cache.append(list(range(start_frame, start_frame + c)), new_k, new_v)
            return None
        return self._unembed(tok, cond)

    def velocity_chunk(
        self, x_chunk: Tensor, sigma: Tensor, prompt_ids: Tensor, cache: RollingKVCache, start_frame: int
    ) -> Tensor:
        """Streaming pass for one noisy chunk [B, chunk, C, H, W] at frames start_frame.. (sigma [B] or [B, chunk]).

        Attends to the cached frames and to itself; reads the cache, never writes it. -> v, x_chunk's shape.
        """
        return self._chunk_pass(x_chunk, sigma, prompt_ids, cache, start_frame, write=False)

    def append_to_cache(
        self, x_clean_chunk: Tensor, prompt_ids: Tensor, cache: RollingKVCache, start_frame: int
    ) -> None:
        """Run a finished (clean) chunk at sigma 0 against the cache and append its keys/values (then evict)."""
        zeros = torch.zeros(x_clean_chunk.shape[0], device=x_clean_chunk.device)
        self._chunk_pass(x_clean_chunk, zeros, prompt_ids, cache, start_frame, write=True)

    # -- the policy interface (policy.backend.Policy) --

    @property
    def shape(self) -> PolicyShape:
        c = self.cfg
        return PolicyShape(frames=c.frames, channels=c.channels, height=c.size, width=c.size, chunk=c.chunk,
                           window=c.window, sink=c.sink, tokens_per_frame=c.tokens_per_frame, video_frames=c.frames,
                           video_height=c.size, video_width=c.size)

    @property
    def device(self) -> torch.device:
        return self.pos_embed.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pos_embed.dtype

    def encode_prompts(self, prompts) -> Tensor:
        """Prompts -> word ids LongTensor [P, max_words] (0 = pad) on the model's device."""
        return WordTokenizer(self.cfg.vocab, self.cfg.max_words).encode(list(prompts)).to(self.device)

    def decode(self, latents: Tensor) -> np.ndarray:
        """Pixel space: [N, T, C, H, W] in [-1, 1] -> uint8 [N, T, H, W, C]."""
        return to_uint8(model_to_videos(latents))

    def trainable_state(self) -> dict[str, Tensor]:
        """Every weight (VideoDiT has no adapters), detached CPU copies ready for the object store."""
        return {k: portable(v) for k, v in self.state_dict().items()}

    def load_trainable_state(self, state) -> None:
        # np.array copies: arrays from the object store are read-only
        self.load_state_dict({k: v if isinstance(v, Tensor) else torch.from_numpy(np.array(v)) for k, v in state.items()})

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.parameters())

    def frozen_copy(self, role: str) -> VideoDiT:
        """A no-grad copy of the current weights (reference, moving anchor or NFT old policy)."""
        return copy.deepcopy(self).requires_grad_(False).eval()

    def fsdp_units(self) -> tuple[nn.Module, list[nn.Module], tuple[str, ...]]:
        return self, list(self.blocks), ("velocity", "velocity_causal", "velocity_chunk", "append_to_cache")

    # -- checkpoints --

    def save(self, path: str | os.PathLike) -> Path:
        """Write weights to `path` (a .safetensors file, or a directory that gets model.safetensors) and the config
        beside them (.json), atomically. Returns the directory."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        _atomic_write(path.with_suffix(".json"), lambda tmp: tmp.write_text(self.cfg.model_dump_json(indent=2)))
        return path.parent

    @classmethod
    def load(cls, path: str | os.PathLike, cfg: ModelConfig | None = None) -> VideoDiT:
        """Build a model from `path` (safetensors) and its .json config (or the given cfg) and load the weights.

        FileNotFoundError names a missing file; ValueError names a corrupt file or the first tensor whose
        shape differs from the model's (or that is missing / unexpected).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model weights not found: {path}")
        if cfg is None:
            cfg_path = path.with_suffix(".json")
            if not cfg_path.is_file():
                raise FileNotFoundError(f"model config not found: {cfg_path}")
            try:
                cfg = ModelConfig.model_validate(json.loads(cfg_path.read_text()))
            except ValueError as e:  # bad JSON, bad encoding, or a config that fails validation
                raise ValueError(f"corrupt model config {cfg_path}: {e}") from e
        model = cls(cfg)
        model.load_weights(path)
        return model

    def load_weights(self, path: str | os.PathLike) -> None:
        """Load safetensors weights into this model, strictly (see `load` for the errors)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"model weights not found: {path}")
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt weights file {path}: {e}") from e
        own = self.state_dict()
        for name, t in own.items():
            if name not in tensors:
                raise ValueError(f"checkpoint {path} lacks tensor {name!r}")
            if tensors[name].shape != t.shape:
                raise ValueError(
                    f"checkpoint {path}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                    f"the model expects {list(t.shape)}"
                )
        extra = sorted(set(tensors) - set(own))
        if extra:
            raise ValueError(f"checkpoint {path} has unexpected tensors {extra}")
        self.load_state_dict(tensors)


def _atomic_write(path: Path, write) -> None:
    """Write via a temp file in the same folder and rename, so a crash never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
