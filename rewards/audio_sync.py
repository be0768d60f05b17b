"""An example non-visual reward in the shapes world, for SCRL's audio-sync row: a beat track the video should move to.

The rollout emits a per-frame "beat" track with every clip (`rollout.extras: [beat]`): a pulse of 1.0 every P frames,
P = 2 for "quickly" and 4 for "slowly" prompts (the music the clip is cut to). `BeatSync` scores motion-to-beat
synchrony: the object should travel BEAT_PX (at 16 px; scaled with the frame) per beat, i.e. BEAT_PX / P px every
frame, so its motion keeps time with the music. Per pair of consecutive frames where the object is seen, the step d
scores exp(-ln(d / v)^2 / (2 * 0.4^2)) against v = BEAT_PX / P; `sync` is the mean over all T - 1 pairs, a pair
without the object scoring 0 (1 = on the beat throughout, 0 for a still or lost object). The track is read from the batch, not from the prompt: the scorer hears the music.
"""

from __future__ import annotations

import numpy as np

from rewards.errors import DataError
from rewards.world import as_prompt

BEAT_PERIOD = {"quickly": 2, "slowly": 4}  # frames per beat
BEAT_PX = 2.0  # px the object travels per beat at 16 px (the world's speeds: 1 and 0.5 px a frame)
LOG_STD = 0.4
PRESENT = 0.5  # the object is seen in a frame with 2 pixels whose brightest channel is over half
FAINT = 0.1  # pixels fainter than this are background (noise) and do not move the centre


def beat_track(prompt: str, frames: int) -> np.ndarray:
    """float32 [frames]: 1.0 on beat frames (every P frames from frame 0), 0.0 between."""
    beat = np.zeros(frames, np.float32)
    beat[:: BEAT_PERIOD[as_prompt(prompt).speed]] = 1.0
    return beat


EXTRAS = {"beat": beat_track}  # the extra batch fields a rollout can emit: name -> f(prompt, frames) -> [frames]


def batch_extras(names, prompts: list[str], frames: int) -> dict[str, np.ndarray]:
    """{name: [N, frames]} of the named extra fields for N prompts."""
    return {n: np.stack([EXTRAS[n](p, frames) for p in prompts]) if len(prompts) else np.zeros((0, frames), np.float32)
            for n in names}


class BeatSync:
    """Motion-to-beat synchrony of each clip against its batch's "beat" track (see the module docstring)."""

    dims = ("sync",)
    version = "beat-sync-1"

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        ids, videos = batch["ids"], batch["videos"]
        if "beat" not in batch:
            raise DataError(ids[0], "the batch has no 'beat' track: set rollout.extras: [beat]")
        beat = np.asarray(batch["beat"], dtype=np.float32)
        N, T, size = videos.shape[0], videos.shape[1], videos.shape[2]
        if beat.shape != (N, T):
            raise DataError(ids[0], f"beat track of shape {list(beat.shape)}, expected [{N}, {T}] (one value a frame)")
        alpha = (videos.max(-1) if videos.dtype == np.uint8 else videos.max(-1) * 255).astype(np.float32) / 255
        w = alpha * (alpha > FAINT)  # [N, T, H, W]: anti-aliased edges weigh in, so the centre moves by sub-pixels
        mass = w.sum((2, 3))
        grid = np.arange(size) + 0.5
        centre = np.stack([(w.sum(3) * grid).sum(2), (w.sum(2) * grid).sum(2)], -1) / np.maximum(mass, 1e-9)[..., None]
        present = (alpha > PRESENT).sum((2, 3)) >= 2
        sync = np.zeros(N, np.float32)
        for i, sid in enumerate(ids):
            beats = np.flatnonzero(beat[i] > 0.5)
            if len(beats) < 2:
                raise DataError(sid, f"beat track has {len(beats)} beats; need 2 to hear a tempo")
            v = BEAT_PX * size / 16.0 / np.diff(beats).mean()  # px a frame that keeps time
            both = present[i, 1:] & present[i, :-1]
            if both.any():
                d = np.linalg.norm(np.diff(centre[i], axis=0), axis=1)[both]
                sync[i] = np.exp(-np.log(np.maximum(d, 1e-3) / v) ** 2 / (2 * LOG_STD ** 2)).sum() / (T - 1)
        return {"sync": sync}
