"""VideoDiT: shapes, positional sensitivity, no causal leak, checkpoints; the tokenizer and video conversions."""

import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from policy.model import (
    ModelConfig,
    VideoDiT,
    apply_rotary,
    causal_frame_mask,
    model_to_videos,
    sincos_2d,
    videos_to_model,
)
from policy.text import WordTokenizer
from tests.policy.helpers import VOCAB, make_model


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


IDS = torch.tensor([[1, 3, 10, 0], [1, 4, 11, 13]])


# --- tokenizer ------------------------------------------------------------------------------------------


def test_tokenizer_pads_and_rejects_unknown_words():
    tok = WordTokenizer(VOCAB)
    ids = tok.encode(["a red square", "a blue circle moving left"])
    assert ids.tolist() == [[1, 3, 10, 0, 0, 0, 0, 0], [1, 5, 11, 2, 13, 0, 0, 0]]
    assert WordTokenizer(VOCAB, max_words=5).encode(["A Red  square"]).tolist() == [[1, 3, 10, 0, 0]]
    assert tok.decode(ids) == ["a red square", "a blue circle moving left"]
    with pytest.raises(ValueError, match="'purple'.*'a purple square'"):
        tok.encode(["a red square", "a purple square"])
    with pytest.raises(ValueError, match="max_words"):
        tok.encode([" ".join(["a"] * 9)])


# --- config ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(size=15), "size"),
        (dict(frames=7), "frames"),
        (dict(window=3, sink=2), "window"),
        (dict(dim=30, heads=4), "dim"),
        (dict(chunk=0), "chunk"),
        (dict(colour=1), "colour"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kw, field):
    with pytest.raises(ValidationError, match=field):
        ModelConfig(vocab=VOCAB, **kw)


def test_config_window_defaults_to_full_clip():
    assert ModelConfig(vocab=VOCAB).window == 8
    assert ModelConfig(vocab=VOCAB, frames=12, chunk=3).window == 12


# --- forward passes -------------------------------------------------------------------------------------


def test_output_shapes_and_input_checks():
    model = make_model()
    x = rand(2, 8, 3, 16, 16)
    assert model.velocity(x, torch.tensor([0.3, 0.9]), IDS).shape == x.shape
    assert model.velocity(x[:, :3], torch.rand(2, 3), IDS).shape == (2, 3, 3, 16, 16)
    assert model.velocity_causal(x, torch.rand(2, 8), x, IDS).shape == x.shape
    assert model.velocity_causal(x[:, :2], torch.rand(2, 2), x[:, :2], IDS).shape == (2, 2, 3, 16, 16)
    assert model.velocity_causal(rand(2, 24, 3, 16, 16), torch.rand(2), rand(2, 24, 3, 16, 16), IDS).shape[1] == 24
    assert model.velocity_chunk(x[:, :2], torch.rand(2), IDS, model.new_cache(), 0).shape == (2, 2, 3, 16, 16)
    with pytest.raises(ValueError, match=r"expected|\[B, T, 3, 16, 16\]"):
        model.velocity(rand(2, 8, 3, 8, 8), torch.rand(2), IDS)
    with pytest.raises(ValueError, match="sigma"):
        model.velocity(x, torch.rand(3), IDS)
    with pytest.raises(ValueError, match="1..8 frames"):
        model.velocity(rand(2, 10, 3, 16, 16), torch.rand(2), IDS)
    with pytest.raises(ValueError, match="multiple of chunk"):
        model.velocity_causal(x[:, :3], torch.rand(2), x[:, :3], IDS)
    with pytest.raises(ValueError, match="start_frame must be 0"):
        model.velocity_chunk(x[:, :2], torch.rand(2), IDS, model.new_cache(), 2)


def test_zero_init_model_predicts_zero_velocity():
    model = VideoDiT(ModelConfig(vocab=VOCAB, dim=32, depth=2, heads=2))
    assert model.velocity(rand(1, 8, 3, 16, 16), torch.rand(1), IDS[:1]).abs().max() == 0


def test_bidirectional_is_sensitive_to_frame_order():
    """Without the rotary frame positions the network would be permutation-equivariant over time."""
    model = make_model()
    x = rand(2, 8, 3, 16, 16)
    sigma = torch.full((2,), 0.5)
    perm = torch.tensor([3, 0, 6, 1, 7, 2, 5, 4])
    v = model.velocity(x, sigma, IDS)
    v_perm = model.velocity(x[:, perm], sigma, IDS)
    assert (v_perm - v[:, perm]).abs().max() > 1e-3
    # the same positions give the same answer: the difference is really the order
    assert torch.allclose(model.velocity(x.clone(), sigma, IDS), v, atol=1e-6)


