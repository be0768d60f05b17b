"""Sampling with the rolling cache equals the teacher-forced recompute; shared-prefix groups; exact log-probs."""

import pytest
import torch

from policy.kv_bench import kvcache_benchmark
from policy.sampling import recompute_log_probs, sample
from policy.sde import SDE_TYPES
from tests.policy.helpers import make_model

IDS = torch.tensor([[1, 3, 10, 0], [1, 4, 11, 13]])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("window, sink, frames", [(8, 0, 8), (4, 2, 16), (6, 1, 16)])
def test_cached_generation_equals_teacher_forced_causal_recompute(window, sink, frames):
    """ODE rollout through the rolling cache vs velocity_causal on the recorded latents and clean clip."""
    model = make_model(window=window, sink=sink)
    traj = sample(model, IDS, steps=3, sde_type="ode", mode="causal", num_frames=frames, generator=gen())
    sig = traj.sigmas
    with torch.no_grad():
        x = traj.latents[:, 0]
        for k in range(3):
            v = model.velocity_causal(traj.latents[:, k], sig[k].expand(2), traj.videos, IDS)
            # velocities: the recorded Euler step says v = (x_{k+1} - x_k) / dt
            v_rec = (traj.latents[:, k + 1] - traj.latents[:, k]) / (sig[k + 1] - sig[k])
            assert (v - v_rec).abs().max() <= 1e-5
            # and the streaming path itself, chunk by chunk against the same cache the sampler builds
            cache = model.new_cache()
            for j in range(frames // 2):
                fr = slice(2 * j, 2 * j + 2)
                v_chunk = model.velocity_chunk(traj.latents[:, k, fr], sig[k].expand(2), IDS, cache, 2 * j)
                assert (v_chunk - v[:, fr]).abs().max() <= 1e-5
                model.append_to_cache(traj.videos[:, fr], IDS, cache, 2 * j)
            x = x + (sig[k + 1] - sig[k]) * model.velocity_causal(x, sig[k].expand(2), traj.videos, IDS)
    assert (x - traj.videos).abs().max() <= 1e-5  # teacher-forced ODE reproduces the final clip
    assert traj.videos.abs().max() > 0.1  # and it is not trivially zero


def test_cache_memory_stays_flat_as_clips_grow():
    model = make_model(window=4, sink=1)
    peak = {}
    for mult in (4, 8, 16):
        sizes = []
        sample(model, IDS[:1], steps=1, mode="causal", num_frames=8 * mult, generator=gen(),
               on_chunk=lambda j, cache: sizes.append(cache.nbytes()))
        peak[mult] = max(sizes)
        assert sizes[-1] == peak[mult]  # full from the third chunk on, never growing
    # window 4 - chunk 2 = 2 frames x 16 tokens x (2 heads x 16 dims) x 4 bytes x (k, v) x 2 layers
    assert peak == {4: 16384, 8: 16384, 16: 16384}


def test_group_rollout_shares_the_prefix_and_matches_single_candidates():
    model = make_model()
    p, g, steps, prefix = 2, 3, 2, 2
    shape = (p * g, steps + 1, 8, 3, 16, 16)
    noise = torch.randn(shape, generator=gen(1))
    seen = {}  # chunk -> (cache object, its layer-0 keys when the chunk starts)
    traj = sample(model, IDS, steps=steps, sde_type="sage", eta=0.8, mode="causal", group_size=g,
                  prefix_chunks=prefix, noise=noise, on_chunk=lambda j, c: seen.setdefault(j, (c, c.read(0))))
    # the candidates' cache is an expanded view of the prefix cache (batch P): no copy
    prefix_cache, (k_prefix, v_prefix) = seen[prefix - 1][0], seen[prefix - 1][0].read(0)
    group_cache, (k_group, v_group) = seen[prefix]
    assert group_cache is not prefix_cache and k_prefix.shape[:2] == (p, 1) and k_group.shape[:2] == (p, g)
    assert k_group.data_ptr() == k_prefix.data_ptr() and v_group.data_ptr() == v_prefix.data_ptr()
    assert k_group.untyped_storage().data_ptr() == k_prefix.untyped_storage().data_ptr() and k_group.stride(1) == 0
    assert prefix_cache.frame_positions == [0, 1, 2, 3] and not k_group.requires_grad
    assert traj.latents.shape == shape and traj.log_probs.shape == (p * g, 4, steps)
    assert torch.equal(traj.videos, traj.latents[:, steps])
    videos = traj.videos.view(p, g, 8, 3, 16, 16)
    for i in range(p):
        for c in range(1, g):
            assert torch.equal(videos[i, c, :4], videos[i, 0, :4])  # shared prefix frames
            assert (videos[i, c, 4:] - videos[i, 0, 4:]).abs().min() > 0  # independent candidates
            assert torch.equal(traj.log_probs[i * g + c, :prefix], traj.log_probs[i * g, :prefix])
    # each candidate alone (no group, no shared prefix) from the same noise gives the same clip
    for row in range(p * g):
        alone_noise = noise[row : row + 1].clone()
        alone_noise[:, :, :4] = noise[row - row % g, :, :4]  # prefix frames use the prompt's first candidate
        alone = sample(model, IDS[row // g : row // g + 1], steps=steps, sde_type="sage", eta=0.8, mode="causal",
                       noise=alone_noise)
        assert (alone.latents[0] - traj.latents[row]).abs().max() <= 1e-5
        assert (alone.log_probs[0] - traj.log_probs[row]).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["bidirectional", "causal"])
@pytest.mark.parametrize("sde_type", SDE_TYPES)
def test_recomputed_log_probs_equal_recorded(mode, sde_type):
    model = make_model(window=6, sink=2)
    prefix = 1 if mode == "causal" else 0
    traj = sample(model, IDS, steps=3, sde_type=sde_type, eta=0.7, mode=mode, group_size=2, prefix_chunks=prefix,
                  generator=gen(2))
    out = recompute_log_probs(model, traj, IDS, [0, 1, 2], sde_type, 0.7)
    n_chunks = 4 if mode == "causal" else 1
    assert out.log_probs.shape == (4, n_chunks - prefix, 3)
    assert out.means.shape == (4, 3, 8 - 2 * prefix, 3, 16, 16)
    assert (out.log_probs - traj.log_probs[:, prefix:]).abs().max() <= 1e-5
    if sde_type == "ode":
        assert out.log_probs.abs().max() == 0
        return
    if sde_type == "cps":  # CPS is deterministic on its terminal step
        assert out.log_probs[..., 2].abs().max() == 0 and out.std[:, 2].abs().max() == 0
    assert out.log_probs[..., 0].abs().min() > 0
    # the means are where the recorded samples were drawn around: x' = mean + std * noise
    lat = traj.latents[:, 1:, 2 * prefix :]
    z = (lat - out.means) / out.std[:, :, None, None, None, None].clamp_min(1e-12)
    assert abs(z[:, 0].std().item() - 1.0) < 0.1
    # a subset of steps gives the same numbers
    sub = recompute_log_probs(model, traj, IDS.repeat_interleave(2, 0), [1], sde_type, 0.7)
    assert (sub.log_probs[..., 0] - out.log_probs[..., 1]).abs().max() <= 1e-6
    # gradient reaches the parameters
    model.zero_grad()
    out.log_probs.mean().backward()
    grads = [p.grad.abs().sum() for p in model.parameters() if p.grad is not None]
    assert len(grads) > 10 and sum(grads) > 0


def test_recompute_reflects_changed_weights():
    model = make_model()
    traj = sample(model, IDS, steps=2, sde_type="dance_grpo", eta=1.0, mode="causal", generator=gen(3))
    with torch.no_grad():
        model.out.bias.add_(0.05)
    out = recompute_log_probs(model, traj, IDS, [0, 1], "dance_grpo", 1.0)
    assert (out.log_probs - traj.log_probs).abs().max() > 1e-4


def test_bidirectional_group_repeats_prompts():
    model = make_model()
    traj = sample(model, IDS, steps=2, sde_type="flow_grpo", eta=0.5, group_size=3, generator=gen(4))
    assert traj.latents.shape == (6, 3, 8, 3, 16, 16) and traj.log_probs.shape == (6, 1, 2)
    ode = sample(model, IDS, steps=2, group_size=3, generator=gen(4))
    same_start = torch.equal(ode.latents[:, 0], traj.latents[:, 0])
    assert same_start and (traj.videos[0] - traj.videos[1]).abs().max() > 0.01


def test_sample_rejects_bad_arguments():
    model = make_model()
    with pytest.raises(ValueError, match="prefix_chunks"):
        sample(model, IDS, steps=1, mode="causal", prefix_chunks=4)
    with pytest.raises(ValueError, match="prefix_chunks"):
        sample(model, IDS, steps=1, prefix_chunks=1)
    with pytest.raises(ValueError, match="causal"):
        sample(model, IDS, steps=1, num_frames=16)
    with pytest.raises(ValueError, match="multiple of chunk"):
        sample(model, IDS, steps=1, mode="causal", num_frames=7)
    with pytest.raises(ValueError, match="noise"):
        sample(model, IDS, steps=1, noise=torch.randn(2, 3, 8, 3, 16, 16))
    with pytest.raises(ValueError, match="sde_type"):
        sample(model, IDS, steps=1, sde_type="euler")
    traj = sample(model, IDS, steps=2, mode="causal")
    with pytest.raises(ValueError, match="chunk_steps"):
        recompute_log_probs(model, traj, IDS, [2], "ode", 0.0)
    with pytest.raises(ValueError, match="rows"):
        recompute_log_probs(model, traj, IDS[:1], [0], "ode", 0.0)


def test_kvcache_benchmark_rows():
    model = make_model(window=4, sink=1)
    rows = kvcache_benchmark(model, lengths=(1, 2), group_size=2, steps=1, repeats=1)
    lengths = [r for r in rows if r["bench"] == "length"]
    assert [r["frames"] for r in lengths] == [8, 16]
    assert lengths[0]["cache_bytes_max"] == lengths[1]["cache_bytes_max"] > 0
    assert lengths[0]["cache_frames_max"] == 2  # window 4 - chunk 2
    group = rows[-1]
    assert group["bench"] == "group" and group["speedup"] == pytest.approx(group["independent_ms"] / group["shared_ms"])
