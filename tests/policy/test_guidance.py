"""Reward-guided sampling (VideoAlign, MATH.md §3): v' = v − (t/(1−t))·(w/β)·∇_{x_t} r(x̂0) through a VideoReward
checkpoint, in the sampler, the rollout worker and with the same noise as the unguided sampler."""

import numpy as np
import pytest
import torch

from policy.rollout import RewardGuide, RolloutWorker, trajectory_from_payload
from policy.sampling import GUIDE_T_MAX, guided_velocity, recompute_log_probs, sample
from rewards.reward_model import RewardModelConfig, VideoReward

from .helpers import SDE_ROLLOUTS, make_model

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly"]


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A real VideoReward checkpoint (random weights: still a differentiable function of the pixels)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("reward") / "videoreward"
    VideoReward(RewardModelConfig()).save(path)
    return path


def test_guided_velocity_formula_and_its_clamp():
    v, grad = torch.tensor([[0.5], [0.5], [0.5]]), torch.tensor([[2.0], [2.0], [2.0]])
    out = guided_velocity(v, torch.tensor([0.5, 0.8, 1.0]), grad, weight=0.3, beta=2.0)
    # t/(1-t) = 1, 4, and at t = 1 the clamp GUIDE_T_MAX = 0.9 gives 9; (w/β) = 0.15
    assert GUIDE_T_MAX == 0.9
    torch.testing.assert_close(out, torch.tensor([[0.5 - 0.3], [0.5 - 1.2], [0.5 - 2.7]]))
    assert torch.equal(guided_velocity(v, torch.tensor([0.5, 0.8, 1.0]), grad, 0.0, 2.0), v)


def _guided(model, reward, weight, mode="bidirectional", **kw):
    guide = RewardGuide(reward, "ta", weight, 1.0)
    cond = model.encode_prompts(PROMPTS)
    traj = sample(model, cond, steps=4, sde_type="sage", eta=0.5, mode=mode, guide=guide.for_prompts(PROMPTS),
                  generator=torch.Generator().manual_seed(0), **kw)
    g = kw.get("group_size", 1)
    with torch.no_grad():
        scores = guide.reward(traj.videos[:, -8:], [p for p in PROMPTS for _ in range(g)])
    return traj, scores


def test_guided_samples_score_higher_on_the_guiding_reward_with_the_same_noise(reward_dir):
    model, reward = make_model(), VideoReward.load(reward_dir)
    plain, s0 = _guided(model, reward, 0.0)
    with torch.no_grad():
        unguided = sample(model, model.encode_prompts(PROMPTS), steps=4, sde_type="sage", eta=0.5,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain.latents, unguided.latents) and torch.equal(plain.log_probs, unguided.log_probs)
    _, s1 = _guided(model, reward, 1.0)
    _, s3 = _guided(model, reward, 3.0)
    # measured: mean TA logit 0.003 unguided, 0.16 at w = 1, 0.47 at w = 3 (every clip higher)
    assert torch.all(s1 > s0 + 0.05) and torch.all(s3 > s1 + 0.1)


def test_causal_guidance_steers_the_chunks_once_a_full_clip_window_exists(reward_dir):
    """Streaming: 16 frames, the window after a 4-chunk shared history is guided chunk by chunk."""
    model, reward = make_model(window=6, sink=2), VideoReward.load(reward_dir)
    kw = dict(mode="causal", num_frames=16, prefix_chunks=4, group_size=2)
    plain, s0 = _guided(model, reward, 0.0, **kw)
    guided, s3 = _guided(model, reward, 3.0, **kw)
    assert torch.all(s3 > s0 + 0.05) and s3.mean() > s0.mean() + 0.1  # measured: mean -0.09 -> 0.05
    # the first 4 chunks end before frame 8 is generated: nothing to score, so the shared history is unguided
    assert torch.equal(plain.latents[:, :, :6], guided.latents[:, :, :6])


