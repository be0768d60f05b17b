"""`videorl reward train --model videoalign` and `videorl reward bench --models videoreward videoalign` at tiny
settings: the VLM reward trains on the cached preference data, is cached by its config, and is benched beside
VideoReward in one table and JSON."""

import json
import math
from pathlib import Path

import pytest
import torch

from orchestrator.cli import main
from orchestrator.config import cache_dir, load_config
from orchestrator.reward_training import VideoAlignTrainConfig, ensure_videoalign_model

pytestmark = pytest.mark.slow

TINY = ["model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
        "rollout.steps=3", "rewards.preference.samples_per_prompt=1", "rewards.preference.samplers=[[ode, 0.0]]",
        "rewards.preference.degraded_per_prompt=3", "rewards.preference.pairs_per_prompt=6",
        "rewards.reward_model.steps=20", "rewards.reward_model.batch_size=8", "rewards.reward_model.model.dim=16",
        "rewards.reward_model.model.depth=1", "rewards.reward_model.model.heads=2",
        "rewards.videoalign.steps=6", "rewards.videoalign.batch_size=4"]


def _mtimes(dirs):
    return {d: (d / "model.pth").stat().st_mtime_ns for d in dirs}


def test_videoalign_trains_caches_and_is_benched_beside_videoreward(tmp_path, capsys):
    args = [*TINY, f"cache_dir={tmp_path / 'cache'}"]
    assert main(["reward", "train", "--model", "videoalign", "--loss", "bt", *args]) == 0
    [trained] = list((tmp_path / "cache").glob("videoalign-bt-*"))
    assert {"model.pth", "config.json", "model_config.json", "train.json"} <= {p.name for p in trained.iterdir()}
    info = json.loads((trained / "train.json").read_text())
    assert info["loss"] == "bt" and info["steps"] == 6 and info["pairs"] == 780 and math.isfinite(info["loss_final"])

    bench = ["reward", "bench", "--losses", "bt", "btt", "--models", "videoreward", "videoalign",
             "--out", str(tmp_path / "out"), *args]
    assert main(bench) == 0
    table = capsys.readouterr().out
    assert "videoalign" in table and "videoreward" in table
    result = json.loads((tmp_path / "out" / "reward_bench.json").read_text())
    assert set(result["models"]) == {"bt", "btt", "videoalign-bt", "videoalign-btt"}
    assert result["models"]["videoalign-bt"]["dir"] == str(trained)  # the model trained above, reused
    assert result["models"]["videoalign-btt"]["tie_threshold"] == pytest.approx(math.log(4.6))  # Rao-Kupper k=5
    assert "validation" in result["models"]["videoalign-bt"]["tie_threshold_from"]
    for name, entry in result["models"].items():
        assert entry["model"] == ("videoalign" if name.startswith("videoalign") else "videoreward")
        for ties in ("without_ties", "with_ties"):
            assert all(0.0 <= entry[ties][d] <= 1.0 for d in ("vq", "mq", "ta", "overall")), (name, entry[ties])
    assert result["counts"]["pairs"] == 144
    vlm_dirs = [trained, Path(result["models"]["videoalign-btt"]["dir"])]
    stamps = _mtimes(vlm_dirs)

    # a second call reuses every cached model and gives the same numbers
    assert main(bench) == 0
    again = json.loads((tmp_path / "out" / "reward_bench.json").read_text())
    assert _mtimes(vlm_dirs) == stamps and again["models"] == result["models"]
    assert len(list((tmp_path / "cache").glob("videoalign-*"))) == 2


def test_each_videoalign_training_key_changes_the_model(tmp_path):
    cfg = load_config(None, [*TINY, f"cache_dir={tmp_path / 'cache'}"])
    assert main(["reward", "data", *TINY, f"cache_dir={tmp_path / 'cache'}"]) == 0
    [data] = list(cache_dir(cfg).glob("prefdata-*"))
    base = VideoAlignTrainConfig(steps=2, batch_size=4)
    variants = [base, base.model_copy(update={"steps": 3}), base.model_copy(update={"batch_size": 2}),
                base.model_copy(update={"lr": 3e-4}), base.model_copy(update={"seed": 1})]
    dirs = [ensure_videoalign_model(v, data, tmp_path / "cache", progress=False) for v in variants]
    assert len(set(dirs)) == len(variants)  # cached by config
    heads = [torch.load(d / "model.pth", weights_only=True)["rm_head.weight"] for d in dirs]
    assert all((heads[0] - h).abs().max() > 1e-6 for h in heads[1:])  # and each key changes what is trained
    assert [json.loads((d / "train.json").read_text())["steps"] for d in dirs] == [2, 3, 2, 2, 2]
    assert ensure_videoalign_model(base, data, tmp_path / "cache", progress=False) == dirs[0]


def test_reward_train_builds_the_configured_ensemble(tmp_path, capsys):
    args = [*TINY, f"cache_dir={tmp_path / 'cache'}"]
    assert main(["reward", "train", *args, "rewards.reward_model.ensemble=[bt]"]) == 0
    [ensemble] = list((tmp_path / "cache").glob("reward-ensemble-*"))
    assert sorted(p.name for p in ensemble.iterdir()) == ["bt", "btt", "ensemble.json"]
    assert f"reward model (btt+bt): {ensemble}" in capsys.readouterr().out
    assert main(["reward", "train", *args, "rewards.reward_model.ensemble=[bt]", "--loss", "regression"]) == 0
    assert len(list((tmp_path / "cache").glob("reward-*"))) == 4  # --loss trains that model alone
