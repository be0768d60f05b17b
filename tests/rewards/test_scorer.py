"""RewardScorer: each kind against its module computed directly, and every bad sample named by a DataError."""

import json
import zlib

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from rewards import oracle, world
from rewards.errors import DataError
from rewards.feedback import EngagementPredictor, UserPopulation, feedback_reward
from rewards.reward_model import RewardModelConfig, VideoReward
from rewards.scorer import RewardScorer


def _batch(n, seed=0):
    videos, prompts = world.sft_dataset(n, seed=seed)
    return world.to_uint8(videos), [p.text for p in prompts], [f"s{seed}-{i}" for i in range(n)]


def _videoreward(tmp_path, seed=0):
    torch.manual_seed(seed)
    model = VideoReward(RewardModelConfig(dim=16, depth=1, heads=2)).eval()
    model.save(tmp_path / "vr")
    return model, tmp_path / "vr"


def test_oracle_kind_reproduces_the_oracle_exactly():
    videos, prompts, ids = _batch(12)
    scorer = RewardScorer("oracle")
    scores = scorer.score(videos, prompts, ids)
    direct = oracle.score_batch(videos, prompts)
    assert scorer.dims == ("vq", "mq", "ta")
    assert scores.dtype == np.float32 and scores.shape == (12, 3)
    np.testing.assert_array_equal(scores, np.stack([direct[d] for d in scorer.dims], 1).astype(np.float32))
    assert scores.std(0).min() > 0.01  # flawed clips differ: the comparison is not between constants
    # a list of clips is the same batch; float videos in [0, 1] give the oracle's float result
    np.testing.assert_array_equal(scorer.score(list(videos), prompts, ids), scores)
    floats = world.from_uint8(videos)
    assert np.abs(scorer.score(floats, prompts, ids) - scores).max() < 1e-6
    assert scorer.score(videos[:0], [], []).shape == (0, 3)


def test_a_wrong_shaped_clip_in_the_middle_of_a_batch_is_named():
    videos, prompts, ids = _batch(5)
    clips = list(videos)
    clips[2] = clips[2][:, :12, :12]  # [8, 12, 12, 3] among [8, 16, 16, 3]
    with pytest.raises(DataError, match=r"\(8, 12, 12, 3\), expected \(8, 16, 16, 3\)") as err:
        RewardScorer("oracle").score(clips, prompts, ids)
    assert err.value.sample_id == "s0-2"


def test_bad_pixels_and_unreadable_prompts_are_named():
    videos, prompts, ids = _batch(4)
    floats = world.from_uint8(videos)
    floats[3, 0, 0, 0, 0] = 1.5
    with pytest.raises(DataError, match="outside") as err:
        RewardScorer("oracle").score(floats, prompts, ids)
    assert err.value.sample_id == "s0-3"
    floats[1, 2, 3, 4, 1] = np.nan
    with pytest.raises(DataError, match="non-finite") as err:
        RewardScorer("oracle").score(floats, prompts, ids)
    assert err.value.sample_id == "s0-1"
    bad = prompts[:1] + ["a purple circle moving left quickly"] + prompts[2:]
    with pytest.raises(DataError, match="purple") as err:
        RewardScorer("oracle").score(videos, bad, ids)
    assert err.value.sample_id == "s0-1"
    with pytest.raises(DataError, match="4 ids but 3 prompts"):
        RewardScorer("oracle").score(videos, prompts[:3], ids)


def test_construction_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match=r"'clip'.*\['oracle', 'videoreward', 'feedback', 'python', 'http'"):
        RewardScorer("clip")
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        RewardScorer("videoreward", missing)
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        RewardScorer("feedback", missing)
    with pytest.raises(ValueError, match="impression_rate and mix"):
        RewardScorer("feedback", missing, impression_rate=1.5)
    with pytest.raises(ValueError, match="needs a checkpoint"):
        RewardScorer("videoreward")
    _, path = _videoreward(tmp_path)
    with pytest.raises(ValueError, match="frame_shape"):
        RewardScorer("videoreward", path, frame_shape=(4, 16, 16, 3))


def test_videoreward_kind_equals_the_model_scored_directly(tmp_path):
    model, path = _videoreward(tmp_path)
    videos, prompts, ids = _batch(6)
    scorer = RewardScorer("videoreward", path)
    scores = scorer.score(videos, prompts, ids)
    assert scorer.dims == ("vq", "mq", "ta") and scores.shape == (6, 3)
    np.testing.assert_allclose(scores, model.score_videos(videos, prompts), rtol=0, atol=1e-6)
    assert np.ptp(scores, axis=0).min() > 0  # different clips, different scores


