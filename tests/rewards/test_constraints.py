"""rewards/constraints.py against MATH.md §5 numbers and a simulated closed loop."""
import math

import msgpack
import numpy as np
import pytest
from pydantic import ValidationError

from rewards.constraints import (
    ConstraintSet,
    ConstraintsConfig,
    DualAscent,
    PIDLagrangian,
    oscillation_stats,
)

TAU = 0.7
MEANS = [0.5, 0.6, 0.75, 0.8, 0.65]


def test_pid_reproduces_math_section5():
    pid = PIDLagrangian(kp=1, ki=0.5, kd=2, d_delay=1, ema_p=0.5, ema_d=0.5)
    assert pid.lam == 0.0
    lams = [pid.update(TAU - m) for m in MEANS]
    np.testing.assert_allclose(lams, [0.4, 0.25, 0.15, 0.0375, 0.19375], atol=1e-12)
    assert pid.lam == lams[-1]
    s = pid.state_dict()
    assert s["step"] == 5 and len(s["history"]) == 1
    np.testing.assert_allclose([s["I"], s["P"], s["Cd"], s["history"][0]], [0.1, 0.00625, 0.00625, 0.00625])


def test_dual_ascent_reproduces_math_section5():
    dual = DualAscent(lr=0.5)
    np.testing.assert_allclose([dual.update(TAU - m) for m in MEANS], [0.1, 0.15, 0.125, 0.075, 0.1], atol=1e-12)


