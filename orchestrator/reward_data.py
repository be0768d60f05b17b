"""`videorl reward data`: base-model samples + true and degraded renders -> oracle-labelled preference pairs.

The format and the labelling rules live in `rewards.preference`; this module only runs the base model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from policy.backend import Policy
from policy.sampling import sample
from rewards.preference import (PreferenceDataConfig, damage_base, pair_table, render_references, score_pool,
                                summary, write_preference_data)
from rewards.world import all_prompts


@torch.no_grad()
def sample_base_pool(model: Policy, prompts: list[str], cfg: PreferenceDataConfig, mode: str = "causal",
                     steps: int = 8, batch_size: int = 256, progress: bool = True,
                     shift: float = 1.0) -> tuple[np.ndarray, dict]:
    """`cfg.samples_per_prompt` clips per prompt per sampler -> (uint8 [N, T, H, W, 3], pool columns
    prompt, source "base", sampler, eta, degradation "", strength 0). Sampler i draws its noise from a
    generator seeded by (cfg.seed, i), so a pool is reproducible and samplers see different noise."""
    texts = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    ids = model.encode_prompts(texts)
    batches = -(-len(texts) // batch_size)
    bar = tqdm(total=batches * len(cfg.samplers), desc="reward data: base samples", unit="batch", disable=not progress)
    videos, meta = [], {"prompt": [], "source": [], "sampler": [], "eta": [], "degradation": [], "strength": []}
    for i, spec in enumerate(cfg.samplers):
        seed = int(np.random.SeedSequence([cfg.seed, 3, i]).generate_state(1)[0])
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, len(texts), batch_size):
            traj = sample(model, ids[start:start + batch_size], steps=steps, shift=shift, sde_type=spec.sde_type, eta=spec.eta,
                          mode=mode, generator=gen)
            videos.append(model.decode(traj.videos))
            bar.update(1)
        for key, value in zip(meta, ("", "base", spec.sde_type, spec.eta, "", 0.0)):
            meta[key] += texts if key == "prompt" else [value] * len(texts)
    bar.close()
    return np.concatenate(videos), meta


def build_preference_dataset(cfg: PreferenceDataConfig, model: Policy, out_dir: Path, mode: str = "causal",
                             steps: int = 8, progress: bool = True, batch_size: int = 256, shift: float = 1.0) -> dict:
    """Sample every world prompt (train + held-out) with the base policy at each configured sampler, add
    damaged copies of those samples and true and degraded renders, score the pool with the oracle, pair and
    label it, and write `out_dir` (see `rewards.preference`). Returns `rewards.preference.summary(out_dir)`.
    """
    frames, size = model.shape.video_frames, model.shape.video_height
    prompts = [p.text for p in all_prompts()]
    base, base_meta = sample_base_pool(model, prompts, cfg, mode, steps, batch_size, progress, shift)
    with tqdm(total=3, desc="reward data: renders, oracle, pairs", disable=not progress) as bar:
        refs, ref_meta = render_references(prompts, cfg.degraded_per_prompt, np.random.default_rng([cfg.seed, 0]),
                                           frames, size, cfg.degradations, cfg.strength)
        bar.update(1)
        damaged, damaged_meta = damage_base(base, base_meta["prompt"], cfg.damaged_per_prompt,
                                            np.random.default_rng([cfg.seed, 4]), cfg.degradations, cfg.strength)
        videos = np.concatenate([base, damaged, refs])
        pool = score_pool(videos, {k: base_meta[k] + damaged_meta[k] + ref_meta[k] for k in base_meta})
        bar.update(1)
        write_preference_data(out_dir, videos, pool, pair_table(pool, cfg), cfg)
        bar.update(1)
    return summary(out_dir)