def test_prompt_conditioning_is_a_padding_invariant_bag_of_words():
    model = make_model()
    x = rand(1, 8, 3, 16, 16)
    s = torch.full((1,), 0.5)
    v = model.velocity(x, s, torch.tensor([[1, 3, 10]]))
    assert torch.allclose(model.velocity(x, s, torch.tensor([[1, 3, 10, 0, 0]])), v, atol=1e-6)
    assert (model.velocity(x, s, torch.tensor([[1, 4, 10]])) - v).abs().max() > 1e-3  # blue, not red


@pytest.mark.parametrize("window, sink", [(8, 0), (4, 2), (4, 0)])
def test_causal_pass_does_not_leak_the_future(window, sink):
    model = make_model(window=window, sink=sink)
    noisy, clean = rand(2, 8, 3, 16, 16, seed=1), rand(2, 8, 3, 16, 16, seed=2)
    sigma = torch.tensor([0.2, 0.2, 0.5, 0.5, 0.7, 0.7, 0.9, 0.9]).expand(2, 8)
    v = model.velocity_causal(noisy, sigma, clean, IDS)
    for j in range(1, 4):  # change every frame from chunk j on, noisy and clean
        noisy2, clean2 = noisy.clone(), clean.clone()
        noisy2[:, 2 * j :] = rand(2, 8 - 2 * j, 3, 16, 16, seed=10 + j)
        clean2[:, 2 * j :] = rand(2, 8 - 2 * j, 3, 16, 16, seed=20 + j)
        v2 = model.velocity_causal(noisy2, sigma, clean2, IDS)
        assert (v2[:, : 2 * j] - v[:, : 2 * j]).abs().max() < 1e-6
        assert (v2[:, 2 * j :] - v[:, 2 * j :]).abs().max() > 1e-3
    # a noisy chunk never sees its own clean frames (they are what it is predicting)
    clean3 = clean.clone()
    clean3[:, 2:4] = rand(2, 2, 3, 16, 16, seed=30)
    assert (model.velocity_causal(noisy, sigma, clean3, IDS)[:, 2:4] - v[:, 2:4]).abs().max() < 1e-6


def test_causal_mask_of_a_small_window():
    # 6 frames, chunks of 2, window 4, sink 0: noisy chunk 2 (frames 4, 5) sees clean 2, 3 only
    mask = causal_frame_mask(6, chunk=2, window=4, sink=0)
    n_clean = 4
    assert mask[n_clean + 4, :n_clean].tolist() == [False, False, True, True]
    assert mask[n_clean + 4, n_clean:].tolist() == [False, False, False, False, True, True]
    assert mask[2, :n_clean].tolist() == [True, True, True, True]  # clean chunk 1 sees chunks 0, 1
    assert not mask[:n_clean, n_clean:].any()  # clean frames never see noisy ones


def test_detach_history_stops_gradient_into_the_clean_frames():
    model = make_model()
    noisy = rand(1, 8, 3, 16, 16, seed=1)
    for detach, expect_grad in ((False, True), (True, False)):
        clean = rand(1, 8, 3, 16, 16, seed=2).requires_grad_(True)
        model.velocity_causal(noisy, torch.rand(1), clean, IDS[:1], detach_history=detach).square().sum().backward()
        assert (clean.grad.abs().sum() > 0) == expect_grad


# --- checkpoints and conversions ------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model(window=6, sink=2)
    model.save(tmp_path / "ckpt" / "model.safetensors")
    assert json.loads((tmp_path / "ckpt" / "model.json").read_text())["sink"] == 2
    loaded = VideoDiT.load(tmp_path / "ckpt" / "model.safetensors")
    assert loaded.cfg == model.cfg
    x = rand(2, 8, 3, 16, 16)
    s = torch.tensor([0.3, 0.6])
    assert torch.equal(loaded.velocity(x, s, IDS), model.velocity(x, s, IDS))
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_checkpoint_errors_name_the_culprit(tmp_path):
    model = make_model()
    path = tmp_path / "model.safetensors"
    model.save(path)
    with pytest.raises(ValueError, match=r"tensor 'pos_embed' has shape \[16, 32\], the model expects \[16, 48\]"):
        VideoDiT.load(path, cfg=ModelConfig(vocab=VOCAB, dim=48, depth=2, heads=2))
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        VideoDiT.load(tmp_path / "nowhere.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    (tmp_path / "bad.json").write_text(model.cfg.model_dump_json())
    with pytest.raises(ValueError, match="bad.safetensors"):
        VideoDiT.load(tmp_path / "bad.safetensors")
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ValueError, match="model.json"):
        VideoDiT.load(path)
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        VideoDiT.load(path)
    loaded = VideoDiT.load(path, cfg=model.cfg)  # an explicit config needs no .json
    assert torch.equal(loaded.out.weight, model.out.weight)


