"""rewards/oracle.py: truth scores ~1, garbage ~0, each flaw lowers its own dimension (margins measured)."""
import dataclasses

import numpy as np
import pytest

from rewards.oracle import DIMENSIONS, TERMS, score, score_batch, score_terms
from rewards.world import (
    COLOURS,
    SHAPES,
    FlawConfig,
    all_prompts,
    degrade,
    random_start,
    render,
    sft_clip,
    sft_dataset,
    to_uint8,
)

NO_FLAWS = FlawConfig(p_wrong_direction=0, p_jitter=0, p_colour_drift=0, p_noise=0, p_wrong_speed=0)


def truth(prompts, seed=0, frames=8, size=16):
    rng = np.random.default_rng(seed)
    return np.stack([render(p, random_start(p, rng, frames, size), frames, size) for p in prompts])


def means(videos, prompts):
    out = {k: float(v.mean()) for k, v in score_batch(videos, prompts).items()}
    out.update({k: float(v.mean()) for k, v in score_terms(videos, prompts).items()})
    return out


@pytest.fixture(scope="module")
def fifty():
    """50 clean clips over random prompts and their mean scores (the baseline every flaw is compared to)."""
    rng = np.random.default_rng(11)
    prompts = [all_prompts()[i] for i in rng.integers(168, size=50)]
    videos = np.stack([sft_clip(p, rng, flaws=NO_FLAWS)[0] for p in prompts])
    return videos, prompts, means(videos, prompts)


def test_rendered_truth_scores_near_one_for_every_prompt():
    prompts = all_prompts()
    videos = truth(prompts)
    scores = score_batch(videos, prompts)
    assert set(scores) == set(DIMENSIONS)
    assert scores["overall"].mean() >= 0.95  # measured 0.998
    for dim in ("vq", "mq", "ta"):
        assert scores[dim].mean() >= 0.93, dim  # measured >= 0.997
        assert scores[dim].min() >= 0.9, dim
    np.testing.assert_allclose(scores["overall"], (scores["vq"] + scores["mq"] + scores["ta"]) / 3)
    # uint8 input gives the same verdict; other sizes and lengths too
    np.testing.assert_allclose(score_batch(to_uint8(videos), prompts)["overall"], scores["overall"], atol=0.02)
    for frames, size in ((4, 16), (8, 32)):
        assert score_batch(truth(prompts[::5], 1, frames, size), prompts[::5])["overall"].min() >= 0.95


def test_noise_and_black_score_near_zero():
    prompts = all_prompts()[::4]
    rng = np.random.default_rng(0)
    noise = score_batch(rng.uniform(size=(len(prompts), 8, 16, 16, 3)).astype(np.float32), prompts)
    assert noise["overall"].max() <= 0.15  # measured 0.0
    black = score_batch(np.zeros((len(prompts), 8, 16, 16, 3), np.float32), prompts)
    assert black["overall"].max() <= 0.2  # measured 0.111: only the clean background counts
    assert black["mq"].max() == 0.0 and black["ta"].max() == 0.0


def test_vq_ignores_the_prompt_and_text_mismatch_hits_only_ta(fifty):
    videos, prompts, base = fifty
    colours = list(COLOURS)
    wrong_colour = [dataclasses.replace(p, colour=colours[(colours.index(p.colour) + 1) % 7]) for p in prompts]
    wrong_shape = [dataclasses.replace(p, shape=SHAPES[(SHAPES.index(p.shape) + 1) % 3]) for p in prompts]
    right = score_batch(videos, prompts)
    for wrong, term in ((wrong_colour, "colour"), (wrong_shape, "shape")):
        got = score_batch(videos, wrong)
        np.testing.assert_array_equal(got["vq"], right["vq"])
        np.testing.assert_array_equal(got["mq"], right["mq"])  # same direction and speed asked
        m = means(videos, wrong)
        assert m[term] <= 0.05, (term, m[term])  # measured 0.00 / 0.01
        assert base["ta"] - m["ta"] >= 0.25, term  # measured 0.33


