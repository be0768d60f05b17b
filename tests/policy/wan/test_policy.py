"""policy.wan.policy: the stock diffusers WanTransformer3DModel behind policy.backend.Policy, bidirectional and causal
with videorl's rolling KV cache; everything on random models written by policy.wan.init and read by the real loader."""

import numpy as np
import pytest
import torch

from policy.kv_cache import attended_frames
from policy.sampling import recompute_log_probs, sample
from policy.sde import sigma_schedule
from policy.wan.loading import read_safetensors_dir

from .conftest import wan

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly"]


def test_loads_a_diffusers_directory_and_reads_shapes_from_it(model_dirs):
    from diffusers import WanTransformer3DModel

    latent = wan(model_dirs["tiny"], frames=9, height=32, width=32, chunk=3)
    s = latent.shape
    assert (s.frames, s.channels, s.height, s.width, s.tokens_per_frame) == (3, 16, 4, 4, 4)  # VAE 4x / 8x, patch 2
    assert (s.video_frames, s.video_height, s.video_width, s.temporal_scale) == (9, 32, 32, 4)
    reference = WanTransformer3DModel.from_pretrained(model_dirs["tiny"], subfolder="transformer")
    ours = latent.transformer.state_dict()
    assert set(ours) == set(reference.state_dict())  # the swaps changed no key
    for k, v in reference.state_dict().items():
        assert torch.equal(ours[k], v), k
    pixel = wan(model_dirs["shapes"], frames=8, height=16, width=12, chunk=2)  # non-square frames
    assert (pixel.shape.channels, pixel.shape.height, pixel.shape.width, pixel.shape.tokens_per_frame) == (3, 16, 12, 12)
    cond = pixel.encode_prompts(PROMPTS)
    assert cond.shape == (2, 8, 32)
    # zero rows after each prompt's real length (6 words + </s>), as WanPipeline pads
    assert cond[:, 7:].abs().max() == 0 and (cond[:, :7].abs().sum(-1) > 0).all()
    x = torch.randn(2, 8, 3, 16, 12)
    assert pixel.velocity(x, torch.tensor([0.5, 0.9]), cond).shape == x.shape


def test_the_shapes_preset_reads_its_position_planes(model_dirs):
    """in_channels 5 = RGB + the row and column planes (policy.wan.policy.position_planes); they reach the model only
    through the patch embedding's two extra input channels, and are the same for every sample and frame."""
    from policy.wan.policy import position_planes

    planes = position_planes(3, 4)
    assert planes.shape == (2, 3, 4)
    assert planes[0, :, 0].tolist() == [-1.0, 0.0, 1.0] and planes[1, 0].tolist() == pytest.approx([-1, -1 / 3, 1 / 3, 1])
    policy = wan(model_dirs["shapes"], frames=8, height=16, width=12, chunk=2)
    assert policy.planes.shape == (2, 16, 12)
    x, cond = torch.randn(2, 8, 3, 16, 12), policy.encode_prompts(PROMPTS)
    sigma = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        policy.planes = policy.planes.flip(-1)  # another place for every pixel: another velocity
        assert (policy.velocity(x, sigma, cond) - v).abs().max() > 1e-3
        policy.transformer.patch_embedding.weight[:, 3:] = 0  # planes cut off: what they hold no longer matters
        v0 = policy.velocity(x, sigma, cond)
        policy.planes = torch.zeros_like(policy.planes)
        assert torch.equal(policy.velocity(x, sigma, cond), v0)


def test_a_transformer_whose_channels_fit_neither_the_frames_nor_the_planes_is_refused(model_dirs, tmp_path):
    import json
    import shutil

    d = tmp_path / "shapes4"
    shutil.copytree(model_dirs["shapes"], d)
    config = json.loads((d / "transformer" / "config.json").read_text())
    (d / "transformer" / "config.json").write_text(json.dumps({**config, "in_channels": 4}))
    with pytest.raises(ValueError, match="takes 4 channels and makes 3, but the pixel frames have 3"):
        wan(str(d), device="meta")  # the shape check, before any weight is read


