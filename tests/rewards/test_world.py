"""rewards/world.py: prompt grammar, held-out split, renderer geometry, flawed SFT data, degradations."""
import numpy as np
import pytest
from pydantic import ValidationError
from scipy import ndimage

from rewards.world import (
    COLOURS,
    DEGRADATIONS,
    DIRECTIONS,
    NEIGHBOUR,
    SHAPES,
    SPEEDS,
    VOCAB,
    FlawConfig,
    Prompt,
    all_prompts,
    degrade,
    from_uint8,
    heldout_prompts,
    random_start,
    render,
    sft_clip,
    sft_dataset,
    shape_alpha,
    to_uint8,
    train_prompts,
)

NO_FLAWS = FlawConfig(p_wrong_direction=0, p_jitter=0, p_colour_drift=0, p_noise=0, p_wrong_speed=0)


def centroids(video):
    """Alpha-weighted centroid per frame [T, 2] in the renderer's pixel-centre coordinates."""
    a = video.max(-1)
    grid = np.arange(a.shape[1]) + 0.5
    m = a.sum((1, 2))
    return np.stack([(a.sum(2) * grid).sum(1) / m, (a.sum(1) * grid).sum(1) / m], 1)


# ---------------------------------------------------------------- prompts

def test_prompt_text_parse_round_trip_and_vocab():
    prompts = all_prompts()
    assert len(prompts) == 168 == len(set(prompts))
    assert prompts[0].text == "a red square moving left slowly"
    assert prompts[-1].text == "a white triangle moving down quickly"
    for p in prompts:
        assert Prompt.parse(p.text) == p
        assert set(p.text.split()) <= set(VOCAB)
    assert Prompt.parse("  A Red  Circle moving UP quickly ") == Prompt("red", "circle", "up", "quickly")
    assert VOCAB == sorted(VOCAB) and len(VOCAB) == len(set(VOCAB)) == 2 + 7 + 3 + 4 + 2
    assert {w for p in prompts for w in p.text.split()} == set(VOCAB)


@pytest.mark.parametrize("text, needle", [
    ("a purple square moving left slowly", "unknown colour 'purple'"),
    ("a red hexagon moving left slowly", "unknown shape 'hexagon'"),
    ("a red square moving sideways slowly", "unknown direction 'sideways'"),
    ("a red square moving left fast", "unknown speed 'fast'"),
    ("red square moving left slowly", "grammar"),
    ("a red square going left slowly", "grammar"),
])
def test_parse_names_the_bad_word_or_the_grammar(text, needle):
    with pytest.raises(ValueError, match=needle):
        Prompt.parse(text)


def test_prompt_fields_are_validated_and_frozen():
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        Prompt("orange", "square", "left", "slowly")
    p = Prompt("red", "square", "left", "slowly")
    with pytest.raises(AttributeError):
        p.colour = "blue"


def test_heldout_split_is_fixed_disjoint_and_covers_every_word():
    np.random.seed(123)
    held = heldout_prompts()
    np.random.seed(7)
    assert held == heldout_prompts()  # no RNG involved
    train = train_prompts()
    assert len(held) == 24 and len(set(held)) == 24 and len(train) == 144
    assert set(held).isdisjoint(train) and set(held) | set(train) == set(all_prompts())
    # every (shape, direction, speed) triple is held out exactly once, with one colour
    assert len({(p.shape, p.direction, p.speed) for p in held}) == 24
    for field, words in (("colour", COLOURS), ("shape", SHAPES), ("direction", DIRECTIONS), ("speed", SPEEDS)):
        counts = {w: sum(getattr(p, field) == w for p in train) for w in words}
        assert min(counts.values()) >= 20, (field, counts)


# ---------------------------------------------------------------- renderer

