"""EvoPress-like evolutionary search over per-layer levels, on the budget surface.

Why this shape (Sieberling et al., EvoPress, 2024): damage from compressing several layers is not
the sum of each alone, so the sensitivity knapsack is only a good start; a GA scores real
assignments. Its one mutation, the *level switch*, moves a layer one level and another layer the
opposite way by the closest matching cost, so children stay on the budget surface instead of
wandering off it (off it, a child is either over budget or wastes budget). Selection uses
successive halving over calibration windows when ``evaluate_at`` is given: many children on a
few windows, the best few rescored on more, one on all (EvoPress: 16 -> 4 -> 1 over 2k, 16k,
64k tokens)::

    population = best mu of score(knapsack(w), uniform, seeds, random fitting ...)
    repeat while a generation can be paid:
        children = [level_switch(tournament(population)) for _ in range(lam)]  # new, distinct
        survivors = successive_halving(children, fidelities, eta)  # last rung at fidelity 1
        population = best mu of population + survivors                # full-fidelity fitness

Plain ``random.Random(seed)`` and numpy-free operators (no DEAP): no ``deap.creator`` classes to
collide with ``samplers/ga.py``'s, and a seed repeats a search exactly.

Accounting: every rung call is charged by the ledger (``problem`` module docstring): a call at
fidelity f costs ``overhead + (1 - overhead) f``, a full call 1. A generation's price is known
before it runs; when what is left cannot pay the planned ``lam`` children, ``lam`` shrinks to
what it can, and the search stops when not even one full call is left. Only full-fidelity
fitness ranks the population and picks the result.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from autosparse.search.levels.knapsack_search import (
    Sensitivity,
    sensitivity_weights,
    solve,
)
from autosparse.search.levels.problem import (
    Evaluate,
    EvaluateAt,
    Index,
    Ledger,
    LevelProblem,
    LevelSearchResult,
    check_search_args,
    tightest_uniform,
)

if TYPE_CHECKING:
    from autosparse.compress.oneshot.levels import Level

FIDELITIES = (0.125, 0.5, 1.0)
_TRIES = 20


def _switch_once(problem: LevelProblem, index: Index, rng: random.Random) -> Index | None:
    """One level switch of a fitting ``index``: layer a one level up or down, layer b the other
    way by the option whose cost change best cancels a's, within the budget. Falls back to a's
    move alone when no b can compensate and it fits; None when nothing fits after some tries."""
    n = len(index)
    for _ in range(_TRIES):
        a = rng.randrange(n)
        steps = [d for d in (-1, 1) if 0 <= index[a] + d < len(problem.options[a])]
        if not steps:
            continue
        step = rng.choice(steps)
        child = list(index)
        child[a] = index[a] + step
        delta_a = problem.cost[a][child[a]] - problem.cost[a][index[a]]
        others = [b for b in range(n) if b != a]
        rng.shuffle(others)
        total = problem.total(child)
        for b in others:
            row, now = problem.cost[b], problem.cost[b][index[b]]
            choices = [j for j in range(len(row)) if (j - index[b]) * step < 0
                       and total - now + row[j] <= problem.limit]
            if choices:
                j = min(choices, key=lambda j: (abs(delta_a + row[j] - now), abs(j - index[b])))
                child[b] = j
                return tuple(child)
        if total <= problem.limit:
            return tuple(child)
    return None


def level_switch(problem: LevelProblem, index: Sequence[int], rng: random.Random,
                 switches: int = 1) -> Index:
    """``index`` after ``switches`` level switches (EvoPress's mutation); every intermediate and
    the result fit the budget when ``index`` does."""
    out = tuple(index)
    for _ in range(switches):
        nxt = _switch_once(problem, out, rng)
        if nxt is not None and problem.fits(nxt):  # exact sum, as the ledger checks it
            out = nxt
    return out


def _rung_sizes(children: int, rungs: int, eta: int) -> list[int]:
    return [max(1, math.ceil(children / eta ** r)) for r in range(rungs)]


def _plan(children: int, fidelities: Sequence[float], eta: int) -> list[tuple[float, int]]:
    """(fidelity, how many scored there) per rung that selects something, the last at 1."""
    sizes = _rung_sizes(children, len(fidelities), eta)
    plan = [(f, sizes[r]) for r, f in enumerate(fidelities[:-1]) if sizes[r + 1] < sizes[r]]
    return plan + [(fidelities[-1], sizes[-1])]


def _price(ledger: Ledger, plan: list[tuple[float, int]]) -> float:
    return sum(count * ledger.charge(f) for f, count in plan)


def evolutionary(layers: Sequence[str], options: Mapping[str, Sequence[Level]],
                 cost: Mapping[str, Sequence[float]], evaluate: Evaluate, budget: float,
                 evaluations: int, seed: int = 0, *, evaluate_at: EvaluateAt | None = None,
                 fidelities: Sequence[float] = FIDELITIES, eta: int = 4,
                 sensitivity: Sensitivity | None = None,
                 seeds: Sequence[Mapping[str, Level]] = (), initial: int = 4,
                 population: int = 1, offspring: int | None = None, max_switches: int = 3,
                 overhead: float = 0.0) -> LevelSearchResult:
    """The GA (module docstring). ``population`` (mu) 1 is EvoPress's elitist (1 + lambda)
    scheme, the best at a few dozen evaluations; ``offspring`` (lambda): children per
    generation, default 16 with ``evaluate_at`` (successive halving) and 4 without. Starting
    points, all scored at full fidelity: the knapsack's (with ``sensitivity``), the tightest
    uniform, ``seeds`` (repaired into the budget if over it), the uniform with its slack spent,
    then random fitting ones until there are ``initial``. ``info``: ``generations``, ``seeded``
    (how many starting points were scored)."""
    check_search_args(evaluate, evaluations, seed)
    problem = LevelProblem.build(layers, options, cost, budget)
    for name, value, low in (("initial", initial, 1), ("population", population, 1),
                             ("eta", eta, 2),
                             ("max_switches", max_switches, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    rungs = tuple(float(f) for f in fidelities) if evaluate_at is not None else (1.0,)
    if not rungs or rungs[-1] != 1.0 or any(not 0 < f <= 1 for f in rungs) \
            or list(rungs) != sorted(set(rungs)):
        raise ValueError(f"fidelities must rise strictly within (0, 1] and end at 1, got "
                         f"{fidelities!r}")
    lam = offspring if offspring is not None else (16 if len(rungs) > 1 else 4)
    if isinstance(lam, bool) or not isinstance(lam, int) or lam < 1:
        raise ValueError(f"offspring must be an integer >= 1, got {offspring!r}")
    rng = random.Random(seed)
    ledger = Ledger(problem, evaluate, evaluations, evaluate_at=evaluate_at, overhead=overhead)

    starts: list[Index] = []
    if sensitivity is not None:
        first = solve(problem, sensitivity_weights(problem, sensitivity))
        if first is not None:
            starts.append(first)
    uniform = tightest_uniform(problem)
    starts += uniform
    starts += [problem.repair(problem.index_of(s)) for s in seeds]
    starts += [problem.fill(u, rng) for u in uniform]
    while len(dict.fromkeys(starts)) < initial:
        before = len(dict.fromkeys(starts))
        for _ in range(_TRIES):
            starts.append(problem.random_feasible(rng))
            if len(dict.fromkeys(starts)) > before:
                break
        else:
            break  # fewer distinct fitting assignments than the population
    pool: list[tuple[float, int, Index]] = []  # (full fitness, order, index)
    for index in dict.fromkeys(starts):
        if not ledger.can_pay():
            break
        pool.append((ledger.score(index), len(pool), index))
    seeded, generations, order = len(pool), 0, len(pool)
    pool = sorted(pool)[:population]

    while ledger.can_pay():
        size = lam
        while size > 1 and _price(ledger, _plan(size, rungs, eta)) > ledger.remaining + 1e-9:
            size -= 1
        if _price(ledger, _plan(size, rungs, eta)) > ledger.remaining + 1e-9:
            break
        children = _breed(problem, ledger, pool, size, rng, max_switches)
        if not children:
            break  # every neighbour of the population has been scored
        for f, count in _plan(len(children), rungs, eta)[:-1]:
            scored = sorted((ledger.score(c, f), i, c) for i, c in enumerate(children))
            children = [c for _, _, c in scored[:max(1, math.ceil(count / eta))]]
        for child in children:
            pool.append((ledger.score(child), order, child))
            order += 1
        pool = sorted(pool)[:population]
        generations += 1
    return ledger.result("evolutionary", {"generations": generations, "seeded": seeded})


def _breed(problem: LevelProblem, ledger: Ledger, pool: list[tuple[float, int, Index]],
           size: int, rng: random.Random, max_switches: int) -> list[Index]:
    """Up to ``size`` distinct children never scored before, each a level-switched parent from a
    binary tournament on full-fidelity fitness."""
    children: list[Index] = []
    for _ in range(size * _TRIES):
        if len(children) == size:
            break
        a, b = rng.choice(pool), rng.choice(pool)
        parent = min(a, b)[2]
        switches = min(rng.randint(1, max_switches), rng.randint(1, max_switches))
        child = level_switch(problem, parent, rng, switches)
        if child in children or ledger.known(child, fidelity=1e-12) is not None:
            continue
        children.append(child)
    return children
