"""The PPO path (SAGE-GRPO, MATH.md §2-3) end to end through `train_loop` on the real Ray cluster, for every KL kind:
the first ratio is 1, the equaliser's scales reach `loss/policy`, the moving anchor refreshes every update_ref_every.

One rollout actor, one group of 3 per step, max_staleness 1: the rollout actor receives both first generate calls
before any new weights, so step 0 trains on-policy data (version 0) and steps 1-2 data one version old, always.
A tiny adv_clip makes every clipped advantage ±c, so on-policy `loss/policy` = mean(-clip(A)) · mean(scales) ≠ 0.
"""

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch

from actors.learner import LearnerActor
from orchestrator.checkpoint import load_checkpoint
from orchestrator.cluster import start_actors
from orchestrator.config import base_key, load_config
from orchestrator.metrics import read_metrics
from orchestrator.pretraining import Base, ensure_base_model
from orchestrator.train import train_loop
from policy.sde import equalizer_scales, sigma_schedule
from rewards.advantages import gdpo_advantages
from rewards.world import train_prompts
from tests.policy.helpers import SDE_ROLLOUTS

pytestmark = pytest.mark.slow
KINDS = ("none", "fixed", "moving", "stepwise", "dual")
ADV_CLIP = 1e-3
TAUS = {"vq": -1.0}  # never violated: λ stays 0 and its channel is 0, so the advantage is R_f's alone


def kind_config(cache, kind):
    return load_config(None, [
        "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
        "rollout.steps=3", "rollout.group_size=3",
        "rewards.models={oracle: {kind: oracle}}", "ray.rollout_workers=1", "ray.rollout_cpus=0.2",
        "ray.learner_cpus=0.2", "train.steps=3", "train.groups_per_step=1", "train.max_staleness=1",
        "train.checkpoint_every=1", "learner.loss=ppo", *SDE_ROLLOUTS, f"learner.kl={kind}",
        "learner.update_ref_every=2",
        "learner.step_fraction=1.0", f"learner.adv_clip={ADV_CLIP}", "learner.lr=0.01",
        f"learner.equalizer={kind != 'none'}", f"cache_dir={cache}",
    ])


@pytest.fixture(scope="module")
def ppo_runs(tmp_path_factory, ray_cluster):
    """{kind: (cfg, run_dir)}: one train_loop per KL kind on the same rollout, reward and controller actors, each
    with a learner actor of its own (start_actors' for the first kind; the others unnamed, so all start at once)."""
    root, cache = tmp_path_factory.mktemp("ppo"), tmp_path_factory.getbasetemp() / "tiny-cache"
    cfgs = {kind: kind_config(cache, kind) for kind in KINDS}
    path = ensure_base_model(cfgs["none"], progress=False)  # 40 steps: rewards that differ within a group
    base = Base(cfgs["none"].model, path, base_key(cfgs["none"], path))
    actors = start_actors(cfgs["none"], base, {"oracle": None}, {"oracle": ("vq", "mq", "ta")}, TAUS)
    learners = {kind: ray.remote(LearnerActor).options(num_cpus=0.2).remote(
        cfg.model, str(path), cfg.learner.model_dump(), cfg.train.steps, cfg.train.seed)
        for kind, cfg in cfgs.items() if kind != KINDS[0]}
    prompts = [p.text for p in train_prompts()]
    runs = {}
    try:
        for kind, cfg in cfgs.items():
            if kind != KINDS[0]:
                ray.kill(actors.learner, no_restart=True)
                actors.learner = learners.pop(kind)
            train_loop(cfg, root / kind, actors, prompts, "ta", TAUS, progress=False)
            for pool in actors.pools.values():  # scores of abandoned groups must not reach the next loop's ids
                pool.drain()
            runs[kind] = (cfg, root / kind)
    finally:
        actors.shutdown()
        for handle in [actors.learner, *learners.values()]:  # the last swapped-in learner is no longer the group's
            ray.kill(handle, no_restart=True)
    return runs


