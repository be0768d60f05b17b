"""Simulated users, the engagement predictor, AUC and the SCRL feedback reward."""
import itertools

import numpy as np
import pytest
import torch

from rewards import world
from rewards.feedback import (ClickLog, UserPopulation, auc, feedback_reward, train_engagement,
                              video_features)


def _square_video():
    """Black 8x8 clip, 3 frames: a 2x2 pure-red square moving 1 px right per frame."""
    v = np.zeros((1, 3, 8, 8, 3), np.float32)
    for t in range(3):
        v[0, t, 2:4, 1 + t:3 + t, 0] = 1.0
    return v


def test_video_features_numbers():
    speed, size, brightness, warmth, saturation = video_features(_square_video())[0]
    assert speed == pytest.approx(1.0)
    assert size == pytest.approx(4 / 64)
    assert brightness == pytest.approx(4 * 0.299 / 64, abs=1e-6)
    assert warmth == pytest.approx(1.0) and saturation == pytest.approx(1.0)
    # the same clip as uint8 gives the same features
    assert np.allclose(video_features((_square_video() * 255).astype(np.uint8)), video_features(_square_video()))
    with pytest.raises(ValueError, match=r"\[N, T>=2, H, W, 3\]"):
        video_features(np.zeros((3, 8, 8, 3)))


def test_world_speeds_are_measured_in_pixels_per_frame():
    quick = world.render("a red square moving right quickly", (8.0, 4.0))
    slow = world.render("a red square moving right slowly", (8.0, 4.0))
    f = video_features(np.stack([quick, slow]))
    assert f[0, 0] == pytest.approx(1.0, abs=0.1)
    assert f[1, 0] == pytest.approx(0.5, abs=0.1)


def test_taste_prefers_fast_warm_large_regardless_of_prompt():
    pop = UserPopulation(seed=0, n_users=200)
    start = (8.0, 4.0)
    p = pop.click_probability(np.stack([
        world.render("a blue square moving right slowly", start),
        world.render("a blue square moving right quickly", start),
        world.render("a red square moving right slowly", start),
    ]))
    assert p[1] > p[0] + 0.05  # faster
    assert p[2] > p[0] + 0.05  # warmer and brighter
    # a large extra copy of the object is clicked more even though it breaks alignment
    video = world.render("a red circle moving down quickly", (4.0, 5.0))
    extra = world.degrade(video, "extra", 1.0, np.random.default_rng(0))
    p_true, p_extra = pop.click_probability(np.stack([video, extra]))
    assert p_extra > p_true + 0.05


def test_impressions_are_sparse_bernoulli_and_reproducible():
    rng = np.random.default_rng(1)
    prompts = [world.all_prompts()[i] for i in rng.integers(0, 168, size=500)]
    videos = np.stack([world.render(p, world.random_start(p, rng)) for p in prompts])
    videos = np.concatenate([videos] * 3)  # 1500 clips
    texts = [p.text for p in prompts] * 3
    pop = UserPopulation(seed=3, n_users=50)
    clicks = pop.impressions(videos, texts, np.random.default_rng(7), impression_rate=0.3)
    shown = ~np.isnan(clicks)
    assert shown.mean() == pytest.approx(0.3, abs=0.035)  # 3 sigma at n = 1500
    assert set(np.unique(clicks[shown])) <= {0.0, 1.0}
    expected = pop.click_probability(videos[shown]).mean()
    assert clicks[shown].mean() == pytest.approx(expected, abs=0.05)
    again = pop.impressions(videos, texts, np.random.default_rng(7), impression_rate=0.3)
    assert np.array_equal(clicks, again, equal_nan=True)
    assert np.isnan(pop.impressions(videos[:10], texts[:10], np.random.default_rng(0), 0.0)).all()
    with pytest.raises(ValueError, match="prompts"):
        pop.impressions(videos[:3], texts[:2], np.random.default_rng(0))


def test_auc_numbers_and_ties():
    assert auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auc(np.array([0.5, 0.5, 0.5, 0.9]), np.array([0, 1, 0, 1])) == pytest.approx(0.75)
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([1, 1, 0])) == pytest.approx(1.0)
    assert auc(np.array([3.0, 2.0, 1.0]), np.array([0, 0, 1])) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, size=60).astype(float), rng.integers(0, 2, size=60)
    pos, neg = s[y == 1], s[y == 0]
    brute = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in itertools.product(pos, neg)])
    assert auc(s, y) == pytest.approx(brute)
    with pytest.raises(ValueError, match="both classes"):
        auc(np.array([0.1, 0.2]), np.array([1, 1]))


def test_feedback_reward_mixes_real_clicks_where_present():
    r = feedback_reward(np.array([0.2, 0.6, 0.9]), np.array([np.nan, 1.0, 0.0]), mix=0.5)
    assert r.tolist() == pytest.approx([0.2, 0.8, 0.45])
    r = feedback_reward(np.array([0.2, 0.6]), np.array([np.nan, 1.0]), mix=1.0)
    assert r.tolist() == pytest.approx([0.2, 1.0])
    with pytest.raises(ValueError, match="mix"):
        feedback_reward(np.zeros(2), np.zeros(2), mix=1.5)
    with pytest.raises(ValueError, match="clicks"):
        feedback_reward(np.zeros(2), np.array([0.5, np.nan]))
    with pytest.raises(ValueError, match=r"\[N\]"):
        feedback_reward(np.zeros(2), np.zeros(3))


def _logged_clips(n, prompts, rng):
    """True renders and degraded ones (a third untouched), as real generators would produce."""
    videos = []
    for _ in range(n):
        p = prompts[rng.integers(len(prompts))]
        v = world.render(p, world.random_start(p, rng))
        kind = rng.choice(["none"] * 3 + list(world.DEGRADATIONS))
        videos.append(v if kind == "none" else world.degrade(v, kind, rng.uniform(0.3, 1.0), rng))
    return np.stack(videos)


@pytest.mark.slow
def test_engagement_predictor_beats_a_constant_on_heldout_logs():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pop = UserPopulation(seed=0, n_users=50)
    train = _logged_clips(1000, world.train_prompts(), rng)
    test = _logged_clips(500, world.heldout_prompts(), rng)
    train_clicks = pop.impressions(train, ["-"] * len(train), rng, impression_rate=0.8)
    test_clicks = pop.impressions(test, ["-"] * len(test), rng, impression_rate=1.0)
    model = train_engagement(ClickLog(world.to_uint8(train), train_clicks), steps=150, batch_size=64,
                             seed=0, progress=False)
    pred = model.predict(test)
    assert pred.shape == (500,) and ((pred > 0) & (pred < 1)).all()
    assert auc(np.full(500, 0.3), test_clicks) == 0.5  # a constant predictor
    assert auc(pred, test_clicks) > 0.62
    # the dense prediction tracks the users' true click probability: measured 0.49 on logs with all twelve degradations
    # (0.66 with the eight before grow, swell, fast and shape were added: big, fast objects the users' taste saturates on
    # are harder to rank; real runs' held-out AUC fell from 0.72 to 0.65 at seeds 1 and 2)
    assert np.corrcoef(pred, pop.click_probability(test))[0, 1] > 0.4
