"""Fit a profile's free constants to measured latencies, and score predictions on held-out ones.

The cost model stays the one in ``cost.py``: calibration only chooses the numbers it reads.
Free constants (all positive, fitted in log space so every one moves by factors):

    peak MACs/s of fp32 and of int8, the Linear kind's efficiency (Conv = 1),
    per-layer overhead of fp32 and of int8 layers, the fixed per-inference overhead,
    the fixed and per-element cost of an fp32 <-> int8 switch, one scale on every memory
    level's bandwidth; and, by a small grid, the channel block of fp32 and of int8 kernels.

The loss is on the log error, so a 10 % miss on a 30 µs model weighs as much as a 10 % miss on a
3 ms one (the targets are relative: share within ±10 %), and robust (soft L1 beyond 5 %), so one
variant timed during a burst of machine load does not pull every constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from ..candidate import Candidate
from ..cost import estimate_cost
from ..hardware import HardwareProfile, MemoryLevel, Precision
from ..layers import LayerTable

FREE_CONSTANTS = (
    "fp32_macs_per_second",
    "int8_macs_per_second",
    "linear_efficiency",
    "fp32_layer_overhead_us",
    "int8_layer_overhead_us",
    "model_overhead_us",
    "conversion_overhead_us",
    "conversion_ns_per_element",
    "bandwidth_scale",
)


@dataclass(frozen=True)
class Sample:
    """One measured variant: what the cost model sees, and the measured median latency."""

    name: str
    architecture: str
    table: LayerTable
    candidate: Candidate
    measured_s: float


def _precision(base: HardwareProfile, bits: int, kind: str) -> Precision:
    for precision in base.precisions:
        if precision.bits == bits and precision.kind == kind:
            return precision
    raise ValueError(f"the base profile {base.name!r} has no {kind}{bits} precision to calibrate")


def apply_constants(base: HardwareProfile, values: dict[str, float], name: str,
                    blocks: tuple[int, int] = (1, 1)) -> HardwareProfile:
    """The base profile with the fitted constants in place (energy figures stay the base's).

    ``blocks`` are the fp32 and int8 channel blocks (discrete: chosen by a grid, not fitted).
    """
    fp32 = _precision(base, 32, "float").model_copy(update={
        "macs_per_second": values["fp32_macs_per_second"],
        "layer_overhead_us": values["fp32_layer_overhead_us"], "channel_block": blocks[0]})
    int8 = _precision(base, 8, "int").model_copy(update={
        "macs_per_second": values["int8_macs_per_second"],
        "layer_overhead_us": values["int8_layer_overhead_us"], "channel_block": blocks[1]})
    memory = [MemoryLevel(**{**level.model_dump(), "bandwidth_bytes_per_second":
                             level.bandwidth_bytes_per_second * values["bandwidth_scale"]})
              for level in base.memory]
    data = base.model_dump()
    data.update(
        name=name,
        measured=True,
        precisions=[fp32.model_dump(), int8.model_dump()],
        sparsity=[],  # what the runtime accelerates is measured, not assumed: see the report
        kind_efficiency={"Conv1d": 1.0, "Conv2d": 1.0,
                         "Linear": min(1.0, values["linear_efficiency"])},
        memory=[level.model_dump() for level in memory],
        model_overhead_us=values["model_overhead_us"],
        conversion_overhead_us=values["conversion_overhead_us"],
        conversion_ns_per_element=values["conversion_ns_per_element"],
    )
    return HardwareProfile.model_validate(data)


def initial_constants(base: HardwareProfile) -> dict[str, float]:
    return {
        "fp32_macs_per_second": _precision(base, 32, "float").macs_per_second,
        "int8_macs_per_second": _precision(base, 8, "int").macs_per_second,
        "linear_efficiency": base.efficiency("Linear"),
        "fp32_layer_overhead_us": max(0.5, _precision(base, 32, "float").layer_overhead_us),
        "int8_layer_overhead_us": max(0.5, _precision(base, 8, "int").layer_overhead_us),
        "model_overhead_us": max(1.0, base.model_overhead_us),
        "conversion_overhead_us": max(0.5, base.conversion_overhead_us),
        "conversion_ns_per_element": max(0.05, base.conversion_ns_per_element),
        "bandwidth_scale": 1.0,
    }


_BOUNDS = {  # factors around the start a fit may move each constant (log space)
    "fp32_macs_per_second": (1e-3, 1e2),
    "int8_macs_per_second": (1e-3, 1e2),
    "linear_efficiency": (1e-2, 1.0),
    "fp32_layer_overhead_us": (1e-3, 1e3),
    "int8_layer_overhead_us": (1e-3, 1e3),
    "model_overhead_us": (1e-3, 1e3),
    "conversion_overhead_us": (1e-3, 1e3),
    "conversion_ns_per_element": (1e-3, 1e3),
    "bandwidth_scale": (1e-3, 1e2),
}


def predict(profile: HardwareProfile, samples: Sequence[Sample]) -> np.ndarray:
    return np.array([estimate_cost(s.table, s.candidate, profile).latency_s for s in samples])


@dataclass(frozen=True)
class FitResult:
    profile: HardwareProfile
    constants: dict[str, float]
    train_log_rmse: float


def fit_profile(base: HardwareProfile, samples: Sequence[Sample], name: str,
                starts: int = 6, seed: int = 0, blocks: tuple[int, int] = (1, 1)) -> FitResult:
    """Least squares on log latency over the samples, from several starts; keeps the best."""
    if len(samples) < len(FREE_CONSTANTS):
        raise ValueError(f"need at least {len(FREE_CONSTANTS)} measured variants to fit "
                         f"{len(FREE_CONSTANTS)} constants, got {len(samples)}")
    start = initial_constants(base)
    lower = np.log([start[k] * _BOUNDS[k][0] for k in FREE_CONSTANTS])
    upper = np.log([start[k] * _BOUNDS[k][1] for k in FREE_CONSTANTS])
    upper[FREE_CONSTANTS.index("linear_efficiency")] = 0.0  # efficiency <= 1
    measured = np.log([s.measured_s for s in samples])

    def residuals(theta: np.ndarray) -> np.ndarray:
        values = dict(zip(FREE_CONSTANTS, np.exp(theta)))
        return np.log(predict(apply_constants(base, values, name, blocks), samples)) - measured

    rng = np.random.default_rng(seed)
    x0 = np.clip(np.log([start[k] for k in FREE_CONSTANTS]), lower, upper)
    best = None
    for attempt in range(starts):
        guess = x0 if attempt == 0 else np.clip(x0 + rng.normal(0, 1.0, x0.shape), lower, upper)
        result = optimize.least_squares(residuals, guess, bounds=(lower, upper), diff_step=1e-3,
                                        loss="soft_l1", f_scale=0.05, max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    values = dict(zip(FREE_CONSTANTS, (float(v) for v in np.exp(best.x))))
    rmse = math.sqrt(float(np.mean(residuals(best.x) ** 2)))
    return FitResult(apply_constants(base, values, name, blocks), values, rmse)


def prediction_stats(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float]:
    """Rank agreement and relative error: what the issue's acceptance targets are stated in."""
    relative = predicted / measured - 1.0
    return {
        "count": float(len(measured)),
        "spearman": float(stats.spearmanr(predicted, measured).statistic),
        "kendall": float(stats.kendalltau(predicted, measured).statistic),
        "mape_percent": float(np.mean(np.abs(relative)) * 100),
        "within_10_percent": float(np.mean(np.abs(relative) <= 0.10) * 100),
        "within_20_percent": float(np.mean(np.abs(relative) <= 0.20) * 100),
        "median_abs_error_percent": float(np.median(np.abs(relative)) * 100),
    }


def split_samples(samples: Sequence[Sample], fit_share: float,
                  seed: int) -> tuple[list[Sample], list[Sample]]:
    """Per architecture, a seeded share of the variants to fit on; the rest is held out."""
    rng = np.random.default_rng(seed)
    fit, held = [], []
    for arch in sorted({s.architecture for s in samples}):
        group = [s for s in samples if s.architecture == arch]
        order = rng.permutation(len(group))
        count = max(1, round(fit_share * len(group)))
        fit += [group[i] for i in order[:count]]
        held += [group[i] for i in order[count:]]
    return fit, held


BLOCK_CHOICES = (1, 8, 16, 32)


def fit_with_blocks(base: HardwareProfile, samples: Sequence[Sample], name: str, seed: int = 0,
                    choices: Sequence[int] = BLOCK_CHOICES, starts: int = 3) -> FitResult:
    """Fit the constants for every (fp32, int8) channel-block pair; keep the pair whose fit
    explains the fitting samples best (the held-out ones are never looked at)."""
    best: FitResult | None = None
    for blocks in ((a, b) for a in choices for b in choices):
        result = fit_profile(base, samples, name, starts=starts, seed=seed, blocks=blocks)
        if best is None or result.train_log_rmse < best.train_log_rmse:
            best = FitResult(result.profile, {**result.constants, "fp32_channel_block": blocks[0],
                                              "int8_channel_block": blocks[1]},
                             result.train_log_rmse)
    assert best is not None
    return best
