"""Build the base (SFT) model once per config and cache it.

The base is what every later stage loads with `policy.backend.load_policy(cfg.model, base)`: a directory written
by the policy's `save` (VideoDiT: model.safetensors; Wan: a diffusers transformer/), or None when the config has
no pretraining (`pretrain: null`, Wan only): then the base is the model as `model.path` (+ `model.checkpoint`) holds it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from orchestrator.config import Config, base_checkpoint_dir, base_key
from orchestrator.hashing import building
from policy.backend import Policy, encode_prompt_table, init_policy, load_policy, without_adapters
from policy.pretrain import pretrain
from rewards.world import sft_dataset, to_uint8

DONE = "pretrain.json"  # written last: a base directory without it is incomplete


def train_base_model(cfg: Config, out_dir: Path, progress: bool = True) -> Path:
    """Pretrain every weight (no adapters) on flawed SFT renders of the world and save the EMA policy into
    `out_dir` atomically."""
    torch.manual_seed(cfg.pretrain.seed)
    policy = init_policy(without_adapters(cfg.model), device="cpu")
    shape = policy.shape
    if (shape.channels, shape.temporal_scale) != (3, 1) or shape.height != shape.width:
        raise ValueError("pretraining on the shapes world needs a pixel-space model on square RGB frames "
                         f"(latent {shape.channels}x{shape.height}x{shape.width}); give a base with pretrain: null")
    videos, prompts = sft_dataset(cfg.data.sft_clips, seed=cfg.data.seed, frames=shape.frames, size=shape.height,
                                  flaws=cfg.data.flaws)
    clips = torch.from_numpy(to_uint8(videos)).permute(0, 1, 4, 2, 3).contiguous()  # [N, T, C, H, W] uint8
    cond = policy.encode_prompts([p.text for p in prompts])
    p = cfg.pretrain
    bar = tqdm(total=p.steps, desc="pretrain", unit="step", disable=not progress)
    losses: list[float] = []

    def on_step(step: int, loss: float) -> None:
        losses.append(loss)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)  # shown by update
        bar.update(1)

    start = time.perf_counter()
    ema_policy = pretrain(
        policy, clips, cond, steps=p.steps, batch_size=p.batch_size, lr=p.lr, warmup=p.warmup,
        ema=p.ema, causal_fraction=p.causal_fraction, t_mean=p.t_mean, t_std=p.t_std, seed=p.seed, on_step=on_step,
    )
    bar.close()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    ema_policy.save(tmp)
    (tmp / DONE).write_text(json.dumps({
        "config": cfg.model_dump(mode="json", include={"model", "data", "pretrain"}),
        "seconds": round(time.perf_counter() - start, 1),
        "threads": torch.get_num_threads(),
        "final_loss": float(np.mean(losses[-100:])),
    }, indent=2))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)  # readers never see a half-written checkpoint
    return out_dir


def ensure_base_model(cfg: Config, force: bool = False, progress: bool = True) -> Path | None:
    """The cached base for `cfg` (pretrained first when missing), or None without pretraining (see the module doc)."""
    if cfg.pretrain is None:
        return None
    out_dir = base_checkpoint_dir(cfg)
    with building(out_dir):
        if force or not (out_dir / DONE).is_file():
            return train_base_model(cfg, out_dir, progress)
    return out_dir


@dataclass(frozen=True)
class Base:
    """The base (SFT) policy every stage starts from: its `model` config, where its weights are (see the module
    doc) and their content key (part of every cache key built from its samples)."""

    model: object
    path: Path | None
    key: str
    prompt_table: dict | None = None  # text-encoder states of the world's prompts (Wan), computed once

    def load(self, **kwargs) -> Policy:
        return load_policy(self.model, self.path, prompt_table=self.prompt_table, **kwargs)


def base_policy(cfg: Config, prompts: list[str] = (), progress: bool = True) -> Base:
    """The base for `cfg`, with the prompt table of `prompts` and of every world prompt."""
    from rewards.world import all_prompts

    path = ensure_base_model(cfg, progress=progress)
    table = encode_prompt_table(cfg.model, [*prompts, *(p.text for p in all_prompts())])
    return Base(cfg.model, path, base_key(cfg, path), table)
