"""The two baselines a level search must beat: one level everywhere, and OWL.

Uniform: why pure. When no single level hits the budget exactly, mixing the two neighbouring
uniform levels by some fixed layer order is already a (poor) allocation, not the uniform
baseline; so ``uniform`` scores the common level whose total cost fits the budget most tightly
(the costliest that fits: the least compression the budget forces) and reports the cost it
reaches, which may sit below the budget. Levels that tie on cost (one sparsity by two methods)
are all scored, while evaluations last, and the best returned.

OWL (outlier-weighted layerwise sparsity, Yin et al., ICML 2024): layers whose weights carry more
outliers (``|W_ij| * ||X_j|| > M * mean``, the Wanda score) lose more when pruned, so they get
less sparsity. As the authors' code does it::

    D_l      = outlier ratio of layer l at M           (input; see ``outliers.outlier_ratio``)
    n_l      = (D_l - min D) / (max D - min D) * 2 lambda          # in [0, 2 lambda]
    s_l      = target - (n_l - mean_w n)                           # mean_w s = target exactly
    level_l  = the option nearest s_l; then repaired into the budget, least deviation first

so the spread of sparsities is 2 lambda, ``[target - lambda, target + lambda]`` when the
normalised ratios average one half; ``mean_w`` weighs layers by ``sizes`` (the paper's
transformer blocks all have the same size; Linear layers here do not, and the target is a mean
over weights). Give OWL options that differ in sparsity only (one method, one bit width): the
nearest sparsity is its only criterion (ties: the option listed first). Its two hyperparameters
are tuned on a grid, as the paper does, with every distinct grid assignment scored while
evaluations last, nearest the paper's usual (lambda 0.08, M 5) first.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from autosparse.search.levels.problem import (
    Evaluate,
    Index,
    Ledger,
    LevelProblem,
    LevelSearchResult,
    check_search_args,
    tightest_uniform,
    uniform_candidates,
)

if TYPE_CHECKING:
    from autosparse.compress.oneshot.levels import Level

LAMBDAS = (0.02, 0.04, 0.06, 0.08, 0.1)
MS = (3.0, 5.0, 7.0, 10.0)
OWL_DEFAULT = (0.08, 5.0)


def uniform(layers: Sequence[str], options: Mapping[str, Sequence[Level]],
            cost: Mapping[str, Sequence[float]], evaluate: Evaluate, budget: float,
            evaluations: int, seed: int = 0) -> LevelSearchResult:
    """Every layer at one level: the common level that fits the budget most tightly (module
    docstring). ``info``: ``levels`` (the keys scored), ``uniform_costs`` (every common level's
    total cost). Raises ValueError when no level common to all layers fits."""
    check_search_args(evaluate, evaluations, seed)
    problem = LevelProblem.build(layers, options, cost, budget)
    chosen = tightest_uniform(problem)
    if not chosen:
        common = {key: total for key, _, total in uniform_candidates(problem)}
        raise ValueError(f"no level common to every layer fits the budget {budget} (common "
                         f"levels and their totals: {common or 'none'})")
    ledger = Ledger(problem, evaluate, evaluations)
    for index in chosen:
        if not ledger.can_pay():
            break
        ledger.score(index)
    keys = [problem.options[0][index[0]].key for index in chosen]
    totals = {key: total for key, _, total in uniform_candidates(problem)}
    return ledger.result("uniform", {"levels": keys, "uniform_costs": totals})


def owl_sparsities(ratios: Sequence[float], target: float, lam: float,
                   weights: Sequence[float] | None = None) -> np.ndarray:
    """OWL's per-layer sparsity from outlier ratios (module docstring), clipped to [0, 1]."""
    d = np.asarray(ratios, dtype=float)
    if d.ndim != 1 or not len(d) or not np.isfinite(d).all():
        raise ValueError(f"ratios must be a non-empty list of finite numbers, got {ratios!r}")
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target must be a sparsity in [0, 1], got {target!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam!r}")
    w = np.ones_like(d) if weights is None else np.asarray(weights, dtype=float)
    if w.shape != d.shape or not (w > 0).all():
        raise ValueError(f"weights must be one positive number per ratio, got {weights!r}")
    span = float(d.max() - d.min())
    n = (d - d.min()) / span * 2.0 * lam if span > 0 else np.zeros_like(d)
    mean = float((n * w).sum() / w.sum())
    return np.clip(target - (n - mean), 0.0, 1.0)


