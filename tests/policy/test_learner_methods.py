"""The learner-side methods wired to `learner.*` keys on a small VideoDiT: Flow-DPO / Flow-RWR / SFT (VideoAlign),
the moving reference and selective KL (Astrolabe), SCRL's sum norm and extra advantage channels. Every test fails
if its key were ignored: the numbers are recomputed by hand from the same noise draws."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from orchestrator.config import ConfigError, load_config
from policy.learner import Learner, LearnerConfig, ScoredGroup, advantages, check_rewards
from policy.losses import flow_dpo_loss, nft_loss
from policy.sampling import sample
from rewards.advantages import constrained_channels, gdpo_advantages, grpo_advantages, selective_kl_mask

from .helpers import make_model

torch.set_num_threads(1)
PROMPT = ["a red circle moving left quickly"]
REWARDS = {  # candidate 1 is best, 0 worst by "r"; "aux" disagrees on 0 and 1 (u = [-1, 1, 0, 0])
    "r": np.array([0.1, 0.9, 0.4, 0.6], dtype=np.float32),
    "aux": np.array([0.9, 0.1, 0.4, 0.6], dtype=np.float32),
    "c": np.array([0.3, 0.8, 0.2, 0.6], dtype=np.float32),
}


def group(model, rewards=REWARDS, gid="g0", seed=0) -> ScoredGroup:
    cond = model.encode_prompts(PROMPT)
    traj = sample(model, cond, steps=3, sde_type="sage", eta=0.7, mode="causal", group_size=4, prefix_chunks=1,
                  generator=torch.Generator().manual_seed(seed))
    return ScoredGroup(gid, cond, traj, dict(rewards), 0)


def learner(**kw) -> Learner:
    return Learner(make_model(), LearnerConfig(**kw), total_steps=10, seed=0)


def perturb(copy) -> None:
    """Move a frozen copy away from the policy, so terms against it are not trivially zero."""
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for p in copy.parameters():
            p.add_(0.05 * torch.randn_like(p))


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.trainable_parameters() if p.grad is not None])


def same_state(a, b) -> bool:
    sa, sb = a.trainable_state(), b.trainable_state()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


def hand_forward(lrn: Learner, g: ScoredGroup, rows, shared: bool, with_t: bool = False):
    """The forward process as MATH.md §3 states it, from the learner's generator: -> (x0, eps, v_theta, v_ref),
    with t after eps when `with_t`, at the trained frames (after the one-chunk prefix), history as clean context."""
    x0 = g.traj.videos[rows]
    n = 1 if shared else len(rows)
    t = torch.rand(n, generator=lrn.generator).clamp(0.02, 0.98).expand(len(rows))
    eps = torch.randn((n, *x0.shape[1:]), generator=lrn.generator).expand_as(x0)
    x_t = (1 - t[:, None, None, None, None]) * x0 + t[:, None, None, None, None] * eps
    ids = g.cond.expand(len(rows), *g.cond.shape[1:])
    f = lrn.model.shape.chunk  # prefix_chunks = 1
    with torch.no_grad():
        v = [m.velocity_causal(x_t, t, x0, ids, detach_history=True)[:, f:] for m in (lrn.model, lrn.reference)]
    return (x0[:, f:], eps[:, f:], *([t] if with_t else []), v[0], v[1])


def per_sample_mse(a, b) -> torch.Tensor:
    return ((a - b) ** 2).reshape(a.shape[0], -1).mean(1)


# --------------------------------------------------------------------------- VideoAlign losses

@pytest.mark.parametrize("beta", [100.0, 20.0])
def test_flow_dpo_loss_on_the_best_and_worst_candidate_equals_the_formula(beta):
    lrn = learner(loss="flow_dpo", dpo_beta=beta)
    perturb(lrn.reference)
    g = group(lrn.model)
    adv = advantages([g], "r", {}, {}, "gdpo")
    state = lrn.generator.get_state()
    loss, parts = lrn._flow_dpo(g, adv)
    lrn.generator.set_state(state)
    x0, eps, v_theta, v_ref = hand_forward(lrn, g, [1, 0], shared=True)  # winner 1 (r = 0.9), loser 0 (r = 0.1)
    e_theta, e_ref = per_sample_mse(v_theta, eps - x0), per_sample_mse(v_ref, eps - x0)
    margin = (e_theta[0] - e_ref[0]) - (e_theta[1] - e_ref[1])
    assert abs(margin.item()) > 1e-4  # the reference differs: the loss is not log 2
    expected = -F.logsigmoid(-0.5 * beta * margin)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() == pytest.approx(flow_dpo_loss(e_theta[0], e_ref[0], e_theta[1], e_ref[1], beta).item(), rel=1e-5)
    assert parts["dpo/margin"] == pytest.approx(margin.item(), rel=1e-4)


def test_flow_dpo_with_no_preference_in_a_group_gives_no_gradient():
    lrn = learner(loss="flow_dpo", grad_clip=1e9)
    flat = {k: np.full(4, 0.5, np.float32) for k in REWARDS}
    lrn.step([group(lrn.model, flat)], "r", {}, {})
    assert grads(lrn.model).abs().max() == 0.0


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_flow_rwr_weights_each_candidates_flow_matching_error_by_exp_advantage_over_beta(beta):
    lrn = learner(loss="flow_rwr", rwr_beta=beta)
    g = group(lrn.model)
    adv = advantages([g], "r", {}, {}, "gdpo")
    state = lrn.generator.get_state()
    loss, _ = lrn._flow_rwr(g, adv)
    lrn.generator.set_state(state)
    x0, eps, v_theta, _ = hand_forward(lrn, g, [0, 1, 2, 3], shared=False)
    expected = (torch.exp(adv / beta) * per_sample_mse(v_theta, eps - x0)).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.item() != pytest.approx(per_sample_mse(v_theta, eps - x0).mean().item(), rel=1e-3)  # weights matter


def test_sft_trains_the_winner_only():
    """Replacing every other candidate's clip leaves the gradient bit for bit; replacing the winner's changes it."""
    out = []
    for replace in (None, [0, 2, 3], [1]):
        lrn = learner(loss="sft", grad_clip=1e9)
        g = group(lrn.model)
        if replace:
            g.traj.videos[replace] = torch.randn_like(g.traj.videos[replace])
        lrn.step([g], "r", {}, {})
        out.append(grads(lrn.model))
    assert out[0].abs().max() > 0
    assert torch.equal(out[0], out[1])
    assert not torch.allclose(out[0], out[2])


def test_each_loss_trains_differently():
    first = {}
    for loss in ("nft", "flow_dpo", "flow_rwr", "sft"):
        lrn = learner(loss=loss, grad_clip=1e9)
        perturb(lrn.reference)
        lrn.step([group(lrn.model)], "r", {}, {})
        first[loss] = grads(lrn.model)
    names = list(first)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not torch.allclose(first[a], first[b]), (a, b)


# --------------------------------------------------------------------------- Astrolabe: selective KL

def test_selective_kl_applies_the_nft_kl_term_only_where_the_mask_is_set():
    lrn = learner(loss="nft", nft_kl=1.0, selective_kl={"percentile": 50, "auxiliary": ["aux"]})
    perturb(lrn.reference)
    g = group(lrn.model)
    mask = selective_kl_mask(REWARDS["r"], REWARDS["aux"][:, None], [0, 0, 0, 0], 50).float()
    assert mask.tolist() == [0.0, 1.0, 0.0, 0.0]  # the primary reward alone likes candidate 1: likely hacking
    adv = advantages([g], "r", {}, {}, "gdpo")
    state = lrn.generator.get_state()
    losses = {}
    for name, m in (("full", None), ("selective", mask), ("none", torch.zeros(4))):
        lrn.generator.set_state(state)
        losses[name] = lrn._nft(g, adv, m)[0].item()
    lrn.generator.set_state(state)
    _, _, v_theta, v_ref = hand_forward(lrn, g, [0, 1, 2, 3], shared=False)
    d = per_sample_mse(v_theta, v_ref)  # the per-sample KL
    assert losses["selective"] - losses["none"] == pytest.approx((mask * d).mean().item(), rel=1e-4)
    assert losses["full"] - losses["none"] == pytest.approx(d.mean().item(), rel=1e-4)
    assert losses["none"] < losses["selective"] < losses["full"]
    stats = lrn.step([g], "r", {}, {})
    assert stats["kl/selected_fraction"] == 0.25


def test_nft_draws_average_the_loss_over_that_many_noise_draws():
    """learner.nft_draws = K: K fresh (t, ε) per clip, the loss is the mean of their NFT losses (MATH.md §3)."""
    lrn = learner(loss="nft", nft_draws=3)
    perturb(lrn.old)  # v_old != v_theta, so every draw's loss depends on its (t, ε)
    g = group(lrn.model)
    adv = advantages([g], "r", {}, {}, "gdpo")
    state = lrn.generator.get_state()
    loss = lrn._nft(g, adv)[0].item()
    lrn.generator.set_state(state)
    lrn.reference.load_trainable_state(lrn.old.trainable_state())  # hand_forward's second model: the old policy
    draws = [nft_loss(x0, eps, t, v, v_old, None, adv, 1.0).item()
             for x0, eps, t, v, v_old in (hand_forward(lrn, g, [0, 1, 2, 3], shared=False, with_t=True)
                                          for _ in range(3))]
    assert loss == pytest.approx(np.mean(draws), rel=1e-5)
    assert np.std(draws) > 1e-3 * abs(np.mean(draws))  # the draws differ: one draw alone is another loss
    lrn.cfg.nft_draws = 1
    lrn.generator.set_state(state)
    assert lrn._nft(g, adv)[0].item() == pytest.approx(draws[0], rel=1e-5)


@pytest.mark.parametrize("kl", ["fixed", "dual"])
def test_selective_kl_makes_the_ppo_kl_term_a_masked_sum_over_samples(kl):
    """The KL is linear in the per-sample mask: KL(m) = Σ_b m_b KL(e_b), KL(1) = the unmasked term."""
    lrn = learner(loss="ppo", kl=kl, kl_weight=1.0)
    perturb(lrn.reference)
    perturb(lrn.anchor)
    g = group(lrn.model)
    for _ in range(2):
        lrn.step([g], "r", {}, {})  # stale rollouts: the step-wise KL is non-zero too
    adv = advantages([g], "r", {}, {}, "gdpo")
    state = lrn.generator.get_state()

    def kl_with(mask):
        lrn.generator.set_state(state)
        return lrn._ppo(g, adv, mask)[1]["kl"]

    full = kl_with(None)
    per_sample = [kl_with(torch.eye(4)[b]) for b in range(4)]
    mask = torch.tensor([0.0, 1.0, 0.0, 1.0])
    assert full == pytest.approx(sum(per_sample), rel=1e-4) and min(per_sample) != max(per_sample)
    assert kl_with(mask) == pytest.approx(per_sample[1] + per_sample[3], rel=1e-4)
    assert kl_with(mask) != pytest.approx(full, rel=1e-3)


def test_selective_kl_changes_the_update():
    out = []
    for sel in (None, {"percentile": 50, "auxiliary": ["aux"]}):
        lrn = learner(loss="nft", nft_kl=1.0, selective_kl=sel, grad_clip=1e9)
        perturb(lrn.reference)
        lrn.step([group(lrn.model)], "r", {}, {})
        out.append(grads(lrn.model))
    assert not torch.allclose(out[0], out[1])


def test_selective_kl_names_a_missing_auxiliary_reward():
    lrn = learner(loss="nft", nft_kl=1.0, selective_kl={"percentile": 50, "auxiliary": ["vq"]})
    with pytest.raises(ValueError, match="learner.selective_kl.auxiliary names reward 'vq'"):
        lrn.step([group(lrn.model)], "r", {}, {})
    check_rewards(lrn.cfg, ["vq", "r"])  # the orchestrator's check before any actor starts
    with pytest.raises(ValueError, match="'vq', which this run does not score"):
        check_rewards(lrn.cfg, ["mq", "r"])


# --------------------------------------------------------------------------- Astrolabe: dynamic reference

def test_a_moving_reference_is_reset_every_n_steps():
    lrn = learner(loss="nft", nft_kl=0.1, lr=3e-2, reference="moving", reference_reset_every=2)
    initial = make_model()
    g = group(lrn.model)
    resets = []
    for step in range(1, 5):
        resets.append(lrn.step([g], "r", {}, {})["reference/resets"])
        assert same_state(lrn.reference, lrn.model) == (step % 2 == 0), step
        assert same_state(lrn.reference, initial) == (step == 1), step
    assert resets == [0, 1, 1, 2]


def test_a_moving_reference_is_reset_when_the_kl_to_it_exceeds_the_threshold():
    """The KL is measured before the update: 0 right after a reset, > 1e-12 one step later."""
    lrn = learner(loss="nft", nft_kl=0.1, lr=3e-2, reference="moving", reference_reset_kl=1e-12)
    g = group(lrn.model)
    steps = [lrn.step([g], "r", {}, {}) for _ in range(4)]
    assert [s["reference/resets"] for s in steps] == [0, 1, 1, 2]
    assert steps[0]["kl/reference"] == 0.0 and steps[1]["kl/reference"] > 1e-12 and steps[2]["kl/reference"] == 0.0
    frozen = learner(loss="nft", nft_kl=0.1, lr=3e-2)
    assert [frozen.step([g], "r", {}, {})["reference/resets"] for _ in range(3)] == [0, 0, 0]
    assert not same_state(frozen.reference, frozen.model)


@pytest.mark.parametrize("kw", [dict(loss="nft", nft_kl=0.1), dict(loss="ppo", kl="fixed"), dict(loss="flow_dpo")])
def test_every_loss_that_uses_the_reference_sees_the_reset(kw):
    """Right after a reset the reference is the current policy: its measured KL is 0, the frozen one's is not."""
    seen = {}
    for ref in ("frozen", "moving"):
        extra = dict(reference="moving", reference_reset_every=1) if ref == "moving" else {}
        lrn = learner(lr=3e-2, **kw, **extra)
        g = group(lrn.model)
        lrn.step([g], "r", {}, {})
        seen[ref] = lrn.step([g], "r", {}, {})["kl/reference"]
    assert seen["moving"] == pytest.approx(0.0, abs=1e-12) and seen["frozen"] > 1e-10


