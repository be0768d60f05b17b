"""Streaming long tuning (Astrolabe, MATH.md §7): rollouts 4x the training clip whose rolling cache evicts, the
candidates generating one clip window after a shared history, rewards on that window, gradients only inside it."""

import copy

import numpy as np
import pytest
import torch

from policy.kv_cache import attended_frames
from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.rollout import RolloutWorker, trajectory_from_payload
from policy.sampling import recompute_log_probs, sample

from .helpers import make_model

PROMPT = "a red circle moving left quickly"
CLIP, CHUNK, WINDOW, SINK, LONG = 8, 2, 6, 2, 32  # window < clip, with sink frames: the cache really rolls


def rolling_model():
    return make_model(window=WINDOW, sink=SINK)


def long_rollout(model, prefix: int, seed: int = 0, group_size: int = 3):
    cond = model.encode_prompts([PROMPT])
    return cond, sample(model, cond, steps=2, sde_type="sage", eta=0.7, mode="causal", group_size=group_size,
                        num_frames=prefix * CHUNK + CLIP, prefix_chunks=prefix,
                        generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
def test_rollouts_of_4x_the_clip_evict_and_reward_the_last_clip_window(tmp_path):
    model = rolling_model()
    model.save(tmp_path / "base")
    w = RolloutWorker(model.cfg, str(tmp_path / "base"), mode="causal", sampler="sage", eta=0.7, steps=2, shift=1.0,
                      group_size=3, frames=LONG)
    prefixes = set()
    for seed in range(16):
        batch, payload, meta = w.generate(f"g{seed}", PROMPT, seed=seed)
        p = payload["prefix_chunks"]
        prefixes.add(p)
        lat = payload["latents"]
        assert lat.shape[2] == p * CHUNK + CLIP and meta["prefix_chunks"] == p  # history + exactly one clip window
        assert batch["videos"].shape == (3, CLIP, 16, 16, 3)  # the reward models see model.frames frames
        assert np.array_equal(batch["videos"], w.policy.decode(torch.from_numpy(lat[:, -1, -CLIP:])))
        if p:
            assert np.array_equal(lat[0, :, : p * CHUNK], lat[2, :, : p * CHUNK])  # one shared history
        assert not np.array_equal(lat[0, -1, -CLIP:], lat[1, -1, -CLIP:])  # candidates differ in the window
    assert prefixes <= set(range((LONG - CLIP) // CHUNK + 1)) and len(prefixes) >= 6  # window starts over [0, 24]
    traj = trajectory_from_payload(payload)
    assert traj.log_probs.shape == (3, lat.shape[2] // CHUNK, 2)


def test_the_rolling_cache_holds_at_most_the_window_at_absolute_positions():
    model = rolling_model()
    prefix, seen = 12, []
    cond = model.encode_prompts([PROMPT])

    def record(j, cache):
        seen.append((j, list(cache.frame_positions), cache.keys[0].shape[3] if cache.keys[0] is not None else 0,
                     cache.batch))

    sample(model, cond, steps=2, sde_type="sage", eta=0.7, mode="causal", group_size=3, num_frames=LONG,
           prefix_chunks=prefix, generator=torch.Generator().manual_seed(0), on_chunk=record)
    rule = attended_frames(LONG, CHUNK, WINDOW, SINK)
    for j, positions, tokens, batch in seen:
        assert positions + list(range(j * CHUNK, (j + 1) * CHUNK)) == rule[j]  # sink + most recent, absolute
        assert len(positions) <= WINDOW - CHUNK and tokens == len(positions) * model.cfg.tokens_per_frame
        assert batch == (3 if j >= prefix else 1) or j == 0  # history once per prompt, then broadcast to G
    assert seen[prefix][1] == [0, 1, 22, 23]  # the first candidate chunk: frames 2..21 were evicted
    assert seen[-1][1] == [0, 1, 28, 29]


def test_recomputed_log_probs_of_a_long_rollout_match_the_behaviour_ones():
    """The learner's teacher-forced pass over T = 32 (mask with window and sink) equals what the cache computed."""
    model = rolling_model()
    cond, traj = long_rollout(model, prefix=12)
    new = recompute_log_probs(model, traj, cond, [0, 1], "sage", 0.7)
    assert new.log_probs.shape == (3, CLIP // CHUNK, 2)
    torch.testing.assert_close(new.log_probs, traj.log_probs[:, 12:], atol=2e-5, rtol=0)


def test_the_gradient_is_zero_for_history_frames_and_outside_the_window():
    """Autograd on the inputs of the learner's pass (velocity_causal with detach_history, trained frames only)."""
    model = rolling_model()
    start = 12 * CHUNK  # the window is frames 24..31 of a 32-frame video
    gen = torch.Generator().manual_seed(1)
    x_noisy = torch.randn(2, LONG, 3, 16, 16, generator=gen).requires_grad_(True)
    x_clean = torch.randn(2, LONG, 3, 16, 16, generator=gen).requires_grad_(True)
    ids = model.encode_prompts([PROMPT, PROMPT])
    v = model.velocity_causal(x_noisy, torch.full((2,), 0.6), x_clean, ids, detach_history=True)[:, start:]
    v.square().sum().backward()
    per_frame = x_noisy.grad.abs().sum(dim=(0, 2, 3, 4))
    assert torch.all(per_frame[:start] == 0) and torch.all(per_frame[start:] > 0)
    assert x_clean.grad is None or torch.all(x_clean.grad == 0)  # the history is detached context

    x_clean.grad = None  # without detaching, the cached history would get gradient: the sink and the recent frames,
    # and (depth 2) the frames frame 22's cached keys attended to one layer down; older frames none
    v = model.velocity_causal(x_noisy, torch.full((2,), 0.6), x_clean, ids, detach_history=False)[:, start:]
    v.square().sum().backward()
    clean = x_clean.grad.abs().sum(dim=(0, 2, 3, 4))
    assert torch.all(clean[[0, 1, 20, 21, 22, 23]] > 0) and torch.all(clean[2:20] == 0)


def _learner_step(model, traj, cond):
    learner = Learner(copy.deepcopy(model), LearnerConfig(loss="nft", lr=1e-3), total_steps=10, seed=0)
    g = ScoredGroup("g", cond, traj, {"r": np.array([0.1, 0.9, 0.4], np.float32)}, version=0)
    stats = learner.step([g], "r", {}, {})
    return stats["loss/policy"], torch.cat([p.grad.flatten() for p in learner.model.trainable_parameters()])


@pytest.mark.slow
def test_the_learner_trains_only_the_window_and_reads_only_the_cached_history():
    """Learner.step on a 4x rollout: history frames the window cannot see (evicted, and beyond what the cached keys
    saw: depth 2 reaches frames 20..23) change nothing (loss, gradient); the cached history does."""
    model = rolling_model()
    cond, traj = long_rollout(model, prefix=12)
    loss, grad = _learner_step(model, traj, cond)
    assert grad.abs().sum() > 0

    def edited(frames):
        t = copy.deepcopy(traj)
        t.latents[:, :, frames] += 0.5 * torch.randn_like(t.latents[:, :, frames])
        t.videos = t.latents[:, -1]
        return _learner_step(model, t, cond)

    loss_evicted, grad_evicted = edited(slice(2, 20))
    assert loss_evicted == pytest.approx(loss, abs=1e-7)
    torch.testing.assert_close(grad_evicted, grad, atol=1e-8, rtol=0)  # bit-identical on CPU
    _, grad_cached = edited(slice(22, 24))
    assert (grad_cached - grad).abs().max() > 1e-6  # the cached history still conditions the window (weakly here)



def test_rollout_frames_is_validated_in_one_line():
    from orchestrator.config import ConfigError, load_config

    assert load_config(None, ["rollout.frames=32"]).rollout.frames == 32
    for overrides, message in ((["rollout.frames=33"], "multiple of model.chunk=2"),
                               (["rollout.frames=6"], "at least model.frames=8"),
                               (["rollout.frames=32", "rollout.mode=bidirectional"], "needs rollout.mode=causal"),
                               (["rollout.frames=32", "rollout.shared_prefix=false"], "share their history")):
        with pytest.raises(ConfigError, match=message) as e:
            load_config(None, overrides)
        assert "\n" not in str(e.value)
