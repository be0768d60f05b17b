"""The embedded shapes world: prompts, renderer, held-out split, flawed SFT data and degradations.

Prompt grammar: ``a <colour> <shape> moving <direction> <speed>``
- colours: red, green, blue, yellow, cyan, magenta, white (pure RGB, every one has max channel 1);
- shapes: square, circle, triangle (apex up); diameter / side / base and height are 6/16 of the frame;
- directions: left (column falls), right, up (row falls), down;
- speeds: slowly = 1/32 of the frame width per frame, quickly = 1/16 (0.5 and 1 px at 16 px).
Background black. 7 x 3 x 4 x 2 = 168 prompts; `heldout_prompts()` holds 24 of them out of training.
The object must stay in frame, so a clip is at most 1 + (size - 6/16 size) / speed frames long:
11 frames for "quickly", 21 for "slowly" (at any size); longer clips raise ValueError.

Videos are numpy float32 ``[T, H, W, 3]`` in [0, 1] (H == W == size); batches ``[N, T, H, W, 3]``.
Coordinates are continuous (row, col) in pixels: pixel (i, j) covers [i, i+1) x [j, j+1), so its
centre is (i + 0.5, j + 0.5). An object's "centre" is its area centroid (for the triangle that is
1/3 of the height above the base). Frames are anti-aliased: shapes are sampled on a 4x supersampled
grid and box-averaged, so the 0.5 px/frame "slowly" motion is visible.

SFT data flaws (`FlawConfig`, each drawn independently per clip; defaults in brackets):
- wrong_direction [p=0.25]: the object moves opposite or perpendicular to the asked direction
  (one of the three wrong directions, uniformly);
- jitter [p=0.4]: per-frame positional jitter, gaussian, std 0.6 px per axis (scaled by size/16);
- colour_drift [p=0.3]: the colour drifts linearly toward its neighbouring colour (`NEIGHBOUR`),
  reaching 80 % of the way at the last frame;
- noise [p=0.3]: additive gaussian pixel noise, std 0.08, clipped to [0, 1];
- wrong_speed [p=0.3]: the object moves at the other speed.
A flawed track is clipped so the object stays fully inside the frame.

`degrade(video, kind, strength, rng)` corrupts any world video (for preference pairs); see its docstring.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
}
# Hue-wheel neighbour each colour drifts toward (white toward cyan); pairs share a saturated channel,
# so a drifting object keeps its brightness.
NEIGHBOUR: dict[str, str] = {
    "red": "yellow", "yellow": "green", "green": "cyan", "cyan": "blue",
    "blue": "magenta", "magenta": "red", "white": "cyan",
}
SHAPES: tuple[str, ...] = ("square", "circle", "triangle")
# Unit (d_row, d_col) per direction.
DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0),
}
# Fraction of the frame width travelled per frame.
SPEEDS: dict[str, float] = {"slowly": 1.0 / 32.0, "quickly": 1.0 / 16.0}
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}
OTHER_SPEED = {"slowly": "quickly", "quickly": "slowly"}

GRAMMAR = "a <colour> <shape> moving <direction> <speed>"
VOCAB: list[str] = sorted({"a", "moving", *COLOURS, *SHAPES, *DIRECTIONS, *SPEEDS})
SUPERSAMPLE = 4
OBJECT_FRACTION = 6.0 / 16.0  # object extent / frame size


@dataclass(frozen=True)
class Prompt:
    """One prompt of the grammar; every field is one word of its vocabulary."""

    colour: str
    shape: str
    direction: str
    speed: str

    def __post_init__(self) -> None:
        for field, allowed in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"unknown {field} {value!r}; expected one of {sorted(allowed)}")

    @property
    def text(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} {self.speed}"

    @classmethod
    def parse(cls, text: str) -> "Prompt":
        """Parse ``a <colour> <shape> moving <direction> <speed>`` (case and extra spaces ignored)."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        words = text.lower().split()
        if len(words) != 6 or words[0] != "a" or words[3] != "moving":
            raise ValueError(f"prompt {text!r} does not match the grammar {GRAMMAR!r}")
        for word, field, allowed in zip(words[1:3] + words[4:], ("colour", "shape", "direction", "speed"),
                                        (COLOURS, SHAPES, DIRECTIONS, SPEEDS)):
            if word not in allowed:
                raise ValueError(f"prompt {text!r}: unknown {field} {word!r}; expected one of {sorted(allowed)} "
                                 f"(grammar {GRAMMAR!r})")
        return cls(words[1], words[2], words[4], words[5])


