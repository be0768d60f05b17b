"""End to end on a real local Ray cluster: a tiny model, the oracle as the reward, a few learner steps."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.config import load_config
from orchestrator.inputs import held_out_reward_means
from orchestrator.metrics import read_metrics
from orchestrator.train import run_training
from policy.backend import load_policy
from rewards.oracle import TERMS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("train")
    (root / "profile.yaml").write_text("primary: ta\nconstraints: {vq: 0.5}\n")
    cfg = load_config(None, [
        "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
        "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
        f"rewards.profile={root / 'profile.yaml'}", "rewards.calibration.samples_per_prompt=2",
        "train.steps=4", "train.groups_per_step=2", "train.checkpoint_every=2", "train.max_staleness=1",
        "rollout.groups_per_call=2", "ray.rollout_workers=2", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", "eval.steps=3",
        "eval.seeds_per_prompt=1", "eval.constraint_samples_per_prompt=2", f"cache_dir={root / 'cache'}",
    ])
    run_dir = root / "run"
    summary = run_training(cfg, run_dir, progress=False)
    return cfg, run_dir, summary


def test_run_directory_holds_everything(tiny_run):
    cfg, run_dir, summary = tiny_run
    for name in ("config.yaml", "metrics.parquet", "rollouts.parquet", "summary.json", "report.html",
                 "samples/before.npz", "samples/after.npz", "final/model.safetensors"):
        assert (run_dir / name).exists(), name
    assert json.loads((run_dir / "summary.json").read_text()) == json.loads(json.dumps(summary))
    for when in ("before", "after"):
        assert set(summary["oracle"][when]) == {"vq", "mq", "ta", "overall"}
        terms = summary["oracle_terms"][when]  # each dimension is the mean of its three terms, so are the means
        for dim, names in TERMS.items():
            assert summary["oracle"][when][dim] == pytest.approx(np.mean([terms[n] for n in names]), abs=1e-9)
    before, after = (np.load(run_dir / "samples" / f"{w}.npz") for w in ("before", "after"))
    assert before["videos"].dtype == np.uint8 and before["videos"].shape == (24, 8, 16, 16, 3)
    assert list(before["prompts"]) == list(after["prompts"])  # same held-out prompts and seeds
    assert set(summary["constraints"]) == {"vq"} and "tau" in summary["constraints"]["vq"]


def test_constraints_are_checked_on_held_out_rollouts_of_the_trained_policy(tiny_run):
    """"final" is the calibration's measurement repeated on the saved final policy, compared with τ."""
    cfg, run_dir, summary = tiny_run
    vq = summary["constraints"]["vq"]
    again, skipped = held_out_reward_means(cfg, {"oracle": None}, load_policy(cfg.model, run_dir / "final"))
    assert vq["final"] == pytest.approx(again["vq"], abs=1e-9) and skipped == [] and vq["skipped_samples"] == 0
    assert vq["satisfied"] == (vq["final"] >= vq["tau"])
    assert np.isfinite(vq["training_batches"])


def test_ledger_balances_and_metrics_have_one_row_per_step(tiny_run):
    cfg, run_dir, summary = tiny_run
    ledger = summary["ledger"]
    assert ledger["balanced"] and ledger["lost"] == 0 and ledger["counted_twice"] == 0
    assert ledger["consumed"] == cfg.train.steps * cfg.train.groups_per_step
    assert ledger["produced"] == ledger["consumed"] + ledger["dropped"]
    m = read_metrics(run_dir)
    assert list(m["step"]) == list(range(cfg.train.steps))
    assert np.all(m["staleness/max"] <= cfg.train.max_staleness)
    # rollout.groups_per_call=2: the admission window (4 groups) fills 2 actors with 2 groups each, one call apiece
    assert np.all(m["pipeline/rollout_calls_per_group"] == 0.5)
    # ray.compute_slots=auto on the 2-CPU test cluster: 2 rollout calls, or one and the update, at a time
    assert m["pipeline/busy_peak"].max() == 2
    for key in ("reward/ta", "reward/vq", "lambda/vq", "tau/vq", "loss/policy", "throughput/samples_per_s"):
        assert np.isfinite(m[key]).all(), key
    n_weights = sum(p.numel() for p in load_policy(cfg.model, run_dir / "final").trainable_parameters())
    assert (m["weights/bytes_per_version"] == 4 * n_weights).all()  # full float32 weights each version
    rows = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    assert len(rows) == cfg.train.steps * cfg.train.groups_per_step * cfg.rollout.group_size
    assert {r["group_id"] for r in rows}.__len__() == ledger["consumed"]
    assert max(r["prefix_chunks"] for r in rows) > 0  # rollout.shared_prefix (default): groups share a random history
