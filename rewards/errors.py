"""Data errors: a problem with one sample, reported with the sample's id.

Failures are sorted where they happen (NeMo-RL's taxonomy): a `DataError` is about the
input and would fail again anywhere, so it is never retried on another replica and is
reported naming the sample; anything else an actor raises is treated as infrastructure
(retried elsewhere with back-off, see actors/).
"""

from __future__ import annotations

import numpy as np


class DataError(ValueError):
    def __init__(self, sample_id: str, problem: str):
        super().__init__(f"sample {sample_id}: {problem}")
        self.sample_id = sample_id
        self.problem = problem

    def __reduce__(self):  # keep sample_id when the error crosses a Ray boundary
        return DataError, (self.sample_id, self.problem)


def score_each(score, batches) -> list:
    """score(batch) for each batch -> [its scores, or the DataError naming its bad sample]: one bad sample fails only
    its own batch when several travel in one call (anything else still raises and fails the call)."""
    out = []
    for batch in batches:
        try:
            out.append(score(batch))
        except DataError as e:
            out.append(e)
    return out


def check_videos(videos: np.ndarray, ids: list[str], frame_shape: tuple[int, int, int, int]) -> None:
    """Raise DataError naming the first sample that is not a [T, H, W, 3] clip of `frame_shape`."""
    if len(ids) != len(videos):
        raise DataError(ids[0] if ids else "?", f"batch has {len(videos)} videos but {len(ids)} ids")
    for sid, v in zip(ids, videos):
        if tuple(v.shape) != tuple(frame_shape):
            raise DataError(sid, f"video shape {tuple(v.shape)}, expected {tuple(frame_shape)} [T, H, W, 3]")
        if v.dtype != np.uint8 and not np.isfinite(v).all():
            raise DataError(sid, "video has non-finite pixels")


def check_scores(scores: np.ndarray, ids: list[str], dims: tuple[str, ...]) -> np.ndarray:
    """Scores must be finite float [N, D]; the first bad row raises DataError naming sample and dimension."""
    scores = np.asarray(scores, dtype=np.float32)
    if scores.shape != (len(ids), len(dims)):
        raise DataError(ids[0] if ids else "?", f"scores shape {scores.shape}, expected {(len(ids), len(dims))}")
    bad = ~np.isfinite(scores)
    if bad.any():
        i, d = np.argwhere(bad)[0]
        raise DataError(ids[i], f"non-finite {dims[d]} score {scores[i, d]}")
    return scores
