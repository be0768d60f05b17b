"""Small random Wan models in diffusers format, so the real-model path runs with nothing downloaded.

`write_random_model(out_dir, preset, seed)` writes the directory layout diffusers' `WanPipeline` uses, one
`save_pretrained` per component, so the real loaders read it offline:

    out_dir/
      transformer/   WanTransformer3DModel.from_pretrained(out_dir, subfolder="transformer")
      vae/           AutoencoderKLWan.from_pretrained(out_dir, subfolder="vae")        (latent presets only)
      text_encoder/  transformers.UMT5EncoderModel.from_pretrained(out_dir, subfolder="text_encoder")
      tokenizer/     transformers.AutoTokenizer.from_pretrained(out_dir, subfolder="tokenizer")
      scheduler/     FlowMatchEulerDiscreteScheduler config (informational: videorl samples with its own policy.sde
                     schedule; only the flow `shift` recorded here needs matching)
      model_index.json   WanPipeline.from_pretrained(out_dir) for the latent presets
      videorl_model.json the description dict returned by write_random_model

Presets (PRESETS):
  "shapes"       PIXEL SPACE, no VAE: the transformer reads and writes RGB frames of the shapes world directly,
                 [B, 3, F, H, W] in [-1, 1] (Wan's channel-first layout; videorl's VideoDiT uses [B, T, C, H, W]),
                 8 frames of 16x16 px, patch (1, 4, 4) -> 16 tokens per frame. 0.25 M transformer params. It reads
                 two position planes beside RGB (in_channels 5, out_channels 3: policy.wan.policy.WanPolicy).
                 WanPipeline saves fine with vae=None (model_index.json records "vae": [null, null]), but
                 `WanPipeline.from_pretrained(out_dir)` then raises ValueError (it expects every component);
                 `WanPipeline.from_pretrained(out_dir, vae=None)` loads. That pipeline is a loader only: its
                 __call__ assumes VAE scale factors (4x time, 8x space) and decodes with the VAE.
  "tiny"         latent model with diffusers' own test sizes: AutoencoderKLWan(base_dim=3) (16 latent channels,
                 4x temporal / 8x spatial, the default Wan2.1 latents_mean/std kept in its config) + a 2-layer
                 transformer (patch (1, 2, 2)). Tens of thousands of params per component.
  "wan2.1-1.3b"  the real Wan2.1-T2V-1.3B transformer shape (1.42e9 params, saved in bfloat16: 2.8 GB) and the real
                 AutoencoderKLWan() shape (1.27e8 params, float32), random init; the text encoder has UMT5-XXL's width
                 (d_model 4096) but 1 layer, so prompt embeddings have the real [L, 4096] shape. For GPU machines
                 (writing it on a 2-core CPU took 28 s and 6 GB of RAM; 3.4 GB on disk).

All presets share the word-level tokenizer of `build_tokenizer` (default vocabulary: `rewards.world.VOCAB`, the
shapes world's words) and a UMT5 encoder sized to it; a random model has no use for the real 256k-token vocabulary.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

PRESETS = ("shapes", "tiny", "wan2.1-1.3b")

PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 (UMT5's pad/eos/unk ids)

_TRANSFORMER = {  # WanTransformer3DModel kwargs per preset
    "shapes": dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=32, in_channels=5, out_channels=3,
                   text_dim=32, freq_dim=64, ffn_dim=128, num_layers=4, cross_attn_norm=True,
                   qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "tiny": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
                 text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
                 qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
    "wan2.1-1.3b": dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                        out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024),
}
_VAE = {  # AutoencoderKLWan kwargs per latent preset; the defaults (incl. latents_mean/std) are the real Wan VAE
    "tiny": dict(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]),
    "wan2.1-1.3b": dict(),
}
_TEXT = {  # UMT5Config kwargs per preset (vocab_size comes from the tokenizer); d_model must equal the text_dim above
    "shapes": dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                   relative_attention_max_distance=16),
    "wan2.1-1.3b": dict(d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=2, relative_attention_num_buckets=32,
                        relative_attention_max_distance=128),
}
_TEXT["tiny"] = _TEXT["shapes"]
# Flow shift of the sampling schedule: the shapes world samples unshifted (orchestrator rollout.shift default 1.0);
# 5.0 is the documented FlowMatchEuler value for Wan (diffusers Wan docs), 3.0 Wan2.1's 480p value.
_SHIFT = {"shapes": 1.0, "tiny": 5.0, "wan2.1-1.3b": 3.0}
# bfloat16 halves the 1.3B transformer on disk (2.8 GB instead of 5.7 GB); the small presets stay float32.
_TRANSFORMER_DTYPE = {"shapes": torch.float32, "tiny": torch.float32, "wan2.1-1.3b": torch.bfloat16}


def build_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """Offline word-level tokenizer: <pad>=0, </s>=1, <unk>=2, then the words of `vocab` in the given order.

    Text is lower-cased and split on whitespace/punctuation (`Whitespace` pre-tokenizer); a word not in the vocabulary
    becomes <unk>; </s> is appended to every sequence (as UMT5's tokenizer does). Returns a
    `transformers.PreTrainedTokenizerFast` that `save_pretrained`s to tokenizer.json + tokenizer_config.json and
    reloads with `AutoTokenizer.from_pretrained`. Deterministic: the same vocab always gives the same ids.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ids = {PAD: 0, EOS: 1, UNK: 2}
    splitter = pre_tokenizers.Whitespace()
    for word in vocab:
        word = word.lower()
        # A word the pre-tokenizer would split (e.g. "don't") could never be looked up whole.
        if [p for p, _ in splitter.pre_tokenize_str(word)] != [word]:
            raise ValueError(f"vocab word {word!r} is not a single token under whitespace/punctuation splitting")
        ids.setdefault(word, len(ids))  # duplicates keep their first id
    tok = Tokenizer(models.WordLevel(ids, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = splitter
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, ids[EOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def _build(preset: str, seed: int, vocab: list[str]) -> dict:
    """The pipeline components of `preset`, weights drawn from torch.manual_seed(seed) (caller's RNG untouched).

    Each component is built right after its own torch.manual_seed(seed), so e.g. the transformer's weights do not
    depend on the vocabulary size or on which other components the preset has. Works under `torch.device("meta")`.
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from policy.wan.loading import cast_like_diffusers

    tokenizer = build_tokenizer(vocab)
    parts = {"tokenizer": tokenizer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=_SHIFT[preset]), "vae": None}
    with torch.random.fork_rng(devices=[]):  # CPU RNG only: init runs on CPU (or meta), CUDA state is not touched
        torch.manual_seed(seed)
        parts["text_encoder"] = UMT5EncoderModel(UMT5Config(
            vocab_size=len(tokenizer), **_TEXT[preset], feed_forward_proj="gated-gelu", is_encoder_decoder=False,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))  # ids inside the small vocab
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**_TRANSFORMER[preset])
        parts["transformer"] = cast_like_diffusers(transformer, _TRANSFORMER_DTYPE[preset])
        if preset in _VAE:
            torch.manual_seed(seed)
            parts["vae"] = AutoencoderKLWan(**_VAE[preset])
    return parts


def write_random_model(out_dir: str | Path, preset: str = "shapes", seed: int = 0, vocab: list[str] | None = None,
                       kind: str = "wan_causal") -> dict:
    """Write a random Wan model directory (layout in the module docstring) and return its description.

    out_dir must not exist or be an empty directory (else FileExistsError). The directory is built in a temporary
    sibling and renamed into place at the end, so a crash never leaves a half-written model at out_dir.
    The same (preset, seed, vocab) writes bit-identical weights; vocab defaults to `rewards.world.VOCAB`.

    Returns (also written to out_dir/videorl_model.json):
      preset, seed, latent (False: the transformer works on RGB pixels; True: on AutoencoderKLWan latents),
      shift (scheduler flow shift), vocab_size (tokenizer ids incl. the 3 specials),
      params {component: number of parameters}, dtypes {component: dtype of the saved weights, e.g. "bfloat16"; the
      bf16 transformer keeps its rope/time_embedder/scale_shift_table/norm weights in float32, as diffusers does},
      files {path relative to out_dir: size in bytes} (every file except videorl_model.json itself).
    """
    if kind not in ("wan", "wan_causal"):
        raise ValueError(f"unknown kind {kind!r}; choose wan or wan_causal (the directory layout is the same)")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    if vocab is None:
        from rewards.world import VOCAB  # the shapes world's words (lazy: policy does not depend on rewards)

        vocab = list(VOCAB)
    from diffusers import WanPipeline

    parts = _build(preset, seed, vocab)
    modules = {k: parts[k] for k in ("transformer", "vae", "text_encoder") if parts[k] is not None}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir (not tempfile.mkdtemp, which makes it 0700) so the final directory gets the usual umask mode.
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # WanPipeline.save_pretrained writes each component's save_pretrained into its subfolder plus
        # model_index.json; with vae=None it skips vae/ and records "vae": [null, null] (logs "cannot be saved").
        from policy.wan.loading import quiet

        with quiet():
            WanPipeline(**parts).save_pretrained(tmp)
        info = {
            "kind": kind,
            "preset": preset,
            "seed": seed,
            "latent": parts["vae"] is not None,
            "shift": _SHIFT[preset],
            "vocab_size": len(parts["tokenizer"]),
            "params": {k: sum(p.numel() for p in m.parameters()) for k, m in modules.items()},
            "dtypes": {k: str(m.dtype).removeprefix("torch.") for k, m in modules.items()},  # the bulk's dtype
            "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()},
        }
        (tmp / "videorl_model.json").write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.replace(tmp, out_dir)  # atomic; replaces out_dir only if it is (still) an empty directory
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            raise FileExistsError(f"{out_dir} became non-empty while the model was being written") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info