def test_shape_areas_and_triangle_points_up():
    # 6 px objects at 16 px: square 36, circle pi*9 = 28.27 (to the 4x4 supersampling), triangle 6*6/2 = 18
    areas = {s: shape_alpha(s, np.array([8.0, 8.0]), 16).sum() for s in SHAPES}
    assert areas["square"] == pytest.approx(36.0, abs=1e-4)
    assert areas["circle"] == pytest.approx(np.pi * 9, abs=0.6)
    assert areas["triangle"] == pytest.approx(18.0, abs=0.3)
    tri = shape_alpha("triangle", np.array([8.0, 8.0]), 16)
    widths = tri.sum(1)[tri.sum(1) > 0]
    assert np.all(np.diff(widths) > 0)  # wider row by row going down: the apex is up
    assert shape_alpha("square", np.array([8.0, 8.0]), 32).sum() == pytest.approx(144.0, abs=1e-4)  # scales with size


@pytest.mark.parametrize("prompt, velocity", [
    ("a red square moving left slowly", (0.0, -0.5)),
    ("a green circle moving right quickly", (0.0, 1.0)),
    ("a blue triangle moving up slowly", (-0.5, 0.0)),
    ("a white square moving down quickly", (1.0, 0.0)),
])
def test_render_moves_the_centroid_as_asked(prompt, velocity):
    start = (8.0 - 3.5 * velocity[0], 8.0 - 3.5 * velocity[1])  # the clip is centred in the frame
    video = render(prompt, start)
    assert video.shape == (8, 16, 16, 3) and video.dtype == np.float32
    assert video.min() >= 0.0 and video.max() <= 1.0
    c = centroids(video)
    # exact for the (separable) square; circle and triangle centroids measured on pixels wobble by < 0.05 px
    atol = 1e-3 if "square" in prompt else 0.05
    np.testing.assert_allclose(c[0], start, atol=atol)
    np.testing.assert_allclose(c[1:] - c[:-1], np.broadcast_to(velocity, (7, 2)), atol=atol)
    assert np.all(np.abs(np.diff(video, axis=0)).max((1, 2, 3)) > 0.2)  # sub-pixel motion is visible
    colour = np.asarray(COLOURS[Prompt.parse(prompt).colour])
    lit = video.max(-1) > 0
    np.testing.assert_allclose(video[lit] / video.max(-1)[lit][:, None], np.broadcast_to(colour, (lit.sum(), 3)),
                               atol=1e-6)  # pure colour on a black background


def test_render_start_is_the_centroid_and_speed_scales_with_size():
    c = centroids(render("a red square moving right slowly", (10.25, 12.5), frames=4, size=32))
    np.testing.assert_allclose(c, [[10.25, 12.5], [10.25, 13.5], [10.25, 14.5], [10.25, 15.5]], atol=1e-3)


def test_random_start_keeps_the_whole_object_in_frame():
    rng = np.random.default_rng(0)
    full = {"square": 36.0, "circle": np.pi * 9, "triangle": 18.0}
    starts = []
    for p in all_prompts():
        for _ in range(3):
            start = random_start(p, rng)
            starts.append(start)
            mass = render(p, start).max(-1).sum((1, 2))
            np.testing.assert_allclose(mass, full[p.shape], atol=1.0)  # nothing cut off (4x4 sampling: +-0.75)
    assert np.ptp(np.asarray(starts), axis=0).min() > 5  # starts actually vary
    with pytest.raises(ValueError, match="does not fit"):
        random_start("a red square moving left quickly", rng, frames=12, size=16)


def test_uint8_round_trip():
    video = render("a cyan circle moving up slowly", (9.3, 7.7))
    u = to_uint8(video)
    assert u.dtype == np.uint8
    np.testing.assert_allclose(from_uint8(u), video, atol=0.5 / 255 + 1e-7)
    with pytest.raises(ValueError, match="uint8"):
        from_uint8(video)


# ---------------------------------------------------------------- SFT data

def test_flaw_config_rejects_bad_values_naming_the_field():
    with pytest.raises(ValidationError, match="p_noise"):
        FlawConfig(p_noise=1.5)
    with pytest.raises(ValidationError, match="p_typo"):
        FlawConfig(p_typo=0.1)


