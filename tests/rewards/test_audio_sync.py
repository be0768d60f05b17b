"""The audio-sync example reward: a beat track from the prompt's speed, and motion-to-beat synchrony."""

import numpy as np
import pytest

from rewards import world
from rewards.audio_sync import BeatSync, batch_extras, beat_track
from rewards.errors import DataError
from rewards.scorer import RewardScorer

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly", "a green triangle moving right slowly"]


def _truth(prompts, seed=0):
    rng = np.random.default_rng(seed)
    return np.stack([world.to_uint8(world.render(p, world.random_start(p, rng))) for p in prompts])


def test_the_beat_follows_the_prompts_speed():
    np.testing.assert_array_equal(beat_track(PROMPTS[0], 8), [1, 0, 1, 0, 1, 0, 1, 0])
    np.testing.assert_array_equal(beat_track(PROMPTS[1], 8), [1, 0, 0, 0, 1, 0, 0, 0])
    assert batch_extras(["beat"], PROMPTS, 8)["beat"].shape == (3, 8)


def test_motion_on_the_beat_scores_one_off_the_beat_less_and_still_zero():
    videos, ids = _truth(PROMPTS), ["a", "b", "c"]
    scorer = RewardScorer("python", callable="rewards.audio_sync:BeatSync")
    beat = batch_extras(["beat"], PROMPTS, 8)["beat"]
    on = scorer.score(videos, PROMPTS, ids, beat=beat)[:, 0]
    assert on.min() > 0.99  # the true renders travel 2 px a beat
    # the scorer hears the track, not the prompt: the other tempo (2x or 0.5x the speed) scores exp(-ln2^2/0.32) = 0.22
    off = scorer.score(videos, PROMPTS, ids, beat=beat[[1, 0, 0]])[:, 0]
    np.testing.assert_allclose(off, np.exp(-np.log(2) ** 2 / (2 * 0.4 ** 2)), atol=0.01)
    still = np.repeat(videos[:, :1], 8, axis=1)
    np.testing.assert_array_equal(scorer.score(still, PROMPTS, ids, beat=beat)[:, 0], 0.0)


def test_a_batch_without_a_beat_is_a_data_error_naming_a_sample():
    with pytest.raises(DataError, match="rollout.extras: \\[beat\\]") as err:
        BeatSync().score({"ids": ["x"], "videos": _truth(PROMPTS[:1]), "prompts": PROMPTS[:1]})
    assert err.value.sample_id == "x"
