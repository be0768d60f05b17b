"""Reading Wan transformer weights: diffusers-format directories and Self-Forcing / CausVid checkpoints, strictly.

Every loader ends in `load_strict`: a missing or unexpected tensor, or a tensor of another shape, is a ValueError
naming the first few, never a silently half-loaded model. Weights are read with safetensors, or with
`torch.load(weights_only=True)` for the .pt checkpoints Self-Forcing releases (no pickle code runs).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

SF_KEYS = ("generator_ema", "generator")  # what Self-Forcing's self_forcing_dmd.pt holds (inference.py loads _ema)


@contextlib.contextmanager
def quiet():
    """diffusers / transformers without their info logs and progress bars (a loader's bars mean nothing in a log)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    levels = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity_error(), tlog.set_verbosity_error()
    dlog.disable_progress_bar(), tlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(levels[0]), tlog.set_verbosity(levels[1])
        dlog.enable_progress_bar(), tlog.enable_progress_bar()


def transformer_dir(model_dir: str | Path) -> Path:
    """`model_dir/transformer` (a diffusers WanTransformer3DModel folder), or a ValueError naming what is missing."""
    root = Path(model_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory not found: {root}")
    sub = root / "transformer"
    if not (sub / "config.json").is_file():
        raise ValueError(f"model directory {root} has no transformer/ (with config.json): expected a diffusers-format "
                         "directory with transformer/, text_encoder/, tokenizer/ and, for latent models, vae/")
    return sub


def transformer_config(model_dir: str | Path) -> dict:
    path = transformer_dir(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"corrupt model config {path}: {e}") from e


def build_transformer(model_dir: str | Path, device: str | torch.device = "cpu"):
    """A WanTransformer3DModel from model_dir/transformer/config.json with uninitialised weights on `device`
    ("meta": no memory at all); load them with `load_strict`."""
    from diffusers import WanTransformer3DModel

    config = {k: v for k, v in transformer_config(model_dir).items() if not k.startswith("_")}
    with torch.device(device):
        return WanTransformer3DModel.from_config(config)


def read_safetensors_dir(folder: Path) -> dict[str, Tensor]:
    """Every tensor of every *.safetensors file in `folder` (diffusers shards large models)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no weights (*.safetensors) in {folder}")
    out: dict[str, Tensor] = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt weights file {f}: {e}") from e
    return out


def load_strict(module: torch.nn.Module, state: Mapping[str, Tensor], source: str, assign: bool = False) -> None:
    """Load `state` into `module`, refusing missing, unexpected or reshaped keys. assign=True for a module built on
    the meta device (its parameters become the given tensors); otherwise the values are copied into the module's own
    parameters, so an optimizer holding them and the module's device stay as they were."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) {missing[:4]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} tensor(s) {unexpected[:4]}")
        raise ValueError(f"{source} does not fit the model: " + "; ".join(parts))
    for k, t in own.items():
        if tuple(state[k].shape) != tuple(t.shape):
            raise ValueError(f"{source}: tensor {k!r} has shape {list(state[k].shape)}, the model expects {list(t.shape)}")
    module.load_state_dict({k: v.to(own[k].dtype) if own[k].is_floating_point() else v for k, v in state.items()},
                           strict=True, assign=assign)


def read_self_forcing(path: str | Path, use_ema: bool = True) -> dict[str, Tensor]:
    """A Self-Forcing / CausVid generator checkpoint -> WanTransformer3DModel keys.

    `.pt`/`.pth`: `torch.load(weights_only=True)` of a dict with "generator_ema" / "generator" (state dicts of
    Self-Forcing's WanDiffusionWrapper, keys "model.<original Wan name>"). `.safetensors`: the same tensors flattened
    with "generator_ema." / "generator." prefixes. The "model." prefix is stripped, then diffusers' own
    `convert_wan_transformer_to_diffusers` renames the original Wan keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Self-Forcing checkpoint not found: {path}")
    key = SF_KEYS[0] if use_ema else SF_KEYS[1]
    if path.suffix == ".safetensors":
        try:
            flat = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"corrupt Self-Forcing checkpoint {path}: {e}") from e
        groups = {k.split(".", 1)[0] for k in flat}
        state = {k[len(key) + 1:]: v for k, v in flat.items() if k.startswith(key + ".")}
    else:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling errors have many types; all mean the file is not a weights-only dict
            raise ValueError(f"corrupt Self-Forcing checkpoint {path}: {type(e).__name__}: {e}") from e
        groups = set(ckpt) if isinstance(ckpt, dict) else set()
        state = ckpt.get(key) if isinstance(ckpt, dict) else None
    if not state:
        raise ValueError(f"Self-Forcing checkpoint {path} has no {key!r} state dict (it holds {sorted(groups)})")
    return convert_self_forcing_state(state, str(path))


def convert_self_forcing_state(state: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """WanDiffusionWrapper keys ("model.blocks.0.self_attn.q.weight", ...) -> diffusers keys ("blocks.0.attn1.to_q...")."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    bad = [k for k in state if not k.startswith("model.")]
    if bad:
        raise ValueError(f"{source}: expected Self-Forcing generator keys 'model.<Wan name>', got {bad[:4]}")
    return convert_wan_transformer_to_diffusers({k[len("model."):]: v for k, v in state.items()})


def cast_like_diffusers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast parameters and buffers to `dtype` except the model's `_keep_in_fp32_modules` (rope, time_embedder, norms,
    scale_shift_table stay float32, as diffusers' from_pretrained(torch_dtype=bf16) keeps them)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype != torch.float64 else set()
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and keep.isdisjoint(name.split(".")):
            t.data = t.data.to(dtype)
    return model
