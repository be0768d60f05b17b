"""rewards/advantages.py against MATH.md §4–§6 numbers and hand-computed cases."""
import numpy as np
import pytest
import torch

from rewards.advantages import (
    SELF_PACED_STAGES,
    composite_reward,
    constrained_channels,
    constrained_weights,
    gdpo_advantages,
    grpo_advantages,
    low_signal_groups,
    reward_uncertainty,
    selective_kl_mask,
    self_paced_weights,
)

MATH_REWARDS = [(1, 1), (1, 0), (0, 1), (0, 1)]


def test_math_section4_numbers_torch_and_numpy():
    for rewards in (torch.tensor(MATH_REWARDS, dtype=torch.float32), np.array(MATH_REWARDS, dtype=np.float64)):
        grpo = grpo_advantages(rewards, [0, 0, 0, 0], [1.0, 1.0])
        gdpo = gdpo_advantages(rewards, np.zeros(4, dtype=int), np.ones(2))
        assert grpo.dtype == torch.float32 and grpo.shape == (4,)
        assert gdpo.dtype == torch.float32 and gdpo.shape == (4,)
        torch.testing.assert_close(grpo, torch.tensor([1.4997, -0.4999, -0.4999, -0.4999]), atol=1e-4, rtol=0)
        torch.testing.assert_close(gdpo, torch.tensor([1.4856, -0.6894, -0.3981, -0.3981]), atol=1e-4, rtol=0)


def test_gdpo_separates_combinations_that_grpo_collapses():
    # (1,0) appears once, (0,1) three times: equal weighted sums, different rarity per channel.
    rewards = [(0, 0), (1, 0), (0, 1), (0, 1), (0, 1)]
    ids = [7] * 5
    grpo = grpo_advantages(rewards, ids, [1, 1])
    gdpo = gdpo_advantages(rewards, ids, [1, 1])
    assert grpo[1].item() == pytest.approx(grpo[2].item(), abs=1e-7)
    assert gdpo[1].item() - gdpo[2].item() > 0.4  # the rare success is worth more under GDPO (0.47)
    # With equal frequencies GDPO treats them the same, so the gap above comes from frequency.
    balanced = gdpo_advantages([(0, 0), (1, 0), (0, 1), (1, 1)], [0] * 4, [1, 1])
    assert balanced[1].item() == pytest.approx(balanced[2].item(), abs=1e-6)


def _reference_group_norm(values):
    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2 or np.all(v == v[0]):
        return np.zeros_like(v)
    return (v - v.mean()) / (v.std(ddof=1) + 1e-4)


def test_several_groups_of_different_sizes_non_contiguous_labels():
    rng = np.random.default_rng(0)
    ids = np.array([30, 5, 30, 5, 99, 30, 5, 30, 42, 42, 42])  # sizes 4, 3, 1, 3
    rewards = rng.normal(size=(len(ids), 2))
    rewards[ids == 42, 1] = 0.3  # channel 1 constant within group 42
    w = np.array([1.0, 0.5])
    grpo = grpo_advantages(rewards, ids, w).numpy()
    gdpo = gdpo_advantages(rewards, ids, w).numpy()
    exp_grpo = np.zeros(len(ids))
    summed = np.zeros(len(ids))
    for g in np.unique(ids):
        m = ids == g
        exp_grpo[m] = _reference_group_norm(rewards[m] @ w)
        summed[m] = sum(w[k] * _reference_group_norm(rewards[m, k]) for k in range(2))
    exp_gdpo = np.zeros(len(ids))
    keep = ids != 99  # the singleton is left out of the whitening and gets 0
    exp_gdpo[keep] = _reference_group_norm(summed[keep])
    np.testing.assert_allclose(grpo, exp_grpo, atol=1e-5)
    np.testing.assert_allclose(gdpo, exp_gdpo, atol=1e-5)
    assert grpo[ids == 99][0] == 0.0 and gdpo[ids == 99][0] == 0.0
    for g in (30, 5, 42):  # GRPO advantages are zero-mean within each group
        assert abs(grpo[ids == g].sum()) < 1e-5
    # string labels give the same answer as ints
    np.testing.assert_allclose(grpo_advantages(rewards, ids.astype(str), w).numpy(), grpo, atol=0)


def test_constant_group_gives_exact_zero_not_nan():
    # 0.1 three times: mean has rounding error; must still be exactly 0, not noise / 1e-4.
    rewards = np.array([[0.1, 0.0], [0.1, 0.0], [0.1, 0.0], [0.3, 0.2], [0.9, 0.2]])  # float64
    ids = [0, 0, 0, 1, 1]
    grpo = grpo_advantages(rewards, ids, [1.0, 1.0])
    assert torch.equal(grpo[:3], torch.zeros(3))
    # GDPO: the constant group's channels are exactly 0 before the batch whitening, which then
    # maps them to -mean_B/std_B (here the batch is balanced, so ~0 up to float rounding).
    gdpo = gdpo_advantages(rewards, ids, [1.0, 1.0])
    assert torch.isfinite(gdpo).all() and gdpo[:3].abs().max() < 1e-12
    torch.testing.assert_close(gdpo[3:], torch.tensor([-1.0, 1.0]) * gdpo[4], atol=0, rtol=0)
    # a batch where nothing varies at all
    assert torch.equal(gdpo_advantages(torch.ones(4, 2), [0, 0, 1, 1], [1, 1]), torch.zeros(4))


