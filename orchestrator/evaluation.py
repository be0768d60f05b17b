"""Held-out evaluation: sample the generator on the world's held-out prompts, score with the oracle."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from policy.backend import Policy
from policy.sampling import sample
from rewards.oracle import score_batch
from rewards.world import heldout_prompts

DIMENSIONS = ("vq", "mq", "ta", "overall")


@dataclass
class EvalResult:
    videos: np.ndarray  # uint8 [N, T, H, W, 3]
    prompts: list[str]  # [N], prompt-major: seeds of one prompt are adjacent
    scores: dict[str, np.ndarray]  # per dimension [N]

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(self.scores[k])) for k in DIMENSIONS}


@torch.no_grad()
def evaluate(
    model: Policy,
    *,
    sampler: str,
    eta: float,
    steps: int,
    mode: str,
    seeds_per_prompt: int,
    seed: int,
    prompts: list[str] | None = None,
    batch_size: int = 64,
    desc: str | None = None,
    shift: float = 1.0,
) -> EvalResult:
    """Generate `seeds_per_prompt` clips per prompt (default: the held-out split) with fixed seeds.

    The same (prompts, seed) always draws the same initial noise, so two checkpoints evaluated
    with equal arguments are compared on identical starting points. `desc` shows a progress bar; `shift` is the
    sampling schedule's (policy.sde.sigma_schedule).
    """
    prompts = prompts or [p.text for p in heldout_prompts()]
    texts = [p for p in prompts for _ in range(seeds_per_prompt)]
    ids = model.encode_prompts(texts)
    gen = torch.Generator().manual_seed(seed)
    clips = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=desc is None):
        traj = sample(model, ids[start : start + batch_size], steps=steps, sde_type=sampler, eta=eta, mode=mode, generator=gen,
                      shift=shift)
        clips.append(model.decode(traj.videos))
    videos = np.concatenate(clips)
    return EvalResult(videos, texts, score_batch(videos, texts))
