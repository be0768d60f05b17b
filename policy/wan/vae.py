"""From latents to the uint8 clips reward models score, and back: the Wan VAE, or pixel space.

Wan's AutoencoderKLWan compresses 4x in time (the first frame alone: F = 4(T - 1) + 1) and 8x in space, to 16
channels. The transformer works on normalised latents, as WanPipeline does: z_model = (z - mean) / std per channel
(`latents_mean` / `latents_std` of the VAE config); decoding undoes it. The VAE runs in float32 (diffusers'
recommendation for Wan) on the rollout actor's device, so reward pools still receive uint8 frames.

Pixel space (a model directory without vae/, e.g. `videorl model init --preset shapes`): the model's frames are RGB in
[-1, 1], `[N, T, 3, H, W]`, decoded 1:1.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_uint8_frames(x: Tensor) -> np.ndarray:
    """[N, T, 3, H, W] in [-1, 1] -> uint8 [N, T, H, W, 3] (clamped, rounded)."""
    x = ((x.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def from_uint8_frames(videos: np.ndarray, device: str | torch.device = "cpu") -> Tensor:
    """uint8 [N, T, H, W, 3] -> float32 [N, T, 3, H, W] in [-1, 1]."""
    if not isinstance(videos, np.ndarray) or videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3], got {getattr(videos, 'dtype', type(videos))} "
                         f"{list(getattr(videos, 'shape', []))}")
    return torch.from_numpy(videos).to(device).permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0


class PixelSpace:
    """The identity 'VAE' of pixel-space models."""

    channels, temporal_scale, spatial_scale = 3, 1, 1

    def decode(self, latents: Tensor) -> np.ndarray:
        return to_uint8_frames(latents)

    def encode(self, videos: np.ndarray) -> Tensor:
        return from_uint8_frames(videos)


class WanVAE:
    """AutoencoderKLWan with the pipeline's latent normalisation; `[N, T, C, h, w]` latents <-> uint8 clips."""

    def __init__(self, vae):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.channels = cfg.z_dim
        self.temporal_scale = getattr(cfg, "scale_factor_temporal", 4)
        self.spatial_scale = getattr(cfg, "scale_factor_spatial", 8)
        self.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    @classmethod
    def from_model_dir(cls, path: str | Path, device: str | torch.device = "cpu") -> WanVAE:
        from diffusers import AutoencoderKLWan

        from policy.wan.loading import quiet

        with quiet():
            return cls(AutoencoderKLWan.from_pretrained(Path(path) / "vae", torch_dtype=torch.float32).to(device))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @torch.no_grad()
    def decode(self, latents: Tensor, batch_size: int = 4) -> np.ndarray:
        """Normalised latents [N, T, C, h, w] -> uint8 [N, 4(T-1)+1, 8h, 8w, 3]."""
        out = []
        mean, std = self.mean.to(self.device), self.std.to(self.device)
        for z in latents.split(batch_size):
            z = z.to(self.device, torch.float32).permute(0, 2, 1, 3, 4) * std + mean  # [n, C, T, h, w]
            video = self.vae.decode(z).sample  # [n, 3, F, H, W] in [-1, 1]
            out.append(to_uint8_frames(video.permute(0, 2, 1, 3, 4)))
        return np.concatenate(out)

    @torch.no_grad()
    def encode(self, videos: np.ndarray, batch_size: int = 4) -> Tensor:
        """uint8 [N, F, H, W, 3] (F = 4k + 1) -> normalised latents [N, T, C, h, w] (the posterior mean)."""
        if (videos.shape[1] - 1) % self.temporal_scale:
            raise ValueError(f"the Wan VAE takes 4k + 1 frames, got {videos.shape[1]}")
        out = []
        mean, std = self.mean.to(self.device), self.std.to(self.device)
        for v in np.array_split(videos, max(1, -(-len(videos) // batch_size))):
            x = from_uint8_frames(v, self.device).permute(0, 2, 1, 3, 4)  # [n, 3, F, H, W]
            z = self.vae.encode(x).latent_dist.mean
            out.append(((z - mean) / std).permute(0, 2, 1, 3, 4))
        return torch.cat(out)