# --------------------------------------------------------------------------- SCRL sum norm and extra channels

def plain_groups():
    """Two groups scored by r (primary), c (constraint) and aux; only rewards matter for advantages."""
    other = {k: v[::-1].copy() * 0.5 + 0.2 for k, v in REWARDS.items()}
    return [ScoredGroup("a", None, None, dict(REWARDS), 0), ScoredGroup("b", None, None, other, 0)]


@pytest.mark.parametrize("method", ["gdpo", "grpo"])
def test_sum_norm_divides_by_one_plus_the_lambdas_instead_of_whitening(method):
    groups, taus, lam = plain_groups(), {"c": 0.5}, {"c": 2.0}
    ids = np.repeat([0, 1], 4)
    r = np.concatenate([g.rewards["r"] for g in groups]).astype(np.float64)
    c = np.concatenate([g.rewards["c"] for g in groups]).astype(np.float64)
    pen = -np.maximum(0.0, 0.5 - c)
    normed = advantages(groups, "r", taus, lam, method, sum_norm=True)
    plain = advantages(groups, "r", taus, lam, method)
    if method == "gdpo":  # Â = Σ w_k A_jk / (1 + λ), no batch whitening
        def z(x):
            out = np.empty_like(x)
            for gi in (0, 1):
                xs = x[ids == gi]
                out[ids == gi] = (xs - xs.mean()) / (xs.std(ddof=1) + 1e-4)
            return out
        expected = (z(r) + 2.0 * z(pen)) / 3.0
    else:  # (s − mean_G s) / (1 + λ), no std division
        s = r + 2.0 * pen
        expected = s - np.array([s[ids == gi].mean() for gi in ids])
        expected = expected / 3.0
    np.testing.assert_allclose(normed.numpy(), expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(normed.numpy(), plain.numpy(), atol=1e-3)


def test_sum_norm_changes_the_learners_update():
    out = []
    for sum_norm in (False, True):
        lrn = Learner(make_model(), LearnerConfig(loss="nft", grad_clip=1e9), total_steps=10, seed=0, sum_norm=sum_norm)
        stats = lrn.step([group(lrn.model)], "r", {"c": 0.5}, {"c": 2.0})
        out.append((stats["adv_abs"], grads(lrn.model)))
    assert out[0][0] != pytest.approx(out[1][0], rel=1e-3)
    assert not torch.allclose(out[0][1], out[1][1])


@pytest.mark.parametrize("method", ["gdpo", "grpo"])
def test_channel_weights_add_reward_channels_beside_the_scrl_ones(method):
    groups, taus, lam = plain_groups(), {"c": 0.5}, {"c": 2.0}
    ids = np.repeat([0, 1], 4)
    cat = {k: np.concatenate([g.rewards[k] for g in groups]) for k in REWARDS}
    base = constrained_channels(cat["r"], cat["c"][:, None], [0.5])  # [R_f, −ReLU(τ − R_c)]
    fn = gdpo_advantages if method == "gdpo" else grpo_advantages
    expected = fn(torch.cat([base, torch.as_tensor(cat["aux"])[:, None]], 1), ids, [1.0, 2.0, 0.7])
    got = advantages(groups, "r", taus, lam, method, channel_weights={"aux": 0.7})
    torch.testing.assert_close(got, expected)
    default = advantages(groups, "r", taus, lam, method, channel_weights=None)
    torch.testing.assert_close(default, fn(base, ids, [1.0, 2.0]), rtol=0, atol=0)  # None: today's, bit for bit
    assert not torch.allclose(got, default, atol=1e-3)
    with pytest.raises(ValueError, match="channel_weights names reward 'vq'"):
        advantages(groups, "r", taus, lam, method, channel_weights={"vq": 1.0})


def test_channel_weights_reach_the_update():
    out = []
    for cw in (None, {"aux": 1.0}):
        lrn = learner(loss="nft", grad_clip=1e9)
        lrn.step([group(lrn.model)], "r", {}, {}, channel_weights=cw)
        out.append(grads(lrn.model))
    assert not torch.allclose(out[0], out[1])


# --------------------------------------------------------------------------- bad settings: one line, the key named

@pytest.mark.parametrize("kw, message", [
    (dict(reference_reset_every=5), "learner.reference_reset_every resets a moving reference"),
    (dict(reference_reset_kl=0.1), "learner.reference_reset_kl resets a moving reference"),
    (dict(reference="moving", nft_kl=0.1), "learner.reference=moving needs a reset rule"),
    (dict(reference="moving", reference_reset_every=5), "learner.loss=nft does not use the reference"),
    (dict(loss="ppo", kl="dual", reference="moving", reference_reset_every=5), "loss=ppo does not use the reference"),
    (dict(selective_kl={"percentile": 50, "auxiliary": ["vq"]}), "learner.loss=nft has none"),
    (dict(loss="ppo", kl="none", selective_kl={"percentile": 50, "auxiliary": ["vq"]}), "learner.loss=ppo has none"),
    (dict(loss="flow_dpo", selective_kl={"percentile": 50, "auxiliary": ["vq"]}), "learner.loss=flow_dpo has none"),
    (dict(loss="ppo", nft_draws=2), "learner.nft_draws=2 averages the nft loss over noise draws, but learner.loss=ppo"),
])
def test_contradictory_learner_settings_are_one_line_errors(kw, message):
    with pytest.raises(ValueError, match=message):
        LearnerConfig(**kw)


@pytest.mark.parametrize("overrides, message", [
    (["learner.loss=flow_dpo", "rollout.group_size=1"], "learner.loss=flow_dpo needs a winner"),
    (["learner.loss=sft", "rollout.group_size=1"], "learner.loss=sft needs a winner"),
    (["learner.loss=flow_dpo", "constraints.sum_norm=true"], "constraints.sum_norm rescales advantages"),
    (["learner.nft_kl=0.1", "learner.selective_kl={percentile: 50, auxiliary: [vq, oops]}"],
     "auxiliary names reward 'oops'"),
    (["learner.reference=moving"], "learner.reference=moving needs a reset rule"),
])
def test_config_errors_name_the_keys(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "\n" not in str(err.value)


def test_config_accepts_the_new_methods():
    cfg = load_config(None, ["learner.loss=flow_dpo", "learner.reference=moving", "learner.reference_reset_every=10"])
    assert cfg.learner.loss == "flow_dpo" and cfg.learner.dpo_beta == 100.0
    cfg = load_config(None, ["learner.nft_kl=0.1", "learner.selective_kl={percentile: 75, auxiliary: [vq, mq, ta]}"])
    assert cfg.learner.selective_kl.auxiliary == ["vq", "mq", "ta"]
