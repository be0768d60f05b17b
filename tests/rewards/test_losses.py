"""Losses and aggregators against the numbers in MATH.md §6."""
import math

import numpy as np
import pytest
import torch

from rewards.aggregators import to_grayscale, top_fraction_mean, top_k_count
from rewards.losses import bt_loss, btt_loss, regression_loss, tie_threshold


def test_btt_matches_math_md():
    delta = torch.tensor([1.0, 1.0])
    loss = btt_loss(delta, torch.tensor([False, True]), k=5.0)
    assert loss[0].item() == pytest.approx(1.043592, abs=1e-5)
    assert loss[1].item() == pytest.approx(0.545971, abs=1e-5)


def test_btt_probabilities_sum_to_one():
    # exp(-loss) over {a wins, b wins (=-Δ), tie} is a distribution for any Δ.
    for d in [-3.0, -0.2, 0.0, 0.7, 4.0]:
        win = btt_loss(torch.tensor([d]), torch.tensor([False]))
        lose = btt_loss(torch.tensor([-d]), torch.tensor([False]))
        tie = btt_loss(torch.tensor([d]), torch.tensor([True]))
        total = sum(torch.exp(-x).item() for x in (win, lose, tie))
        assert total == pytest.approx(1.0, abs=1e-6)


def test_btt_is_finite_for_huge_differences_and_has_gradients():
    delta = torch.tensor([-1e4, 1e4, -1e4, 1e4], requires_grad=True)
    loss = btt_loss(delta, torch.tensor([False, False, True, True]))
    assert torch.isfinite(loss).all()
    assert loss[0].item() == pytest.approx(1e4 + math.log(5), rel=1e-6)  # confidently wrong: linear
    assert loss[1].item() == pytest.approx(0.0, abs=1e-6)
    loss.sum().backward()
    assert torch.isfinite(delta.grad).all()


def test_btt_rejects_bad_input():
    with pytest.raises(ValueError, match="k"):
        btt_loss(torch.zeros(2), torch.zeros(2, dtype=torch.bool), k=1.0)
    with pytest.raises(ValueError, match=r"\[N\]"):
        btt_loss(torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool))


def test_bt_and_regression():
    assert bt_loss(torch.tensor([0.0]))[0].item() == pytest.approx(math.log(2), abs=1e-6)
    assert bt_loss(torch.tensor([1.0]))[0].item() == pytest.approx(0.313262, abs=1e-5)
    loss = regression_loss(torch.tensor([[1.0, 2.0], [0.0, 0.0]]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    assert loss.tolist() == pytest.approx([2.5, 1.0])
    with pytest.raises(ValueError, match="same shape"):
        regression_loss(torch.zeros(3), torch.zeros(4))


def test_tie_threshold_is_where_tie_stops_being_most_likely():
    thr = tie_threshold(5.0)
    assert thr == pytest.approx(math.log(4.6), abs=1e-9)  # 1.526056
    for d, tie_wins in [(thr - 1e-3, True), (thr + 1e-3, False), (0.0, True)]:
        p_win = torch.exp(-btt_loss(torch.tensor([d]), torch.tensor([False]))).item()
        p_tie = torch.exp(-btt_loss(torch.tensor([d]), torch.tensor([True]))).item()
        assert (p_tie > p_win) == tie_wins
    assert tie_threshold(2.0) == 0.0  # k <= 2: a tie is never the most likely outcome


def test_top_fraction_mean_numbers():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], [5.0, 1.0, 9.0, 1.0, 1.0, 7.0, 1.0, 1.0]])
    # T = 8: ceil(2.4) = 3 frames -> mean(7, 6, 5) = 6 and mean(9, 7, 5) = 7
    assert top_fraction_mean(scores).tolist() == pytest.approx([6.0, 7.0])
    assert top_fraction_mean(scores.numpy()).tolist() == pytest.approx([6.0, 7.0])
    assert top_k_count(10, 0.3) == 3  # 0.3*10 is 3.0000000000000004 in float; still 3
    assert top_k_count(8, 0.3) == 3 and top_k_count(3, 0.3) == 1 and top_k_count(4, 1.0) == 4
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        top_fraction_mean(torch.zeros(8))
    with pytest.raises(ValueError, match="fraction"):
        top_fraction_mean(torch.zeros(2, 8), fraction=0.0)


def test_grayscale_bt601_numbers_in_both_layouts():
    red = np.zeros((1, 2, 4, 4, 3), np.float32)
    red[..., 0] = 1.0
    assert np.allclose(to_grayscale(red), 0.299)
    model = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.2, 0.4, 0.6]])
    model = model[None, :, :, None, None].expand(1, 4, 3, 2, 2)  # [B, T, C, H, W]
    y = to_grayscale(model)
    assert y.shape == (1, 4, 2, 2)
    assert y[0, :, 0, 0].tolist() == pytest.approx([0.299, 0.587, 0.114, 0.363], abs=1e-6)
    # [-1, 1] videos map consistently: gray(2v - 1) = 2 gray(v) - 1
    assert torch.allclose(to_grayscale(2 * model - 1), 2 * y - 1, atol=1e-6)
    with pytest.raises(ValueError, match="3 colour channels"):
        to_grayscale(np.zeros((2, 4, 4, 4)))
