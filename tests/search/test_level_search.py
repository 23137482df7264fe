"""Per-layer level searches on synthetic problems whose optimum is known: budget and evaluation
counts never exceeded, the knapsack against brute force, the level switch on the budget surface,
GA / BO against uniform, OWL's hand example, determinism, and a non-additive smoke test."""

from __future__ import annotations

import ast
import itertools
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from autosparse.compress.oneshot.levels import Level
from autosparse.search.levels import (
    LevelProblem,
    bayesian,
    budget_from_average,
    evolutionary,
    knapsack,
    level_switch,
    nominal_bits_per_weight,
    owl,
    owl_sparsities,
    uniform,
)
from autosparse.search.levels.costs import average_of
from autosparse.search.levels.knapsack_search import (
    brute_force,
    predicted,
    sensitivity_weights,
    solve,
)

ROOT = Path(__file__).resolve().parents[2]
SPARSITIES = (0.0, 0.25, 0.5, 0.75)


def sparse_levels(sparsities=SPARSITIES) -> list[Level]:
    return [Level(s, method="sparsegpt") for s in sparsities]


def curve(s: float) -> float:
    """A convex damage curve: each step of sparsity costs more than the last."""
    return 4.0 * s * s


class Synthetic:
    """Separable fitness ``sum_l w_l * curve(s_l)`` (plus an optional interaction between
    neighbouring layers), with a counter of calls and of charged fidelity."""

    def __init__(self, weights, sizes=None, sparsities=SPARSITIES, average=0.5,
                 interaction: float = 0.0):
        self.layers = [f"blk{i}.fc" for i in range(len(weights))]
        self.w = dict(zip(self.layers, weights))
        self.sizes = dict(zip(self.layers, sizes or [1000] * len(weights)))
        self.options = {name: sparse_levels(sparsities) for name in self.layers}
        self.cost, self.budget = budget_from_average(self.options, self.sizes,
                                                     average_sparsity=average)
        self.interaction = interaction
        self.calls = 0
        self.charged = 0.0

    def true(self, assignment) -> float:
        s = [assignment[name].sparsity for name in self.layers]
        value = sum(self.w[n] * curve(x) for n, x in zip(self.layers, s))
        return value + self.interaction * sum(a * b for a, b in itertools.pairwise(s))

    def evaluate(self, assignment) -> float:
        self.calls += 1
        self.charged += 1.0
        return self.true(assignment)

    def evaluate_at(self, assignment, fidelity) -> float:
        self.calls += 1
        self.charged += fidelity
        noise = random.Random(str(sorted((k, v.key) for k, v in assignment.items()))).gauss(0, 1)
        return self.true(assignment) * (1 + 0.05 * (1 - fidelity) * noise)

    def sensitivity(self):
        return {(n, lv.key): self.w[n] * curve(lv.sparsity)
                for n in self.layers for lv in self.options[n]}

    def args(self):
        return (self.layers, self.options, self.cost)

    def outlier_ratios(self):
        # more sensitive layers carry more outliers
        return {m: {n: self.w[n] / (1 + self.w[n]) / m for n in self.layers} for m in (3, 5, 7, 10)}


DIFFER = [0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 3.0, 10.0]
SAME = [1.0] * 8


def run(method: str, problem: Synthetic, evaluations: int, seed: int = 0, **kwargs):
    layers, options, cost = problem.args()
    extra = dict(kwargs)
    if method == "owl":
        extra.setdefault("outlier_ratios", problem.outlier_ratios())
        extra.setdefault("target", 0.5)
        extra.setdefault("sizes", problem.sizes)
    if method == "knapsack" or (method == "evolutionary" and extra.pop("with_sens", False)):
        extra["sensitivity"] = problem.sensitivity()
    fn = {"uniform": uniform, "owl": owl, "knapsack": knapsack, "evolutionary": evolutionary,
          "bayesian": bayesian}[method]
    return fn(layers, options, cost, problem.evaluate, problem.budget, evaluations, seed, **extra)


METHODS = ["uniform", "owl", "knapsack", "evolutionary", "bayesian"]


# --- costs ---------------------------------------------------------------------------------

