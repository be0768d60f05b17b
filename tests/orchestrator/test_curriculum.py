"""Self-Paced GRPO curriculum (MATH.md §6): the competence EMA, its channel weights, their config errors, and
`rewards.curriculum` through `train_loop` on the real Ray cluster (weights logged per step, reaching the learner's
loss, competence surviving a resume)."""

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator.checkpoint import latest_checkpoint
from orchestrator.cluster import start_actors
from orchestrator.config import ConfigError, base_key, load_config
from orchestrator.metrics import read_metrics
from orchestrator.pretraining import Base, ensure_base_model
from orchestrator.report import save_plots
from orchestrator.train import train_loop
from rewards.advantages import SELF_PACED_STAGES, gdpo_advantages, self_paced_weights
from rewards.curriculum import CurriculumConfig, SelfPacedCurriculum
from rewards.world import train_prompts
from tests.policy.helpers import SDE_ROLLOUTS

CURRICULUM = ["vq", "mq", "ta"]


def test_competence_is_an_ema_of_batch_quality_and_sets_the_weights():
    cur = SelfPacedCurriculum(CurriculumConfig(thresholds=[0.1, 0.3, 0.5], decay=0.5))
    w = cur.update({"vq": 0.1, "mq": 0.2, "ta": 0.3, "feedback": 9.0})  # quality 0.2; other rewards do not count
    assert cur.competence == pytest.approx(0.2)  # starts at the first batch's quality, no warm-up bias
    assert w == pytest.approx({"vq": 0.4, "mq": 0.4, "ta": 0.2})  # halfway from fidelity to coherence
    w = cur.update({"vq": 0.4, "mq": 0.4, "ta": 0.4})
    assert cur.competence == pytest.approx(0.5 * 0.2 + 0.5 * 0.4)
    assert w == pytest.approx(dict(zip(CURRICULUM, SELF_PACED_STAGES[1])))
    for _ in range(20):
        w = cur.update({"vq": 0.9, "mq": 0.9, "ta": 0.9})
    assert w == pytest.approx(dict(zip(CURRICULUM, SELF_PACED_STAGES[2])), abs=1e-6)  # alignment
    again = SelfPacedCurriculum(cur.cfg)
    again.load_state_dict(cur.state_dict())
    assert again.weights() == cur.weights()