def flawed(fifty, **rates):
    videos, prompts, base = fifty
    rng = np.random.default_rng(5)
    clips = np.stack([sft_clip(p, rng, flaws=NO_FLAWS.model_copy(update=rates))[0] for p in prompts])
    return means(clips, prompts), base


def test_wrong_direction_zeroes_the_direction_term(fifty):
    m, base = flawed(fifty, p_wrong_direction=1.0)
    assert m["direction"] <= 0.02  # measured 0.00
    assert base["ta"] - m["ta"] >= 0.3  # measured 0.33
    assert abs(m["vq"] - base["vq"]) <= 0.02 and abs(m["mq"] - base["mq"]) <= 0.02


def test_jitter_lowers_mq(fifty):
    m, base = flawed(fifty, p_jitter=1.0)
    assert m["smoothness"] <= 0.35  # measured 0.19
    assert base["mq"] - m["mq"] >= 0.2  # measured 0.30
    assert abs(m["vq"] - base["vq"]) <= 0.02 and abs(m["ta"] - base["ta"]) <= 0.03


def test_wrong_speed_lowers_mq(fifty):
    m, base = flawed(fifty, p_wrong_speed=1.0)
    assert m["speed"] <= 0.2  # measured 0.07 (the spec asks <= 0.5)
    assert base["mq"] - m["mq"] >= 0.25  # measured 0.31
    assert abs(m["vq"] - base["vq"]) <= 0.02 and abs(m["ta"] - base["ta"]) <= 0.02


def test_colour_drift_lowers_ta(fifty):
    m, base = flawed(fifty, p_colour_drift=1.0)
    assert m["colour"] <= 0.5  # measured 0.35
    assert base["ta"] - m["ta"] >= 0.15  # measured 0.22
    assert abs(m["vq"] - base["vq"]) <= 0.02 and abs(m["mq"] - base["mq"]) <= 0.02


def test_noise_lowers_vq_most(fifty):
    m, base = flawed(fifty, p_noise=1.0)
    vq_drop = base["vq"] - m["vq"]
    assert vq_drop >= 0.3  # measured 0.47
    assert base["mq"] - m["mq"] <= vq_drop / 3 and base["ta"] - m["ta"] <= vq_drop / 3  # measured 0.06, 0.02


def test_extra_object_lowers_vq_and_keeps_the_track(fifty):
    videos, prompts, base = fifty
    rng = np.random.default_rng(6)
    m = means(np.stack([degrade(v, "extra", 0.6, rng) for v in videos]), prompts)
    assert m["one_object"] <= 0.7  # measured 0.55: half the mask is the copy
    assert base["vq"] - m["vq"] >= 0.3  # measured 0.49
    assert abs(m["mq"] - base["mq"]) <= 0.05 and abs(m["ta"] - base["ta"]) <= 0.05  # the copy is not tracked


def test_motion_degradations_lower_mq_or_direction(fifty):
    videos, prompts, base = fifty
    rng = np.random.default_rng(7)
    frozen = means(np.stack([degrade(v, "freeze", 1.0, rng) for v in videos]), prompts)
    assert frozen["speed"] <= 0.01 and frozen["direction"] <= 0.01
    flicker = means(np.stack([degrade(v, "flicker", 1.0, rng) for v in videos]), prompts)
    assert flicker["persistence"] == pytest.approx(0.5)  # 4 of 8 frames have no object
    reverse = means(np.stack([degrade(v, "reverse", 1.0, rng) for v in videos]), prompts)
    assert reverse["direction"] <= 0.01 and abs(reverse["mq"] - base["mq"]) <= 0.01
    blur = means(np.stack([degrade(v, "blur", 1.0, rng) for v in videos]), prompts)
    assert blur["crispness"] <= 0.3 and base["vq"] - blur["vq"] >= 0.3  # measured 0.16, 0.43