def test_nominal_bits_count_values_and_index():
    assert nominal_bits_per_weight(Level(bits=4)) == 4
    assert nominal_bits_per_weight(Level()) == 16
    assert nominal_bits_per_weight(Level(0.5, method="wanda")) == 0.5 * 16 + 1  # + bitmask
    assert nominal_bits_per_weight(Level(0.5, pattern="2:4", bits=4)) == 0.5 * (4 + 2)


def test_budget_from_average_bits_and_sparsity():
    options = {"a": [Level(bits=8), Level(bits=4)], "b": [Level(bits=8), Level(bits=2)]}
    sizes = {"a": 100, "b": 300}
    cost, budget = budget_from_average(options, sizes, average_bits=3.5)
    assert cost == {"a": [800.0, 400.0], "b": [2400.0, 600.0]} and budget == 1400.0
    options = {"a": sparse_levels((0.0, 0.5)), "b": sparse_levels((0.0, 0.75))}
    cost, budget = budget_from_average(options, sizes, average_sparsity=0.5)
    assert cost == {"a": [100.0, 50.0], "b": [300.0, 75.0]} and budget == 200.0
    assert average_of(50.0 + 75.0, sizes, ["a", "b"], "sparsity") == pytest.approx(1 - 125 / 400)
    with pytest.raises(ValueError, match="exactly one"):
        budget_from_average(options, sizes)
    with pytest.raises(ValueError, match="sizes has no weight count"):
        budget_from_average(options, {"a": 1}, average_bits=4)


def test_bad_arguments_are_named():
    p = Synthetic(SAME[:3])
    with pytest.raises(ValueError, match="evaluations"):
        uniform(*p.args(), p.evaluate, p.budget, 0)
    with pytest.raises(ValueError, match="no assignment fits"):
        uniform(*p.args(), p.evaluate, 1.0, 5)
    with pytest.raises(ValueError, match="cost\\['blk0.fc'\\]"):
        uniform(p.layers, p.options, {**p.cost, "blk0.fc": [1.0]}, p.evaluate, p.budget, 5)
    with pytest.raises(ValueError, match="sensitivity has no finite entry"):
        knapsack(*p.args(), p.evaluate, p.budget, 5, sensitivity={})


# --- knapsack -------------------------------------------------------------------------------

def random_problem(rng: random.Random, layers: int = 6, levels: int = 3):
    names = [f"l{i}" for i in range(layers)]
    sparsities = (0.0, 0.5, 0.7, 0.8)[:levels]
    options = {n: sparse_levels(sparsities) for n in names}
    sizes = {n: rng.choice([100, 300, 1000, 4000]) for n in names}
    cost, _ = budget_from_average(options, sizes, average_sparsity=0.5)
    sens = {}
    for n in names:
        acc = 0.0
        for lv in options[n]:
            acc += 0.0 if lv.is_dense else rng.uniform(0.01, 2.0)
            sens[(n, lv.key)] = acc
    total = sum(sizes.values())
    budget = total * rng.uniform(0.3, 0.9)
    return names, options, cost, budget, sens


def test_knapsack_finds_the_brute_force_optimum():
    rng = random.Random(3)
    for _ in range(12):
        names, options, cost, budget, sens = random_problem(rng)
        problem = LevelProblem.build(names, options, cost, budget)
        w = sensitivity_weights(problem, sens)
        exact = brute_force(problem, w)
        found = solve(problem, w)
        assert found is not None and problem.fits(found)
        assert predicted(w, found) == pytest.approx(predicted(w, exact), abs=1e-9)

        def additive(assignment, sens=sens):
            return sum(sens[(n, lv.key)] for n, lv in assignment.items())

        result = knapsack(names, options, cost, additive, budget, 4, sensitivity=sens)
        assert result.fitness == pytest.approx(predicted(w, exact), abs=1e-9)
        assert result.info["first"]["fitness"] == pytest.approx(result.fitness, abs=1e-9)