def test_a_model_producing_nan_for_one_sample_raises_data_error_naming_it(tmp_path):
    # An honest per-sample NaN: the embedding of the word "magenta" is NaN in the checkpoint, so only a
    # prompt with that word poisons the streams that read the prompt (MQ, TA); VQ never reads it.
    model, _ = _videoreward(tmp_path)
    with torch.no_grad():
        model.word_embed.weight[model.tokenize(["magenta"])[0, 0]] = float("nan")
    model.save(tmp_path / "poisoned")
    videos, prompts, ids = _batch(5, seed=1)
    prompts = [p.replace("magenta", "red") for p in prompts]
    prompts[3] = "a magenta square moving up slowly"
    direct = model.score_videos(videos, prompts)
    assert np.isnan(direct[3, 1:]).all() and np.isfinite(direct[3, 0]) and np.isfinite(np.delete(direct, 3, 0)).all()

    scorer = RewardScorer("videoreward", tmp_path / "poisoned")
    with pytest.raises(DataError, match="non-finite mq score") as err:
        scorer.score(videos, prompts, ids)
    assert err.value.sample_id == "s1-3"
    keep = [0, 1, 2, 4]
    clean = scorer.score(videos[keep], [prompts[i] for i in keep], [ids[i] for i in keep])
    np.testing.assert_allclose(clean, direct[keep], rtol=0, atol=1e-6)


def test_feedback_kind_mixes_dense_predictions_with_per_sample_clicks(tmp_path):
    torch.manual_seed(0)
    predictor = EngagementPredictor(width=4).eval()
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, str(tmp_path / "eng.safetensors"))
    videos, prompts, ids = _batch(10, seed=2)
    scorer = RewardScorer("feedback", tmp_path / "eng.safetensors", impression_rate=0.5)
    scores = scorer.score(videos, prompts, ids)
    assert scorer.dims == ("feedback",) and scores.shape == (10, 1)

    dense = predictor.predict(videos)
    users = UserPopulation(seed=0)
    clicks = np.array([users.impressions(videos[i:i + 1], prompts[i:i + 1],
                                         np.random.default_rng([0, zlib.crc32(s.encode())]), 0.5)[0]
                       for i, s in enumerate(ids)])
    assert 0 < np.isnan(clicks).sum() < 10  # some samples got an impression, some did not
    np.testing.assert_allclose(scores[:, 0], feedback_reward(dense, clicks, 0.5), rtol=0, atol=1e-6)
    # a sample's reward does not depend on its batch: retried elsewhere or re-batched, it is the same
    order = [7, 2, 9]
    np.testing.assert_allclose(scorer.score(videos[order], [prompts[i] for i in order], [ids[i] for i in order]),
                               scores[order], rtol=0, atol=1e-6)
    # no impressions: R_f is the dense prediction alone
    dense_only = RewardScorer("feedback", tmp_path / "eng.safetensors", impression_rate=0.0)
    np.testing.assert_allclose(dense_only.score(videos, prompts, ids)[:, 0], dense, rtol=0, atol=1e-6)

    # a predictor directory carries the population its click logs came from (engagement.json's config)
    trained = tmp_path / "engagement-dir"
    trained.mkdir()
    (trained / "model.safetensors").write_bytes((tmp_path / "eng.safetensors").read_bytes())
    (trained / "engagement.json").write_text(json.dumps(
        {"config": {"seed": 3, "n_users": 7, "impression_rate": 1.0, "mix": 0.25}}))
    logged = RewardScorer("feedback", trained).plugin
    assert (logged.users_seed, logged.impression_rate, logged.mix) == (3, 1.0, 0.25)
    np.testing.assert_array_equal(logged.users.weights, UserPopulation(3, 7).weights)
    assert RewardScorer("feedback", trained, mix=0.5).plugin.mix == 0.5  # an explicit argument wins

    with torch.no_grad():
        predictor.head.bias.fill_(float("nan"))
    save_file({k: v.contiguous() for k, v in predictor.state_dict().items()}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(DataError, match="non-finite feedback") as err:
        RewardScorer("feedback", tmp_path / "nan.safetensors").score(videos, prompts, ids)
    assert err.value.sample_id == "s2-0"
