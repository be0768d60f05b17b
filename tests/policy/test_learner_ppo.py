"""The SAGE-GRPO path of the learner end to end (`learner.loss=ppo`) on a small VideoDiT: the first ratio is exactly 1,
the equaliser scales each step's gradient inside the loss, every KL kind measures what it names, the moving anchor is
refreshed every `update_ref_every` steps and the KL weight follows its schedule."""

import numpy as np
import pytest
import torch

from policy.learner import Learner, LearnerConfig, ScoredGroup
from policy.losses import kl_schedule
from policy.sampling import sample
from policy.sde import equalizer_scales

from .helpers import make_model

PROMPT = ["a red circle moving left quickly"]
REWARDS = np.array([0.1, 0.9, 0.4, 0.6], dtype=np.float32)


def group(model, seed: int = 0, steps: int = 4) -> ScoredGroup:
    cond = model.encode_prompts(PROMPT)
    traj = sample(model, cond, steps=steps, sde_type="sage", eta=0.7, mode="causal", group_size=4,
                  generator=torch.Generator().manual_seed(seed))
    return ScoredGroup("g0", cond, traj, {"r": REWARDS}, 0)


def learner(**kw) -> Learner:
    return Learner(make_model(), LearnerConfig(loss="ppo", **kw), total_steps=10, seed=0)


@pytest.mark.parametrize("kl", ["none", "fixed", "moving", "stepwise", "dual"])
def test_the_first_step_is_on_policy_and_every_kl_starts_at_zero_then_grows(kl):
    lrn = learner(kl=kl, lr=3e-2)
    g = group(lrn.model)
    first = lrn.step([g], "r", {}, {})
    assert first["ratio"] == pytest.approx(1.0, abs=1e-5) and first["clip_fraction"] == 0.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # model == reference == anchor == behaviour policy
    for _ in range(3):
        later = lrn.step([g], "r", {}, {})  # the same (now stale) rollouts: the policy has moved away from them
    assert later["ratio"] != pytest.approx(1.0, abs=1e-6)
    assert (later["kl"] == 0.0) if kl == "none" else (later["kl"] > 1e-8)


def test_the_equalizer_scales_each_sampled_steps_gradient_inside_the_loss():
    """With one sampler step per update (step_fraction 1/4 of 4), the equalised gradient is the plain one times that
    step's scale (MATH.md §2); which step is drawn depends only on the learner's seed."""
    grads = {}
    for eq in (True, False):  # two identical models and rollouts; the gradients stay in .grad after the step
        lrn = learner(equalizer=eq, step_fraction=0.25, kl="none", grad_clip=1e9)
        g = group(lrn.model)
        lrn.step([g], "r", {}, {})
        grads[eq] = torch.cat([p.grad.reshape(-1) for p in lrn.model.trainable_parameters() if p.grad is not None])
    k = int(torch.randperm(4, generator=torch.Generator().manual_seed(0))[0])  # the step the learner (seed 0) drew
    scale = float(equalizer_scales("sage", g.traj.sigmas, 0.7)[k])
    assert scale != pytest.approx(1.0, abs=1e-3)  # the test means something: this step is re-weighted
    torch.testing.assert_close(grads[True], scale * grads[False], rtol=1e-4, atol=1e-9)


def test_the_moving_anchor_is_refreshed_every_n_steps_and_the_reference_never():
    lrn = learner(kl="dual", update_ref_every=2, lr=3e-2)
    initial = {k: v.clone() for k, v in lrn.model.trainable_state().items()}
    g = group(lrn.model)

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    lrn.step([g], "r", {}, {})
    assert same(lrn.anchor.trainable_state(), initial) and not same(lrn.model.trainable_state(), initial)
    lrn.step([g], "r", {}, {})  # version 2: the anchor becomes the current policy
    assert same(lrn.anchor.trainable_state(), lrn.model.trainable_state())
    lrn.step([g], "r", {}, {})
    assert not same(lrn.anchor.trainable_state(), lrn.model.trainable_state())
    assert same(lrn.reference.trainable_state(), initial)


@pytest.mark.parametrize("schedule", ["fixed", "two_stage", "milder"])
def test_the_kl_weight_in_the_loss_follows_the_schedule(schedule):
    """loss = policy loss + w(version) * kl, with w from `kl_schedule` at the learner's version before the step."""
    lrn = learner(kl="stepwise", kl_weight=0.5, kl_schedule=schedule, lr=3e-2)
    g = group(lrn.model)
    for _ in range(6):
        version = lrn.version
        loss, parts = lrn._ppo(g, torch.tensor([1.0, -1.0, 0.5, -0.5]))
        w = kl_schedule(schedule, version, lrn.total_steps, 0.5)
        assert loss.item() == pytest.approx(parts["loss/policy"] + w * parts["kl"], rel=1e-5, abs=1e-9)
        lrn.step([g], "r", {}, {})
    assert kl_schedule(schedule, 0, 10, 0.5) == (0.5 if schedule == "fixed" else pytest.approx(0.05))
