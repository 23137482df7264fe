"""Time variants with ONNX Runtime on one CPU thread, interleaved, as medians of medians.

Latency on a shared machine drifts (frequency, neighbours, cache state), so a variant is never
timed in one block: every round visits all variants in a freshly shuffled order and times
``calls`` single calls; the per-round median drops stragglers within a visit and the median over
rounds drops rounds that a neighbour disturbed. Drift then hits all variants alike instead of
biasing whichever happened to run during it. Each variant also gets a few independent sessions,
used in turn across rounds, because one session's memory placement was seen to make the same
int8 model up to ~20 % slower or faster than another session's on a busy machine.
"""

from __future__ import annotations

import gc
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from autosparse.cost.calibration.variants import Variant

DEFAULT_ROUNDS = 61
DEFAULT_CALLS = 21
DEFAULT_WARMUP = 20
DEFAULT_SESSIONS = 1


@dataclass(frozen=True)
class Measurement:
    """One variant's latency at batch size 1; ``spread`` is IQR / median of the round medians."""

    name: str
    median_seconds: float
    round_medians: tuple[float, ...]
    spread: float

    @classmethod
    def of(cls, name: str, round_medians: Sequence[float]) -> "Measurement":
        """The median and spread of ``round_medians``."""
        return cls(name, statistics.median(round_medians), tuple(round_medians),
                   _spread(round_medians))


def make_session(path: str) -> ort.InferenceSession:
    """One thread, sequential, full graph optimisation, no spinning: the setting calibrated for.

    Spinning off matters on a 2-core shared box: a spinning idle worker would steal the core the
    timed call runs on.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def fixed_input(input_shape: Sequence[int], seed: int = 0) -> np.ndarray:
    """The one input every call of a variant gets (batch size 1)."""
    return np.random.default_rng(seed).standard_normal((1, *input_shape)).astype(np.float32)


class _Runner:
    """A session with its feed prepared; ``run`` named-output with RunOptions is ORT's
    cheapest Python call path (IOBinding measured ~35 us slower per call here)."""

    def __init__(self, variant: Variant, seed: int):
        self.session = make_session(str(variant.onnx_path))
        first = self.session.get_inputs()[0]
        x = fixed_input(variant.input_shape, seed)
        if first.type == "tensor(int64)":  # a language model's token ids: id 0 costs as any
            x = np.zeros(x.shape, dtype=np.int64)
        self.feed = {first.name: x}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.options = ort.RunOptions()

    def call(self) -> None:
        self.session.run(self.outputs, self.feed, self.options)

    def time_calls(self, calls: int) -> float:
        """Median seconds over ``calls`` individually timed calls."""
        samples = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            self.session.run(self.outputs, self.feed, self.options)
            samples.append(time.perf_counter_ns() - start)
        return statistics.median(samples) * 1e-9


def _spread(values: Sequence[float]) -> float:
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (0.0, 0.0, 0.0)
    middle = statistics.median(values)
    return (q3 - q1) / middle if middle > 0 else 0.0


def time_variants(
    variants: Sequence[Variant],
    rounds: int = DEFAULT_ROUNDS,
    calls: int = DEFAULT_CALLS,
    warmup: int = DEFAULT_WARMUP,
    seed: int = 0,
    sessions: int = DEFAULT_SESSIONS,
) -> list[Measurement]:
    """Interleaved medians of ``rounds`` x ``calls`` single calls per variant, in input order.

    Round ``r`` times session ``r % sessions`` of each variant. Every session first runs
    ``warmup`` calls (allocator, pre-packed weights, caches). The garbage collector is paused
    while timing so a collection never lands inside a call.
    """
    if rounds < 1 or calls < 1 or warmup < 0 or sessions < 1:
        raise ValueError("rounds, calls and sessions must be at least 1, warmup not negative")
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError("variant names must be unique")
    sessions = min(sessions, rounds)
    runners = [[_Runner(v, seed) for _ in range(sessions)] for v in variants]
    for per_variant in runners:
        for runner in per_variant:
            for _ in range(warmup):
                runner.call()
    order = list(range(len(runners)))
    shuffle = random.Random(seed)
    per_round: list[list[float]] = [[] for _ in runners]
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for r in range(rounds):
            shuffle.shuffle(order)
            for i in order:
                per_round[i].append(runners[i][r % sessions].time_calls(calls))
    finally:
        if enabled:
            gc.enable()
    return [Measurement.of(name, values) for name, values in zip(names, per_round)]


@dataclass(frozen=True)
class Repeatability:
    """How two timings of the same variants agree; ``shift`` is the median ratio (machine-wide
    drift), the deviations are |ratio - 1| per variant."""

    median_deviation: float
    p90_deviation: float
    within_5_percent: float
    shift: float


def compare_runs(first: Sequence[Measurement], second: Sequence[Measurement]) -> Repeatability:
    """Per-variant second/first latency ratios summarised; both lists must name the same
    variants."""
    by_name = {m.name: m.median_seconds for m in second}
    if set(by_name) != {m.name for m in first}:
        raise ValueError("the two runs timed different variants")
    ratios = np.array([by_name[m.name] / m.median_seconds for m in first])
    deviation = np.abs(ratios - 1.0)
    return Repeatability(
        median_deviation=float(np.median(deviation)),
        p90_deviation=float(np.percentile(deviation, 90)),
        within_5_percent=float(np.mean(deviation <= 0.05)),
        shift=float(np.median(ratios)),
    )