def test_invariants_anti_windup_derivative_and_cap():
    # long satisfaction: I stays at 0 instead of going negative, so λ reacts at once later
    pid = PIDLagrangian(kp=0, ki=1.0, kd=0)
    for _ in range(20):
        assert pid.update(-0.5) == 0.0
    assert pid.state_dict()["I"] == 0.0
    assert pid.update(0.1) == pytest.approx(0.1)
    # derivative only raises: a shrinking violation gives no D term (λ = I alone here)
    d_only = PIDLagrangian(kp=0, ki=0.0, kd=10.0, ema_d=0.0)
    assert d_only.update(0.3) == pytest.approx(3.0)  # Cd 0 -> 0.3
    assert d_only.update(0.1) == 0.0  # Cd 0.3 -> 0.1: falling, no negative push
    # d_delay = 3 compares with Cd three steps back (zeros before the start)
    delayed = PIDLagrangian(kp=0, ki=0.0, kd=1.0, d_delay=3, ema_d=0.0)
    assert [delayed.update(v) for v in (0.1, 0.2, 0.3, 0.35)] == pytest.approx([0.1, 0.2, 0.3, 0.25])
    # lambda_max caps λ and the integral
    capped = PIDLagrangian(kp=0, ki=1.0, kd=0, lambda_max=0.5)
    for _ in range(10):
        capped.update(1.0)
    assert capped.lam == 0.5 and capped.state_dict()["I"] == 0.5
    assert capped.update(-0.2) == pytest.approx(0.3)  # no wound-up integral to burn off


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="kd must be >= 0"):
        PIDLagrangian(1, 1, -1)
    with pytest.raises(ValueError, match="d_delay"):
        PIDLagrangian(1, 1, 1, d_delay=0)
    with pytest.raises(ValueError, match="ema_p"):
        PIDLagrangian(1, 1, 1, ema_p=1.0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        DualAscent(0.0)
    with pytest.raises(ValueError, match="violation must be finite"):
        PIDLagrangian(1, 1, 1).update(math.nan)


@pytest.mark.parametrize("make", [lambda: PIDLagrangian(1, 0.5, 2, d_delay=2, ema_p=0.5, ema_d=0.7),
                                  lambda: DualAscent(0.5)])
def test_state_round_trip_through_msgpack(make):
    violations = [0.2, 0.1, -0.05, -0.1, 0.05, 0.3, -0.2, 0.0]
    straight = make()
    expected = [straight.update(v) for v in violations]
    first = make()
    head = [first.update(v) for v in violations[:3]]
    blob = msgpack.packb(first.state_dict())
    resumed = make()
    resumed.load_state_dict(msgpack.unpackb(blob))
    assert resumed.lam == head[-1]
    tail = [resumed.update(v) for v in violations[3:]]
    assert head + tail == expected  # bit-identical, not just close
    assert resumed.state_dict() == straight.state_dict()


def test_load_state_dict_rejects_bad_state():
    pid = PIDLagrangian(1, 1, 1, d_delay=2)
    good = pid.state_dict()
    with pytest.raises(ValueError, match=r"missing keys \['lam'\]"):
        pid.load_state_dict({k: v for k, v in good.items() if k != "lam"})
    with pytest.raises(ValueError, match="d_delay = 2"):
        pid.load_state_dict({**good, "history": [0.0]})
    with pytest.raises(ValueError, match="I >= 0"):
        pid.load_state_dict({**good, "I": -1.0})


def test_config_validation_and_controller_choice():
    cfg = ConstraintsConfig()
    pid = cfg.make_controller()
    np.testing.assert_allclose([pid.update(TAU - m) for m in MEANS], [0.4, 0.25, 0.15, 0.0375, 0.19375])
    dual = ConstraintsConfig(controller="dual").make_controller()
    np.testing.assert_allclose([dual.update(TAU - m) for m in MEANS], [0.1, 0.15, 0.125, 0.075, 0.1])
    for bad, field in [({"ki": 0}, "ki"), ({"kp": -1}, "kp"), ({"controller": "pi"}, "controller"),
                       ({"ema_d": 1.0}, "ema_d"), ({"kd": float("nan")}, "kd"), ({"gain": 1}, "gain"),
                       ({"d_delay": 0}, "d_delay"), ({"lr": -0.1}, "lr")]:
        with pytest.raises(ValidationError, match=field):
            ConstraintsConfig(**bad)


def test_constraint_set_update_state_and_errors():
    cs = ConstraintSet.from_config(ConstraintsConfig(sum_norm=True), {"quality": 0.7, "alignment": 0.4})
    assert cs.names == ["quality", "alignment"] and cs.sum_norm
    assert cs.violations({"alignment": 0.5, "quality": 0.5}) == pytest.approx({"quality": 0.2, "alignment": -0.1})
    lams = None
    for m in MEANS[:3]:
        lams = cs.update({"quality": m, "alignment": 0.5})
    assert lams == pytest.approx({"quality": 0.15, "alignment": 0.0})
    assert list(cs.lambdas()) == ["quality", "alignment"] and cs.lambdas() == lams

    blob = msgpack.packb(cs.state_dict())
    resumed = ConstraintSet.from_config(ConstraintsConfig(), {"quality": 0.0, "alignment": 0.0})
    resumed.load_state_dict(msgpack.unpackb(blob))
    assert resumed.taus == {"quality": 0.7, "alignment": 0.4}
    for m in MEANS[3:]:
        a, b = cs.update({"quality": m, "alignment": 0.5}), resumed.update({"quality": m, "alignment": 0.5})
        assert a == b
    assert a["quality"] == pytest.approx(0.19375)

    with pytest.raises(ValueError, match=r"unknown constraint name\(s\) \['aesthetics'\]"):
        cs.update({"quality": 0.5, "alignment": 0.5, "aesthetics": 0.1})
    with pytest.raises(ValueError, match=r"lacks constraint\(s\) \['alignment'\]"):
        cs.update({"quality": 0.5})
    with pytest.raises(ValueError, match="alignment"):
        cs.update({"quality": 0.5, "alignment": float("inf")})
    with pytest.raises(ValueError, match="do not match"):
        ConstraintSet.from_config(ConstraintsConfig(), {"quality": 0.7}).load_state_dict(cs.state_dict())


def test_oscillation_stats_on_hand_made_sequences():
    s = oscillation_stats([0.1, 0.5, 0.3, 0.2], [0.2, -0.1, 0.05, -0.02])
    assert s == {"overshoot": pytest.approx(0.1), "sign_changes": 3, "lambda_overshoot": pytest.approx(0.3)}
    assert oscillation_stats([0.1, 0.2], [0.2, 0.1])["overshoot"] == 0.0  # never reached the target
    assert oscillation_stats([0, 0, 0], [0.2, -0.001, 0.001], tol=0.005)["sign_changes"] == 0
    with pytest.raises(ValueError, match="equal length"):
        oscillation_stats([0.1], [0.1, 0.2])


def _closed_loop(controller, steps=80, tau=0.7, lag_alpha=0.2, delay=3):
    """A toy policy whose constraint reward follows λ with inertia and dead time.

    The reward the policy would settle at under multiplier λ is 0.5 + 0.2·λ (so λ* = 1 meets
    τ = 0.7); it moves 20 % of the way there per learner step and sees λ three steps late, as
    when rollouts are scored with a stale λ snapshot. Returns (λ_t, Δ_t).
    """
    mean, seen, lams, viols = 0.5, [0.0] * delay, [], []
    for _ in range(steps):
        v = tau - mean
        lam = controller.update(v)
        viols.append(v)
        lams.append(lam)
        seen.append(lam)
        mean += lag_alpha * (0.5 + 0.2 * seen[-1 - delay] - mean)
    return np.array(lams), np.array(viols)


def test_pid_damps_the_loop_that_primal_dual_rings():
    dual_l, dual_v = _closed_loop(DualAscent(lr=1.0))
    pid_l, pid_v = _closed_loop(PIDLagrangian(kp=2.0, ki=1.0, kd=2.0, d_delay=3, ema_p=0.5, ema_d=0.5))
    dual = oscillation_stats(dual_l, dual_v, tol=0.005)
    pid = oscillation_stats(pid_l, pid_v, tol=0.005)
    # same integral gain; the P and D terms halve the swing past τ and ring fewer times
    assert pid["overshoot"] < 0.6 * dual["overshoot"]
    assert pid["sign_changes"] < dual["sign_changes"]
    assert pid["lambda_overshoot"] < dual["lambda_overshoot"]
    # both controllers really solve the problem (λ → 1, constraint met), PID sooner
    assert abs(pid_l[-1] - 1.0) < 0.01 and np.abs(pid_v[-10:]).max() < 0.005
    assert abs(dual_l[-1] - 1.0) < 0.1
    settled = [int(np.nonzero(np.abs(v) > 0.01)[0][-1]) for v in (pid_v, dual_v)]
    assert settled[0] < settled[1]