def step0_policy_loss(cfg, run_dir) -> float:
    """mean(-clip(A, ±c)) of the step-0 group at ratio 1: the unscaled on-policy PPO loss of every sampler step."""
    rows = [r for r in pq.read_table(run_dir / "rollouts.parquet").to_pylist() if r["step"] == 0]
    adv = gdpo_advantages(np.array([[r["reward_ta"]] for r in rows]), [r["group_id"] for r in rows], [1.0])
    return float((-adv.double().clamp(-ADV_CLIP, ADV_CLIP)).mean())


@pytest.mark.parametrize("kind", KINDS)
def test_first_ratio_is_one_and_equalizer_scales_the_loss(ppo_runs, kind):
    cfg, run_dir = ppo_runs[kind]
    m = read_metrics(run_dir)
    assert list(m["step"]) == [0, 1, 2]
    assert abs(m["ratio"][0] - 1.0) < 1e-6  # on-policy: behaviour and recomputed log-probs agree
    assert abs(m["ratio"][1] - 1.0) > 1e-5  # one version stale: the ratio really compares the two
    plain = step0_policy_loss(cfg, run_dir)
    assert abs(plain) > ADV_CLIP / 10  # group of 3: the ±c signs never cancel
    scales = equalizer_scales(cfg.rollout.sampler, sigma_schedule(cfg.rollout.steps, cfg.rollout.shift),
                              cfg.rollout.eta)
    expected = plain * (float(scales.mean()) if cfg.learner.equalizer else 1.0)
    assert m["loss/policy"][0] == pytest.approx(expected, rel=1e-4)


def test_equalizer_on_vs_off_scales_the_same_first_loss(ppo_runs):
    """Every kind's step 0 trains the same group (same base, seed and weights): only the equaliser differs."""
    cfg, _ = ppo_runs["fixed"]
    scale = float(equalizer_scales(cfg.rollout.sampler, sigma_schedule(cfg.rollout.steps, cfg.rollout.shift),
                                   cfg.rollout.eta).mean())
    assert abs(scale - 1.0) > 0.1  # otherwise on and off could not be told apart
    off = read_metrics(ppo_runs["none"][1])["loss/policy"][0]
    for kind in KINDS[1:]:
        assert read_metrics(ppo_runs[kind][1])["loss/policy"][0] == pytest.approx(scale * off, rel=1e-4), kind


def test_kl_kinds(ppo_runs):
    kl = {kind: read_metrics(run_dir)["kl"] for kind, (_, run_dir) in ppo_runs.items()}
    assert np.all(kl["none"] == 0)
    for kind in ("fixed", "moving", "stepwise", "dual"):
        assert abs(kl[kind][0]) < 1e-6, kind  # step 0: reference, anchor and behaviour are the current weights
        assert abs(kl[kind][1]) > 1e-6, kind  # after one update every kind measures a distance
    assert abs(kl["moving"][2]) < 1e-9 < kl["fixed"][2]  # the anchor was refreshed after update 2
    assert abs(kl["stepwise"][2]) > 1e-6  # behaviour one version old


@pytest.mark.parametrize("kind", ["moving", "dual"])
def test_moving_anchor_refreshes_every_update_ref_every(ppo_runs, kind):
    """update_ref_every=2: after update 1 the anchor is still the initial model, after 2 and 3 it is update 2's."""
    _, run_dir = ppo_runs[kind]
    ck = {s: load_checkpoint(run_dir / "checkpoints" / f"step-{s:06d}").tensors for s in (1, 2, 3)}

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(ck[1]["anchor"], ck[1]["reference"]) and not same(ck[1]["anchor"], ck[1]["policy"])
    assert same(ck[2]["anchor"], ck[2]["policy"])
    assert same(ck[3]["anchor"], ck[2]["policy"]) and not same(ck[3]["anchor"], ck[3]["policy"])