def test_the_rollout_worker_guides_from_the_reward_checkpoint(tmp_path, reward_dir):
    model = make_model()
    model.save(tmp_path / "base")

    def worker(weight):
        return RolloutWorker(model.cfg, str(tmp_path / "base"), mode="causal", sampler="sage", eta=0.7, steps=2,
                             shift=1.0, group_size=3, guidance={"checkpoint": str(reward_dir), "dim": "ta",
                                                                "weight": weight, "beta": 1.0})

    w0, w3 = worker(0.0), worker(10.0)  # an 8-frame causal clip: only its last chunk completes the reward's clip
    b0, p0, _ = w0.generate("g", PROMPTS[0], seed=3)
    b3, p3, _ = w3.generate("g", PROMPTS[0], seed=3)
    r = w3.guide.reward
    s0 = r(torch.from_numpy(p0["latents"][:, -1]), [PROMPTS[0]] * 3)
    s3 = r(torch.from_numpy(p3["latents"][:, -1]), [PROMPTS[0]] * 3)
    assert torch.all(s3 > s0 + 0.05)  # measured: -0.06 -> 0.09 mean
    assert not np.array_equal(b0["videos"], b3["videos"])
    # the recorded log-probs are the guided sampler's own (behaviour = guided policy): a step's log-density under the
    # policy that took it depends only on its noise, the same in both runs (one seed) ...
    np.testing.assert_allclose(p0["log_probs"], p3["log_probs"], atol=1e-5)
    # ... and re-scored under the unguided policy (the learner's view) the unguided steps keep theirs, while guided
    # ones score lower (by ~|Δμ|²/2σ² per element: measured 0.001 ± 0.002 at w = 10, 0.02-0.38 at w = 100)
    def unguided(payload):
        with torch.no_grad():
            return recompute_log_probs(model, trajectory_from_payload(payload), model.encode_prompts([PROMPTS[0]]),
                                       range(2), "sage", 0.7).log_probs
    torch.testing.assert_close(unguided(p0), torch.from_numpy(p0["log_probs"]), atol=1e-4, rtol=0)
    _, p100, _ = worker(100.0).generate("g", PROMPTS[0], seed=3)
    drop = torch.from_numpy(p100["log_probs"]) - unguided(p100)
    assert torch.all(drop[:, 0].abs() < 1e-4) and torch.all(drop[:, 1] > 0.01), drop  # only the last chunk is guided
    with pytest.raises(ValueError, match="not 'overall'"):
        RewardGuide(VideoReward.load(reward_dir), "overall", 1.0, 1.0)


def test_rollout_guidance_config_reaches_the_rollout_worker_or_fails_in_one_line():
    from orchestrator.cluster import guidance_kwargs
    from orchestrator.config import ConfigError, load_config

    cfg = load_config(None, ["rollout.guidance={reward: ta, weight: 2.0, beta: 4.0}"])
    ckpts = {"videoreward": "/ckpt/vr", "feedback": "/ckpt/fb", "oracle": None}
    assert guidance_kwargs(cfg, ckpts) == {"checkpoint": "/ckpt/vr", "dim": "ta", "weight": 2.0, "beta": 4.0}
    assert guidance_kwargs(load_config(None, []), ckpts) is None
    for overrides, message in (
        (["rollout.guidance={reward: oracle_ta}"], r"kind oracle\), which is not differentiable"),
        (["rollout.guidance={reward: feedback}"], r"kind feedback\), which is not differentiable"),
        (["rollout.guidance={reward: speed}"], "unknown reward 'speed'"),
        (["rollout.guidance={reward: ta}", "learner.loss=ppo", *SDE_ROLLOUTS],
         "rollout.guidance with learner.loss=ppo"),
        (["rollout.guidance={reward: ta, beta: 0}"], "rollout.guidance.beta"),
        (["rollout.guidance={reward: ta}", "rewards.reward_model.ensemble=[bt]"],
         "makes rewards.models.videoreward an ensemble"),
    ):
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)
