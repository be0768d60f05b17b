"""Build the base (SFT) model once per config and cache it."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from orchestrator.config import Config, base_checkpoint_dir
from policy.model import VideoDiT
from policy.pretrain import pretrain
from policy.text import WordTokenizer
from rewards.world import sft_dataset, to_uint8

CHECKPOINT = "model.safetensors"


def train_base_model(cfg: Config, out_dir: Path, progress: bool = True) -> Path:
    """Pretrain on flawed SFT renders and write `out_dir/model.safetensors` (+ its config) atomically."""
    torch.manual_seed(cfg.pretrain.seed)
    m = cfg.model
    videos, prompts = sft_dataset(cfg.data.sft_clips, seed=cfg.data.seed, frames=m.frames, size=m.size, flaws=cfg.data.flaws)
    clips = torch.from_numpy(to_uint8(videos)).permute(0, 1, 4, 2, 3).contiguous()  # [N, T, C, H, W] uint8
    ids = WordTokenizer(m.vocab).encode([p.text for p in prompts])
    model = VideoDiT(m)
    p = cfg.pretrain
    bar = tqdm(total=p.steps, desc="pretrain", unit="step", disable=not progress, mininterval=1.0)
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")

    start = time.perf_counter()
    ema_model = pretrain(
        model, clips, ids, steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup=p.warmup,
        ema=p.ema, causal_fraction=p.causal_fraction, t_mean=p.t_mean, t_std=p.t_std, seed=p.seed, on_step=on_step,
    )
    bar.close()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ema_model.save(tmp / CHECKPOINT)
    (tmp / "pretrain.json").write_text(json.dumps({
        "config": cfg.model_dump(mode="json", include={"model", "data", "pretrain"}),
        "seconds": round(time.perf_counter() - start, 1),
        "final_loss": float(np.mean(losses[-100:])),
    }, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # readers never see a half-written checkpoint
    return out_dir / CHECKPOINT


def ensure_base_model(cfg: Config, force: bool = False, progress: bool = True) -> Path:
    """Path of the cached base checkpoint for `cfg`, pretraining it first when missing."""
    out_dir = base_checkpoint_dir(cfg)
    if force or not (out_dir / CHECKPOINT).is_file():
        return train_base_model(cfg, out_dir, progress)
    return out_dir / CHECKPOINT
