"""Lagrange multipliers for SCRL constraints R_c >= τ_c (MATH.md §5).

`PIDLagrangian` is the PID-controlled multiplier of Stooke, Achiam & Abbeel (2020), "Responsive
Safety in RL by PID Lagrangian Methods" (reference code: rlpyt `cppo_pid.py`, OmniSafe
`pid_lagrange.py`); `DualAscent` is the plain primal–dual baseline (Kp = Kd = 0, Ki = lr).
`ConstraintSet` holds one controller per named constraint; `ConstraintsConfig` builds it.
All state is plain python floats/lists so it goes through msgpack into checkpoints.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

_STATE_KEYS = ("I", "P", "Cd", "history", "lam", "step")


def _finite(value, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


class PIDLagrangian:
    """PID-controlled Lagrange multiplier λ for one constraint, updated once per learner step.

    `update(Δ)` takes the batch-mean violation Δ = τ − mean(R_c) (positive = violated) and runs
    MATH.md §5 exactly:
        I  = max(0, I + Ki·Δ)                     anti-windup: the integral never goes negative
        P  = a_p·P + (1 − a_p)·Δ                  EMA of the error
        Cd = a_d·Cd + (1 − a_d)·Δ                 EMA of the violation level
        D  = max(0, Cd − Cd[d_delay steps ago])   only raises λ; Cd before step 1 counts as 0
        λ  = max(0, Kp·P + I + Kd·D)
    Invariants: λ >= 0 and I >= 0 after every update. With `lambda_max`, λ <= lambda_max and
    I <= lambda_max too (the integral cannot wind up past the cap and then take many steps to
    come back down).
    """

    def __init__(self, kp: float, ki: float, kd: float, d_delay: int = 1, ema_p: float = 0.95,
                 ema_d: float = 0.95, lambda_max: float | None = None):
        for name, gain in (("kp", kp), ("ki", ki), ("kd", kd)):
            if _finite(gain, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {gain}")
        if isinstance(d_delay, bool) or not isinstance(d_delay, (int, np.integer)) or d_delay < 1:
            raise ValueError(f"d_delay must be an integer >= 1, got {d_delay!r}")
        for name, a in (("ema_p", ema_p), ("ema_d", ema_d)):
            if not 0.0 <= _finite(a, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {a}")
        if lambda_max is not None and not _finite(lambda_max, "lambda_max") > 0:
            raise ValueError(f"lambda_max must be > 0 or None, got {lambda_max}")
        self.kp, self.ki, self.kd = float(kp), float(ki), float(kd)
        self.d_delay = int(d_delay)
        self.ema_p, self.ema_d = float(ema_p), float(ema_d)
        self.lambda_max = None if lambda_max is None else float(lambda_max)
        self._I = self._P = self._Cd = self._lam = 0.0
        self._history: deque[float] = deque([0.0] * self.d_delay, maxlen=self.d_delay)
        self._step = 0

    @property
    def lam(self) -> float:
        """Current multiplier λ (0 before the first update)."""
        return self._lam

    def _cap(self, x: float) -> float:
        return x if self.lambda_max is None else min(x, self.lambda_max)

    def update(self, violation: float) -> float:
        """One controller step on Δ = τ − mean(R_c); returns the new λ."""
        delta = _finite(violation, "violation")
        self._I = self._cap(max(0.0, self._I + self.ki * delta))
        self._P = self.ema_p * self._P + (1.0 - self.ema_p) * delta
        self._Cd = self.ema_d * self._Cd + (1.0 - self.ema_d) * delta
        d_term = max(0.0, self._Cd - self._history[0])  # history[0] is Cd from d_delay steps ago
        self._history.append(self._Cd)
        self._lam = self._cap(max(0.0, self.kp * self._P + self._I + self.kd * d_term))
        self._step += 1
        return self._lam

    def state_dict(self) -> dict:
        """Plain floats/lists: {I, P, Cd, history (oldest first, length d_delay), lam, step}."""
        return {"I": self._I, "P": self._P, "Cd": self._Cd, "history": list(self._history),
                "lam": self._lam, "step": self._step}

    def load_state_dict(self, state: dict) -> None:
        """Restore a `state_dict()`; ValueError on missing/unknown keys or inconsistent values."""
        if not isinstance(state, dict):
            raise ValueError(f"controller state must be a dict, got {type(state).__name__}")
        missing = sorted(set(_STATE_KEYS) - set(state))
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if missing or unknown:
            raise ValueError(f"controller state: missing keys {missing}, unknown keys {unknown}")
        history = [_finite(h, "history entry") for h in state["history"]]
        if len(history) != self.d_delay:
            raise ValueError(f"controller state history must have d_delay = {self.d_delay} entries, "
                             f"got {len(history)}")
        i_term, lam = _finite(state["I"], "I"), _finite(state["lam"], "lam")
        if i_term < 0 or lam < 0:
            raise ValueError(f"controller state must have I >= 0 and lam >= 0, got I={i_term}, lam={lam}")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"controller state step must be an integer >= 0, got {step!r}")
        self._I, self._lam = i_term, lam
        self._P, self._Cd = _finite(state["P"], "P"), _finite(state["Cd"], "Cd")
        self._history = deque(history, maxlen=self.d_delay)
        self._step = int(step)


class DualAscent(PIDLagrangian):
    """Plain projected primal–dual ascent λ ← max(0, λ + lr·Δ): the PID controller with
    Kp = Kd = 0 and Ki = lr (MATH.md §5). Kept as the baseline that oscillates and overshoots."""

    def __init__(self, lr: float, lambda_max: float | None = None):
        if not _finite(lr, "lr") > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        super().__init__(kp=0.0, ki=lr, kd=0.0, lambda_max=lambda_max)


class ConstraintsConfig(BaseModel):
    """How SCRL constraint multipliers are controlled. Defaults are the MATH.md §5 worked example."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    controller: Literal["pid", "dual"] = "pid"
    kp: float = Field(1.0, ge=0, description="proportional gain (pid)")
    ki: float = Field(0.5, gt=0, description="integral gain (pid); 0 would never enforce the constraint")
    kd: float = Field(2.0, ge=0, description="derivative gain (pid)")
    d_delay: int = Field(1, ge=1, description="derivative compares Cd with its value this many steps ago")
    ema_p: float = Field(0.5, ge=0, lt=1, description="EMA factor of the proportional error")
    ema_d: float = Field(0.5, ge=0, lt=1, description="EMA factor of the derivative's violation level")
    lr: float = Field(0.5, gt=0, description="multiplier learning rate (dual)")
    lambda_max: float | None = Field(None, gt=0, description="cap on every λ; None = uncapped")
    sum_norm: bool = Field(False, description="divide the composite reward by (1 + Σλ) (Stooke)")

    def make_controller(self) -> PIDLagrangian:
        """A fresh controller for one constraint."""
        if self.controller == "dual":
            return DualAscent(self.lr, lambda_max=self.lambda_max)
        return PIDLagrangian(self.kp, self.ki, self.kd, self.d_delay, self.ema_p, self.ema_d,
                             lambda_max=self.lambda_max)


