"""The oracle: the ground-truth score of a world video against its prompt (VQ, MQ, TA in [0, 1]).

Every result in the project is judged by this module, so each component is spelled out here.
Input: float [T, H, W, 3] in [0, 1] (values outside are clipped; NaN/inf rejected) or uint8; H == W.
Lengths below are in pixels at size 16 and scale with size/16; alpha = max over RGB (the renderer's
colours all have max channel 1, so alpha is the object's coverage of a pixel).

Object tracking (per frame):
- mask = alpha > 0.3; 4-connected components (`scipy.ndimage.label`). A component is *plausible*
  when its pixel count lies in [0.35 x smallest shape area, 2 x largest shape area] (6.3..72 px at 16).
- The object is the plausible component with the largest alpha mass in the first frame that has one;
  in later frames the plausible component nearest to the previous object centroid. A frame with no
  plausible component has no object ("absent").
- region R = the object's component grown by one pixel (takes in the anti-aliased edge);
  centroid = alpha-weighted mean of pixel centres (i + 0.5, j + 0.5) over R (the renderer's
  coordinates, so a clean frame gives back the exact centre); colour = sum(rgb) / sum(alpha) over
  the pixels of R with alpha >= 0.5 (exact for a clean frame, little moved by noise).
- template IoU: soft IoU sum(min)/sum(max) between alpha on R and each shape rendered at the centroid.
Per-frame terms are averaged over present frames (0 when no frame has an object).

VQ, visual quality = mean of
- background: b = mean alpha outside R (whole frame when absent), score exp(-b / 0.02), over all frames;
- one object: pixels of the object's component / pixels of the whole mask;
- crispness: e = sum over R or the template of mean_rgb |frame - colour x best template| / template area
  (best = highest-IoU shape, whichever it is), score exp(-e / 0.15). Noise, blur and smear raise e.
MQ, motion quality = mean of
- persistence: fraction of frames with an object;
- speed: m = |least-squares velocity of the centroid track| over present frames (px/frame),
  score exp(-ln(m / v)^2 / (2 x 0.3^2)) with v the asked speed (the other speed scores 0.07);
  0 with fewer than 2 present frames;
- smoothness: J = mean |c[t+1] - 2c[t] + c[t-1]| over consecutive present frames (px), and the
  coefficient of variation of the object's alpha mass over present frames; score
  exp(-J / 1.0 - cv / 0.2); 0 without three consecutive present frames (T = 2: J = 0).
TA, text alignment = mean of
- colour: d = |measured colour - asked colour| (RGB in [0, 1]), score exp(-(d / 0.3)^2);
- shape: softmax over shapes of IoU / 0.05, the probability of the asked shape;
- direction: D = least-squares velocity x (T - 1) (the displacement); with u the asked unit direction,
  score clip((D.u - |D x u|) / (travel / 2), 0, 1), travel = asked speed x (T - 1): full motion the
  asked way (at either speed) scores 1, opposite, perpendicular, diagonal or no motion score 0.
overall = (VQ + MQ + TA) / 3. VQ does not read the prompt; MQ reads only its speed.

Reference numbers (tests/rewards/test_oracle.py): true renders of all 168 prompts 0.998 overall
(each dimension >= 0.997); default-flaw SFT data 0.81 (VQ 0.85, MQ 0.76, TA 0.82); uniform noise 0.0;
all black 0.11. `score_batch` takes ~0.4 s for 512 clips of 8 x 16 x 16 on one core.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from rewards.world import COLOURS, DIRECTIONS, SHAPES, Prompt, as_prompt, from_uint8, shape_alpha, speed_px

MASK_THRESHOLD = 0.3
AREA_RANGE = (0.35, 2.0)  # x smallest / largest shape area
BACKGROUND_SCALE = 0.02
CRISP_SCALE = 0.15
SPEED_LOG_STD = 0.3
JERK_SCALE_PX = 1.0
AREA_CV_SCALE = 0.2
COLOUR_SCALE = 0.3
SHAPE_TEMPERATURE = 0.05
DIMENSIONS = ("vq", "mq", "ta", "overall")
TERMS = {
    "vq": ("background", "one_object", "crispness"),
    "mq": ("persistence", "speed", "smoothness"),
    "ta": ("colour", "shape", "direction"),
}

_CROSS = np.zeros((3, 3, 3), bool)
_CROSS[1] = ndimage.generate_binary_structure(2, 1)  # 4-connected inside a frame, never across frames
_GROW = np.zeros((3, 3, 3), bool)
_GROW[1] = True  # 3x3 dilation inside a frame


def _as_videos(videos: np.ndarray) -> np.ndarray:
    """uint8 or float [N, T, H, W, 3] -> float32 in [0, 1]."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[2] != videos.shape[3] or videos.shape[1] < 2:
        raise ValueError(f"expected videos [N, T, H, W, 3] with T >= 2 and H == W, got shape {videos.shape}")
    if videos.dtype == np.uint8:
        return from_uint8(videos)
    videos = videos.astype(np.float32, copy=False)
    if not np.isfinite(videos).all():
        raise ValueError("videos contain NaN or inf")
    return np.clip(videos, 0.0, 1.0)