def test_sft_clip_without_flaws_is_a_true_render():
    rng = np.random.default_rng(1)
    for p in train_prompts()[::7]:
        video, applied = sft_clip(p, rng, flaws=NO_FLAWS)
        assert not any(applied.values())
        c = centroids(video)
        step = np.asarray(DIRECTIONS[p.direction]) * SPEEDS[p.speed] * 16
        np.testing.assert_allclose(c[1:] - c[:-1], np.broadcast_to(step, (7, 2)), atol=0.05)
        # the true render from the measured start, up to edge coverage (start measured to ~0.05 px)
        np.testing.assert_allclose(video, render(p, tuple(c[0])), atol=0.2)
        assert video.max(-1).sum((1, 2)) == pytest.approx(np.full(8, video[0].max(-1).sum()), abs=0.6)


def test_each_sft_flaw_does_what_it_says():
    rng = np.random.default_rng(2)
    p = Prompt("red", "square", "right", "slowly")
    wrong_dir = sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update={"p_wrong_direction": 1.0}))
    assert wrong_dir[1]["wrong_direction"]
    assert (centroids(wrong_dir[0])[-1] - centroids(wrong_dir[0])[0])[1] <= 1e-6  # never rightwards

    fast = centroids(sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update={"p_wrong_speed": 1.0}))[0])
    np.testing.assert_allclose(np.diff(fast, axis=0), np.broadcast_to([0.0, 1.0], (7, 2)), atol=1e-3)

    drift, _ = sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update={"p_colour_drift": 1.0}))
    last = drift[-1][drift[-1].max(-1) > 0.99].mean(0)
    np.testing.assert_allclose(last, [1.0, 0.8, 0.0], atol=1e-5)  # 80 % of the way to yellow
    assert NEIGHBOUR["red"] == "yellow"

    jerks = []
    for _ in range(40):
        video, applied = sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update={"p_jitter": 1.0}))
        jerks.append(np.diff(centroids(video), 2, axis=0))
    # second differences of iid N(0, 0.6^2) jitter have std 0.6 * sqrt(6) = 1.47 px (less where clipped)
    assert 1.1 < np.std(np.concatenate(jerks)) < 1.6

    noisy, _ = sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update={"p_noise": 1.0}))
    clean_bg = ndimage.binary_dilation(noisy.max(-1) > 0.5, iterations=2)
    # E[clip(N(0, 0.08), 0, 1)] = 0.08 / sqrt(2 pi) = 0.0319
    assert noisy[~clean_bg].mean() == pytest.approx(0.08 / np.sqrt(2 * np.pi), abs=0.004)


def test_observed_flaw_rates_match_the_config():
    rng = np.random.default_rng(3)
    prompts = train_prompts()
    for flaws in (FlawConfig(), FlawConfig(p_wrong_direction=0.6, p_jitter=0.1, p_colour_drift=0.0, p_noise=0.9,
                                           p_wrong_speed=0.5)):
        n = 1500
        applied = [sft_clip(prompts[i % len(prompts)], rng, flaws=flaws)[1] for i in range(n)]
        for name in applied[0]:
            rate = getattr(flaws, f"p_{name}")
            observed = np.mean([a[name] for a in applied])
            assert abs(observed - rate) <= 4 * np.sqrt(max(rate * (1 - rate), 1e-12) / n), (name, observed, rate)


def test_sft_dataset_is_seeded_and_uses_training_prompts_only():
    videos, prompts = sft_dataset(1500, seed=4)
    assert videos.shape == (1500, 8, 16, 16, 3) and videos.dtype == np.float32
    assert 0.0 <= videos.min() and videos.max() <= 1.0
    assert set(prompts) == set(train_prompts())  # uniform over all 144 and none of the held-out ones
    again, prompts2 = sft_dataset(20, seed=4)
    np.testing.assert_array_equal(again, videos[:20])
    assert prompts2 == prompts[:20]
    assert not np.array_equal(sft_dataset(20, seed=5)[0], again)
    small, chosen = sft_dataset(30, seed=0, frames=4, size=24, prompts=["a red square moving left slowly"])
    assert small.shape == (30, 4, 24, 24, 3) and set(chosen) == {Prompt("red", "square", "left", "slowly")}


