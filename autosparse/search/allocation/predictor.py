"""Predicted accuracy drop of an allocation: the additive sensitivity model, corrected by trials.

    drop(allocation) = b + sum_d a_d * s[d][option_d]         (points; a_d >= 0)

``s`` is the zero-shot sensitivity of each option alone. By default it is ``loss_delta`` (nats),
not ``-accuracy_delta``: on a validation subset accuracy moves in steps of 100/samples points and
is 0 for most mild options, while the loss is continuous; the lead's pilot found zero-shot loss a
good *ranker* of fine-tuned accuracy (Spearman about -0.9) but very pessimistic at 2-3 bits, which
is exactly what fitted scales correct. ``signal="accuracy"`` uses ``-accuracy_delta`` instead.

Fit (ridge, so a handful of trials cannot throw the model around)::

    c, b0   = least squares of drop on sum_d s[d][o_d]   (c = PRIOR_SCALE with < 3 trials,
                                                           or when the fit says c <= 0)
    a, b    = argmin ||drop - b - S a||^2 + ridge * sum_d sigma_d^2 (a_d - c)^2 + ridge_b * b^2
              subject to a >= 0     (sigma_d = RMS of s[d][.]: the penalty is in squared points)

The solver's argmin is unchanged by a common positive scale, so the prior scale only decides where
the planner's budget sweep stops (at a predicted drop of a few points), never which allocation is
best at a budget; per-decision scales from trials do change it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy.optimize import lsq_linear

from autosparse.search.allocation.problem import AllocationProblem

# Fine-tuned accuracy drop (points) per unit of zero-shot signal, before any trial: a guess that
# zero-shot loss overstates the fine-tuned damage (a zero-shot +1 nat ~ 10 points after tuning),
# and that fine-tuning recovers about half of a zero-shot accuracy drop.
PRIOR_SCALE = {"loss": 10.0, "accuracy": 0.5}
MIN_OBSERVATIONS = 3


@dataclass(frozen=True)
class Predictor:
    """A fitted (or prior) additive model; ``s[d][o]`` the signal, ``a[d]`` and ``b`` the fit."""

    s: tuple[tuple[float, ...], ...]
    a: tuple[float, ...]
    b: float
    scale: float  # the shared scale c the a_d were shrunk toward
    signal: str
    observations: int

    def weights(self) -> list[list[float]]:
        """Predicted drop per option (points, the intercept left out): :func:`solve`'s weights."""
        return [[a * v for v in row] for a, row in zip(self.a, self.s)]

    def predict(self, allocation: Sequence[int]) -> float:
        return self.b + sum(self.a[d] * self.s[d][o] for d, o in enumerate(allocation))


def signal_of(problem: AllocationProblem, signal: str) -> tuple[tuple[float, ...], ...]:
    if signal == "loss":
        return problem.loss
    if signal == "accuracy":
        return tuple(tuple(-v for v in row) for row in problem.accuracy_delta)
    raise ValueError(f"signal {signal!r} must be 'loss' or 'accuracy'")


def prior(problem: AllocationProblem, signal: str = "loss",
          prior_scale: float | None = None) -> Predictor:
    """The model before any trial: every a_d = the prior scale, b = 0."""
    s = signal_of(problem, signal)
    c = PRIOR_SCALE[signal] if prior_scale is None else float(prior_scale)
    if c < 0:
        raise ValueError(f"prior_scale {prior_scale!r} must be >= 0")
    return Predictor(s=s, a=tuple(c for _ in s), b=0.0, scale=c, signal=signal, observations=0)


def fit(problem: AllocationProblem, observations: Iterable[tuple[Sequence[int], float]], *,
        signal: str = "loss", prior_scale: float | None = None, ridge: float = 1.0,
        ridge_b: float = 1.0) -> Predictor:
    """Fit on (allocation, observed accuracy drop in points) pairs; see the module docstring."""
    if ridge < 0 or ridge_b < 0:
        raise ValueError(f"ridge {ridge!r} and ridge_b {ridge_b!r} must be >= 0")
    base = prior(problem, signal, prior_scale)
    pairs = [(tuple(a), float(y)) for a, y in observations]
    if not pairs:
        return base
    S = np.asarray([[base.s[d][o] for d, o in enumerate(alloc)] for alloc, _ in pairs], float)
    y = np.asarray([v for _, v in pairs], float)
    n, D = S.shape
    c = base.scale
    if n >= MIN_OBSERVATIONS:
        total = S.sum(axis=1)
        design = np.column_stack([np.ones(n), total])
        (b0, slope), *_ = np.linalg.lstsq(design, y, rcond=None)
        if np.isfinite(slope) and slope > 0:
            c = float(slope)
    sigma = np.sqrt(np.asarray([np.mean(np.square(row)) for row in base.s], float))
    penalty = np.sqrt(ridge) * sigma + 1e-9  # keeps a_d defined where a decision has no data
    rows = [np.column_stack([S, np.ones(n)])]
    targets = [y]
    rows.append(np.column_stack([np.diag(penalty), np.zeros(D)]))
    targets.append(penalty * c)
    rows.append(np.concatenate([np.zeros(D), [np.sqrt(ridge_b)]])[None, :])
    targets.append(np.zeros(1))
    A, t = np.vstack(rows), np.concatenate(targets)
    lower = np.concatenate([np.zeros(D), [-np.inf]])
    result = lsq_linear(A, t, bounds=(lower, np.full(D + 1, np.inf)), method="bvls")
    a, b = result.x[:D], float(result.x[D])
    return Predictor(s=base.s, a=tuple(float(v) for v in a), b=b, scale=c, signal=signal,
                     observations=n)