def test_knapsack_scores_distinct_assignments_and_stops_when_exhausted():
    p = Synthetic([1.0, 2.0, 3.0], sparsities=(0.0, 0.5, 0.75))
    result = run("knapsack", p, 200)
    keys = [tuple(lv.key for lv in e.assignment.values()) for e in result.history]
    assert len(keys) == len(set(keys))
    fitting = sum(1 for idx in itertools.product(range(3), repeat=3)
                  if LevelProblem.build(*p.args(), p.budget).fits(idx))
    assert len(keys) == fitting and result.info["exhausted"]
    assert result.calls == fitting < 200


# --- the contract every method keeps ------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("evaluations", [1, 7, 30])
def test_never_over_budget_or_evaluations(method, evaluations):
    p = Synthetic(DIFFER, sizes=[1000, 4000, 1000, 250, 2000, 1000, 500, 3000])
    result = run(method, p, evaluations)
    assert p.calls == result.calls <= evaluations
    assert result.evaluations_used <= evaluations
    assert all(e.cost <= p.budget * (1 + 1e-9) for e in result.history)
    assert result.cost <= p.budget * (1 + 1e-9)
    assert result.fitness == min(e.fitness for e in result.history if e.fidelity == 1)
    assert result.fitness == pytest.approx(p.true(result.assignment))


def test_multi_fidelity_charges_by_fraction():
    p = Synthetic(DIFFER)
    layers, options, cost = p.args()
    result = evolutionary(layers, options, cost, p.evaluate, p.budget, 20, 0,
                          evaluate_at=p.evaluate_at, sensitivity=p.sensitivity(), overhead=0.1)
    assert p.charged <= result.evaluations_used + 1e-9 <= 20 + 1e-9
    low = [e for e in result.history if e.fidelity < 1]
    assert low and p.calls == result.calls > 20  # more calls than full ones, same compute
    expected = sum(1.0 if e.fidelity == 1 else 0.1 + 0.9 * e.fidelity for e in result.history)
    assert result.evaluations_used == pytest.approx(expected)
    assert result.info["generations"] >= 2


def test_level_switch_keeps_the_budget():
    rng = random.Random(0)
    for _ in range(10):
        names, options, cost, budget, _ = random_problem(rng, layers=8, levels=4)
        problem = LevelProblem.build(names, options, cost, budget)
        index = problem.random_feasible(rng)
        moved = 0
        for _ in range(200):
            child = level_switch(problem, index, rng, rng.randint(1, 3))
            assert problem.fits(child)
            moved += child != index
            # close to the parent's total: the switch walks along the budget surface
            index = child
        assert moved > 150


# --- against uniform ---------------------------------------------------------------------------

def test_uniform_takes_the_tightest_fitting_level_and_reports_its_cost():
    p = Synthetic(SAME[:4], average=0.4)  # 0.4 is no level: 0.5 everywhere fits, 0.25 does not
    result = run("uniform", p, 5)
    assert {lv.sparsity for lv in result.assignment.values()} == {0.5}
    assert result.cost == 4 * 500 < p.budget and result.calls == 1
    with pytest.raises(ValueError, match="no level common"):
        options = {**p.options, "blk0.fc": sparse_levels((0.0, 0.3, 0.9))}
        uniform(p.layers, options, budget_from_average(options, p.sizes, average_sparsity=0.5)
                .cost, p.evaluate, p.budget * 0.5, 5)


@pytest.mark.parametrize("method", ["evolutionary", "bayesian"])
def test_ga_and_bo_beat_uniform_when_layers_differ_and_tie_when_not(method):
    differ = Synthetic(DIFFER)
    base = run("uniform", differ, 40).fitness
    optimum = run("knapsack", Synthetic(DIFFER), 1).fitness  # additive: knapsack is exact
    found = run(method, differ, 40).fitness
    assert found < 0.6 * base
    if method == "evolutionary":
        assert found <= 1.5 * optimum

    same = Synthetic(SAME)
    base = run("uniform", same, 40).fitness
    found = run(method, same, 40).fitness
    assert found == pytest.approx(base)  # convex and identical layers: uniform is optimal


# --- OWL -----------------------------------------------------------------------------------------

