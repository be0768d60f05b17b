"""`kind: videoalign`: a tiny random VideoAlign checkpoint (old key names, written here) configured as
`rewards.models.<name>`, scored by a real reward actor behind a RewardPool; its config keys reach the scorer."""

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import ray
import torch

from actors.reward import reward_actor
from orchestrator.config import ConfigError, known_reward_names, load_config
from orchestrator.reward_pool import RewardPool
from rewards.scorer import RewardScorer
from rewards.videoalign import DIMS, VideoAlignScorer, apply_lora, build_tiny_videoalign, save_videoalign_checkpoint
from tests.rewards.test_videoalign import PROMPTS, clips, direct_forward

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NORM = {"vq": (0.5, 2.0), "mq": (-0.25, 0.5), "ta": (1.0, 4.0)}


def _spec(ckpt, **keys):
    extra = "".join(f", {k}: {v}" for k, v in keys.items())
    cfg = load_config(None, [f"rewards.models={{va: {{kind: videoalign, checkpoint: '{ckpt}', prefix: va_{extra}}}}}"])
    return cfg, cfg.rewards.models["va"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(in-memory tiny Qwen2-VL reward model, its full VideoAlign checkpoint with normalisation stats)."""
    out = tmp_path_factory.mktemp("videoalign-kind") / "full"
    model = build_tiny_videoalign(seed=0)
    save_videoalign_checkpoint(model, out, normalization=NORM)
    return model, out


def test_a_reward_pool_of_kind_videoalign_scores_as_a_direct_forward(tiny, ray_cluster):
    model, ckpt = tiny
    keys = torch.load(ckpt / "model.pth", weights_only=True).keys()
    assert "visual.patch_embed.proj.weight" in keys and "model.layers.0.mlp.up_proj.weight" in keys  # old names
    cfg, spec = _spec(ckpt, fps=4.0, normalize="false")
    assert known_reward_names(cfg.rewards) == {"va_vq", "va_mq", "va_ta"}  # dims known before anything loads
    pool = RewardPool("va", lambda name: reward_actor(name, spec.kind, spec.checkpoint, num_cpus=0.2,
                                                      frame_shape=(8, 16, 16, 3), options=spec.scorer_options()),
                      replicas=1)
    try:
        videos = clips(4)
        pool.submit("b0", ray.put({"ids": [f"c{i}" for i in range(4)], "videos": videos, "prompts": PROMPTS}))
        [(bid, got)] = pool.drain(timeout=300)
        stats = ray.get(next(iter(pool.replicas.values())).stats.remote())
    finally:
        pool.shutdown()
    assert bid == "b0" and got.shape == (4, 3) and got.dtype == np.float32
    sampling = model.sampling
    model.sampling = replace(sampling, fps=4.0)  # 8 frames at 8 fps -> 4 frames: what fps: 4.0 configures
    try:
        want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    finally:
        model.sampling = sampling
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)  # columns in DIMS order: vq, mq, ta
    assert np.ptp(want, axis=0).min() > 1e-3
    assert np.abs(direct_forward(model, videos[0], PROMPTS[0]) - want[0]).max() > 1e-4  # every frame: other scores
    assert stats["batches"] == 1 and stats["version"] == VideoAlignScorer(ckpt, device="cpu", fps=4.0,
                                                                          normalize=False).version


def _big(n=2):
    """World clips upsampled 7x to 112 x 112, so the pixel budget matters."""
    return np.repeat(np.repeat(clips(n), 7, axis=2), 7, axis=3)


@pytest.mark.parametrize("key,value,kwargs", [
    ("fps", "2.0", {"fps": 2.0}),
    ("num_frames", "4", {"num_frames": 4}),
    ("max_pixels", str(112 * 112), {"max_pixels": 112 * 112}),
    ("aggregate", "astrolabe", {"aggregate": "astrolabe"}),
    ("normalize", "false", {"normalize": False}),
    ("rubric", "'Rate \" {prompt} \" : quality {vq} motion {mq} alignment {ta}'",
     {"rubric": "Rate \" {prompt} \" : quality {vq} motion {mq} alignment {ta}"}),
])
def test_each_videoalign_key_changes_the_scores(tiny, key, value, kwargs):
    _, ckpt = tiny
    videos, ids = _big(), ["a", "b"]
    default = RewardScorer("videoalign", ckpt, (8, 112, 112, 3), device="cpu", **_spec(ckpt)[1].scorer_options())
    scorer = RewardScorer("videoalign", ckpt, (8, 112, 112, 3), device="cpu",
                          **_spec(ckpt, **{key: value})[1].scorer_options())
    got = scorer.score(videos, PROMPTS[:2], ids)
    direct = VideoAlignScorer(ckpt, device="cpu", **kwargs).score({"ids": ids, "videos": videos, "prompts": PROMPTS[:2]})
    np.testing.assert_allclose(got, np.stack([direct[d] for d in DIMS], 1), atol=1e-6, rtol=0)
    assert np.abs(got - default.score(videos, PROMPTS[:2], ids)).max() > 1e-4
    assert scorer.version != default.version


def test_base_points_a_lora_checkpoint_at_its_base_weights(tmp_path):
    model = apply_lora(build_tiny_videoalign(seed=1), rank=4, random_b=True)
    save_videoalign_checkpoint(model, tmp_path / "lora")
    shutil.move(tmp_path / "lora" / "base", tmp_path / "elsewhere")  # model_config.json still says "base"
    videos = clips(2)
    want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    _, spec = _spec(tmp_path / "lora", base=f"'{tmp_path / 'elsewhere'}'")
    got = RewardScorer("videoalign", spec.checkpoint, device="cpu", **spec.scorer_options()).score(videos, PROMPTS[:2],
                                                                                                    ["a", "b"])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)  # the adapter folded into the weights
    with pytest.raises(OSError):  # without base: the named "base" is neither a directory nor reachable
        RewardScorer("videoalign", spec.checkpoint, device="cpu", **_spec(tmp_path / "lora")[1].scorer_options())


def test_bad_videoalign_config_is_one_line_naming_the_key(tiny):
    _, ckpt = tiny
    with pytest.raises(ConfigError, match="kind videoalign needs checkpoint"):
        load_config(None, ["rewards.models={va: {kind: videoalign}}"])
    with pytest.raises(ConfigError, match="fps and num_frames both set"):
        _spec(ckpt, fps=2.0, num_frames=4)
    with pytest.raises(ConfigError, match="rewards.models.va.aggregate"):
        _spec(ckpt, aggregate="median")
    with pytest.raises(ConfigError, match=r"rubric template must contain \{ta\}"):
        _spec(ckpt, rubric="'{prompt} {vq} {mq}'")
    with pytest.raises(ConfigError, match="fps applies to kind videoalign, not oracle"):
        load_config(None, ["rewards.models={o: {kind: oracle, fps: 2.0}}"])


def test_a_checkpoint_with_a_missing_key_fails_naming_it(tiny, tmp_path):
    _, ckpt = tiny
    bad = tmp_path / "bad"
    shutil.copytree(ckpt, bad)
    state = torch.load(bad / "model.pth", weights_only=True)
    state.pop("visual.blocks.0.attn.qkv.weight")
    torch.save(state, bad / "model.pth")
    with pytest.raises(ValueError, match=r"1 missing key: visual\.blocks\.0\.attn\.qkv\.weight"):
        RewardScorer("videoalign", bad, device="cpu", **_spec(bad)[1].scorer_options())
    # the CLI: `videorl reward serve` loads it before serving; one line, exit 2
    out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "reward", "serve", "--model", "va",
                          f"rewards.models={{va: {{kind: videoalign, checkpoint: '{bad}'}}}}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("videorl: error: ") and "1 missing key: visual.blocks.0.attn.qkv.weight" in lines[0]