def test_sum_norm_divides_by_the_sum_of_weights_instead_of_the_final_normaliser():
    """MATH.md §4 rewards with SCRL-style weights [1, λ = 0.5]: the divisor is 1 + λ = 1.5 (Stooke's sum norm).
    GRPO: s = [1.5, 1, 0.5, 0.5], (s − 0.875)/1.5. GDPO: per-channel z-scores (±0.86588; 0.4999, −1.4997)
    summed with the weights, /1.5, no batch whitening."""
    w = [1.0, 0.5]
    grpo = grpo_advantages(MATH_REWARDS, [0, 0, 0, 0], w, sum_norm=True)
    gdpo = gdpo_advantages(MATH_REWARDS, [0, 0, 0, 0], w, sum_norm=True)
    torch.testing.assert_close(grpo, torch.tensor([0.416667, 0.083333, -0.25, -0.25]), atol=1e-5, rtol=0)
    torch.testing.assert_close(gdpo, torch.tensor([0.743889, 0.077353, -0.410621, -0.410621]), atol=1e-5, rtol=0)
    for fn in (grpo_advantages, gdpo_advantages):  # differs from the plain normalisation
        assert not torch.allclose(fn(MATH_REWARDS, [0, 0, 0, 0], w), fn(MATH_REWARDS, [0, 0, 0, 0], w, sum_norm=True))
        # the scale is bounded as the weights grow: doubling every weight changes nothing
        torch.testing.assert_close(fn(MATH_REWARDS, [0, 0, 0, 0], [2.0, 1.0], sum_norm=True),
                                   fn(MATH_REWARDS, [0, 0, 0, 0], w, sum_norm=True))
        assert torch.equal(fn(np.ones((3, 2)), [0, 0, 1], w, sum_norm=True), torch.zeros(3))  # constant, singleton
        with pytest.raises(ValueError, match="sum of the weights"):
            fn(MATH_REWARDS, [0, 0, 0, 0], [1.0, -1.0], sum_norm=True)


@pytest.mark.parametrize("fn", [grpo_advantages, gdpo_advantages])
def test_bad_inputs_raise_clear_errors(fn):
    good = np.ones((4, 2))
    with pytest.raises(ValueError, match="row 2, channel 1"):
        bad = good.copy(); bad[2, 1] = np.nan
        fn(bad, [0, 0, 1, 1], [1, 1])
    with pytest.raises(ValueError, match=r"expected shape \[B, K\].*got \(4,\)"):
        fn(np.ones(4), [0, 0, 1, 1], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        fn(good, [0, 0, 1, 1], [1, 1, 1])
    with pytest.raises(ValueError, match="group_ids"):
        fn(good, [0, 0, 1], [1, 1])
    with pytest.raises(ValueError, match="integer or string"):
        fn(good, [0.0, 0.0, 1.0, 1.0], [1, 1])


def test_constrained_channels_weights_and_composite():
    primary = [0.5, 0.2, 0.9]
    cons = [[0.8, 0.1], [0.6, 0.5], [0.9, 0.6]]
    tau = [0.7, 0.4]
    ch = constrained_channels(primary, cons, tau)
    expected = torch.tensor([[0.5, 0.0, -0.3], [0.2, -0.1, 0.0], [0.9, 0.0, 0.0]])
    torch.testing.assert_close(ch, expected)
    lam = [2.0, 0.5]
    w = constrained_weights(lam)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, 0.5]))
    r = composite_reward(primary, cons, tau, lam)
    torch.testing.assert_close(r, torch.tensor([0.5 - 0.5 * 0.3, 0.2 - 2.0 * 0.1, 0.9]))
    torch.testing.assert_close(r, ch @ w)
    torch.testing.assert_close(composite_reward(primary, cons, tau, lam, sum_norm=True), r / 3.5)
    # the GDPO route: channels + weights; with λ = 0 it reduces to normalising R_f alone
    a0 = gdpo_advantages(ch, [0, 0, 0], constrained_weights([0.0, 0.0]))
    torch.testing.assert_close(a0, gdpo_advantages(torch.tensor(primary)[:, None], [0, 0, 0], [1.0]))


