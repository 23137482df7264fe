"""The level-allocation problem every search here shares, the evaluation ledger, and the result.

Why a ledger: the searches are compared at EQUAL candidate evaluations, and one evaluation (a KL
score of a stitched model over calibration windows) costs far more than anything a search computes
itself. So every call of the caller's fitness goes through :class:`Ledger`, which charges it,
refuses a call the budget cannot pay, answers an assignment already scored from its cache (free),
and records what was scored.

Accounting (what "equal compute" means here)::

    evaluate(assignment)                      costs 1
    evaluate_at(assignment, f), 0 < f < 1     costs overhead + (1 - overhead) * f
    an assignment already scored at f' >= f   costs 0 (the cached value at f' is returned)
    total charged                             <= evaluations, always (a call that would pass it is
                                                 refused before it runs)

``f`` is the fraction of the full calibration set the call scores (``n_windows = f * N``): a
forward pass costs about linearly in windows. ``overhead`` is the part of a call that does not
shrink with ``f`` (stitching the candidate from the level database); 0 by default, which flatters
low-fidelity calls when stitching is slow, so set it from a measured ratio when comparing.

Budget: an assignment fits when its total cost is at most ``budget`` (plus a 1e-9 relative
tolerance for float sums); every search here only ever scores assignments that fit.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # a type name only: the searches never need torch, which levels.py imports
    from autosparse.compress.oneshot.levels import Level

Index = tuple[int, ...]  # option index per layer, in problem.layers order
Assignment = dict[str, "Level"]
Evaluate = Callable[[Assignment], float]
EvaluateAt = Callable[[Assignment, float], float]

REL_TOL = 1e-9


class BudgetExhausted(RuntimeError):
    """The ledger cannot pay for another call at the asked fidelity."""


@dataclass(frozen=True)
class LevelProblem:
    """Layers, their level options (in increasing compression), the cost of each option, the
    budget on the summed cost. Build it with :meth:`build`, which checks every argument."""

    layers: tuple[str, ...]
    options: tuple[tuple[Level, ...], ...]
    cost: tuple[tuple[float, ...], ...]
    budget: float

    @classmethod
    def build(cls, layers: Sequence[str], options: Mapping[str, Sequence[Level]],
              cost: Mapping[str, Sequence[float]], budget: float) -> LevelProblem:
        layers = list(layers)
        if not layers or any(not isinstance(name, str) for name in layers):
            raise ValueError(f"layers must be a non-empty list of layer names, got {layers!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"layers must be distinct, got {layers!r}")
        for name, table in (("options", options), ("cost", cost)):
            missing = [n for n in layers if n not in table]
            if missing:
                raise ValueError(f"{name} has no entry for layers {missing}")
        opts, costs = [], []
        for name in layers:
            row = tuple(options[name])
            if not row:
                raise ValueError(f"options[{name!r}] is empty: give each layer at least one level")
            keys = [getattr(level, "key", None) for level in row]
            if None in keys or len(set(keys)) != len(keys):
                raise ValueError(f"options[{name!r}] must be distinct Levels, got {row!r}")
            c = tuple(float(v) for v in cost[name])
            if len(c) != len(row) or not all(math.isfinite(v) for v in c):
                raise ValueError(f"cost[{name!r}] must hold one finite number per level "
                                 f"({len(row)}), got {list(cost[name])!r}")
            opts.append(row)
            costs.append(c)
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) \
                or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number, got {budget!r}")
        problem = cls(tuple(layers), tuple(opts), tuple(costs), float(budget))
        floor = problem.total(problem.cheapest())
        if not problem.fits(problem.cheapest()):
            raise ValueError(f"budget {budget} is below the cheapest assignment's cost {floor}: "
                             f"no assignment fits")
        return problem

    def total(self, index: Sequence[int]) -> float:
        return float(sum(row[i] for row, i in zip(self.cost, index)))

    @property
    def limit(self) -> float:
        """The largest total that fits: the budget plus the float tolerance."""
        return self.budget + REL_TOL * max(1.0, abs(self.budget))

    def fits(self, index: Sequence[int]) -> bool:
        return self.total(index) <= self.limit

    def assignment(self, index: Sequence[int]) -> Assignment:
        return {name: row[i] for name, row, i in zip(self.layers, self.options, index)}

    def index_of(self, assignment: Mapping[str, Level]) -> Index:
        """Option index per layer of an assignment (matched by ``Level.key``)."""
        out = []
        for name, row in zip(self.layers, self.options):
            if name not in assignment:
                raise ValueError(f"assignment has no level for layer {name!r}")
            keys = [level.key for level in row]
            key = assignment[name].key
            if key not in keys:
                raise ValueError(f"layer {name!r}: level {key!r} is not one of its options {keys}")
            out.append(keys.index(key))
        return tuple(out)

    def cheapest(self) -> Index:
        return tuple(int(min(range(len(row)), key=lambda i, r=row: (r[i], i))) for row in self.cost)

    def _down(self, layer: int, now: int) -> int | None:
        """The next cheaper option of a layer (largest cost below option ``now``'s)."""
        row = self.cost[layer]
        cheaper = [i for i, c in enumerate(row) if c < row[now]]
        return max(cheaper, key=lambda i: (row[i], -i)) if cheaper else None

    def _up(self, layer: int, now: int) -> int | None:
        """The next costlier option of a layer (smallest cost above option ``now``'s)."""
        row = self.cost[layer]
        dearer = [i for i, c in enumerate(row) if c > row[now]]
        return min(dearer, key=lambda i: (row[i], i)) if dearer else None

    def repair(self, index: Sequence[int], rng: random.Random | None = None) -> Index:
        """``index`` moved into the budget one cheaper step at a time.

        Without ``rng`` the step goes to the layer that is least compressed relative to its
        options (then the largest saving, then layer order): compression spreads evenly, the
        same answer every time. With ``rng``, a random layer that can step down.
        """
        out = list(index)
        while not self.fits(out):
            moves = [(layer, down) for layer in range(len(out))
                     if (down := self._down(layer, out[layer])) is not None]
            if rng is not None:
                layer, down = rng.choice(moves)
            else:
                def key(move: tuple[int, int]) -> tuple[float, float, int]:
                    layer, down = move
                    position = out[layer] / max(1, len(self.options[layer]) - 1)
                    saving = self.cost[layer][out[layer]] - self.cost[layer][down]
                    return (position, -saving, layer)
                layer, down = min(moves, key=key)
            out[layer] = down
        return tuple(out)

    def fill(self, index: Sequence[int], rng: random.Random) -> Index:
        """``index`` with its budget slack spent: random layers step to a costlier option while
        the total still fits (so random starts lie near the budget surface, not far inside)."""
        out = list(index)
        total = self.total(out)
        while True:
            moves = []
            for layer in range(len(out)):
                up = self._up(layer, out[layer])
                if up is not None and \
                        total + self.cost[layer][up] - self.cost[layer][out[layer]] <= self.limit:
                    moves.append((layer, up))
            if not moves:
                return tuple(out)
            layer, up = rng.choice(moves)
            before = out[layer]
            out[layer] = up
            total = self.total(out)  # exact, not accumulated: fits() must agree
            if total > self.limit:
                out[layer] = before
                return tuple(out)

    def random_feasible(self, rng: random.Random) -> Index:
        """A uniformly random index, repaired into the budget at random, then filled."""
        start = tuple(rng.randrange(len(row)) for row in self.options)
        return self.fill(self.repair(start, rng), rng)


def check_search_args(evaluate: Any, evaluations: Any, seed: Any) -> None:
    if not callable(evaluate):  # every bad argument is a ValueError here, as in the samplers
        raise ValueError(  # noqa: TRY004
            f"evaluate must be callable (assignment -> fitness), got {evaluate!r}")
    if isinstance(evaluations, bool) or not isinstance(evaluations, int) or evaluations < 1:
        raise ValueError(f"evaluations must be an integer >= 1, got {evaluations!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")  # noqa: TRY004


@dataclass(frozen=True)
class Evaluated:
    """One scored assignment: its fitness at ``fidelity`` (1 = the full calibration set)."""

    assignment: Assignment
    fitness: float
    cost: float
    fidelity: float = 1.0


@dataclass(frozen=True)
class LevelSearchResult:
    """What a search returns: the best full-fidelity assignment, its fitness and total cost,
    every scored assignment in order, and the evaluations charged (see the module docstring).
    ``calls`` counts the caller's fitness calls, cached answers not included; ``info`` holds the
    method's own notes (OWL's chosen lambda and M, the knapsack's predicted loss, ...)."""

    method: str
    assignment: Assignment
    fitness: float
    cost: float
    budget: float
    history: tuple[Evaluated, ...]
    evaluations_used: float
    evaluations: int
    calls: int
    info: dict[str, Any] = field(default_factory=dict)


class Ledger:
    """Every fitness call of a search: charged, capped, cached, recorded (module docstring)."""

    def __init__(self, problem: LevelProblem, evaluate: Evaluate, evaluations: int, *,
                 evaluate_at: EvaluateAt | None = None, overhead: float = 0.0) -> None:
        if evaluate_at is not None and not callable(evaluate_at):
            raise ValueError(f"evaluate_at must be callable (assignment, fidelity) -> fitness, "
                             f"got {evaluate_at!r}")
        if isinstance(overhead, bool) or not isinstance(overhead, (int, float)) \
                or not 0.0 <= overhead <= 1.0:
            raise ValueError(f"overhead must be a number in [0, 1], got {overhead!r}")
        self.problem = problem
        self._evaluate = evaluate
        self._evaluate_at = evaluate_at
        self._overhead = float(overhead)
        self.evaluations = evaluations
        self.spent = 0.0
        self.calls = 0
        self.history: list[Evaluated] = []
        self._cache: dict[Index, tuple[float, float]] = {}  # index -> (fidelity, fitness)

    def charge(self, fidelity: float = 1.0) -> float:
        if not 0.0 < fidelity <= 1.0:
            raise ValueError(f"fidelity must be in (0, 1], got {fidelity!r}")
        if fidelity < 1.0 and self._evaluate_at is None:
            raise ValueError(f"fidelity {fidelity} < 1 needs evaluate_at")
        return 1.0 if fidelity >= 1.0 else self._overhead + (1.0 - self._overhead) * fidelity

    @property
    def remaining(self) -> float:
        return self.evaluations - self.spent

    def can_pay(self, fidelity: float = 1.0) -> bool:
        return self.charge(fidelity) <= self.remaining + 1e-9

    def known(self, index: Sequence[int], fidelity: float = 1.0) -> float | None:
        """The cached fitness of ``index`` at ``fidelity`` or higher, else None."""
        hit = self._cache.get(tuple(index))
        return hit[1] if hit is not None and hit[0] >= fidelity else None

    def score(self, index: Sequence[int], fidelity: float = 1.0) -> float:
        """Fitness of a fitting ``index`` at ``fidelity``: cached (free) or one charged call.
        NaN counts as +inf (a broken candidate is never the best). Raises BudgetExhausted
        rather than pass the budget."""
        index = tuple(index)
        cached = self.known(index, fidelity)
        if cached is not None:
            return cached
        if not self.problem.fits(index):
            raise ValueError(f"assignment {index} costs {self.problem.total(index)}, over the "
                             f"budget {self.problem.budget}: searches score only what fits")
        price = self.charge(fidelity)
        if price > self.remaining + 1e-9:
            raise BudgetExhausted(f"{self.remaining} evaluations left, a call at fidelity "
                                  f"{fidelity} costs {price}")
        assignment = self.problem.assignment(index)
        if fidelity >= 1.0:
            value = float(self._evaluate(dict(assignment)))
        else:
            assert self._evaluate_at is not None
            value = float(self._evaluate_at(dict(assignment), fidelity))
        value = math.inf if math.isnan(value) else value
        self.spent += price
        self.calls += 1
        self._cache[index] = (fidelity, value)
        self.history.append(Evaluated(assignment, value, self.problem.total(index), fidelity))
        return value

    def best(self) -> tuple[Index, float] | None:
        """The lowest full-fidelity fitness scored so far (first scored wins a tie)."""
        full = [(value, i) for i, (index, (f, value)) in enumerate(self._cache.items()) if f >= 1.0]
        if not full:
            return None
        _, position = min(full)
        index = list(self._cache)[position]
        return index, self._cache[index][1]

    def result(self, method: str, info: dict[str, Any] | None = None) -> LevelSearchResult:
        best = self.best()
        if best is None:
            raise BudgetExhausted(f"{method}: no assignment was scored at full fidelity")
        index, fitness = best
        return LevelSearchResult(
            method=method, assignment=self.problem.assignment(index), fitness=fitness,
            cost=self.problem.total(index), budget=self.problem.budget,
            history=tuple(self.history), evaluations_used=self.spent,
            evaluations=self.evaluations, calls=self.calls, info=dict(info or {}))


def uniform_candidates(problem: LevelProblem) -> list[tuple[str, Index, float]]:
    """Every level (by key) that all layers offer, as ``(key, index, total cost)``, in the first
    layer's option order."""
    common = []
    for level in problem.options[0]:
        index = []
        for row in problem.options:
            keys = [lv.key for lv in row]
            if level.key not in keys:
                break
            index.append(keys.index(level.key))
        else:
            common.append((level.key, tuple(index), problem.total(index)))
    return common


def tightest_uniform(problem: LevelProblem) -> list[Index]:
    """The uniform assignments that fit and use the most budget (several when levels tie on
    cost, e.g. the same sparsity by two methods); empty when no uniform level fits."""
    fitting = [(total, index) for _, index, total in uniform_candidates(problem)
               if problem.fits(index)]
    if not fitting:
        return []
    top = max(total for total, _ in fitting)
    tol = REL_TOL * max(1.0, abs(top))
    return [index for total, index in fitting if total >= top - tol]
