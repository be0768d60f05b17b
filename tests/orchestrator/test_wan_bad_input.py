"""Bad input for Wan models: one line naming the problem and exit status 2, before any work starts (the CLI's own
main(), in-process, on real model directories)."""

import pytest
import torch

from orchestrator.cli import main
from policy.backend import check_dtype
from policy.wan.init import write_random_model

WAN = ["--config", "configs/wan_shapes.yaml"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    write_random_model(root / "shapes", "shapes")
    write_random_model(root / "tiny", "tiny")
    (root / "empty").mkdir()
    return root


def error_of(capsys, *argv) -> str:
    code = main(list(argv))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("videorl: error: ")
    return err


@pytest.fixture(autouse=True)
def repo_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])


def test_a_model_directory_without_a_transformer(capsys, dirs, tmp_path):
    err = error_of(capsys, "doctor", *WAN, f"model.path={dirs / 'empty'}", f"cache_dir={tmp_path}")
    assert "has no transformer/" in err and str(dirs / "empty") in err


def test_a_checkpoint_with_missing_and_unexpected_keys(capsys, dirs, tmp_path):
    state = {f"model.{k}": v for k, v in _original_names(dirs / "shapes").items()}
    del state["model.blocks.0.self_attn.q.weight"]
    state["model.blocks.0.self_attn.q2.weight"] = torch.zeros(1)
    torch.save({"generator_ema": state}, tmp_path / "sf.pt")
    err = error_of(capsys, "doctor", *WAN, f"model.path={dirs / 'shapes'}", f"model.checkpoint={tmp_path / 'sf.pt'}",
                   f"cache_dir={tmp_path}")
    assert "missing 1 tensor(s) ['blocks.0.attn1.to_q.weight']" in err and "blocks.0.attn1.q2.weight" in err


def _original_names(model_dir):
    """The shapes model's weights renamed back to the original Wan layout Self-Forcing checkpoints use."""
    from policy.wan.loading import read_safetensors_dir

    back = {"attn1": "self_attn", "attn2": "cross_attn", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "o",
            "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2", "condition_embedder.time_embedder.linear_1": "time_embedding.0",
            "condition_embedder.time_embedder.linear_2": "time_embedding.2",
            "condition_embedder.text_embedder.linear_1": "text_embedding.0",
            "condition_embedder.text_embedder.linear_2": "text_embedding.2",
            "condition_embedder.time_proj": "time_projection.1", "proj_out": "head.head"}
    out = {}
    for k, v in read_safetensors_dir(model_dir / "transformer").items():
        for new, old in back.items():
            k = k.replace(new, old)
        k = k.replace("norm2", "norm__x").replace("norm3", "norm2").replace("norm__x", "norm3")
        k = "head.modulation" if k == "scale_shift_table" else k.replace("scale_shift_table", "modulation")
        out[k] = v
    return out


def test_lora_targets_that_match_nothing(capsys, dirs, tmp_path):
    err = error_of(capsys, "doctor", *WAN, f"model.path={dirs / 'shapes'}", "model.lora.target_modules=[to_qq]",
                   f"cache_dir={tmp_path}")
    assert "'to_qq' matches no module" in err


def test_a_window_smaller_than_sink_plus_chunk(capsys, tmp_path):
    err = error_of(capsys, "doctor", *WAN, "model.window=3", f"cache_dir={tmp_path}")
    assert "model.window (3) must be >= chunk + sink (2 + 2)" in err


def test_frames_the_vae_cannot_take(capsys, dirs, tmp_path):
    err = error_of(capsys, "doctor", *WAN, f"model.path={dirs / 'tiny'}", "model.height=32", "model.width=32",
                   f"cache_dir={tmp_path}")  # 8 frames with a Wan VAE
    assert "model.frames=8: the Wan VAE takes 4k + 1 frames" in err


def test_bfloat16_on_a_cpu_that_cannot_run_it():
    with pytest.raises(ValueError, match="model.dtype=bfloat16 needs a CPU with native bfloat16"):
        check_dtype("bfloat16", torch.device("cpu"), cpu_bf16=False)
    check_dtype("bfloat16", torch.device("cpu"), cpu_bf16=True)  # a CPU with AVX-512 BF16 / AMX runs it
    check_dtype("float32", torch.device("cpu"), cpu_bf16=False)


def test_the_real_model_recipes_load_and_pass_their_checks_but_need_real_rewards(capsys, dirs, tmp_path):
    """configs/wan2_1_t2v_1_3b.yaml and configs/self_forcing_wan_1_3b.yaml, pointed at a (tiny, latent) Wan directory:
    every model check passes; training refuses the shapes world's rewards for 240 x 416 / 480 x 832 clips."""
    from orchestrator.config import load_config
    from orchestrator.inputs import check_rewards_fit
    from policy.backend import check_policy_config

    for recipe, extra in (("configs/wan2_1_t2v_1_3b.yaml", []), ("configs/self_forcing_wan_1_3b.yaml", ["model.checkpoint=null"])):
        cfg = load_config(recipe, [f"model.path={dirs / 'tiny'}", "model.dtype=float32", *extra])
        check_policy_config(cfg.model)
        with pytest.raises(ValueError, match="real video needs reward models for real video"):
            check_rewards_fit(cfg)
    err = error_of(capsys, "train", "--config", "configs/wan2_1_t2v_1_3b.yaml", f"model.path={dirs / 'tiny'}",
                   "model.dtype=float32", f"cache_dir={tmp_path}")
    assert "33 x 240 x 416 clips" in err


def test_settings_that_would_change_nothing(capsys, dirs, tmp_path):
    err = error_of(capsys, "doctor", *WAN, f"model.path={dirs / 'shapes'}", "model.use_ema=false", f"cache_dir={tmp_path}")
    assert "model.use_ema=false applies with model.checkpoint" in err


def test_training_refuses_bfloat16_wherever_a_cpu_would_run_it(monkeypatch, dirs, tmp_path):
    """The preflight, before Ray starts: the driver (prompts, calibration, eval) and CPU rollout actors at
    rollout.dtype, each error naming its key (the CPU probe set to "no native bf16")."""
    import policy.backend
    from orchestrator.config import load_config
    from orchestrator.train import run_training

    monkeypatch.setattr(policy.backend, "cpu_supports_bfloat16", lambda: False)
    for override, key in (("model.dtype=bfloat16", "model.dtype"), ("rollout.dtype=bfloat16", "rollout.dtype")):
        cfg = load_config("configs/wan_shapes.yaml", [f"model.path={dirs / 'shapes'}", override, f"cache_dir={tmp_path}"])
        with pytest.raises(ValueError, match=f"{key}=bfloat16 needs a CPU with native bfloat16"):
            run_training(cfg, tmp_path / "run", progress=False)
        assert not (tmp_path / "run").exists()  # nothing ran