def snap(problem: LevelProblem, wanted: Sequence[float],
         sizes: Sequence[float] | None = None) -> Index:
    """Each layer's option nearest ``wanted`` sparsity, then cheaper steps into the budget, each
    the one adding the least size-weighted deviation from ``wanted`` per unit of cost saved."""
    sizes = [1.0] * len(wanted) if sizes is None else list(sizes)

    def deviation(layer: int, i: int) -> float:
        return sizes[layer] * abs(problem.options[layer][i].sparsity - wanted[layer])

    index = [min(range(len(row)), key=lambda i, lay=layer: (deviation(lay, i), i))
             for layer, row in enumerate(problem.options)]
    while not problem.fits(index):
        best, best_key = None, None
        for layer, row in enumerate(problem.cost):
            now = row[index[layer]]
            for i, c in enumerate(row):
                if c < now:
                    extra = deviation(layer, i) - deviation(layer, index[layer])
                    key = (extra / (now - c), -(now - c), layer, i)
                    if best_key is None or key < best_key:
                        best, best_key = (layer, i), key
        assert best is not None  # build() checked that the cheapest assignment fits
        index[best[0]] = best[1]
    return tuple(index)


def _grid_order(points: list[tuple[float, float]], seed: int) -> list[tuple[float, float]]:
    """Nearest the paper's usual (lambda 0.08, M 5) first; equal distances in seeded order."""
    rng = random.Random(seed)
    keyed = [(abs(lam - OWL_DEFAULT[0]) / 0.02 + abs(math.log(m / OWL_DEFAULT[1])) / 0.35,
              rng.random(), (lam, m)) for lam, m in points]
    return [point for _, _, point in sorted(keyed)]


def owl(layers: Sequence[str], options: Mapping[str, Sequence[Level]],
        cost: Mapping[str, Sequence[float]], evaluate: Evaluate, budget: float,
        evaluations: int, seed: int = 0, *,
        outlier_ratios: Mapping[float, Mapping[str, float]], target: float,
        sizes: Mapping[str, float] | None = None,
        lambdas: Sequence[float] = LAMBDAS) -> LevelSearchResult:
    """OWL's allocation, tuned on the grid ``lambdas`` x the M values of ``outlier_ratios``.

    ``outlier_ratios[M][layer]``: the layer's outlier ratio at threshold M (from
    ``outliers.outlier_ratios``; one M gives a grid over lambda alone). ``target``: the mean
    sparsity (over weights when ``sizes`` is given, else over layers). ``info``: ``lambda``,
    ``M`` and ``sparsities`` (the wanted, unsnapped) of the best, and ``grid`` (every grid point
    to its assignment's level keys, scored or not).
    """
    check_search_args(evaluate, evaluations, seed)
    problem = LevelProblem.build(layers, options, cost, budget)
    if not outlier_ratios:
        raise ValueError("outlier_ratios must map at least one M to per-layer ratios")
    for m, ratios in outlier_ratios.items():
        missing = [name for name in problem.layers if name not in ratios]
        if missing:
            raise ValueError(f"outlier_ratios[{m}] has no ratio for layers {missing}")
    if not lambdas or any(not 0 <= lam <= 0.5 for lam in lambdas):
        raise ValueError(f"lambdas must be numbers in [0, 0.5], got {lambdas!r}")
    weights = None if sizes is None else [float(sizes[name]) for name in problem.layers]
    plans: dict[tuple[float, float], tuple[Index, np.ndarray]] = {}
    for m, lam in itertools.product(outlier_ratios, lambdas):
        lam, m = float(lam), float(m)
        wanted = owl_sparsities([outlier_ratios[m][name] for name in problem.layers],
                                target, lam, weights)
        plans[(lam, m)] = (snap(problem, wanted, weights), wanted)
    ledger = Ledger(problem, evaluate, evaluations)
    chosen: dict[Index, tuple[float, float]] = {}
    for point in _grid_order(list(plans), seed):
        index = plans[point][0]
        if ledger.known(index) is None and not ledger.can_pay():
            break
        ledger.score(index)
        chosen.setdefault(index, point)  # the grid point that first gave this assignment
    result = ledger.result("owl")
    best = problem.index_of(result.assignment)
    lam, m = chosen[best]
    grid = {f"lambda={p[0]:g},M={p[1]:g}": [problem.options[layer][i].key
                                            for layer, i in enumerate(plans[p][0])]
            for p in plans}
    result.info.update({"lambda": lam, "M": m, "sparsities": plans[(lam, m)][1].tolist(),
                        "grid": grid})
    return result