@pytest.mark.parametrize("value, message", [
    ("{thresholds: [0.1, 0.2]}", "3 stages for 2 thresholds"),
    ("{thresholds: [0.3, 0.2, 0.4]}", "strictly increasing"),
    ("{thresholds: [0.1], stages: [[1, 0]]}", "stages[0] has 2 weights for the 3 rewards"),
    ("{thresholds: [0.1], stages: [[1, 0, 0]], rewards: [vq, vq, ta]}", "repeats a reward"),
    ("{thresholds: [0.1], stages: [[1, 0]], rewards: [vq, oracle_vq]}", "['oracle_vq'] are not rewards of this run"),
    ("{thresholds: [0.1, 0.2, 0.3], decay: 1.0}", "rewards.curriculum.decay"),
])
def test_bad_curriculum_is_a_one_line_config_error(value, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rewards.models={oracle: {kind: oracle}}", f"rewards.curriculum={value}"])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_curriculum_rewards_may_be_any_reward_of_the_run():
    cfg = load_config(None, ["rewards.curriculum={thresholds: [0.1], stages: [[1, 1]], rewards: [feedback, oracle_ta]}"])
    assert cfg.rewards.curriculum.rewards == ["feedback", "oracle_ta"]


# ------------------------------------------------------------------------------------- through train_loop

TAUS = {"vq": -1.0}  # never violated: λ stays 0 and the constraint's channel is 0
ADV_CLIP = 0.5


def tiny_config(cache, steps):
    return load_config(None, [
        "model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=40", "pretrain.batch_size=8",
        "rollout.steps=3", "rollout.group_size=4", "rewards.models={oracle: {kind: oracle}}",
        "ray.rollout_workers=1", "ray.rollout_cpus=0.2", "ray.learner_cpus=0.2",
        f"train.steps={steps}", "train.groups_per_step=1", "train.max_staleness=0", "train.checkpoint_every=1",
        # on-policy PPO without equaliser or KL: loss/policy = mean(-clip(A)) exactly, A from the channel weights
        "learner.loss=ppo", *SDE_ROLLOUTS, "learner.kl=none", "learner.equalizer=false",
        f"learner.adv_clip={ADV_CLIP}",
        "rewards.curriculum={thresholds: [0.0, 0.15, 0.4], decay: 0.5}", f"cache_dir={cache}",
    ])


@pytest.fixture(scope="module")
def curriculum_run(tmp_path_factory, ray_cluster):
    """2 steps, then a resume from the step-2 checkpoint to 4 steps, on the same actors."""
    root, cache = tmp_path_factory.mktemp("curriculum"), tmp_path_factory.getbasetemp() / "tiny-cache"
    cfg = tiny_config(cache, 2)
    path = ensure_base_model(cfg, progress=False)  # 40 steps: rewards that differ within a group
    actors = start_actors(cfg, Base(cfg.model, path, base_key(cfg, path)), {"oracle": None},
                          {"oracle": ("vq", "mq", "ta")}, TAUS)
    prompts = [p.text for p in train_prompts()]
    try:
        first = train_loop(cfg, root / "run", actors, prompts, "ta", TAUS, progress=False)
        competence_at_2 = first.curriculum.competence
        for pool in actors.pools.values():  # abandoned groups' scores must not reach the resumed run
            pool.drain()
        cfg = tiny_config(cache, 4)
        train_loop(cfg, root / "run", actors, prompts, "ta", TAUS, resume_from=latest_checkpoint(root / "run"),
                   progress=False)
    finally:
        actors.shutdown()
    return cfg, root / "run", competence_at_2


@pytest.mark.slow
def test_logged_weights_follow_the_competence(curriculum_run):
    cfg, run_dir, competence_at_2 = curriculum_run
    m = read_metrics(run_dir)
    assert list(m["step"]) == [0, 1, 2, 3]
    quality = np.mean([m[f"reward/{r}"] for r in CURRICULUM], axis=0)  # batch mean over the curriculum rewards
    c = [quality[0]]
    for q in quality[1:]:
        c.append(0.5 * c[-1] + 0.5 * q)
    np.testing.assert_allclose(m["curriculum/competence"], c, rtol=1e-9)  # across the resume too
    assert m["curriculum/competence"][1] == pytest.approx(competence_at_2)
    for t in range(4):
        w = self_paced_weights(m["curriculum/competence"][t], cfg.rewards.curriculum.thresholds,
                               cfg.rewards.curriculum.stages)
        np.testing.assert_allclose([m[f"curriculum/w_{r}"][t] for r in CURRICULUM], w.numpy(), rtol=1e-6)
    assert not np.allclose(m["curriculum/w_vq"], SELF_PACED_STAGES[0][0])  # the emphasis moved off fidelity
    assert "curriculum" in save_plots(m, run_dir / "plots")  # the report shows them


@pytest.mark.slow
def test_weights_reach_the_learners_advantages(curriculum_run):
    """On-policy PPO at ratio 1: loss/policy = mean(-clip(A, ±c)) with A = GDPO over (R_f, curriculum channels)
    weighted (1, w_vq, w_mq, w_ta) — and not the A the learner would have without the curriculum."""
    cfg, run_dir, _ = curriculum_run
    m = read_metrics(run_dir)
    rows = pq.read_table(run_dir / "rollouts.parquet").to_pylist()
    assert np.all(np.abs(m["ratio"] - 1) < 1e-6)
    differs = 0
    for t in range(4):
        step = [r for r in rows if r["step"] == t]
        ids = [r["group_id"] for r in step]
        r_f = [[r["reward_ta"]] for r in step]
        channels = [[r["reward_ta"], *(r[f"reward_{c}"] for c in CURRICULUM)] for r in step]
        weights = [1.0, *(m[f"curriculum/w_{c}"][t] for c in CURRICULUM)]

        def loss(adv):
            return float((-adv.double().clamp(-ADV_CLIP, ADV_CLIP)).mean())

        with_weights, without = loss(gdpo_advantages(channels, ids, weights)), loss(gdpo_advantages(r_f, ids, [1.0]))
        assert m["loss/policy"][t] == pytest.approx(with_weights, rel=1e-4, abs=1e-6), t
        differs += abs(with_weights - without) > 1e-3
    assert differs >= 2  # the check tells the two apart