def _track_object(alpha: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha [N, T, H, W] -> (object component bool [N, T, H, W], present bool [N, T], mask bool [N, T, H, W])."""
    N, T = alpha.shape[:2]
    mask = alpha > MASK_THRESHOLD
    labels, count = ndimage.label(mask.reshape(N * T, size, size), structure=_CROSS)
    flat = labels.ravel()
    pixels = np.bincount(flat, minlength=count + 1).astype(np.float64)
    mass = np.bincount(flat, weights=alpha.ravel(), minlength=count + 1)
    rows = np.broadcast_to(np.arange(size)[None, :, None] + 0.5, labels.shape).ravel()
    cols = np.broadcast_to(np.arange(size)[None, None, :] + 0.5, labels.shape).ravel()
    safe = np.maximum(pixels, 1)
    centre = np.stack([np.bincount(flat, rows, count + 1) / safe, np.bincount(flat, cols, count + 1) / safe], 1)
    frame_of = np.zeros(count + 1, dtype=np.int64)
    frame_of[flat] = np.repeat(np.arange(N * T), size * size)
    areas = [shape_alpha(s, np.array([size / 2, size / 2]), size).sum() for s in SHAPES]
    plausible = (pixels >= AREA_RANGE[0] * min(areas)) & (pixels <= AREA_RANGE[1] * max(areas))
    plausible[0] = False  # label 0 is the background
    clip_of, t_of = frame_of // T, frame_of % T

    chosen = np.zeros((N, T), dtype=np.int64)  # 0 = absent
    prev = np.full((N, 2), np.nan)
    for t in range(T):
        cand = np.flatnonzero(plausible & (t_of == t))
        if cand.size == 0:
            continue
        n = clip_of[cand]
        dist = np.linalg.norm(centre[cand] - prev[n], axis=1)
        key = np.where(np.isnan(dist), -mass[cand], dist)  # first sighting: heaviest; then: nearest
        order = np.lexsort((key, n))
        first = np.ones(order.size, bool)
        first[1:] = n[order][1:] != n[order][:-1]
        best = cand[order[first]]
        chosen[clip_of[best], t] = best
        prev[clip_of[best]] = centre[best]
    component = (labels == chosen.reshape(-1)[:, None, None]) & (chosen.reshape(-1)[:, None, None] > 0)
    return component.reshape(N, T, size, size), chosen > 0, mask


def _present_mean(values: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Mean over present frames of [N, T] values; 0 for a clip with none."""
    k = present.sum(1)
    return np.where(k > 0, (values * present).sum(1) / np.maximum(k, 1), 0.0)


def _velocity(centroids: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares velocity [N, 2] (px/frame) of a centroid track over present frames; ok [N] when >= 2."""
    T = present.shape[1]
    w = present.astype(np.float64)
    k = np.maximum(w.sum(1, keepdims=True), 1)
    t = np.arange(T, dtype=np.float64)[None, :]
    tc = t - (w * t).sum(1, keepdims=True) / k
    c = np.where(present[..., None], centroids, 0.0)
    cc = c - (w[..., None] * c).sum(1, keepdims=True) / k[..., None]
    var = (w * tc ** 2).sum(1)
    v = (w[..., None] * tc[..., None] * cc).sum(1) / np.maximum(var, 1e-12)[:, None]
    return v, present.sum(1) >= 2


def score_terms(videos: np.ndarray, prompts: list[Prompt | str]) -> dict[str, np.ndarray]:
    """The nine oracle terms of videos [N, T, H, W, 3] (float in [0, 1] or uint8) against N prompts.

    Returns {name: float64 [N] in [0, 1]} for the names in `TERMS` (see the module docstring).
    """
    videos = _as_videos(videos)
    prompts = [as_prompt(p) for p in prompts]
    N, T, size = videos.shape[0], videos.shape[1], videos.shape[2]
    if len(prompts) != N:
        raise ValueError(f"expected {N} prompts (one per video), got {len(prompts)}")
    px = size / 16.0
    alpha = videos.max(-1)
    component, present, mask = _track_object(alpha, size)
    region = ndimage.binary_dilation(component.reshape(N * T, size, size), structure=_GROW).reshape(component.shape)

    # per-frame measurements on the object region
    a_r = alpha * region
    mass = a_r.sum((2, 3))
    safe = np.maximum(mass, 1e-9)
    grid = np.arange(size) + 0.5
    centroids = np.stack([(a_r.sum(3) * grid).sum(2) / safe, (a_r.sum(2) * grid).sum(2) / safe], -1)  # [N, T, 2]
    core = region & (alpha >= 0.5)  # colour from well-covered pixels: edge pixels are mostly noise when noisy
    colour = (videos * core[..., None]).sum((2, 3)) / np.maximum((alpha * core).sum((2, 3)), 1e-9)[..., None]

    # templates of every shape at the measured centroid, present frames only
    idx = np.flatnonzero(present.ravel())
    iou = np.zeros((N * T, len(SHAPES)))
    crisp_frame = np.zeros(N * T)
    if idx.size:
        a_p = a_r.reshape(N * T, size, size)[idx]
        templates = np.stack([shape_alpha(s, centroids.reshape(-1, 2)[idx], size) for s in SHAPES], 1)  # [K, 3, H, W]
        iou[idx] = np.minimum(a_p[:, None], templates).sum((2, 3)) / np.maximum(
            np.maximum(a_p[:, None], templates).sum((2, 3)), 1e-9)
        best = templates[np.arange(idx.size), iou[idx].argmax(1)]  # [K, H, W]
        frames = videos.reshape(N * T, size, size, 3)[idx]
        recon = colour.reshape(-1, 3)[idx][:, None, None, :] * best[..., None]
        support = region.reshape(N * T, size, size)[idx] | (best > 0)
        err = (np.abs(frames - recon).mean(-1) * support).sum((1, 2)) / np.maximum(best.sum((1, 2)), 1e-9)
        crisp_frame[idx] = np.exp(-err / CRISP_SCALE)
    iou = iou.reshape(N, T, len(SHAPES))

    # VQ
    outside = ~region
    background = (alpha * outside).sum((2, 3)) / np.maximum(outside.sum((2, 3)), 1)
    bg_score = np.exp(-background / BACKGROUND_SCALE).mean(1)
    one_object = _present_mean(component.sum((2, 3)) / np.maximum(mask.sum((2, 3)), 1), present)
    crisp = _present_mean(crisp_frame.reshape(N, T), present)

    # MQ
    asked_speed = np.array([speed_px(p.speed, size) for p in prompts], dtype=np.float64)
    asked_dir = np.array([DIRECTIONS[p.direction] for p in prompts], dtype=np.float64).reshape(N, 2)
    velocity, moving_ok = _velocity(centroids, present)
    m = np.linalg.norm(velocity, axis=1)
    speed = np.where(moving_ok, np.exp(-np.log(np.maximum(m, 1e-6) / asked_speed) ** 2 / (2 * SPEED_LOG_STD ** 2)), 0.0)
    triple = present[:, 2:] & present[:, 1:-1] & present[:, :-2]
    jerk = np.linalg.norm(centroids[:, 2:] - 2 * centroids[:, 1:-1] + centroids[:, :-2], axis=-1)
    mean_jerk = (jerk * triple).sum(1) / np.maximum(triple.sum(1), 1)
    mean_mass = _present_mean(mass, present)
    mass_sd = np.sqrt(_present_mean((mass - mean_mass[:, None]) ** 2, present))
    cv = mass_sd / np.maximum(mean_mass, 1e-9)
    enough = triple.any(1) if T >= 3 else present.all(1)  # a 2-frame clip has no jerk to measure
    smooth = np.where(enough, np.exp(-mean_jerk / (JERK_SCALE_PX * px) - cv / AREA_CV_SCALE), 0.0)
    persistence = present.mean(1)

    # TA
    target = np.array([COLOURS[p.colour] for p in prompts], dtype=np.float64).reshape(N, 3)
    dist = np.linalg.norm(colour - target[:, None, :], axis=-1)
    colour_score = _present_mean(np.exp(-(dist / COLOUR_SCALE) ** 2), present)
    logits = iou / SHAPE_TEMPERATURE
    prob = np.exp(logits - logits.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    asked_shape = np.array([SHAPES.index(p.shape) for p in prompts], dtype=np.int64)
    shape_score = _present_mean(np.take_along_axis(prob, asked_shape[:, None, None], 2)[..., 0], present)
    displacement = velocity * (T - 1)
    along = (displacement * asked_dir).sum(1)
    across = np.abs(displacement[:, 0] * asked_dir[:, 1] - displacement[:, 1] * asked_dir[:, 0])
    travel = asked_speed * (T - 1)
    direction = np.where(moving_ok, np.clip((along - across) / (travel / 2), 0.0, 1.0), 0.0)
    return {"background": bg_score, "one_object": one_object, "crispness": crisp,
            "persistence": persistence, "speed": speed, "smoothness": smooth,
            "colour": colour_score, "shape": shape_score, "direction": direction}


def score_batch(videos: np.ndarray, prompts: list[Prompt | str]) -> dict[str, np.ndarray]:
    """Oracle scores of videos [N, T, H, W, 3] (float in [0, 1] or uint8) against N prompts.

    Returns {"vq", "mq", "ta", "overall"} -> float64 [N] in [0, 1]; each dimension is the mean of its
    three `TERMS`, overall the mean of the three dimensions.
    """
    return dimension_scores(score_terms(videos, prompts))


def dimension_scores(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"vq", "mq", "ta", "overall"} from `score_terms`' output: each dimension the mean of its `TERMS`."""
    out = {dim: np.mean([terms[t] for t in names], axis=0) for dim, names in TERMS.items()}
    out["overall"] = (out["vq"] + out["mq"] + out["ta"]) / 3
    return out


def score(video: np.ndarray, prompt: Prompt | str) -> dict[str, float]:
    """Oracle scores of one video [T, H, W, 3] (float in [0, 1] or uint8) -> {"vq", "mq", "ta", "overall"}."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[1] != video.shape[2] or video.shape[0] < 2:
        raise ValueError(f"expected a video [T, H, W, 3] with T >= 2 and H == W, got shape {video.shape}")
    return {k: float(v[0]) for k, v in score_batch(video[None], [prompt]).items()}
