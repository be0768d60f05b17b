"""Benchmark of streaming generation with the rolling KV cache (wired to `videorl bench kvcache`).

Two questions, answered with plain rows (list of dicts) the CLI prints and writes as JSON:
- "length": does per-chunk time and cache memory stay flat as clips grow past the training length?
- "group": how much faster is a group of G candidates that shares a frozen prefix (generated once,
  cache broadcast) than G independent rollouts of prefix + candidate (batched together)?
Timings use time.perf_counter; the compared variants (lengths; shared vs independent) run interleaved
and repeated, and the median is reported, so machine noise hits them alike.
"""

from __future__ import annotations

import statistics
import time
from functools import partial

import torch

from policy.backend import Policy
from policy.sampling import sample

BENCH_PROMPT = "a red circle moving left quickly"  # the content does not matter for timing


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def kvcache_benchmark(
    model: Policy,
    *,
    lengths: tuple[int, ...] = (4, 8, 16),
    group_size: int = 8,
    steps: int = 4,
    repeats: int = 3,
    seed: int = 0,
) -> list[dict]:
    """Rows of {"bench", ...}; `lengths` are multiples of the training clip (model.shape.frames latent frames).

    length rows: frames, chunks, ms_per_chunk (median over repeats), cache_bytes_max (largest cache seen
        while generating, which stays flat once the window is full), cache_frames_max.
    group row: group_size, prefix_chunks, shared_ms, independent_ms, speedup = independent / shared.
    """
    cfg = model.shape
    if any(m < 1 for m in lengths) or group_size < 1 or steps < 1 or repeats < 1:
        raise ValueError("lengths, group_size, steps and repeats must be >= 1")
    gen = torch.Generator().manual_seed(seed)
    prompt = model.encode_prompts([BENCH_PROMPT])
    runs, seen = {}, {}
    for mult in lengths:
        frames = mult * cfg.frames
        seen[frames] = {"bytes": 0, "frames": 0}

        def watch(j, cache, seen=seen[frames]):
            seen["bytes"] = max(seen["bytes"], cache.nbytes())
            seen["frames"] = max(seen["frames"], len(cache.frame_positions))

        runs[frames] = partial(
            sample, model, prompt, steps=steps, mode="causal", num_frames=frames, generator=gen, on_chunk=watch
        )
        runs[frames]()  # warm-up
    times = {frames: [] for frames in runs}
    for _ in range(repeats):  # lengths interleaved, so machine noise hits every length alike
        for frames, run in runs.items():
            times[frames].append(_timed(run))
    rows = []
    for frames in runs:
        n_chunks = frames // cfg.chunk
        rows.append(
            {
                "bench": "length",
                "frames": frames,
                "chunks": n_chunks,
                "ms_per_chunk": 1000 * statistics.median(times[frames]) / n_chunks,
                "cache_bytes_max": seen[frames]["bytes"],
                "cache_frames_max": seen[frames]["frames"],
            }
        )

    # Group rollout: a clip of 2 x training length whose first half is the shared prefix.
    frames = 2 * cfg.frames
    prefix = cfg.frames // cfg.chunk
    common = dict(steps=steps, sde_type="sage", eta=0.5, mode="causal", num_frames=frames)
    common["generator"] = gen
    shared = partial(sample, model, prompt, group_size=group_size, prefix_chunks=prefix, **common)
    independent = partial(sample, model, prompt.expand(group_size, *prompt.shape[1:]), **common)
    shared()
    independent()
    t_shared, t_indep = [], []
    for _ in range(repeats):
        t_shared.append(_timed(shared))
        t_indep.append(_timed(independent))
    ms_shared, ms_indep = 1000 * statistics.median(t_shared), 1000 * statistics.median(t_indep)
    rows.append(
        {
            "bench": "group",
            "frames": frames,
            "group_size": group_size,
            "prefix_chunks": prefix,
            "shared_ms": ms_shared,
            "independent_ms": ms_indep,
            "speedup": ms_indep / ms_shared,
        }
    )
    return rows