def as_prompt(prompt: Prompt | str) -> Prompt:
    """A `Prompt` from a `Prompt` or its text."""
    return prompt if isinstance(prompt, Prompt) else Prompt.parse(prompt)


def all_prompts() -> list[Prompt]:
    """All 168 prompts in a fixed order: colour, then shape, direction, speed (dictionary orders above)."""
    return [Prompt(c, s, d, v) for c, s, d, v in itertools.product(COLOURS, SHAPES, DIRECTIONS, SPEEDS)]


def heldout_prompts() -> list[Prompt]:
    """The 24 held-out combinations: each (shape, direction, speed) triple, in product order j, once,
    with colour number j mod 7. Every word keeps >= 20 training prompts; no RNG involved."""
    colours = list(COLOURS)
    return [Prompt(colours[j % len(colours)], s, d, v)
            for j, (s, d, v) in enumerate(itertools.product(SHAPES, DIRECTIONS, SPEEDS))]


def train_prompts() -> list[Prompt]:
    """The 144 prompts not held out, in `all_prompts()` order."""
    held = set(heldout_prompts())
    return [p for p in all_prompts() if p not in held]


# ---------------------------------------------------------------- geometry and rendering

def object_size(size: int) -> float:
    """Object extent in pixels (6 px at size 16)."""
    return OBJECT_FRACTION * size


def speed_px(speed: str, size: int) -> float:
    """Pixels per frame for a speed word at a frame size."""
    return SPEEDS[speed] * size


def shape_extent(shape: str, size: int) -> tuple[float, float, float, float]:
    """Distance (up, down, left, right) in px from the centre (area centroid) to the shape's bounding box."""
    d = object_size(size)
    if shape == "triangle":  # apex 2/3 of the height above the centroid, base 1/3 below
        return 2 * d / 3, d / 3, d / 2, d / 2
    if shape in ("square", "circle"):
        return d / 2, d / 2, d / 2, d / 2
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def shape_alpha(shape: str, centres: np.ndarray, size: int, ss: int = SUPERSAMPLE) -> np.ndarray:
    """Anti-aliased coverage of `shape` centred at `centres` [..., 2] (row, col px) -> float32 [..., size, size].

    Each pixel is sampled at ss x ss points and box-averaged, so coverage is exact to 1/ss^2.
    """
    centres = np.asarray(centres, dtype=np.float32)
    if centres.shape[-1:] != (2,):
        raise ValueError(f"centres must be [..., 2] (row, col), got shape {centres.shape}")
    lead = centres.shape[:-1]
    flat = centres.reshape(-1, 2)
    d = np.float32(object_size(size))
    grid = ((np.arange(size * ss, dtype=np.float32) + 0.5) / ss)
    out = np.empty((flat.shape[0], size, size), dtype=np.float32)
    for lo in range(0, flat.shape[0], 512):  # chunks bound the [K, P, P] temporaries
        c = flat[lo:lo + 512]
        dy = grid[None, :] - c[:, :1]  # [K, P]
        dx = grid[None, :] - c[:, 1:]
        if shape == "square":  # separable: coverage = row coverage x column coverage
            ry = (np.abs(dy) <= d / 2).reshape(-1, size, ss).mean(-1)
            rx = (np.abs(dx) <= d / 2).reshape(-1, size, ss).mean(-1)
            out[lo:lo + 512] = ry[:, :, None] * rx[:, None, :]
            continue
        if shape == "circle":
            inside = dy[:, :, None] ** 2 + dx[:, None, :] ** 2 <= (d / 2) ** 2
        elif shape == "triangle":  # apex up at dy = -2d/3, base at dy = +d/3, base width d
            depth = dy + 2 * d / 3  # distance below the apex
            inside = ((depth >= 0) & (depth <= d))[:, :, None] & (np.abs(dx)[:, None, :] <= 0.5 * depth[:, :, None])
        else:
            raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")
        out[lo:lo + 512] = inside.reshape(-1, size, ss, size, ss).mean((2, 4))
    return out.reshape(*lead, size, size)


