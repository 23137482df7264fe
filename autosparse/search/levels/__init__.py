"""Per-layer level allocation for one-shot LLM compression: which level each Linear layer gets.

Why here and pure: a candidate's fitness (KL to the dense model over calibration windows, from the
level database and the scorer) is costly, and the searches differ only in how they spend it. So
every search is a function of plain inputs, comparable at EQUAL candidate evaluations::

    layers       list of layer names
    options      layer -> its Levels, in increasing compression
    cost         layer -> one cost per level; the budget bounds the SUM over layers
                 (stored bits, kept weights: see ``costs.budget_from_average``)
    evaluate     assignment (layer -> Level) -> fitness, lower is better; ``evaluate_at(a, f)``
                 scores on a fraction f of the windows (multi-fidelity, the GA only)
    budget, evaluations (calls allowed, charged by ``problem.Ledger``), seed

and returns a ``LevelSearchResult`` (best assignment, fitness, cost, every scored assignment,
evaluations charged). Methods: ``uniform``, ``owl`` (outlier-weighted sparsity, grid-tuned),
``knapsack`` (MILP on per-layer sensitivity, then a sweep), ``evolutionary`` (EvoPress-like GA
with a budget-keeping level switch and successive halving), ``bayesian`` (Optuna TPE with
budget repair).

Never imports the level database or the scorer: the caller wires ``evaluate`` to them. Only
``outliers`` (OWL's outlier ratios from tensors) imports torch, and this package's face does not
import it. May import: ``config``, ``workload``, ``space``, ``compress`` (``Level``, as a type
name), ``cost``, ``search``; numpy, scipy, optuna.
"""

from autosparse.search.levels.baselines import owl, owl_sparsities, uniform
from autosparse.search.levels.bayes import bayesian
from autosparse.search.levels.costs import (
    Budget,
    budget_from_average,
    kept_costs,
    nominal_bits_per_weight,
    size_costs,
)
from autosparse.search.levels.evolution import evolutionary, level_switch
from autosparse.search.levels.knapsack_search import knapsack
from autosparse.search.levels.problem import (
    Evaluated,
    LevelProblem,
    LevelSearchResult,
)

__all__ = [
    "Budget",
    "Evaluated",
    "LevelProblem",
    "LevelSearchResult",
    "bayesian",
    "budget_from_average",
    "evolutionary",
    "kept_costs",
    "knapsack",
    "level_switch",
    "nominal_bits_per_weight",
    "owl",
    "owl_sparsities",
    "size_costs",
    "uniform",
]
