"""Held-out evaluation: sample the generator on the world's held-out prompts, score with the oracle.

Long-video evaluation (Astrolabe): `evaluate_long` streams N-frame videos with the rolling KV cache and scores every
window of the training clip length (the length the oracle's terms and the reward models are made for) at a stride,
by default the clip length (consecutive, non-overlapping windows: N = 32 at 8 frames -> windows at 0, 8, 16, 24).
`long_eval_json` / `plot_long_eval` are what `videorl eval --frames N` writes and the run report shows
(LONG_EVAL_FILE in the run directory).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from policy.backend import Policy
from policy.sampling import sample
from rewards.oracle import dimension_scores, score_batch, score_terms
from rewards.world import heldout_prompts

DIMENSIONS = ("vq", "mq", "ta", "overall")
LONG_EVAL_FILE = "long_eval.json"


@dataclass
class EvalResult:
    videos: np.ndarray  # uint8 [N, T, H, W, 3]
    prompts: list[str]  # [N], prompt-major: seeds of one prompt are adjacent
    scores: dict[str, np.ndarray]  # per dimension [N]
    terms: dict[str, np.ndarray]  # per oracle term [N] (rewards.oracle.TERMS): the dimensions are their means

    def means(self) -> dict[str, float]:
        return {k: float(np.mean(self.scores[k])) for k in DIMENSIONS}

    def term_means(self) -> dict[str, float]:
        return {k: float(np.mean(v)) for k, v in self.terms.items()}


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
    guide=None,
) -> EvalResult:
    """Generate `seeds_per_prompt` clips per prompt (default: the held-out split) with fixed seeds.

    The same (prompts, seed) always draws the same initial noise, so two checkpoints evaluated
    with equal arguments are compared on identical starting points. `desc` shows a progress bar; `shift` is the
    sampling schedule's (policy.sde.sigma_schedule). guide: a `policy.rollout.RewardGuide` (reward-guided sampling).
    """
    videos, texts = _sample_videos(model, prompts, seeds_per_prompt, seed, batch_size, desc, sde_type=sampler, eta=eta,
                                   steps=steps, mode=mode, shift=shift, guide=guide)
    terms = score_terms(videos, texts)
    return EvalResult(videos, texts, dimension_scores(terms), terms)


def _sample_videos(model: Policy, prompts: list[str] | None, seeds_per_prompt: int, seed: int, batch_size: int,
                   desc: str | None, guide=None, **sample_kwargs) -> tuple[np.ndarray, list[str]]:
    """Decoded uint8 videos [N, T, H, W, 3] for seeds_per_prompt clips per prompt (default: the held-out split), the
    noise drawn from `seed` batch by batch, and their prompts [N] (prompt-major)."""
    prompts = prompts or [p.text for p in heldout_prompts()]
    texts = [p for p in prompts for _ in range(seeds_per_prompt)]
    ids = model.encode_prompts(texts)
    gen = torch.Generator().manual_seed(seed)
    clips = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", disable=desc is None):
        traj = sample(model, ids[start : start + batch_size], generator=gen,
                      guide=guide and guide.for_prompts(texts[start : start + batch_size]), **sample_kwargs)
        clips.append(model.decode(traj.videos))
    return np.concatenate(clips), texts


@dataclass
class LongEvalResult:
    videos: np.ndarray  # uint8 [N, frames, H, W, 3], the whole streamed videos
    prompts: list[str]  # [N], prompt-major
    starts: list[int]  # first frame of each scored window [W]
    window: int  # frames per window (the training clip length)
    oracle: dict[str, np.ndarray]  # per dimension (DIMENSIONS) [W, N]
    rewards: dict[str, np.ndarray]  # per learned reward name [W, N] (empty without `score`)


@torch.no_grad()
def evaluate_long(
    model: Policy,
    *,
    frames: int,
    sampler: str,
    eta: float,
    steps: int,
    seeds_per_prompt: int,
    seed: int,
    prompts: list[str] | None = None,
    stride: int | None = None,
    shift: float = 1.0,
    score: Callable[[np.ndarray, list[str]], dict[str, np.ndarray]] | None = None,
    guide=None,
    batch_size: int = 64,
    desc: str | None = None,
) -> LongEvalResult:
    """Stream `frames`-frame videos (causal, rolling KV cache) for each prompt and score every window.

    Windows are model.shape.frames long, starting at 0, stride, 2*stride, ... (stride default: the window, i.e.
    consecutive windows; a multiple of the chunk). score(videos uint8 [N, T, H, W, 3], prompts) -> {name: [N]}: the
    learned reward models, each window scored as a clip. Same (prompts, seed): same noise, as `evaluate`.
    """
    shp = model.shape
    window = shp.frames
    stride = window if stride is None else stride
    if frames < window or frames % shp.chunk:
        raise ValueError(f"--frames must be a multiple of the chunk ({shp.chunk}) and at least the clip's {window} "
                         f"frames, got {frames}")
    if stride < 1 or stride % shp.chunk:
        raise ValueError(f"--stride must be a positive multiple of the chunk ({shp.chunk}), got {stride}")
    videos, texts = _sample_videos(model, prompts, seeds_per_prompt, seed, batch_size, desc, sde_type=sampler, eta=eta,
                                   steps=steps, mode="causal", num_frames=frames, shift=shift, guide=guide)
    starts = list(range(0, frames - window + 1, stride))
    oracle = {d: [] for d in DIMENSIONS}
    rewards: dict[str, list[np.ndarray]] = {}
    for s0 in starts:
        part = np.ascontiguousarray(videos[:, s0 : s0 + window])
        for d, v in score_batch(part, texts).items():
            if d in oracle:
                oracle[d].append(v)
        for name, v in (score(part, texts) if score else {}).items():
            rewards.setdefault(name, []).append(np.asarray(v, np.float64))
    return LongEvalResult(videos, texts, starts, window, {d: np.stack(v) for d, v in oracle.items()},
                          {n: np.stack(v) for n, v in rewards.items()})


def long_eval_json(res: LongEvalResult, **info) -> dict:
    """The JSON `videorl eval --frames` writes: per window its frames and mean scores (plus `info`, e.g. checkpoint)."""
    windows = [{"index": i, "start": s0, "end": s0 + res.window,
                "oracle": {d: float(res.oracle[d][i].mean()) for d in DIMENSIONS},
                "rewards": {n: float(v[i].mean()) for n, v in res.rewards.items()}}
               for i, s0 in enumerate(res.starts)]
    return {**info, "frames": int(res.videos.shape[1]), "window": res.window,
            "stride": res.starts[1] - res.starts[0] if len(res.starts) > 1 else res.window,
            "clips": len(res.prompts), "windows": windows}


def long_eval_rows(data: dict) -> list[dict]:
    """Table rows of a long_eval_json: window, frames, oracle dimensions, learned rewards."""
    return [{"window": w["index"], "frames": f"{w['start']}-{w['end'] - 1}", **w["oracle"], **w["rewards"]}
            for w in data["windows"]]


def plot_long_eval(data: dict) -> Figure:
    """Quality against window position (a long_eval_json): the oracle's dimensions, and the learned rewards on a
    second panel when present; the dashed line marks the end of the training clip length."""
    windows = data["windows"]
    x = [w["start"] for w in windows]
    names = sorted({n for w in windows for n in w["rewards"]})
    fig = Figure(figsize=(6.5 * (1 + bool(names)), 3.5), layout="constrained")
    ax = fig.add_subplot(1, 1 + bool(names), 1)
    for d in DIMENSIONS:
        ax.plot(x, [w["oracle"][d] for w in windows], marker="o", label=d, linewidth=2.5 if d == "overall" else 1.2)
    ax.set(title=f"oracle per {data['window']}-frame window of {data['frames']}-frame videos",
           xlabel="window start (frame)", ylabel="oracle score", ylim=(0, 1))
    panels = [ax]
    if names:
        ax2 = fig.add_subplot(1, 2, 2)
        for n in names:
            ax2.plot(x, [w["rewards"].get(n, np.nan) for w in windows], marker="o", label=n)
        ax2.set(title="learned rewards per window", xlabel="window start (frame)", ylabel="reward")
        panels.append(ax2)
    for a in panels:
        a.axvline(data["window"], color="grey", linestyle="--", linewidth=1)  # windows from here lie past the clip
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    return fig
