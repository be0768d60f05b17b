"""Dynamic grouping (Self-Paced GRPO, MATH.md §6): a scored group whose trained rewards barely differ is dropped as
low_signal and its prompt re-sampled with a new seed, at most max_resamples times, then trained as it is; the ledger
counts every re-sample and still balances. Through `train_loop` on the real Ray cluster."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.cluster import start_actors
from orchestrator.config import ConfigError, base_key, load_config
from orchestrator.metrics import read_metrics
from orchestrator.pipeline import PromptCursor, is_low_signal
from orchestrator.pretraining import Base, ensure_base_model
from orchestrator.train import train_loop
from rewards.world import train_prompts


def test_identical_rewards_are_low_signal_and_only_trained_channels_count():
    same = {"ta": np.full(4, 0.5), "vq": np.full(4, 0.2), "oracle_mq": np.array([0.0, 1.0, 0.0, 1.0])}
    assert is_low_signal(same, ["ta", "vq"], min_std=1e-3)  # a monitor's spread is not signal for the learner
    assert not is_low_signal(same, ["ta", "oracle_mq"], min_std=1e-3)  # one channel with spread is enough
    near = {"ta": np.array([0.50, 0.51, 0.50, 0.51])}  # std 0.0058
    assert is_low_signal(near, ["ta"], min_std=0.01) and not is_low_signal(near, ["ta"], min_std=0.005)


def test_bad_dynamic_grouping_is_a_config_error():
    for value, key in (("{min_std: 0}", "rollout.dynamic_grouping.min_std"),
                       ("{min_std: 0.01, max_resamples: 0}", "rollout.dynamic_grouping.max_resamples")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(None, [f"rollout.dynamic_grouping={value}"])


STEPS, RESAMPLES = 3, 2


def tiny_config(cache, min_std):
    return load_config(None, [
        "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
        "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
        "ray.rollout_workers=1", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2", f"train.steps={STEPS}",
        "train.groups_per_step=1", "train.max_staleness=0", "train.checkpoint_every=100",
        f"rollout.dynamic_grouping={{min_std: {min_std}, max_resamples: {RESAMPLES}}}", f"cache_dir={cache}",
    ])


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ray_cluster):
    """min_std 10: every group of oracle scores in [0, 1] is low-signal; min_std 1e-9: none is (their rewards differ)."""
    root, cache = tmp_path_factory.mktemp("dyngroup"), tmp_path_factory.getbasetemp() / "tiny-cache"
    cfg = tiny_config(cache, 10.0)
    path = ensure_base_model(cfg, progress=False)  # 40 steps: rewards that differ within a group
    actors = start_actors(cfg, Base(cfg.model, path, base_key(cfg, path)), {"oracle": None},
                          {"oracle": ("vq", "mq", "ta")}, {"vq": 0.1})
    prompts = [p.text for p in train_prompts()]
    out = {}
    try:
        for min_std in (10.0, 1e-9):
            cfg = tiny_config(cache, min_std)
            run = train_loop(cfg, root / str(min_std), actors, prompts, "ta", {"vq": 0.1}, progress=False)
            for pool in actors.pools.values():  # abandoned groups' scores must not reach the next loop's ids
                pool.drain()
            out[min_std] = (run, root / str(min_std), prompts)
    finally:
        actors.shutdown()
    return out


@pytest.mark.slow
def test_low_signal_groups_are_resampled_and_counted(runs):
    run, run_dir, prompts = runs[10.0]
    ledger = run.ledger.balance(run.held)
    assert ledger["balanced"] and ledger["lost"] == 0 and ledger["counted_twice"] == 0
    assert ledger["consumed"] == STEPS
    assert ledger["low_signal"] == ledger["dropped_low_signal"] == STEPS * RESAMPLES  # bounded per prompt
    assert ledger["low_signal_kept"] == STEPS  # then trained as they are
    m = read_metrics(run_dir)
    assert list(m["ledger/low_signal"]) == [RESAMPLES * (t + 1) for t in range(STEPS)]  # one at a time: staleness 0
    # a re-sample is the same prompt with a new id and seed: the trained prompts are the cursor's first ones
    rows = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    trained = [next(r["prompt"] for r in rows if r["step"] == t) for t in range(STEPS)]
    cursor = PromptCursor(prompts, 0)
    assert trained == [cursor.next() for _ in range(STEPS)]
    gids = sorted({r["group_id"] for r in rows})
    assert gids == [f"g{(RESAMPLES + 1) * t + RESAMPLES:06d}" for t in range(STEPS)]  # the last of each prompt's three


@pytest.mark.slow
def test_groups_with_spread_are_trained_at_once(runs):
    run, run_dir, _ = runs[1e-9]
    ledger = run.ledger.balance(run.held)
    assert ledger["low_signal"] == 0 and ledger["low_signal_kept"] == 0 and ledger["consumed"] == STEPS
    assert list(read_metrics(run_dir)["ledger/low_signal"]) == [0] * STEPS