def test_vae_round_trip_of_a_9_frame_clip(model_dirs):
    """Latents are the VAE's normalised posterior mean ((z - mean) / std, per channel, as WanPipeline); decoding undoes
    the normalisation exactly and returns the clip's 9 frames."""
    policy = wan(model_dirs["tiny"], frames=9, height=32, width=32, chunk=3)
    codec = policy.latents
    video = np.random.default_rng(0).integers(0, 256, (1, 9, 32, 32, 3), dtype=np.uint8)
    z = codec.encode(video)
    assert z.shape == (1, 3, 16, 4, 4)
    with torch.no_grad():
        raw = codec.vae.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() / 127.5 - 1).latent_dist.mean
        np.testing.assert_allclose((z.permute(0, 2, 1, 3, 4) * codec.std + codec.mean).numpy(), raw.numpy(), atol=1e-5)
        expected = ((codec.vae.decode(raw).sample.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    back = policy.decode(z)
    assert back.shape == (1, 9, 32, 32, 3) and back.dtype == np.uint8
    np.testing.assert_array_equal(back, expected.permute(0, 2, 3, 4, 1).numpy())
    # pixel space decodes 1:1: a uint8 clip survives the round trip exactly
    pixel = wan(model_dirs["shapes"])
    clip = np.random.default_rng(1).integers(0, 256, (2, 8, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(pixel.decode(pixel.latents.encode(clip)), clip)


def test_per_token_timesteps_equal_one_timestep_per_sample(model_dirs):
    policy = wan(model_dirs["shapes"], kind="wan")
    cond = policy.encode_prompts(PROMPTS)
    x = torch.randn(2, 8, 3, 16, 16)
    sigma = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        per_sample = policy.velocity(x, sigma, cond)  # timestep [B]
        per_token = policy.velocity(x, sigma[:, None].expand(2, 8), cond)  # timestep [B, tokens]
    assert (per_sample - per_token).abs().max() < 1e-6


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-10)])
def test_streaming_with_the_cache_equals_teacher_forcing(model_dirs, dtype, tol):
    """The cache evicts (window 6 < 8 frames, sink 2); log-probs recomputed teacher-forced match the rollout's."""
    policy = wan(model_dirs["shapes"], chunk=2, window=6, sink=2, dtype=dtype)
    cond = policy.encode_prompts(PROMPTS[:1])
    traj = sample(policy, cond, steps=4, sde_type="sage", eta=0.7, mode="causal", group_size=2,
                  generator=torch.Generator().manual_seed(0))
    assert traj.latents.dtype == getattr(torch, dtype)
    with torch.no_grad():
        for detach in (False, True):
            new = recompute_log_probs(policy, traj, cond, [0, 1, 2, 3], "sage", 0.7, detach_history=detach)
            assert (new.log_probs - traj.log_probs).abs().max() < tol
        # the velocities themselves, at one step: streaming chunk by chunk vs one teacher-forced pass
        x, clean = traj.latents[:, 1], traj.videos
        sig = torch.full((2,), float(traj.sigmas[1]))
        forced = policy.velocity_causal(x, sig, clean, cond.expand(2, -1, -1))
        cache, streamed = policy.new_cache(), []
        for j in range(4):
            fr = slice(2 * j, 2 * j + 2)
            streamed.append(policy.velocity_chunk(x[:, fr], sig, cond.expand(2, -1, -1), cache, 2 * j))
            policy.append_to_cache(clean[:, fr], cond.expand(2, -1, -1), cache, 2 * j)
    assert (torch.cat(streamed, dim=1) - forced).abs().max() < tol * 10


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("float64", 1e-12)])
def test_a_shared_prefix_equals_independent_caches(model_dirs, dtype, tol):
    """G candidates on one frozen, expanded prefix == G rollouts that each generate the same prefix themselves."""
    policy = wan(model_dirs["shapes"], chunk=2, window=6, sink=2, dtype=dtype)
    cond = policy.encode_prompts(PROMPTS[:1])
    g, steps = 3, 3
    noise = torch.randn(g, steps + 1, 8, 3, 16, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    noise[:, :, :4] = noise[:1, :, :4]  # the prefix (2 chunks) is drawn from the first candidate's noise
    kw = dict(steps=steps, sde_type="sage", eta=0.7, mode="causal", noise=noise)
    shared = sample(policy, cond, group_size=g, prefix_chunks=2, **kw)
    independent = sample(policy, cond.expand(g, -1, -1), **kw)
    assert (shared.latents - independent.latents).abs().max() <= tol
    assert (shared.log_probs[:, 2:] - independent.log_probs[:, 2:]).abs().max() <= tol + 1e-6


@pytest.mark.parametrize("sink, expected", [(3, [[], [0, 1, 2], [0, 1, 2], [0, 1, 2]]),
                                            (0, [[], [0, 1, 2], [3, 4, 5], [6, 7, 8]])])
def test_eviction_keeps_the_frames_of_math_section_7(model_dirs, sink, expected):
    """Chunks of 3 frames, a cache of 6 frames: before chunk j the cache holds attended_frames[j] minus chunk j."""
    policy = wan(model_dirs["shapes"], frames=12, chunk=3, window=6, sink=sink)
    held = []
    sample(policy, policy.encode_prompts(PROMPTS[:1]), steps=1, mode="causal",
           on_chunk=lambda j, cache: held.append(list(cache.frame_positions)))
    assert held == expected
    assert [h + list(range(3 * j, 3 * j + 3)) for j, h in enumerate(held)] == attended_frames(12, 3, 6, sink)


def test_a_long_rollout_keeps_positions_growing_and_the_cache_bounded(model_dirs):
    policy = wan(model_dirs["shapes"], chunk=2, window=6, sink=2)
    sizes = []
    traj = sample(policy, policy.encode_prompts(PROMPTS[:1]), steps=2, mode="causal", num_frames=24,
                  on_chunk=lambda j, cache: sizes.append((cache.next_frame, len(cache.frame_positions))))
    assert traj.videos.shape == (1, 24, 3, 16, 16) and torch.isfinite(traj.videos).all()
    assert sizes[-1] == (22, 4) and max(n for _, n in sizes) == 4  # 4 frames (sink 2 + 2 recent) ever held


def test_the_bidirectional_kind_has_no_streaming(model_dirs):
    policy = wan(model_dirs["shapes"], kind="wan")
    assert policy.shape.chunk == policy.shape.frames == 8
    with pytest.raises(ValueError, match="wan_causal"):
        policy.velocity_causal(torch.zeros(1, 8, 3, 16, 16), torch.zeros(1), torch.zeros(1, 8, 3, 16, 16),
                               policy.encode_prompts(PROMPTS[:1]))
    traj = sample(policy, policy.encode_prompts(PROMPTS), steps=2, sde_type="flow_grpo", eta=0.5, mode="bidirectional")
    assert traj.log_probs.shape == (2, 1, 2)


def test_timesteps_are_float32_1000_sigma(model_dirs):
    """The model sees 1000 sigma computed in float32: 833.3333129882812 for sigma = 5/6 (Self-Forcing's schedule)."""
    policy = wan(model_dirs["shapes"])
    sigmas = sigma_schedule(4, shift=5.0)
    assert sigmas.tolist()[:4] == pytest.approx([1.0, 0.9375, 0.8333333134651184, 0.625], abs=0)
    t = policy._timesteps(sigmas[2].expand(1), 1, 2)
    assert t.dtype == torch.float32 and t.item() == 833.3333129882812


def test_weights_come_from_the_directory(model_dirs):
    state = read_safetensors_dir(__import__("pathlib").Path(model_dirs["shapes"]) / "transformer")
    policy = wan(model_dirs["shapes"])
    assert all(torch.equal(policy.transformer.state_dict()[k], v) for k, v in state.items())


def test_the_attention_backend_is_the_one_configured(model_dirs):
    """model.attention_backend reaches diffusers' dispatch: "flash" needs flash-attn (absent on this CPU), while the
    math backend computes what the default does."""
    x = torch.randn(1, 8, 3, 16, 16)
    default = wan(model_dirs["shapes"], kind="wan")
    cond = default.encode_prompts(PROMPTS[:1])
    with torch.no_grad():
        v = default.velocity(x, torch.tensor([0.5]), cond)
        math_backend = wan(model_dirs["shapes"], kind="wan", attention_backend="_native_math")
        assert (math_backend.velocity(x, torch.tensor([0.5]), cond) - v).abs().max() < 1e-5
        with pytest.raises(ValueError, match="model.attention_backend='flash' cannot run here: .*flash-attn"):
            wan(model_dirs["shapes"], kind="wan", attention_backend="flash")


def test_chunk_by_chunk_recompute_equals_the_dense_teacher_forced_pass_with_its_gradients(model_dirs):
    """What the learner uses at real sizes (no dense mask): the same velocities, the same adapter gradients, also
    under gradient checkpointing (each chunk's cached keys are the ones it saw, whatever was appended later)."""
    from policy.wan.config import LoraConfig

    from .conftest import perturb_adapters

    results = []
    for streamed, checkpointing in ((False, False), (True, False), (True, True)):
        policy = wan(model_dirs["shapes"], window=6, sink=2, lora=LoraConfig(rank=4, alpha=8), for_training=True,
                     gradient_checkpointing=checkpointing).train()
        if not results:
            perturb_adapters(policy)
            adapter = policy.trainable_state()
        policy.load_trainable_state(adapter)
        g = torch.Generator().manual_seed(5)
        x, clean = torch.randn(2, 8, 3, 16, 16, generator=g), torch.randn(2, 8, 3, 16, 16, generator=g)
        cond = policy.encode_prompts(PROMPTS)
        sigma = torch.tensor([[0.9, 0.9, 0.7, 0.7, 0.5, 0.5, 0.2, 0.2], [0.4] * 8])
        if streamed:
            v = policy.velocity_causal_streamed(x, sigma, clean, cond)
        else:
            v = policy.velocity_causal(x, sigma, clean, cond, detach_history=True)
        (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
        results.append((v.detach(), [p.grad.clone() for p in policy.trainable_parameters()]))
    (v0, g0) = results[0]
    for v, grads in results[1:]:
        assert (v - v0).abs().max() < 1e-5
        assert max((a - b).abs().max() for a, b in zip(grads, g0)) < 1e-5 * max(a.abs().max() for a in g0)


def test_loading_full_weights_copies_into_the_models_own_parameters(model_dirs):
    """A resumed learner's optimizer holds the model's parameters: loading weights must fill those, not swap them."""
    policy = wan(model_dirs["shapes"], for_training=True)
    params = list(policy.trainable_parameters())
    opt = torch.optim.SGD(params, lr=0.1)
    state = {k: v + 0.01 for k, v in policy.trainable_state().items()}
    policy.load_trainable_state(state)
    assert all(a is b for a, b in zip(params, policy.trainable_parameters()))
    for k, v in policy.trainable_state().items():
        assert torch.equal(v, state[k].to(v.dtype)), k
    x, cond = torch.randn(1, 8, 3, 16, 16), policy.encode_prompts(PROMPTS[:1])
    before = {k: v.clone() for k, v in policy.trainable_state().items()}
    policy.velocity(x, torch.tensor([0.5]), cond).square().mean().backward()
    opt.step()
    moved = sum(not torch.equal(v, before[k]) for k, v in policy.trainable_state().items())
    assert moved > len(before) // 2  # the optimizer still drives the loaded model
