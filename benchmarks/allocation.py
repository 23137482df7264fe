"""How additive the allocation problem's costs are, and how fast the MILP solves.

    python benchmarks/allocation.py --out benchmarks/results/allocation.md

1. The quickstart's space (digits-cnn) with every shipped profile: the additive latency/energy
   total vs estimate_cost on 200 random candidates (relative error); size/MACs/BOPs are exact.
2. solve() on a random 14-decision x 40-option problem, without and with 50 no-good cuts.
Sensitivities are synthetic (the costs and the timing do not depend on them).
"""

from __future__ import annotations

import argparse
import random
import time
from pathlib import Path

import numpy as np

from autosparse.compress.footprint import footprint_metrics
from autosparse.config.hardware import builtin_profiles, load_profile
from autosparse.config.schema import load_config
from autosparse.search.allocation.knapsack import solve
from autosparse.search.allocation.problem import (
    AllocationProblem,
    additive_error,
    build_problem,
)
from autosparse.search.allocation.table import (
    ChoiceSensitivity,
    SensitivityTable,
    choice_id,
)
from autosparse.space.candidate import DENSE_FP32, Candidate
from autosparse.space.layers import LayerInfo, LayerTable
from autosparse.space.search_space import SearchSpace

ROOT = Path(__file__).resolve().parents[1]
DIGITS = LayerTable(
    layers=(
        LayerInfo("conv1", "Conv2d", (16, 1, 3, 3), True, 9216, 64, 1024),
        LayerInfo("conv2", "Conv2d", (32, 16, 3, 3), True, 294912, 1024, 2048),
        LayerInfo("conv3", "Conv2d", (32, 32, 3, 3), True, 147456, 512, 512),
        LayerInfo("fc1", "Linear", (64, 512), True, 32768, 512, 64),
        LayerInfo("fc2", "Linear", (10, 64), True, 640, 64, 10),
    ),
    input_shape=(1, 8, 8),
)


def _sensitivity(space: SearchSpace) -> SensitivityTable:
    entries = tuple(ChoiceSensitivity(d.name, choice_id(c), c.sparsity + 1 / c.bits, 0.0)
                    for d in space.decisions for c in d.distinct_choices() if c != DENSE_FP32)
    return SensitivityTable(entries, dense_loss=0.0, dense_accuracy=0.0, samples=0)


def _random(space: SearchSpace, rng: random.Random) -> Candidate:
    out = {}
    for d in space.decisions:
        choice = rng.choice(sorted(d.distinct_choices()))
        out.update({layer: choice for layer in d.layers})
    return Candidate(out)


def additivity(samples: int) -> list[str]:
    space = SearchSpace.build(load_config(ROOT / "search_spaces/quickstart.yaml").space, DIGITS)
    lines = ["| profile | objective | median abs error | p90 | max | mean signed |",
             "|---|---|---|---|---|---|"]
    sens = _sensitivity(space)
    exact = build_problem(space, DIGITS, sens, ["size", "macs", "bops"])
    rng = random.Random(0)
    worst = 0.0
    for candidate in (_random(space, rng) for _ in range(samples)):
        truth = footprint_metrics(DIGITS, candidate)
        allocation = exact.allocation_of(candidate)
        for o, m in (("size", "size_kb"), ("macs", "macs"), ("bops", "bops")):
            worst = max(worst, abs(exact.total(o, allocation) / truth[m] - 1))
    lines.insert(0, f"size / MACs / BOPs: max relative error {worst:.1e} over {samples} candidates\n")
    for name in builtin_profiles():
        profile = load_profile(name)
        problem = build_problem(space, DIGITS, sens, ["latency", "energy"], profile)
        rng = random.Random(0)
        errors = additive_error(problem, DIGITS, profile, [_random(space, rng) for _ in range(samples)])
        for o, values in errors.items():
            v = np.abs(values) * 100
            lines.append(f"| {name} | {o} | {np.median(v):.1f} % | {np.percentile(v, 90):.1f} % | "
                         f"{v.max():.1f} % | {np.mean(values) * 100:+.1f} % |")
    return lines


def timing(repeats: int) -> list[str]:
    rng = np.random.default_rng(0)
    D, K = 14, 40
    costs = {"size": tuple(tuple(rng.uniform(1, 10, K)) for _ in range(D))}
    loss = tuple(tuple(rng.uniform(0, 2, K)) for _ in range(D))
    problem = AllocationProblem(
        decisions=tuple(f"d{i}" for i in range(D)), layers=tuple((f"l{i}",) for i in range(D)),
        options=tuple(tuple(DENSE_FP32 for _ in range(K)) for _ in range(D)),
        loss=loss, accuracy_delta=loss, costs=costs, fixed={"size": 0.0}, dense={"size": 140.0})
    budget = 0.4 * sum(max(r) for r in costs["size"])
    out = []
    best: list = []  # worst case: the 50 best allocations at this budget are all excluded
    while len(best) < 50:
        best.append(solve(problem, loss, "size", budget, exclude=best))
    spread = [tuple(int(v) for v in rng.integers(0, K, D)) for _ in range(50)]  # tried elsewhere
    for label, exclude in (("no cuts", []), ("50 cuts, tried at other budgets", spread),
                           ("50 cuts, the 50 best here (worst case)", best)):
        start = time.perf_counter()
        for _ in range(repeats):
            solve(problem, loss, "size", budget, exclude=exclude)
        ms = (time.perf_counter() - start) / repeats * 1e3
        out.append(f"- solve, {D} decisions x {K} options, {label}: {ms:.1f} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = "\n".join(["# Allocation: additive costs and solve time", "",
                      "python benchmarks/allocation.py --out benchmarks/results/allocation.md", "",
                      *additivity(args.samples), "", *timing(args.repeats), ""])
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