def test_constrained_inputs_validated():
    with pytest.raises(ValueError, match="row 1, channel constraint 0"):
        constrained_channels([0.1, 0.2], [[0.5], [np.inf]], [0.3])
    with pytest.raises(ValueError, match="row 0, channel primary"):
        composite_reward([np.nan, 0.2], [[0.5], [0.5]], [0.3], [1.0])
    with pytest.raises(ValueError, match=r"tau must have shape \[C\] = \[2\]"):
        constrained_channels([0.1], [[0.5, 0.5]], [0.3])
    with pytest.raises(ValueError, match=r"B = 2"):
        constrained_channels([0.1, 0.2], [[0.5]], [0.3])
    with pytest.raises(ValueError, match="lambdas must be >= 0"):
        composite_reward([0.1], [[0.5]], [0.3], [-1.0])
    with pytest.raises(ValueError, match=r"lambdas must have shape \[C\] = \[1\]"):
        composite_reward([0.1], [[0.5]], [0.3], [1.0, 2.0])


def test_selective_kl_flags_samples_the_primary_reward_overrates():
    # group 0: sample 3 is ranked top by the primary reward and bottom by both auxiliaries.
    primary = [0.1, 0.2, 0.3, 0.9, 0.5, 0.4, 0.6]
    aux = [[0.2, 0.3], [0.5, 0.5], [0.9, 0.8], [0.0, 0.1], [0.5, 0.5], [0.4, 0.4], [0.6, 0.6]]
    ids = [0, 0, 0, 0, 1, 1, 1]
    u = reward_uncertainty(primary, aux, ids).numpy()
    # group 0 ranks /3: primary [0,1,2,3]/3, aux mean [1,2,3,0]/3; group 1 agrees everywhere
    np.testing.assert_allclose(u, [-1 / 3, -1 / 3, -1 / 3, 1.0, 0.0, 0.0, 0.0], atol=1e-12)
    mask = selective_kl_mask(primary, aux, ids, percentile=80)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [False, False, False, True, False, False, False]
    # rewards that agree everywhere: nothing is flagged at any percentile
    assert not selective_kl_mask([1, 2, 3, 4], [1, 2, 3, 4], [0, 0, 1, 1], 0).any()
    with pytest.raises(ValueError, match="percentile"):
        selective_kl_mask(primary, aux, ids, 101)


def test_selective_kl_ties_use_average_rank():
    # primary ties on samples 0 and 1 -> both get rank 0.5 (of 0..2), scaled to 0.25; auxiliary is 0, 0.5, 1
    u = reward_uncertainty([1.0, 1.0, 2.0], [0.0, 1.0, 2.0], [0, 0, 0]).numpy()
    np.testing.assert_allclose(u, [0.25, -0.25, 0.0], atol=1e-12)


def test_self_paced_weights_move_fidelity_to_alignment_continuously():
    th = [0.3, 0.5, 0.7]
    torch.testing.assert_close(self_paced_weights(0.0, th, SELF_PACED_STAGES), torch.tensor([0.6, 0.2, 0.2]))
    torch.testing.assert_close(self_paced_weights(0.5, th, SELF_PACED_STAGES), torch.tensor([0.2, 0.6, 0.2]))
    torch.testing.assert_close(self_paced_weights(0.9, th, SELF_PACED_STAGES), torch.tensor([0.2, 0.2, 0.6]))
    torch.testing.assert_close(self_paced_weights(0.4, th, SELF_PACED_STAGES), torch.tensor([0.4, 0.4, 0.2]))
    grid = np.linspace(0, 1, 201)
    ws = torch.stack([self_paced_weights(c, th, SELF_PACED_STAGES) for c in grid])
    assert (ws.diff(dim=0).abs().max() < 0.02 + 1e-6)  # continuous: 0.005 steps move ≤ 0.02
    torch.testing.assert_close(ws.sum(dim=1), torch.ones(len(grid)))
    assert (ws[:, 2].diff() >= -1e-7).all()  # alignment emphasis never decreases with competence
    with pytest.raises(ValueError, match="strictly increasing"):
        self_paced_weights(0.5, [0.5, 0.3, 0.7], SELF_PACED_STAGES)
    with pytest.raises(ValueError, match=r"S = len\(thresholds\) = 2"):
        self_paced_weights(0.5, [0.3, 0.5], SELF_PACED_STAGES)


def test_low_signal_groups():
    rewards = np.array([[0.5, 0.1], [0.5, 0.1001], [0.2, 0.9], [0.6, 0.9], [0.7, 0.3]])
    ids = ["a", "a", "b", "b", "c"]
    assert low_signal_groups(rewards, ids, min_std=0.01) == {"a": True, "b": False, "c": True}
    # one channel with spread is enough to keep a group
    assert low_signal_groups(rewards, ids, min_std=1e-5) == {"a": False, "b": False, "c": True}
    assert low_signal_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([4, 4, 2, 2]), 0.1) == {2: False, 4: True}