class ConstraintSet:
    """Named constraints R_c >= τ_c, one λ controller each.

    The insertion order of the names is the channel order: `list(lambdas().values())` and
    `list(taus.values())` line up with the constraint columns fed to
    `rewards.advantages.constrained_channels` / `composite_reward`.
    Every update must report every constraint, and nothing else.
    """

    def __init__(self, constraints: dict[str, tuple[float, PIDLagrangian]], sum_norm: bool = False):
        if not constraints:
            raise ValueError("ConstraintSet needs at least one constraint")
        self._taus: dict[str, float] = {}
        self._controllers: dict[str, PIDLagrangian] = {}
        for name, (tau, controller) in constraints.items():
            if not isinstance(controller, PIDLagrangian):
                raise ValueError(f"constraint {name!r}: controller must be a PIDLagrangian, "
                                 f"got {type(controller).__name__}")
            self._taus[str(name)] = _finite(tau, f"tau of constraint {name!r}")
            self._controllers[str(name)] = controller
        self.sum_norm = bool(sum_norm)

    @classmethod
    def from_config(cls, config: ConstraintsConfig, taus: dict[str, float]) -> "ConstraintSet":
        """One fresh controller per calibrated threshold τ_c (e.g. from the SFT baseline)."""
        return cls({name: (tau, config.make_controller()) for name, tau in taus.items()},
                   sum_norm=config.sum_norm)

    @property
    def names(self) -> list[str]:
        return list(self._taus)

    @property
    def taus(self) -> dict[str, float]:
        return dict(self._taus)

    def _check_means(self, batch_means: dict) -> dict[str, float]:
        unknown = sorted(set(batch_means) - set(self._taus))
        missing = [n for n in self._taus if n not in batch_means]
        if unknown:
            raise ValueError(f"unknown constraint name(s) {unknown}; known: {self.names}")
        if missing:
            raise ValueError(f"batch_means lacks constraint(s) {missing}")
        return {n: _finite(batch_means[n], f"batch mean of constraint {n!r}") for n in self._taus}

    def violations(self, batch_means: dict) -> dict[str, float]:
        """Δ_c = τ_c − mean(R_c) per constraint (positive = violated)."""
        means = self._check_means(batch_means)
        return {n: self._taus[n] - means[n] for n in self._taus}

    def update(self, batch_means: dict) -> dict[str, float]:
        """One controller step per constraint on this batch's mean constraint rewards; returns λ."""
        return {n: self._controllers[n].update(v) for n, v in self.violations(batch_means).items()}

    def lambdas(self) -> dict[str, float]:
        return {n: c.lam for n, c in self._controllers.items()}

    def state_dict(self) -> dict:
        """{"taus": {name: τ}, "controllers": {name: controller state}} — plain python types."""
        return {"taus": dict(self._taus),
                "controllers": {n: c.state_dict() for n, c in self._controllers.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore τ and controller states; the constraint names must match exactly."""
        if not isinstance(state, dict) or set(state) != {"taus", "controllers"}:
            raise ValueError("constraint set state must be a dict with keys 'taus' and 'controllers'")
        for part in ("taus", "controllers"):
            if set(state[part]) != set(self._taus):
                raise ValueError(f"constraint set state {part} names {sorted(state[part])} "
                                 f"do not match {sorted(self._taus)}")
        for n in self._taus:
            self._controllers[n].load_state_dict(state["controllers"][n])
            self._taus[n] = _finite(state["taus"][n], f"tau of constraint {n!r}")


def oscillation_stats(lambdas, violations, tol: float = 0.0) -> dict:
    """How much a λ control loop rings (used to compare PID with plain primal–dual).

    lambdas [T] and violations [T] (Δ_t = τ − mean R_c) from one run. Returns
      overshoot:        largest |Δ_t| after Δ first changes sign, i.e. how far the loop swings
                        past the threshold once it has reached it (0 if it never gets there);
      sign_changes:     how often Δ flips between violated and satisfied; entries with
                        |Δ| <= tol count as on target and are skipped (ignores jitter at 0);
      lambda_overshoot: max(λ) − λ_final, how far λ peaked above where it ended.
    """
    lam = np.asarray(lambdas, dtype=np.float64)
    v = np.asarray(violations, dtype=np.float64)
    if lam.ndim != 1 or v.ndim != 1 or lam.shape != v.shape or v.size == 0:
        raise ValueError(f"lambdas and violations must be non-empty [T] arrays of equal length, "
                         f"got {lam.shape} and {v.shape}")
    if not (np.all(np.isfinite(lam)) and np.all(np.isfinite(v))):
        raise ValueError("lambdas and violations must be finite")
    if not float(tol) >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    signs = np.sign(v)
    start = signs[signs != 0]
    crossed = np.nonzero(signs == -start[0])[0] if start.size else np.array([], dtype=int)
    overshoot = float(np.abs(v[crossed[0]:]).max()) if crossed.size else 0.0
    outside = np.where(v > tol, 1, np.where(v < -tol, -1, 0))
    outside = outside[outside != 0]
    sign_changes = int(np.count_nonzero(outside[1:] != outside[:-1]))
    return {"overshoot": overshoot, "sign_changes": sign_changes,
            "lambda_overshoot": float(lam.max() - lam[-1])}
