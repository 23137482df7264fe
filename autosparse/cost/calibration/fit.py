"""Fit a profile's free constants to measured latencies, and score predictions on held-out ones.

The cost model stays the one in ``cost.py``: calibration only chooses the numbers it reads.
Free constants (all positive, fitted in log space so every one moves by factors):

    peak MACs/s of fp32 and of int8, the efficiency of Linear, depthwise and Conv1d layers
    (Conv2d = 1), per-layer overhead of fp32 and of int8 layers, the per-op overhead of the
    ops between layers (adds, pooling) at fp32 and at int8, the fixed per-inference overhead,
    the fixed and per-element cost of an fp32 <-> int8 switch, one scale on every memory
    level's bandwidth; and, by a coordinate scan, the channel block of fp32 and of int8 kernels.
A constant no fitting sample can inform (no depthwise layer, no op between layers) is not
fitted: it keeps the base profile's value.

The loss is on the log error, so a 10 % miss on a 30 µs model weighs as much as a 10 % miss on a
3 ms one (the targets are relative: share within ±10 %), and robust (soft L1 beyond 5 %), so one
variant timed during a burst of machine load does not pull every constant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import optimize, stats

from autosparse.config.hardware import HardwareProfile, MemoryLevel, Precision
from autosparse.cost.estimate import estimate_cost
from autosparse.space.candidate import Candidate
from autosparse.space.layers import LayerTable

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
# fitted only where the samples inform them (see informed_constants)
OPTIONAL_CONSTANTS = (
    "depthwise_efficiency",
    "conv1d_efficiency",
    "fp32_op_overhead_us",
    "int8_op_overhead_us",
    "int8_linear_efficiency",
    "int8_depthwise_efficiency",
    "int8_conv1d_efficiency",
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
                    blocks: tuple[int, ...] = (1, 1)) -> HardwareProfile:
    """The base profile with the fitted constants in place (energy figures stay the base's).

    ``blocks`` are the fp32 and int8 channel blocks, optionally followed by their input
    channel blocks (discrete: chosen by a scan, not fitted).
    """
    values = {**initial_constants(base), **values}
    fp32 = _precision(base, 32, "float").model_copy(update={
        "macs_per_second": values["fp32_macs_per_second"],
        "layer_overhead_us": values["fp32_layer_overhead_us"], "channel_block": blocks[0],
        "input_channel_block": blocks[2] if len(blocks) > 2 else 1,
        "op_overhead_us": values["fp32_op_overhead_us"]})
    int8 = _precision(base, 8, "int").model_copy(update={
        "macs_per_second": values["int8_macs_per_second"],
        "layer_overhead_us": values["int8_layer_overhead_us"], "channel_block": blocks[1],
        "input_channel_block": blocks[3] if len(blocks) > 3 else 1,
        "op_overhead_us": values["int8_op_overhead_us"],
        "kind_efficiency": {kind: min(1.0, values[f"int8_{key}"])
                            for key, kind in _EFFICIENCY_KINDS.items()
                            if f"int8_{key}" in values}})
    memory = [MemoryLevel(**{**level.model_dump(), "bandwidth_bytes_per_second":
                             level.bandwidth_bytes_per_second * values["bandwidth_scale"]})
              for level in base.memory]
    data = base.model_dump()
    data.update(
        name=name,
        measured=True,
        precisions=[fp32.model_dump(), int8.model_dump()],
        sparsity=[],  # what the runtime accelerates is measured, not assumed: see the report
        kind_efficiency={"Conv1d": min(1.0, values["conv1d_efficiency"]), "Conv2d": 1.0,
                         "DepthwiseConv2d": min(1.0, values["depthwise_efficiency"]),
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
        "depthwise_efficiency": min(1.0, max(0.05, base.efficiency("DepthwiseConv2d"))),
        "conv1d_efficiency": min(1.0, max(0.05, base.efficiency("Conv1d"))),
        "fp32_layer_overhead_us": max(0.5, _precision(base, 32, "float").layer_overhead_us),
        "int8_layer_overhead_us": max(0.5, _precision(base, 8, "int").layer_overhead_us),
        "fp32_op_overhead_us": max(0.3, _precision(base, 32, "float").op_overhead_us),
        **{f"int8_{key}": min(1.0, max(0.05, base.efficiency(kind, _precision(base, 8, "int"))))
           for key, kind in _EFFICIENCY_KINDS.items()},
        "int8_op_overhead_us": max(0.3, _precision(base, 8, "int").op_overhead_us),
        "model_overhead_us": max(1.0, base.model_overhead_us),
        "conversion_overhead_us": max(0.5, base.conversion_overhead_us),
        "conversion_ns_per_element": max(0.05, base.conversion_ns_per_element),
        "bandwidth_scale": 1.0,
    }


_BOUNDS = {  # factors around the start a fit may move each constant (log space)
    "fp32_macs_per_second": (1e-3, 1e2),
    "int8_macs_per_second": (1e-3, 1e2),
    "linear_efficiency": (1e-2, 1.0),
    "depthwise_efficiency": (1e-2, 1.0),
    "conv1d_efficiency": (1e-2, 1.0),
    "fp32_layer_overhead_us": (1e-3, 1e3),
    "int8_layer_overhead_us": (1e-3, 1e3),
    "fp32_op_overhead_us": (1e-3, 1e3),
    "int8_linear_efficiency": (1e-2, 1.0),
    "int8_depthwise_efficiency": (1e-2, 1.0),
    "int8_conv1d_efficiency": (1e-2, 1.0),
    "int8_op_overhead_us": (1e-3, 1e3),
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
    # channel block tried -> train log RMSE, per precision ("fp32", "int8"): why a block won
    block_scan: dict[str, dict[int, float]] = field(default_factory=dict)


_EFFICIENCY_KINDS = {"linear_efficiency": "Linear", "depthwise_efficiency": "DepthwiseConv2d",
                     "conv1d_efficiency": "Conv1d"}


def informed_constants(samples: Sequence[Sample]) -> tuple[str, ...]:
    """The free constants the samples can inform: an efficiency only where some sample has a
    layer of that kind, an op overhead only where some sample has ops at that precision."""
    kinds = {layer.cost_kind for s in samples for layer in s.table.layers}
    int8_kinds = {layer.cost_kind for s in samples for layer in s.table.layers
                  if s.candidate.get_choice(layer.name).bits <= 8}
    op_bits = set()
    for s in samples:
        if not s.table.ops:
            continue
        for op in s.table.ops:
            if op.after_layer is None:
                op_bits.add(32)
            else:
                op_bits.add(8 if s.candidate.get_choice(op.after_layer).bits <= 8 else 32)
    out = []
    for name in (*FREE_CONSTANTS, *OPTIONAL_CONSTANTS):
        if name == "linear_efficiency":
            out.append(name)  # always: the fit has always had it (kept at start if unused)
            continue
        if name in _EFFICIENCY_KINDS and _EFFICIENCY_KINDS[name] not in kinds:
            continue
        if name.startswith("int8_") and name.endswith("_efficiency") and (
                _EFFICIENCY_KINDS[name.removeprefix("int8_")] not in int8_kinds):
            continue
        if name == "fp32_op_overhead_us" and 32 not in op_bits:
            continue
        if name == "int8_op_overhead_us" and 8 not in op_bits:
            continue
        out.append(name)
    return tuple(out)


def fit_profile(base: HardwareProfile, samples: Sequence[Sample], name: str,
                starts: int = 6, seed: int = 0, blocks: tuple[int, ...] = (1, 1),
                start: dict[str, float] | None = None) -> FitResult:
    """Least squares on log latency over the samples, from several starts; keeps the best.

    ``start`` (e.g. a previous fit's constants) replaces the base profile's values as the
    first starting point."""
    if len(samples) < len(FREE_CONSTANTS):  # the rule calibrate checks before timing
        raise ValueError(f"need at least {len(FREE_CONSTANTS)} measured variants to fit "
                         f"{len(FREE_CONSTANTS)} constants, got {len(samples)}")
    free = informed_constants(samples)
    if len(samples) < len(free):  # too few for the optional ones: they keep the base's values
        free = tuple(k for k in free if k in FREE_CONSTANTS)
    initial = {**initial_constants(base), **(start or {})}
    fixed = {k: v for k, v in initial.items() if k not in free}
    lower = np.log([initial_constants(base)[k] * _BOUNDS[k][0] for k in free])
    upper = np.log([initial_constants(base)[k] * _BOUNDS[k][1] for k in free])
    for k in free:
        if k.endswith("_efficiency"):
            upper[free.index(k)] = 0.0  # efficiency <= 1
    measured = np.log([s.measured_s for s in samples])

    def residuals(theta: np.ndarray) -> np.ndarray:
        values = {**fixed, **dict(zip(free, np.exp(theta)))}
        return np.log(predict(apply_constants(base, values, name, blocks), samples)) - measured

    rng = np.random.default_rng(seed)
    x0 = np.clip(np.log([initial[k] for k in free]), lower, upper)
    best = None
    for attempt in range(starts):
        guess = x0 if attempt == 0 else np.clip(x0 + rng.normal(0, 1.0, x0.shape), lower, upper)
        result = optimize.least_squares(residuals, guess, bounds=(lower, upper), diff_step=1e-3,
                                        loss="soft_l1", f_scale=0.05, max_nfev=400)
        if best is None or result.cost < best.cost:
            best = result
    values = {**fixed, **dict(zip(free, (float(v) for v in np.exp(best.x))))}
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


BLOCK_CHOICES = (1, 4, 8, 16, 32)
START_BLOCKS = (8, 8, 1, 1)  # fp32, int8 output channel blocks; fp32, int8 input blocks


def fit_with_blocks(base: HardwareProfile, samples: Sequence[Sample], name: str, seed: int = 0,
                    choices: Sequence[int] = BLOCK_CHOICES, starts: int = 3) -> FitResult:
    """Fit the constants, then scan the channel block of each precision over ``choices`` (the
    fp32 block with int8's held, then int8's with the chosen fp32 one, then fp32's once more,
    then each precision's input channel block of dense convs), refitting from the best
    constants so far; keep the blocks whose fit explains the fitting samples best (the
    held-out ones are never looked at). A block only shows where some fitting variant has a
    layer narrower than it or not a multiple of it: variants.CHANNEL_STEPS puts them there.
    """
    current = fit_profile(base, samples, name, starts=starts, seed=seed, blocks=START_BLOCKS)
    blocks = list(START_BLOCKS)
    scan: dict[str, dict[int, float]] = {}
    for index, label in ((0, "fp32"), (1, "int8"), (0, "fp32"), (2, "fp32_input"),
                         (3, "int8_input")):  # fp32 again once int8's has moved
        scan[label] = {}
        best_block, best = blocks[index], current
        for block in choices:
            trial = list(blocks)
            trial[index] = block
            if tuple(trial) == tuple(blocks):
                result = current
            else:
                result = fit_profile(base, samples, name, starts=1, seed=seed,
                                     blocks=tuple(trial), start=current.constants)
            scan[label][int(block)] = result.train_log_rmse
            if result.train_log_rmse < best.train_log_rmse:
                best_block, best = block, result
        blocks[index] = best_block
        current = best
    return FitResult(current.profile, {**current.constants, "fp32_channel_block": blocks[0],
                                       "int8_channel_block": blocks[1],
                                       "fp32_input_channel_block": blocks[2],
                                       "int8_input_channel_block": blocks[3]},
                     current.train_log_rmse, scan)
