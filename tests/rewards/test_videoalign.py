"""VideoAlign-style VLM reward: tiny random Qwen-VL models saved in VideoAlign's old layout, loaded back, scored.

Nothing is downloaded: the models are built from config, the tokenizer offline. Every number is checked against a
direct forward of the in-memory model the checkpoint was written from.
"""

import json
import math

import numpy as np
import pytest
import torch

from rewards.aggregators import top_fraction_mean
from rewards.errors import DataError
from rewards.videoalign import (DIMS, REWARD_TOKENS, RUBRIC, FrameSampling, VideoAlignScorer, apply_lora,
                                build_tiny_videoalign, frame_indices, frame_size, load_videoalign, new_to_old_key,
                                old_to_new_key, patchify, preference_loss, save_videoalign_checkpoint,
                                train_videoalign)
from rewards.world import degrade, render, to_uint8

PROMPTS = ["a red circle moving left quickly", "a blue square moving up slowly",
           "a green triangle moving right quickly", "a white circle moving down slowly"]
STARTS = [(8.0, 11.0), (11.0, 8.0), (8.0, 5.0), (5.0, 8.0)]


def clips(n=4):
    """World renders, uint8 [n, 8, 16, 16, 3]."""
    return np.stack([to_uint8(render(p, s)) for p, s in zip(PROMPTS[:n], STARTS[:n])])


def batch(videos, prompts=PROMPTS):
    return {"ids": [f"clip-{i}" for i in range(len(videos))], "videos": videos, "prompts": list(prompts[:len(videos)])}