def test_owl_sparsities_hand_example():
    s = owl_sparsities([0.1, 0.2, 0.3, 0.4], target=0.5, lam=0.08)
    # normalised ratios 0, 1/3, 2/3, 1 times 2 lambda = 0.16; mean 0.08
    assert s == pytest.approx([0.58, 0.5 + 0.08 - 0.16 / 3, 0.5 + 0.08 - 0.32 / 3, 0.42])
    assert s.mean() == pytest.approx(0.5) and (np.diff(s) < 0).all()
    weighted = owl_sparsities([0.1, 0.2, 0.3, 0.4], 0.5, 0.08, weights=[1, 1, 1, 5])
    assert np.average(weighted, weights=[1, 1, 1, 5]) == pytest.approx(0.5)
    assert owl_sparsities([0.2, 0.2], 0.6, 0.1) == pytest.approx([0.6, 0.6])


def test_owl_prunes_high_outlier_layers_less_and_keeps_the_target():
    grid = tuple(round(0.3 + 0.02 * i, 2) for i in range(21))  # 0.30 .. 0.70
    p = Synthetic([0.1, 0.3, 1.0, 3.0], sparsities=grid)
    result = run("owl", p, 50)
    s = [result.assignment[n].sparsity for n in p.layers]
    assert s == sorted(s, reverse=True) and s[0] > s[-1]  # more outliers, less sparsity
    assert np.average(s, weights=[p.sizes[n] for n in p.layers]) == pytest.approx(0.5, abs=0.011)
    assert result.info["M"] in (3.0, 5.0, 7.0, 10.0) and result.info["lambda"] <= 0.1
    assert result.calls <= 20  # distinct grid points only
    assert result.fitness < run("uniform", Synthetic([0.1, 0.3, 1.0, 3.0], sparsities=grid),
                                5).fitness


def test_outlier_ratio_hand_example():
    import torch

    from autosparse.search.levels.outliers import outlier_ratio, outlier_ratios
    w = torch.ones(2, 4)
    norm = torch.tensor([1.0, 1.0, 1.0, 10.0])  # scores 1 1 1 10 per row: mean 3.25
    assert outlier_ratio(w, norm, 2.0) == pytest.approx(0.25)
    assert outlier_ratio(w, norm, 4.0) == 0.0
    both = outlier_ratios({"a": w, "b": w * 0.0 + 1}, {"a": norm, "b": torch.ones(4)}, ms=(2.0,),
                          groups={"a": "blk", "b": "blk"})
    assert both == {2.0: {"a": 0.125, "b": 0.125}}  # one block: 2 of 16 scores above 2 x 1.9375


# --- determinism, interactions, layering ------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
def test_same_seed_same_search(method):
    def keys(result):
        return [(tuple(lv.key for lv in e.assignment.values()), e.fitness)
                for e in result.history]

    a = run(method, Synthetic(DIFFER), 15, seed=7)
    b = run(method, Synthetic(DIFFER), 15, seed=7)
    assert keys(a) == keys(b)


def test_ga_beats_the_sensitivity_knapsack_when_damage_interacts():
    """Neighbours compressed together hurt more than apart (``interaction``): per-layer
    sensitivity cannot see it, so the knapsack spreads compression evenly, and the GA, seeded
    with that very solution, learns to alternate compressed and dense layers."""
    weights = [1.0, 1.02, 0.98, 1.01, 0.99, 1.03, 0.97, 1.0]
    for seed in range(3):
        plain = run("knapsack", Synthetic(weights, interaction=10.0, average=0.375), 1, seed)
        ga = run("evolutionary", Synthetic(weights, interaction=10.0, average=0.375), 40, seed,
                 with_sens=True)
        assert ga.fitness < 0.8 * plain.fitness
        s = [ga.assignment[n].sparsity for n in sorted(ga.assignment)]
        assert sum(a * b for a, b in itertools.pairwise(s)) < 0.5  # few compressed neighbours


def test_only_the_outlier_helper_imports_torch():
    folder = ROOT / "autosparse" / "search" / "levels"
    for path in folder.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
        if path.name != "outliers.py":
            assert "torch" not in names, path.name
    code = "import sys, autosparse.search.levels; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_results_are_finite():
    assert math.isfinite(run("evolutionary", Synthetic(DIFFER), 10).fitness)