def _centre_box(shape: str, size: int) -> tuple[float, float, float, float]:
    """(row_min, row_max, col_min, col_max) of centres that keep the shape fully inside the frame."""
    up, down, left, right = shape_extent(shape, size)
    return up, size - down, left, size - right


def track(start: tuple[float, float], direction: str, speed: str, frames: int, size: int) -> np.ndarray:
    """Centre positions [frames, 2] (row, col px) of straight motion from `start`."""
    v = np.asarray(DIRECTIONS[direction], dtype=np.float64) * speed_px(speed, size)
    return np.asarray(start, dtype=np.float64)[None, :] + np.arange(frames)[:, None] * v[None, :]


def _random_start(shape: str, direction: str, speed: str, rng: np.random.Generator, frames: int, size: int):
    r0, r1, c0, c1 = _centre_box(shape, size)
    travel = np.asarray(DIRECTIONS[direction]) * speed_px(speed, size) * (frames - 1)
    lo = np.array([r0, c0]) - np.minimum(travel, 0)
    hi = np.array([r1, c1]) - np.maximum(travel, 0)
    if np.any(hi < lo):
        most = int(np.floor((size - object_size(size)) / speed_px(speed, size))) + 1
        raise ValueError(f"a {shape} moving {direction} {speed} for {frames} frames does not fit in {size} px "
                         f"(at most {most} frames at this speed)")
    return float(rng.uniform(lo[0], hi[0])), float(rng.uniform(lo[1], hi[1]))


def random_start(prompt: Prompt | str, rng: np.random.Generator, frames: int = 8,
                 size: int = 16) -> tuple[float, float]:
    """A uniformly random (row, col) start so the object stays fully inside the frame for the whole clip."""
    p = as_prompt(prompt)
    return _random_start(p.shape, p.direction, p.speed, rng, frames, size)


def _check_geometry(frames: int, size: int) -> None:
    if not (isinstance(frames, (int, np.integer)) and frames >= 2):
        raise ValueError(f"frames must be an int >= 2, got {frames!r}")
    if not (isinstance(size, (int, np.integer)) and size >= 8):
        raise ValueError(f"size must be an int >= 8, got {size!r}")


def render_track(shape: str, centres: np.ndarray, colours: np.ndarray, size: int) -> np.ndarray:
    """Draw `shape` at `centres` [T, 2] in `colours` [T, 3] or [3] on black -> float32 [T, size, size, 3]."""
    alpha = shape_alpha(shape, centres, size)
    colours = np.broadcast_to(np.asarray(colours, dtype=np.float32), (alpha.shape[0], 3))
    return alpha[..., None] * colours[:, None, None, :]


def render(prompt: Prompt | str, start: tuple[float, float], frames: int = 8, size: int = 16) -> np.ndarray:
    """The true video of `prompt` with the object centre at `start` (row, col px) at frame 0.

    Returns float32 [frames, size, size, 3] in [0, 1].
    """
    p = as_prompt(prompt)
    _check_geometry(frames, size)
    return render_track(p.shape, track(start, p.direction, p.speed, frames, size), COLOURS[p.colour], size)