@torch.no_grad()
def direct_forward(model, video, prompt, **kw):
    """One clip through the Qwen-VL backbone and rm_head by hand: head output d at the position of token d."""
    inputs = model.encode([video], [prompt], **kw)
    ids = inputs["input_ids"]
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if "second_per_grid_ts" in inputs else {}
    hidden = model.base_vlm.model(input_ids=ids, attention_mask=inputs["attention_mask"],
                                  pixel_values_videos=inputs["pixel_values_videos"],
                                  video_grid_thw=inputs["video_grid_thw"],
                                  mm_token_type_ids=(ids == model.config.video_token_id).int() * 2,
                                  **extra).last_hidden_state[0]
    out = []
    for d, dim in enumerate(DIMS):
        tid = model.tokenizer.convert_tokens_to_ids(REWARD_TOKENS[dim])
        (pos,) = (ids[0] == tid).nonzero()[0].tolist()
        out.append(model.rm_head(hidden[pos])[d].item())
    return np.array(out, np.float32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(in-memory tiny Qwen2-VL reward model, its full VideoAlign checkpoint directory)."""
    out = tmp_path_factory.mktemp("videoalign") / "full"
    return build_tiny_videoalign(out, seed=0), out


# ---------------------------------------------------------------- preprocessing

def test_key_renames_match_transformers_5():
    assert old_to_new_key("visual.blocks.0.attn.qkv.weight") == "model.visual.blocks.0.attn.qkv.weight"
    assert old_to_new_key("model.layers.1.mlp.up_proj.weight") == "model.language_model.layers.1.mlp.up_proj.weight"
    assert old_to_new_key("model.embed_tokens.weight") == "model.language_model.embed_tokens.weight"
    for kept in ("model.language_model.norm.weight", "model.visual.merger.mlp.0.bias", "lm_head.weight",
                 "rm_head.weight"):
        assert old_to_new_key(kept) == kept
    assert new_to_old_key("model.language_model.norm.weight") == "model.norm.weight"


def test_frame_sampling_and_pixel_budget():
    # 8 frames at 8 fps: every frame; 2 fps -> 2 frames; 3 frames -> rounded to 4 (temporal patch 2)
    assert frame_indices(8, FrameSampling()).tolist() == list(range(8))
    assert frame_indices(8, FrameSampling(fps=2.0)).tolist() == [0, 7]
    assert frame_indices(8, FrameSampling(num_frames=3)).tolist() == [0, 2, 5, 7]
    assert frame_size(16, 16, 28, 56 * 56, 56 * 56) == (56, 56)  # world frames upsampled to the budget
    assert frame_size(480, 832, 28, 56 * 56, 448 * 448) == (336, 588)  # 197 568 <= 200 704 pixels
    with pytest.raises(ValueError, match="fps or num_frames"):
        FrameSampling(fps=2.0, num_frames=4)


def test_patchify_layout():
    # [T=2, C=3, H=56, W=56] -> grid (1, 4, 4); a patch is (C, tp, 14, 14) flattened
    x = torch.arange(2 * 3 * 56 * 56, dtype=torch.float32).reshape(2, 3, 56, 56)
    patches, grid = patchify(x, 14, 2, 2)
    assert grid == (1, 4, 4) and patches.shape == (16, 3 * 2 * 14 * 14)
    # the second patch is the right neighbour of the first within the 2x2 merge window
    assert torch.equal(patches[1].reshape(3, 2, 14, 14), x[:, :, 0:14, 14:28].permute(1, 0, 2, 3))
    # the third is the one below the first
    assert torch.equal(patches[2].reshape(3, 2, 14, 14), x[:, :, 14:28, 0:14].permute(1, 0, 2, 3))


# ---------------------------------------------------------------- loading and scoring

def test_full_checkpoint_scores_equal_direct_forward(tiny):
    model, ckpt = tiny
    assert (ckpt / "model.pth").is_file()
    keys = torch.load(ckpt / "model.pth", weights_only=True).keys()
    assert "visual.patch_embed.proj.weight" in keys and "model.embed_tokens.weight" in keys and "rm_head.weight" in keys
    scorer = VideoAlignScorer(ckpt, device="cpu", max_pixels=56 * 56)
    videos = clips()
    got = scorer.score(batch(videos))
    assert set(got) == set(DIMS) and all(v.dtype == np.float32 and v.shape == (4,) for v in got.values())
    want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    np.testing.assert_allclose(np.stack([got[d] for d in DIMS], 1), want, atol=1e-5, rtol=0)
    assert np.ptp(want, axis=0).min() > 1e-3  # the clips' scores differ: the check is not vacuous


def test_scorer_settings_change_version_and_scores(tiny):
    model, ckpt = tiny
    a = VideoAlignScorer(ckpt, device="cpu")
    assert a.version == VideoAlignScorer(ckpt, device="cpu").version
    assert a.version != VideoAlignScorer(ckpt, device="cpu", aggregate="astrolabe").version
    assert a.version != VideoAlignScorer(ckpt, device="cpu", fps=4.0).version
    # another rubric text (e.g. the one a real checkpoint was trained with) reaches the model
    rubric = "Rate the video for \" {prompt} \" : quality {vq} motion {mq} alignment {ta}"
    other = VideoAlignScorer(ckpt, device="cpu", rubric=rubric)
    assert other.version != a.version
    videos = clips(2)
    got = other.score(batch(videos))
    model.rubric = rubric
    try:
        want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    finally:
        model.rubric = RUBRIC
    np.testing.assert_allclose(np.stack([got[d] for d in DIMS], 1), want, atol=1e-5, rtol=0)
    assert np.abs(want - np.stack([a.score(batch(videos))[d] for d in DIMS], 1)).min() > 1e-4
    with pytest.raises(ValueError, match=r"\{mq\}"):
        VideoAlignScorer(ckpt, device="cpu", rubric="{prompt} {vq} {ta}")


@pytest.mark.parametrize("kind", ["qwen2_5_vl"])
def test_qwen25_checkpoint_scores_equal_direct_forward(tmp_path, kind):
    model = build_tiny_videoalign(tmp_path, seed=3, kind=kind)
    got = VideoAlignScorer(tmp_path, device="cpu").score(batch(clips(2)))
    want = np.stack([direct_forward(model, v, p) for v, p in zip(clips(2), PROMPTS)])
    np.testing.assert_allclose(np.stack([got[d] for d in DIMS], 1), want, atol=1e-5, rtol=0)


def test_lora_checkpoint_scores_equal_direct_forward(tmp_path):
    from safetensors.torch import load_file

    model = apply_lora(build_tiny_videoalign(seed=1), rank=4, random_b=True)
    with torch.no_grad():  # trained reward-token embeddings travel in non_lora_state_dict.pth
        emb = model.base_vlm.get_input_embeddings().weight
        for t in REWARD_TOKENS.values():
            emb[model.tokenizer.convert_tokens_to_ids(t)] += 0.5
    save_videoalign_checkpoint(model, tmp_path)
    adapter_keys = load_file(tmp_path / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.") for k in adapter_keys)
    non_lora = torch.load(tmp_path / "non_lora_state_dict.pth", weights_only=True)
    assert set(non_lora) == {"base_model.model.rm_head.weight", "base_model.model.model.embed_tokens.weight"}
    videos = clips(3)
    want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    unmerged = load_videoalign(tmp_path, device="cpu", merge_lora=False)
    np.testing.assert_allclose(unmerged.score(list(videos), PROMPTS[:3]).detach().numpy(), want, atol=1e-5, rtol=0)
    # the scorer folds the adapter into the weights: W + BA rounds differently from Wx + B(Ax)
    got = VideoAlignScorer(tmp_path, device="cpu").score(batch(videos))
    np.testing.assert_allclose(np.stack([got[d] for d in DIMS], 1), want, atol=1e-4, rtol=0)
    base_only = build_tiny_videoalign(seed=1)
    base_only.rm_head.load_state_dict(model.rm_head.state_dict())
    assert np.abs(direct_forward(base_only, videos[0], PROMPTS[0]) - want[0]).max() > 1e-3  # the adapter matters



def test_lora_checkpoint_with_missing_base_names_it(tmp_path):
    save_videoalign_checkpoint(apply_lora(build_tiny_videoalign(seed=1), rank=4, random_b=True), tmp_path / "ckpt")
    missing = tmp_path / "no-such-base"
    with pytest.raises(FileNotFoundError, match="no-such-base.*set `base:`"):
        load_videoalign(tmp_path / "ckpt", base=missing, device="cpu")

def _rewrite(ckpt, tmp_path, edit):
    out = tmp_path / "edited"
    out.mkdir()
    for f in ckpt.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    state = torch.load(ckpt / "model.pth", weights_only=True)
    edit(state)
    torch.save(state, out / "model.pth")
    return out


def test_missing_key_fails_naming_it(tiny, tmp_path):
    _, ckpt = tiny
    bad = _rewrite(ckpt, tmp_path, lambda s: s.pop("model.layers.1.self_attn.q_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing key: model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_videoalign(bad, device="cpu")


def test_unexpected_key_fails_naming_it(tiny, tmp_path):
    _, ckpt = tiny
    bad = _rewrite(ckpt, tmp_path, lambda s: s.__setitem__("visual.blocks.7.attn.qkv.weight", torch.zeros(3)))
    with pytest.raises(ValueError, match=r"1 unexpected key: visual\.blocks\.7\.attn\.qkv\.weight"):
        load_videoalign(bad, device="cpu")


def test_missing_adapter_key_fails_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    save_videoalign_checkpoint(apply_lora(build_tiny_videoalign(seed=1), rank=2), tmp_path)
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    adapter.pop("base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight")
    save_file(adapter, tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"missing key: base_model\.model\.model\.language_model\.layers\.0\."
                                         r"self_attn\.v_proj\.lora_B\.default\.weight"):
        load_videoalign(tmp_path, device="cpu")


def test_newest_checkpoint_step_directory_is_loaded(tiny, tmp_path):
    """VideoAlign's training output: model_config.json on top, weights in checkpoint-<step>/ (the newest wins)."""
    model, ckpt = tiny
    for step in (2, 10):
        (tmp_path / f"checkpoint-{step}").mkdir()
        for f in ckpt.iterdir():
            if f.name != "model_config.json":
                (tmp_path / f"checkpoint-{step}" / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model_config.json").write_bytes((ckpt / "model_config.json").read_bytes())
    state = torch.load(ckpt / "model.pth", weights_only=True)
    state["rm_head.weight"] = state["rm_head.weight"] * 0.0  # the older step is a different model
    torch.save(state, tmp_path / "checkpoint-2" / "model.pth")
    got = load_videoalign(tmp_path, device="cpu").score(list(clips(1)), PROMPTS[:1]).detach().numpy()[0]
    np.testing.assert_allclose(got, direct_forward(model, clips(1)[0], PROMPTS[0]), atol=1e-5, rtol=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no VideoAlign checkpoint"):
        load_videoalign(tmp_path / "empty", device="cpu")


def test_normalisation_from_model_config(tiny, tmp_path):
    model, ckpt = tiny
    out = _rewrite(ckpt, tmp_path, lambda s: None)
    meta = json.loads((out / "model_config.json").read_text())
    meta["inference_config"] = {"VQ_mean": 0.5, "VQ_std": 2.0, "MQ_mean": -1.0, "MQ_std": 0.25,
                                "TA_mean": 0.0, "TA_std": 4.0}
    (out / "model_config.json").write_text(json.dumps(meta))
    videos = clips(2)
    raw = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    got = VideoAlignScorer(out, device="cpu").score(batch(videos))
    np.testing.assert_allclose(got["vq"], (raw[:, 0] - 0.5) / 2.0, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["mq"], (raw[:, 1] + 1.0) / 0.25, atol=4e-5, rtol=0)
    np.testing.assert_allclose(got["ta"], raw[:, 2] / 4.0, atol=1e-5, rtol=0)
    off = VideoAlignScorer(out, device="cpu", normalize=False).score(batch(videos))
    np.testing.assert_allclose(off["mq"], raw[:, 1], atol=1e-5, rtol=0)


# ---------------------------------------------------------------- Astrolabe aggregators

def test_vq_top_fraction_of_frames(tiny):
    model, ckpt = tiny
    videos = clips(2)
    clip_level = VideoAlignScorer(ckpt, device="cpu").score(batch(videos))
    got = VideoAlignScorer(ckpt, device="cpu", aggregate=["vq_top_frames"]).score(batch(videos))
    # 8 frames, each scored alone (repeated to one temporal patch); the top ceil(0.3 * 8) = 3 averaged
    per_frame = np.array([[direct_forward(model, v, p, frame=f)[0] for f in range(8)]
                          for v, p in zip(videos, PROMPTS)])
    np.testing.assert_allclose(got["vq"], top_fraction_mean(per_frame, 0.3), atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["vq"], np.sort(per_frame, 1)[:, -3:].mean(1), atol=1e-5, rtol=0)
    assert np.abs(got["vq"] - clip_level["vq"]).min() > 1e-4  # a different quantity than the clip's VQ
    np.testing.assert_allclose(got["mq"], clip_level["mq"], atol=1e-6)
    np.testing.assert_allclose(got["ta"], clip_level["ta"], atol=1e-6)


def test_mq_on_grayscale_ignores_luma_preserving_colour_change(tiny):
    _, ckpt = tiny
    video = (30 + 0.75 * clips(1)[0].astype(np.int16)).astype(np.int16)  # room on both sides of every channel
    # 299·15 - 587·9 + 114·7 = 0: this colour shift keeps the BT.601 luma of every object pixel exactly
    shift = np.array([15, -9, 7], np.int16)
    recoloured = np.where(video.max(-1, keepdims=True) > 30, video + shift, video)
    pair = np.stack([video, recoloured]).astype(np.uint8)
    assert np.abs(pair[0] @ np.array([299, 587, 114]) - pair[1] @ np.array([299, 587, 114])).max() == 0
    assert (pair[0] != pair[1]).any()
    ids = {"ids": ["orig", "recoloured"], "videos": pair, "prompts": [PROMPTS[0]] * 2}
    colour = VideoAlignScorer(ckpt, device="cpu").score(ids)
    gray = VideoAlignScorer(ckpt, device="cpu", aggregate=["mq_grayscale"]).score(ids)
    assert abs(colour["mq"][0] - colour["mq"][1]) > 1e-4  # the colour model sees the change
    assert abs(gray["mq"][0] - gray["mq"][1]) < 1e-5  # the grayscale MQ does not
    assert abs(gray["mq"][0] - colour["mq"][0]) > 1e-4
    np.testing.assert_allclose(gray["vq"], colour["vq"], atol=1e-6)  # VQ and TA still see colour
    # grayscale MQ = MQ of the explicit three-channel luma clip
    luma = np.round(pair[:1].astype(np.float64) @ np.array([0.299, 0.587, 0.114]))
    explicit = VideoAlignScorer(ckpt, device="cpu").score(
        {"ids": ["luma"], "videos": np.repeat(luma[..., None], 3, -1).astype(np.uint8), "prompts": [PROMPTS[0]]})
    assert abs(explicit["mq"][0] - gray["mq"][0]) < 5e-3  # up to the rounding of luma to uint8


# ---------------------------------------------------------------- bad samples

def test_bad_samples_raise_data_error_naming_them(tiny):
    _, ckpt = tiny
    scorer = VideoAlignScorer(ckpt, device="cpu")
    videos = list(clips(2))
    videos[1] = videos[1][..., :2]
    with pytest.raises(DataError, match="clip-1") as err:
        scorer.score(batch(videos))
    assert err.value.sample_id == "clip-1"
    with pytest.raises(DataError, match="clip-0"):
        scorer.score({"ids": ["clip-0"], "videos": clips(1), "prompts": [""]})
    with pytest.raises(DataError, match="clip-0"):
        scorer.score({"ids": ["clip-0"], "videos": clips(1).astype(np.float32) * np.nan, "prompts": PROMPTS[:1]})
    assert scorer.score({"ids": [], "videos": np.zeros((0, 8, 16, 16, 3), np.uint8), "prompts": []})["vq"].shape == (0,)
    with pytest.raises(DataError, match=r"clip-0.*<\|TA_reward\|>"):
        scorer.score({"ids": ["clip-0"], "videos": clips(1), "prompts": ["a red <|TA_reward|> circle"]})
    with pytest.raises(ValueError, match="unknown aggregate"):
        VideoAlignScorer(ckpt, device="cpu", aggregate="best_frame")


# ---------------------------------------------------------------- the plug-in contract

def test_runs_as_a_python_plugin_of_the_reward_pools(tiny):
    from rewards.scorer import RewardScorer

    model, ckpt = tiny
    scorer = RewardScorer("python", callable="rewards.videoalign:VideoAlignScorer",
                          kwargs={"checkpoint": str(ckpt), "aggregate": "clip"}, device="cpu")
    videos = clips(2)
    got = scorer.score(videos, PROMPTS[:2], ["a", "b"])  # [N, 3] in dims order
    want = np.stack([direct_forward(model, v, p) for v, p in zip(videos, PROMPTS)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert scorer.version.startswith("videoalign-")


# ---------------------------------------------------------------- training

def _preference_dir(tmp_path):
    """The project's preference data (rewards.preference) for two training prompts: truth vs degraded renders."""
    from rewards.preference import (PreferenceDataConfig, pair_table, render_references, score_pool,
                                    write_preference_data)

    cfg = PreferenceDataConfig(degraded_per_prompt=3, pairs_per_prompt=4, label_noise=0.0, val_fraction=0.0, seed=0)
    prompts = [PROMPTS[0], "a yellow square moving right slowly"]
    videos, meta = render_references(prompts, cfg.degraded_per_prompt, np.random.default_rng(0))
    pool = score_pool(videos, meta)
    return write_preference_data(tmp_path / "prefs", videos, pool, pair_table(pool, cfg), cfg)


def test_btt_steps_on_preference_data_lower_the_loss(tmp_path):
    from rewards.preference import read_preference_data
    from rewards.reward_model import PreferencePairs

    train = read_preference_data(_preference_dir(tmp_path), "train")
    assert len(train) == 8
    pairs = PreferencePairs(train.video_a, train.video_b, train.prompts, train.labels, train.score_a, train.score_b)
    model = build_tiny_videoalign(seed=2)
    with torch.no_grad():
        before = preference_loss(model, pairs, "btt").item()
    history = train_videoalign(model, train, "btt", steps=6, batch_size=8, lr=3e-3, warmup=0.0)
    with torch.no_grad():
        after = preference_loss(model, pairs, "btt").item()
    assert len(history) == 6 and all(math.isfinite(h) for h in history)
    assert history[0] == pytest.approx(before, abs=1e-5)  # full batch: step 0 sees exactly these pairs
    assert after < before - 0.05, (before, after, history)
    assert not model.training


@pytest.mark.parametrize("loss", ["bt", "regression"])
def test_bt_and_regression_steps_run(tmp_path, loss):
    from rewards.preference import read_preference_data

    train = read_preference_data(_preference_dir(tmp_path), "train")
    model = apply_lora(build_tiny_videoalign(seed=4), rank=2)
    head = model.rm_head.weight.detach().clone()
    lora_b = next(p for n, p in model.vlm.named_parameters() if "lora_B" in n).detach().clone()
    history = train_videoalign(model, train, loss, steps=2, batch_size=4, lr=1e-3)
    assert len(history) == 2 and all(math.isfinite(h) for h in history)
    assert not torch.equal(head, model.rm_head.weight)
    assert not torch.equal(lora_b, next(p for n, p in model.vlm.named_parameters() if "lora_B" in n))
