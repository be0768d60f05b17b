"""Pictures of videos: GIF grids for eval and the run report."""

from __future__ import annotations

from pathlib import Path

import imageio.v3 as iio
import numpy as np


def video_grid(videos: np.ndarray, ncols: int = 8, scale: int = 4, gap: int = 1) -> np.ndarray:
    """Tile clips into one clip. videos uint8 [N, T, H, W, 3] -> uint8 [T, rows*(H*s+gap), cols*(W*s+gap), 3]."""
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"expected videos [N, T, H, W, 3], got shape {tuple(videos.shape)}")
    n, t, h, w, _ = videos.shape
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    big = videos.repeat(scale, axis=2).repeat(scale, axis=3)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    grid = np.full((t, nrows * cell_h + gap, ncols * cell_w + gap, 3), 40, np.uint8)
    for i in range(n):
        r, c = divmod(i, ncols)
        grid[:, gap + r * cell_h : gap + r * cell_h + h * scale, gap + c * cell_w : gap + c * cell_w + w * scale] = big[i]
    return grid


def save_gif(videos: np.ndarray, path: str | Path, ncols: int = 8, fps: int = 4) -> Path:
    """Write a looping GIF grid of uint8 clips [N, T, H, W, 3]."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, video_grid(videos, ncols), duration=1000 / fps, loop=0)
    return path