def test_video_conversions_round_trip():
    videos = np.random.default_rng(0).random((2, 8, 16, 16, 3), dtype=np.float32)
    x = videos_to_model(videos)
    assert x.shape == (2, 8, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert np.allclose(model_to_videos(x), videos, atol=1e-6)
    assert model_to_videos(torch.full((1, 1, 3, 2, 2), 5.0)).max() == 1.0  # clamped
    assert torch.allclose(videos_to_model((videos * 255).astype(np.uint8)), x, atol=2 / 255 + 1e-6)
    with pytest.raises(ValueError, match=r"\[N, T, H, W, C\]"):
        videos_to_model(videos[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        videos_to_model(videos * 2)


# --- conditioning and positions -------------------------------------------------------------------------


def test_text_attention_reads_the_words_as_an_unordered_bag():
    model = make_model()
    x, s = rand(1, 8, 3, 16, 16), torch.full((1,), 0.5)
    v = model.velocity(x, s, torch.tensor([[1, 3, 10, 2, 13]]))
    assert torch.allclose(model.velocity(x, s, torch.tensor([[13, 10, 2, 3, 1, 0]])), v, atol=1e-5)
    # the words reach the frames through attention alone, not only through the pooled adaLN path
    with torch.no_grad():
        model.text_mlp[-1].weight.zero_()
        model.text_mlp[-1].bias.zero_()
    red, blue = (model.velocity(x, s, torch.tensor([[1, c, 10]])) for c in (3, 5))
    assert (red - blue).abs().max() > 1e-3
    without = make_model(text_attention=False)
    with torch.no_grad():
        without.text_mlp[-1].weight.zero_()
        without.text_mlp[-1].bias.zero_()
    red, blue = (without.velocity(x, s, torch.tensor([[1, c, 10]])) for c in (3, 5))
    assert (red - blue).abs().max() == 0


def test_3d_rotary_logits_depend_only_on_relative_positions():
    """q.k after rotary depends on (frame, row, column) differences only: what lets cached keys keep their
    absolute positions, and lets attention look for "the same object one patch to the left"."""
    model = make_model()
    d = model.cfg.dim // model.cfg.heads
    q, k = rand(d, seed=1), rand(d, seed=2)

    def logit(qf, qcell, kf, kcell):  # cell = row * 4 + column on the 4 x 4 patch grid
        cos, sin = model._rotary(torch.tensor([qf, kf]))
        qi, ki = qcell, 16 + kcell
        rq = apply_rotary(q.view(1, 1, 1, d), cos[qi], sin[qi]).flatten()
        rk = apply_rotary(k.view(1, 1, 1, d), cos[ki], sin[ki]).flatten()
        return float(rq @ rk)

    base = logit(3, 5, 1, 6)  # query (frame 3, row 1, col 1), key (frame 1, row 1, col 2)
    assert logit(13, 5, 11, 6) == pytest.approx(base, abs=1e-4)  # both frames shifted by 10
    assert logit(3, 10, 1, 11) == pytest.approx(base, abs=1e-4)  # both cells moved one row down and one column right
    assert abs(logit(3, 5, 1, 7) - base) > 1e-3  # a different column offset
    assert abs(logit(3, 5, 1, 10) - base) > 1e-3  # a different row offset
    assert abs(logit(3, 5, 2, 6) - base) > 1e-3  # a different frame offset


def test_sincos_2d_codes_row_then_column():
    # grid 2, dim 4: one frequency (1 rad per cell); [sin, cos](row) then [sin, cos](column)
    s1, c1 = np.sin(1.0), np.cos(1.0)
    expected = [[0, 1, 0, 1], [0, 1, s1, c1], [s1, c1, 0, 1], [s1, c1, s1, c1]]
    assert np.allclose(sincos_2d(2, 4).numpy(), expected, atol=1e-6)
    code = sincos_2d(4, 64)
    assert code.shape == (16, 64)
    assert torch.cdist(code, code).add(torch.eye(16) * 9).min() > 0.5  # every patch position is distinct
    model = VideoDiT(ModelConfig(vocab=VOCAB, dim=32, depth=2, heads=2))
    assert torch.equal(model.pos_embed.data, sincos_2d(4, 32))  # the learned embedding starts there
