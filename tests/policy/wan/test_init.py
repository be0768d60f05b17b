"""policy.wan.init: random Wan model directories that the real diffusers/transformers loaders read offline."""

import json

import pytest
import torch
from safetensors.torch import load_file

from policy.wan.init import PRESETS, _build, build_tokenizer, write_random_model
from rewards.world import VOCAB

WEIGHTS = {  # component -> weights file inside its subfolder
    "transformer": "transformer/diffusion_pytorch_model.safetensors",
    "vae": "vae/diffusion_pytorch_model.safetensors",
    "text_encoder": "text_encoder/model.safetensors",
}


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Every load below must work with the hub unreachable."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """The shapes and tiny presets written once (seed 0) for the read-only tests: {preset: (dir, info)}."""
    root = tmp_path_factory.mktemp("models")
    return {p: (root / p, write_random_model(root / p, p, seed=0)) for p in ("shapes", "tiny")}


def load_components(d, latent):
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    out = {
        "transformer": WanTransformer3DModel.from_pretrained(d, subfolder="transformer"),
        "text_encoder": UMT5EncoderModel.from_pretrained(d, subfolder="text_encoder"),
        "tokenizer": AutoTokenizer.from_pretrained(d, subfolder="tokenizer"),
    }
    if latent:
        out["vae"] = AutoencoderKLWan.from_pretrained(d, subfolder="vae")
    return out


def test_tokenizer_ids_eos_unk_and_padding():
    tok = build_tokenizer(["a", "red", "circle", "moving", "left", "quickly"])
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 9
    assert tok("a red circle moving left quickly").input_ids == [3, 4, 5, 6, 7, 8, 1]
    assert tok("A RED zebra").input_ids == [3, 4, 2, 1]  # lower-cased; unknown word -> <unk>
    batch = tok(["a red", "circle"], padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    assert batch.input_ids.tolist() == [[3, 4, 1, 0, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0, 0, 0]]
    assert batch.attention_mask.sum(1).tolist() == [3, 2]
    # Deterministic, and the vocabulary order sets the ids.
    assert build_tokenizer(["a", "red"]).get_vocab() == {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4}
    assert build_tokenizer(["red", "a"])("a").input_ids == [4, 1]
    with pytest.raises(ValueError, match="don't"):
        build_tokenizer(["don't"])


def test_tokenizer_round_trip_through_save_pretrained(written):
    from transformers import AutoTokenizer

    d, _ = written["shapes"]
    tok = AutoTokenizer.from_pretrained(d, subfolder="tokenizer")
    ids = tok("a red circle moving left quickly").input_ids
    words = dict(zip(VOCAB, range(3, 3 + len(VOCAB))))
    assert ids == [words[w] for w in "a red circle moving left quickly".split()] + [1]
    assert tok("a purple circle").input_ids == [words["a"], 2, words["circle"], 1]
    assert tok("a red", padding="max_length", max_length=8).input_ids == [words["a"], words["red"], 1, 0, 0, 0, 0, 0]
    assert tok.get_vocab() == build_tokenizer(VOCAB).get_vocab()


@pytest.mark.parametrize("preset", ["shapes", "tiny"])
def test_every_component_loads_and_matches_the_description(written, preset):
    d, info = written[preset]
    latent = preset == "tiny"
    assert info == json.loads((d / "videorl_model.json").read_text())
    assert (info["preset"], info["seed"], info["latent"]) == (preset, 0, latent)
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["transformer", "text_encoder", "tokenizer", "scheduler", "model_index.json", "videorl_model.json"]
        + (["vae"] if latent else []))
    # files: every file but the description itself, with its size on disk.
    on_disk = {p.relative_to(d).as_posix(): p.stat().st_size for p in d.rglob("*") if p.is_file()}
    assert info["files"] == {k: v for k, v in on_disk.items() if k != "videorl_model.json"}

    parts = load_components(d, latent)
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in parts.items() if k != "tokenizer"}
    assert info["params"] == params
    assert info["vocab_size"] == len(parts["tokenizer"]) == len(VOCAB) + 3 == 21
    assert parts["text_encoder"].config.vocab_size == 21
    assert parts["text_encoder"].config.d_model == parts["transformer"].config.text_dim == 32
    assert info["dtypes"] == {k: "float32" for k in params}
    if latent:  # diffusers' own test sizes and the real Wan latent normalisation
        assert params == {"transformer": 28_328, "vae": 13_861, "text_encoder": 21_376}
        vae = parts["vae"]
        assert len(vae.config.latents_mean) == len(vae.config.latents_std) == vae.config.z_dim == 16
        assert vae.config.latents_mean[0] == pytest.approx(-0.7571)
    else:
        assert params == {"transformer": 250_480, "text_encoder": 21_376}  # + 2 x 16 x 64 for the position planes
        assert (parts["transformer"].config.in_channels, parts["transformer"].config.out_channels) == (5, 3)


def test_shapes_transformer_works_in_pixel_space(written):
    """The shapes preset reads RGB clips and two position planes [B, 5, F=8, 16, 16] and writes RGB [B, 3, 8, 16, 16]
    directly (16 tokens of 4x4 px per frame)."""
    from diffusers import WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    d, _ = written["shapes"]
    tr = WanTransformer3DModel.from_pretrained(d, subfolder="transformer")
    te = UMT5EncoderModel.from_pretrained(d, subfolder="text_encoder")
    tok = AutoTokenizer.from_pretrained(d, subfolder="tokenizer")
    ids = tok(["a red circle moving left quickly"], padding="max_length", max_length=8, return_tensors="pt")
    with torch.no_grad():
        text = te(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state  # [1, 8, 32]
        v = tr(torch.randn(1, 5, 8, 16, 16), torch.tensor([500.0]), text, return_dict=False)[0]
    assert text.shape == (1, 8, 32)
    assert v.shape == (1, 3, 8, 16, 16) and torch.isfinite(v).all()


def test_wan_pipeline_loads_the_tiny_preset_and_samples(written):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline

    d, _ = written["tiny"]
    pipe = WanPipeline.from_pretrained(d)
    assert isinstance(pipe.vae, AutoencoderKLWan)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) and pipe.scheduler.config.shift == 5.0
    frames = pipe("a red circle moving left quickly", num_frames=5, height=16, width=16, num_inference_steps=2,
                  max_sequence_length=16, guidance_scale=1.0, output_type="np",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 5, 16, 16, 3)  # 5 frames -> 2 latent frames of 2x2 -> decoded back


def test_wan_pipeline_loads_the_pixel_space_preset_only_with_vae_none(written):
    """Without a VAE, model_index.json records "vae": [null, null]; diffusers then wants vae=None spelled out."""
    from diffusers import WanPipeline

    d, _ = written["shapes"]
    assert json.loads((d / "model_index.json").read_text())["vae"] == [None, None]
    pipe = WanPipeline.from_pretrained(d, vae=None)
    assert pipe.vae is None and pipe.transformer.config.in_channels == 5


def tensors(d):
    return {k: load_file(d / f) for k, f in WEIGHTS.items() if (d / f).exists()}


def test_same_seed_is_bit_identical_and_another_seed_differs(tmp_path, written):
    d0, _ = written["tiny"]
    state = torch.get_rng_state()
    write_random_model(tmp_path / "again", "tiny", seed=0)
    write_random_model(tmp_path / "seed1", "tiny", seed=1)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's global RNG is untouched
    for f in WEIGHTS.values():
        assert (tmp_path / "again" / f).read_bytes() == (d0 / f).read_bytes()
    a, b = tensors(d0), tensors(tmp_path / "seed1")
    for comp in WEIGHTS:
        assert a[comp].keys() == b[comp].keys()
        # Random-init tensors differ; norms (ones) and zero-init biases legitimately agree.
        differ = [k for k in a[comp] if not torch.equal(a[comp][k], b[comp][k])]
        assert len(differ) >= len(a[comp]) // 3, comp
    assert not torch.equal(a["transformer"]["patch_embedding.weight"], b["transformer"]["patch_embedding.weight"])


def test_transformer_weights_do_not_depend_on_the_vocabulary(tmp_path):
    """Each component has its own manual_seed(seed), so a bigger vocabulary changes only the text encoder."""
    write_random_model(tmp_path / "small", "shapes", seed=3, vocab=["a", "red"])
    write_random_model(tmp_path / "big", "shapes", seed=3, vocab=["a", "red", "green", "blue"])
    f = WEIGHTS["transformer"]
    assert (tmp_path / "small" / f).read_bytes() == (tmp_path / "big" / f).read_bytes()
    emb = {k: load_file(tmp_path / k / WEIGHTS["text_encoder"])["shared.weight"].shape for k in ("small", "big")}
    assert emb == {"small": (5, 32), "big": (7, 32)}


def test_refuses_a_non_empty_out_dir_and_leaves_no_temporary(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="model"):
        write_random_model(out, "tiny")
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()  # an empty directory is fine: it is replaced
    write_random_model(tmp_path / "empty", "tiny")
    assert (tmp_path / "empty" / "model_index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "model"]  # no .tmp sibling left behind


def test_unknown_preset_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="shapes, tiny, wan2.1-1.3b"):
        write_random_model(tmp_path / "x", "wan2.2-5b")
    assert not (tmp_path / "x").exists()
    assert PRESETS == ("shapes", "tiny", "wan2.1-1.3b")


def test_wan21_preset_has_the_real_shapes_on_meta():
    """The 1.3B preset is built on the meta device only (no memory, no init): real Wan2.1-T2V-1.3B sizes."""
    with torch.device("meta"):
        parts = _build("wan2.1-1.3b", 0, VOCAB)
    n = {k: sum(p.numel() for p in parts[k].parameters()) for k in ("transformer", "vae", "text_encoder")}
    assert n["transformer"] == 1_418_996_800  # 1.419e9, as the real checkpoint
    assert n["vae"] == 126_892_531  # default AutoencoderKLWan() = the real Wan2.1 VAE
    assert n["text_encoder"] < 6_000_000  # UMT5-XXL width (4096) but one small layer
    assert parts["text_encoder"].config.d_model == parts["transformer"].config.text_dim == 4096
    tr = parts["transformer"]
    assert tr.dtype == torch.bfloat16
    # Saved in bf16 except diffusers' keep-in-fp32 modules: 2.84 GB of weights instead of 5.68 GB.
    nbytes = sum(p.numel() * p.element_size() for p in tr.parameters())
    assert 2.83e9 < nbytes < 2.86e9
    assert tr.scale_shift_table.dtype == tr.blocks[0].norm2.weight.dtype == torch.float32