def to_uint8(video: np.ndarray) -> np.ndarray:
    """float [.., 3] in [0, 1] -> uint8 (clipped, rounded)."""
    return np.round(np.clip(np.asarray(video, dtype=np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


def from_uint8(video: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [0, 1]."""
    video = np.asarray(video)
    if video.dtype != np.uint8:
        raise ValueError(f"from_uint8 expects dtype uint8, got {video.dtype}")
    return video.astype(np.float32) / np.float32(255.0)


# ---------------------------------------------------------------- SFT data with documented flaws

class FlawConfig(BaseModel):
    """Rates and strengths of the imperfections in the SFT training data (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    p_wrong_direction: float = Field(0.25, ge=0.0, le=1.0, description="P(moves opposite/perpendicular)")
    p_jitter: float = Field(0.4, ge=0.0, le=1.0, description="P(per-frame positional jitter)")
    jitter_px: float = Field(0.6, ge=0.0, le=4.0, description="jitter std per axis, px at size 16")
    p_colour_drift: float = Field(0.3, ge=0.0, le=1.0, description="P(colour drifts toward its neighbour)")
    colour_drift: float = Field(0.8, ge=0.0, le=1.0, description="way to the neighbour colour at the last frame")
    p_noise: float = Field(0.3, ge=0.0, le=1.0, description="P(additive gaussian pixel noise)")
    noise_std: float = Field(0.08, ge=0.0, le=1.0, description="pixel noise std (video in [0, 1])")
    p_wrong_speed: float = Field(0.3, ge=0.0, le=1.0, description="P(moves at the other speed)")


FLAW_NAMES = ("wrong_direction", "jitter", "colour_drift", "noise", "wrong_speed")


def sft_clip(prompt: Prompt | str, rng: np.random.Generator, frames: int = 8, size: int = 16,
             flaws: FlawConfig = FlawConfig()) -> tuple[np.ndarray, dict[str, bool]]:
    """One SFT training clip for `prompt`, flaws drawn independently from `flaws`.

    Returns (float32 [frames, size, size, 3] in [0, 1], {flaw name: applied}).
    """
    p = as_prompt(prompt)
    _check_geometry(frames, size)
    applied = {
        "wrong_direction": bool(rng.random() < flaws.p_wrong_direction),
        "jitter": bool(rng.random() < flaws.p_jitter),
        "colour_drift": bool(rng.random() < flaws.p_colour_drift),
        "noise": bool(rng.random() < flaws.p_noise),
        "wrong_speed": bool(rng.random() < flaws.p_wrong_speed),
    }
    direction, speed = p.direction, p.speed
    if applied["wrong_direction"]:
        wrong = [d for d in DIRECTIONS if d != p.direction]
        direction = wrong[rng.integers(len(wrong))]
    if applied["wrong_speed"]:
        speed = OTHER_SPEED[p.speed]
    centres = track(_random_start(p.shape, direction, speed, rng, frames, size), direction, speed, frames, size)
    if applied["jitter"]:
        centres = centres + rng.normal(0.0, flaws.jitter_px * size / 16.0, size=centres.shape)
        r0, r1, c0, c1 = _centre_box(p.shape, size)
        centres = np.stack([np.clip(centres[:, 0], r0, r1), np.clip(centres[:, 1], c0, c1)], axis=1)
    colour = np.asarray(COLOURS[p.colour], dtype=np.float32)
    colours = np.broadcast_to(colour, (frames, 3))
    if applied["colour_drift"]:
        target = np.asarray(COLOURS[NEIGHBOUR[p.colour]], dtype=np.float32)
        w = (flaws.colour_drift * np.arange(frames) / (frames - 1)).astype(np.float32)[:, None]
        colours = (1 - w) * colour + w * target
    video = render_track(p.shape, centres, colours, size)
    if applied["noise"]:
        video = np.clip(video + rng.normal(0.0, flaws.noise_std, size=video.shape), 0.0, 1.0).astype(np.float32)
    return video, applied


def sft_dataset(n: int, seed: int, frames: int = 8, size: int = 16, flaws: FlawConfig = FlawConfig(),
                prompts: list[Prompt | str] | None = None) -> tuple[np.ndarray, list[Prompt]]:
    """`n` flawed SFT clips, prompts uniform over `prompts` (default `train_prompts()`).

    Returns (float32 [n, frames, size, size, 3] in [0, 1], list of n Prompt). Deterministic in `seed`.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    pool = train_prompts() if prompts is None else [as_prompt(p) for p in prompts]
    if not pool:
        raise ValueError("prompts is empty")
    rng = np.random.default_rng(seed)
    videos = np.empty((n, frames, size, size, 3), dtype=np.float32)
    chosen = []
    for i in range(n):  # prompt and clip drawn in turn, so a smaller n gives a prefix of a larger one
        chosen.append(pool[rng.integers(len(pool))])
        videos[i] = sft_clip(chosen[-1], rng, frames, size, flaws)[0]
    return videos, chosen


# ---------------------------------------------------------------- degradations for preference data

DEGRADATIONS = (
    "noise", "blur", "jitter", "colour", "freeze", "flicker", "reverse", "extra", "shape", "grow", "swell", "fast",
)


def _check_video(video: np.ndarray) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype == np.uint8:
        video = from_uint8(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[1] != video.shape[2] or video.shape[0] < 2:
        raise ValueError(f"expected a video [T, H, W, 3] with T >= 2 and H == W, got shape {video.shape}")
    return video.astype(np.float32, copy=False)


def _object_region(video: np.ndarray) -> np.ndarray:
    """bool [T, H, W]: pixels brighter than 0.15 (max channel), grown by one pixel (anti-aliased edges)."""
    return ndimage.binary_dilation(video.max(-1) > 0.15, structure=np.ones((1, 3, 3), bool))


def _object_centroids(alpha: np.ndarray) -> np.ndarray:
    """Coverage-weighted centroid (row, col) per frame of alpha [T, H, W] -> [T, 2] (frame centre when empty)."""
    size = alpha.shape[1]
    grid = np.arange(size) + 0.5
    mass = np.maximum(alpha.sum((1, 2)), 1e-9)
    rows, cols = (alpha.sum(2) * grid).sum(1) / mass, (alpha.sum(1) * grid).sum(1) / mass
    empty = alpha.sum((1, 2)) < 1e-6
    return np.where(empty[:, None], size / 2, np.stack([rows, cols], 1))


def _morph(video: np.ndarray, s: float, rng: np.random.Generator) -> np.ndarray:
    """The object's coverage blended toward another shape (not the template it matches best) at its centroids."""
    alpha = video.max(-1)
    centres = _object_centroids(alpha)
    core = alpha >= 0.5
    colour = (video[core] / alpha[core][:, None]).mean(0) if core.any() else np.ones(3, np.float32)
    templates = {shape: shape_alpha(shape, centres, video.shape[1]) for shape in SHAPES}
    iou = {k: np.minimum(alpha, t).sum() / max(np.maximum(alpha, t).sum(), 1e-9) for k, t in templates.items()}
    current = max(iou, key=iou.get)
    other = str(rng.choice([k for k in SHAPES if k != current]))
    return video + (s * (templates[other] - alpha))[..., None] * colour


def _grow(video: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """Frame t's object scaled by factors[t] about its centroid (bilinear)."""
    centres = _object_centroids(video.max(-1)) - 0.5  # array index coordinates: pixel centres at integers
    return np.stack([np.stack([ndimage.affine_transform(video[t, :, :, ch], np.full(2, 1 / f), offset=c - c / f, order=1)
                               for ch in range(3)], -1) for t, (c, f) in enumerate(zip(centres, factors))])


def degrade(video: np.ndarray, kind: str, strength: float, rng: np.random.Generator) -> np.ndarray:
    """A corrupted copy of a world video [T, H, W, 3] -> float32 [T, H, W, 3] in [0, 1].

    strength in [0, 1] (0 leaves the video unchanged up to rounding); lengths scale with size/16:
    - noise: additive gaussian noise, std 0.3*strength, clipped;
    - blur: spatial gaussian blur, sigma 1.5*strength px;
    - jitter: each frame translated by gaussian (row, col), std 1.5*strength px (bilinear);
    - colour: each pixel moved toward the neighbour of its nearest palette colour by `strength`;
    - freeze: the object stops at frame round((1 - strength)(T - 1));
    - flicker: the object vanishes from round(strength*T/2) random frames (background filled in);
    - reverse: frame t shows source frame round(t + strength(T - 1 - 2t)): velocity x (1 - 2 strength),
      so 0.5 stands still and 1 plays the clip backwards (wrong direction);
    - extra: a copy of the object, brightness x strength, one object size + 2 px away (of the 8 such
      offsets, the one that keeps most of it in view in every frame), moving along with it;
    - shape: the object's coverage blended toward another shape drawn at its centroid (the one it best matches
      replaced by a random other one), by `strength`: 1 draws the other shape, 0.5 a half-and-half blob;
    - grow: the object scaled about its centroid by 1 + 0.5*strength in every frame (area up to 2.25x);
    - swell: frame t's object scaled by 1 + 0.5*strength*t/(T - 1): it grows over the clip (area not constant);
    - fast: the object's displacement from frame 0 scaled by 1 + strength (up to twice the asked speed).
    The last four are what a generator pulled by the users' taste for big, fast objects does (`rewards.feedback`).
    """
    if kind not in DEGRADATIONS:
        raise ValueError(f"unknown degradation kind {kind!r}; expected one of {list(DEGRADATIONS)}")
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    video = _check_video(video)
    s = float(strength)
    T, size = video.shape[0], video.shape[1]
    px = size / 16.0
    if kind == "noise":
        out = video + rng.normal(0.0, 0.3 * s, size=video.shape)
    elif kind == "blur":
        out = ndimage.gaussian_filter(video, sigma=(0, 1.5 * s * px, 1.5 * s * px, 0), mode="constant")
    elif kind == "jitter":
        offsets = rng.normal(0.0, 1.5 * s * px, size=(T, 2))
        out = np.stack([ndimage.shift(video[t], (offsets[t, 0], offsets[t, 1], 0), order=1, mode="constant")
                        for t in range(T)])
    elif kind == "colour":
        palette = np.asarray(list(COLOURS.values()), dtype=np.float32)  # [7, 3]
        neighbours = np.asarray([COLOURS[NEIGHBOUR[c]] for c in COLOURS], dtype=np.float32)
        value = video.max(-1, keepdims=True)
        chroma = video / np.maximum(value, 1e-6)
        nearest = np.argmin(((chroma[..., None, :] - palette) ** 2).sum(-1), axis=-1)
        out = (1 - s) * video + s * value * neighbours[nearest]
    elif kind == "freeze":
        stop = int(round((1 - s) * (T - 1)))
        out = video[np.minimum(np.arange(T), stop)]
    elif kind == "reverse":
        t = np.arange(T)
        out = video[np.clip(np.round(t + s * (T - 1 - 2 * t)).astype(int), 0, T - 1)]
    elif kind == "flicker":
        out = video.copy()
        region = _object_region(video)
        for t in rng.choice(T, size=int(round(s * T / 2)), replace=False):
            background = video[t][~region[t]]
            fill = np.median(background, axis=0) if background.size else np.zeros(3, np.float32)
            out[t][region[t]] = fill
    elif kind == "shape":
        out = _morph(video, s, rng)
    elif kind == "grow":
        out = _grow(video, np.full(T, 1.0 + 0.5 * s))
    elif kind == "swell":
        out = _grow(video, 1.0 + 0.5 * s * np.arange(T) / (T - 1))
    elif kind == "fast":
        centres = _object_centroids(video.max(-1))
        moved = (centres - centres[0]) * s
        out = np.stack([ndimage.shift(video[t], (moved[t, 0], moved[t, 1], 0), order=1, mode="constant")
                        for t in range(T)])
    else:  # extra
        layer = video * _object_region(video)[..., None]
        step = int(round(object_size(size))) + 2
        best, best_key = None, None
        for dr, dc in itertools.product((-step, 0, step), repeat=2):
            if dr == dc == 0:
                continue
            shifted = np.zeros_like(layer)
            rs, rd = (slice(0, size - dr), slice(dr, size)) if dr >= 0 else (slice(-dr, size), slice(0, size + dr))
            cs, cd = (slice(0, size - dc), slice(dc, size)) if dc >= 0 else (slice(-dc, size), slice(0, size + dc))
            shifted[:, rd, cd] = layer[:, rs, cs]
            mass = shifted.sum((1, 2, 3))
            key = (mass.min(), mass.sum())  # visible in every frame first, then as much as possible
            if best_key is None or key > best_key:
                best, best_key = shifted, key
        out = np.maximum(video, s * best)
    return np.clip(out, 0.0, 1.0).astype(np.float32)