# ---------------------------------------------------------------- degradations

@pytest.fixture
def clip():
    return render("a green square moving right quickly", (8.0, 5.0))


def test_degrade_strength_zero_is_identity(clip):
    rng = np.random.default_rng(0)
    for kind in DEGRADATIONS:
        np.testing.assert_allclose(degrade(clip, kind, 0.0, rng), clip, atol=1e-6, err_msg=kind)


def test_degrade_rejects_bad_input(clip):
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="unknown degradation kind 'smudge'"):
        degrade(clip, "smudge", 0.5, rng)
    with pytest.raises(ValueError, match="strength"):
        degrade(clip, "noise", 1.5, rng)
    with pytest.raises(ValueError, match=r"expected a video \[T, H, W, 3\].*got shape \(8, 16, 16\)"):
        degrade(clip[..., 0], "noise", 0.5, rng)


def test_degrade_kinds_at_full_strength(clip):
    rng = np.random.default_rng(0)
    c = centroids(clip)
    np.testing.assert_array_equal(degrade(clip, "reverse", 1.0, rng), clip[::-1])
    np.testing.assert_array_equal(degrade(clip, "freeze", 1.0, rng), np.repeat(clip[:1], 8, 0))
    np.testing.assert_allclose(centroids(degrade(clip, "reverse", 0.5, rng)), np.repeat(c[4:5], 8, 0))  # stands still

    flicker = degrade(clip, "flicker", 1.0, rng)
    assert (flicker.max((1, 2, 3)) < 1e-6).sum() == 4  # the object vanishes from T/2 frames

    two = degrade(clip, "extra", 1.0, rng)
    assert all(ndimage.label(f.max(-1) > 0.3)[1] == 2 for f in two)

    recoloured = degrade(clip, "colour", 1.0, rng)
    np.testing.assert_allclose(recoloured[clip.max(-1) > 0.99].mean(0), COLOURS[NEIGHBOUR["green"]], atol=1e-6)

    blurred = degrade(clip, "blur", 1.0, rng)
    assert blurred.max() < 0.9 and blurred.sum() == pytest.approx(clip.sum(), rel=0.02)  # spread, not lost

    shaken = degrade(clip, "jitter", 1.0, rng)
    assert np.abs(np.diff(centroids(shaken), 2, axis=0)).max() > 0.5

    morphed = degrade(clip, "shape", 1.0, rng)  # a square drawn as a circle or a triangle, same colour and track
    np.testing.assert_allclose(centroids(morphed)[:, 1], c[:, 1], atol=0.05)
    iou = np.minimum(morphed.max(-1), clip.max(-1)).sum() / np.maximum(morphed.max(-1), clip.max(-1)).sum()
    assert iou < 0.8 and np.abs(morphed[morphed.max(-1) > 0.99] - COLOURS["green"]).max() < 1e-5

    grown = degrade(clip, "grow", 0.5, rng)  # scaled 1.25x about the centroid: area x 1.5625, same track
    assert grown.max(-1).sum() == pytest.approx(1.5625 * clip.max(-1).sum(), rel=0.03)
    np.testing.assert_allclose(centroids(grown), c, atol=0.05)
    swollen = degrade(clip, "swell", 0.5, rng)  # frame t scaled by 1 + 0.25 t / 7
    np.testing.assert_allclose(swollen.max(-1).sum((1, 2)) / clip.max(-1).sum((1, 2)), (1 + np.arange(8) / 28) ** 2,
                               rtol=0.03)

    slow = render("a green square moving right slowly", (8.0, 4.0))  # 0.5 px a frame; twice that stays in view
    start = centroids(slow)
    np.testing.assert_allclose(centroids(degrade(slow, "fast", 1.0, rng)) - start[0], 2 * (start - start[0]), atol=0.05)

    grey = np.full((8, 16, 16, 3), 0.5, np.float32)
    assert np.std(degrade(grey, "noise", 0.5, rng) - grey) == pytest.approx(0.15, abs=0.005)  # std 0.3 * strength
