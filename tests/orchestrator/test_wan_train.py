"""`videorl model init` then `videorl train --config configs/wan_shapes.yaml model.path=D` with LoRA on: the Wan
policy through the same actors, pipeline and checkpoints as tiny.yaml, on a real local Ray cluster (small settings;
the full recipe's numbers are in the README)."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.checkpoint import latest_checkpoint
from orchestrator.cli import main
from orchestrator.config import load_config
from orchestrator.metrics import read_metrics
from orchestrator.train import run_training
from policy.backend import load_policy, trainable_bytes

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.sft_clips=256", "pretrain.steps=30", "pretrain.batch_size=8", "pretrain.lr=0.01", "rollout.steps=3", "rollout.group_size=4",
    "rewards.models={oracle: {kind: oracle}}", "rewards.calibration.samples_per_prompt=2", "train.groups_per_step=2",
    "train.max_staleness=1", "ray.rollout_workers=2", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=3",
    "eval.seeds_per_prompt=1", "eval.constraint_samples_per_prompt=2",
]


@pytest.fixture(scope="module")
def wan_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("wan_train")
    assert main(["model", "init", "--kind", "wan_causal", "--out", str(root / "D")]) == 0
    (root / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    cfg = load_config(ROOT / "configs" / "wan_shapes.yaml", [
        *SMALL, f"model.path={root / 'D'}", "model.lora={rank: 4, alpha: 8}", "train.steps=3", "train.checkpoint_every=2",
        f"rewards.profile={root / 'profile.yaml'}", f"cache_dir={root / 'cache'}"])
    return root, cfg, run_training(cfg, root / "run", progress=False)


def test_the_wan_run_balances_its_ledger_and_publishes_only_the_adapter(wan_run):
    root, cfg, summary = wan_run
    assert summary["steps"] == 3 and summary["ledger"]["balanced"] and summary["ledger"]["lost"] == 0
    assert set(summary["oracle"]["after"]) == {"vq", "mq", "ta", "overall"}
    final = load_policy(cfg.model, root / "run" / "final")
    adapter = final.trainable_state()
    assert adapter and all("lora_" in k for k in adapter)
    rows = pq.read_table(root / "run" / "rollouts.parquet").to_pylist()
    assert rows and {r["prefix_chunks"] for r in rows} == {0}  # wan_shapes: rollout.shared_prefix=false
    m = read_metrics(root / "run")
    assert (m["weights/bytes_per_version"] == trainable_bytes(adapter)).all()
    full = trainable_bytes({k: v for k, v in final.transformer.state_dict().items() if "lora_" not in k})
    assert trainable_bytes(adapter) < full  # the adapter, not the model, crosses the object store
    assert max(v.abs().max() for k, v in adapter.items() if "lora_B" in k) > 0  # and it was trained (B starts at 0)
    info = json.loads((root / "run" / "final" / "videorl_policy.json").read_text())
    assert info["format"] == "lora" and info["base"] is not None  # the pretrained base it sits on
    assert json.loads((root / "run" / "final" / "base.json").read_text())["base_key"]


def test_checkpoints_hold_adapters_and_the_run_resumes(wan_run):
    root, cfg, _ = wan_run
    ckpt = latest_checkpoint(root / "run")
    for group in ("policy", "anchor", "old"):
        assert ckpt.tensors[group] and all("lora_" in k for k in ckpt.tensors[group]), group
    assert ckpt.tensors["reference"] == {}  # the reference is the base (adapters off): nothing to store
    from orchestrator.train import _check_same_base

    base = Path(ckpt.state["learner"]["base"])
    assert base.name.startswith("base-") and (base / "transformer").is_dir()  # the pretrained base it points to
    key = json.loads((root / "run" / "final" / "base.json").read_text())["base_key"]
    assert ckpt.state["learner"]["base_key"] == key
    _check_same_base(cfg, ckpt, key)
    with pytest.raises(ValueError, match=f"its LoRA adapters were trained on the base {key}, the config now gives"):
        _check_same_base(cfg, ckpt, "another-base")
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 5})})
    summary = run_training(more, root / "run", resume=True, progress=False)
    assert summary["steps"] == 5 and summary["ledger"]["balanced"]
    assert list(read_metrics(root / "run")["step"]) == list(range(5))
    resumed = load_policy(cfg.model, root / "run" / "final").trainable_state()
    assert any(not torch.equal(resumed[k], ckpt.tensors["policy"][k]) for k in resumed)  # it kept training
    assert np.isfinite(summary["oracle"]["after"]["overall"])
