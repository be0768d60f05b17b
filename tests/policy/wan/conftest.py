"""Random Wan model directories written once per session (the same files a user's download would be), and a
helper that loads them through the real loader."""

import pytest
import torch

from policy.backend import load_policy
from policy.wan.config import WanConfig
from policy.wan.init import write_random_model


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """{"shapes": pixel-space dir, "tiny": latent dir with a VAE}, seed 0."""
    root = tmp_path_factory.mktemp("wan_models")
    for preset in ("shapes", "tiny"):
        write_random_model(root / preset, preset, seed=0)
    return {preset: str(root / preset) for preset in ("shapes", "tiny")}


def wan(path: str, *, kind: str = "wan_causal", device: str = "cpu", weights=None, for_training=False, **kw):
    """A Wan policy from `path` through policy.backend.load_policy (pixel-space defaults: 8 frames of 16x16)."""
    kw.setdefault("frames", 8)
    kw.setdefault("height", 16)
    kw.setdefault("width", 16)
    kw.setdefault("text_len", 8)
    if kind == "wan_causal":
        kw.setdefault("chunk", 2)
    cfg = WanConfig(kind=kind, path=path, **kw)
    return load_policy(cfg, weights, device=device, for_training=for_training)


def perturb_adapters(policy, seed: int = 0, scale: float = 0.3) -> None:
    """Give a fresh LoRA adapter (B = 0, an identity) weights, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