def test_shape_grow_and_fast_degradations_lower_shape_or_speed(fifty):
    """What a generator drawn to big, fast objects does (a circle or triangle turned into a large square-ish blob,
    moving too fast) is seen by the oracle's shape and speed terms, so pairs with these degradations teach the reward
    model TA and MQ."""
    videos, prompts, base = fifty
    rng = np.random.default_rng(9)
    morphed = means(np.stack([degrade(v, "shape", 1.0, rng) for v in videos]), prompts)
    half = means(np.stack([degrade(v, "shape", 0.5, rng) for v in videos]), prompts)
    grown = means(np.stack([degrade(v, "grow", 0.5, rng) for v in videos]), prompts)
    assert base["shape"] >= 0.95 and morphed["shape"] <= 0.05  # measured 0.99, 0.005
    assert half["shape"] <= 0.6 and grown["shape"] <= 0.6  # measured 0.43, 0.42
    assert abs(morphed["colour"] - base["colour"]) <= 0.02 and abs(morphed["direction"] - base["direction"]) <= 0.02
    swollen = means(np.stack([degrade(v, "swell", 1.0, rng) for v in videos]), prompts)
    assert base["smoothness"] - swollen["smoothness"] >= 0.3  # the area changes over the clip; measured
    fast = means(np.stack([degrade(v, "fast", 1.0, rng) for v in videos]), prompts)
    assert base["speed"] - fast["speed"] >= 0.5  # twice the asked speed; measured


def test_vq_falls_strictly_with_noise_strength(fifty):
    videos, prompts, _ = fifty
    rng = np.random.default_rng(8)
    vq = [means(np.stack([degrade(v, "noise", s, rng) for v in videos]), prompts)["vq"] for s in (0.0, 0.05, 0.15, 0.3)]
    # measured 1.00, 0.80, 0.62, 0.51
    assert vq[0] - vq[1] >= 0.1 and vq[1] - vq[2] >= 0.1 and vq[2] - vq[3] >= 0.05


def test_sft_data_scores_clearly_below_truth_and_each_flaw_shows():
    videos, prompts = sft_dataset(200, seed=9)
    sft = means(videos, prompts)
    clean = means(truth(prompts, 9), prompts)
    assert clean["overall"] - sft["overall"] >= 0.12  # measured 0.998 vs 0.83
    for dim in ("vq", "mq", "ta"):
        assert clean[dim] - sft[dim] >= 0.08, dim  # measured 0.13, 0.22, 0.15
    rng = np.random.default_rng(10)
    rows = [sft_clip(prompts[i], rng) for i in range(200)]
    terms = score_terms(np.stack([r[0] for r in rows]), prompts)
    flags = {k: np.array([r[1][k] for r in rows]) for k in rows[0][1]}
    unflawed = ~np.any(list(flags.values()), axis=0)
    assert unflawed.sum() > 10
    overall = score_batch(np.stack([r[0] for r in rows]), prompts)["overall"]
    assert overall[unflawed].min() >= 0.95
    assert terms["direction"][flags["wrong_direction"]].mean() <= 0.05
    assert terms["speed"][flags["wrong_speed"]].mean() <= 0.2
    assert terms["colour"][flags["colour_drift"]].mean() <= 0.5
    assert terms["background"][flags["noise"]].mean() <= 0.1


def test_score_single_matches_batch_and_rejects_bad_input():
    prompts = all_prompts()[:3]
    videos = truth(prompts)
    batch = score_batch(videos, [p.text for p in prompts])  # text prompts are parsed
    single = score(videos[1], prompts[1])
    assert set(single) == set(DIMENSIONS)
    for k in DIMENSIONS:
        assert single[k] == pytest.approx(batch[k][1])
        assert 0.0 <= batch[k].min() and batch[k].max() <= 1.0
    assert set(score_terms(videos, prompts)) == {t for names in TERMS.values() for t in names}
    with pytest.raises(ValueError, match=r"expected a video \[T, H, W, 3\].*got shape \(8, 16, 16\)"):
        score(videos[0][..., 0], prompts[0])
    with pytest.raises(ValueError, match=r"expected videos \[N, T, H, W, 3\].*got shape \(8, 16, 16, 3\)"):
        score_batch(videos[0], prompts[:1])
    with pytest.raises(ValueError, match="expected 3 prompts"):
        score_batch(videos, prompts[:2])
    with pytest.raises(ValueError, match="NaN"):
        score_batch(np.full_like(videos, np.nan), prompts)
    with pytest.raises(ValueError, match="unknown colour 'purple'"):
        score(videos[0], "a purple square moving left slowly")
