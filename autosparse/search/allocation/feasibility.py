"""What finished trials rule out: harder versions and near-duplicates of an infeasible allocation,
and predictions past a bound calibrated on the predictor's own errors.

An additive sensitivity model refitted on a few trials underestimates the drop of aggressive
allocations (interactions between compressed layers add up to more than the sum), so a planner
that trusts it keeps proposing past its accuracy bound. Three rules keep it inside.

*At least as hard*, per decision (a partial order on the decision's options, by damage not by
cost: an unstructured 50 % layer may store more than its dense twin, yet it loses more)::

    x >= y  iff  x.bits <= y.bits and x.sparsity >= y.sparsity
                 and (y is dense, or x and y share pattern and criterion)

so sparsity is ordered within one pattern (dense below every pattern), bits are ordered
everywhere (fp32 above every integer width), and two different patterns (unstructured, channel,
2:4, ...) or criteria are not ordered: neither rules the other out.

*One step*, per decision: the same pattern and criterion, and either the same bits with the
sparsity level next to it among the decision's options of that pattern (dense being level 0 of
every pattern), or the same sparsity with the next bit-width among those options.

A finished trial is *infeasible* when its drop exceeds the planner's limit. Each one forbids::

    dominating  = every decision at least as hard as the trial's     (the trial included)
    near copies = the trial with one decision moved by one step

Both are products of per-decision option sets ("boxes"), one MILP row each (see
:func:`autosparse.search.allocation.knapsack.solve`).

*Calibrated ceiling* on the predicted drop, from what the trials showed against what a model
that had not seen them predicted (leave-one-out)::

    for each finished trial i:  p_i = prediction of the model refitted without trial i
                                y_i = min(drop_i, 2 limit)
    curve    = isotonic (non-decreasing) regression of y on p, through (0, 0) (dense loses 0)
    ceiling  = the p where the curve, interpolated linearly, first exceeds limit
               (limit when it never does), kept in [limit / 2, limit]
    margin   = limit - ceiling       (a proposal needs predicted drop <= ceiling)

so a model that underestimates aggressive allocations (predicted 4, came out 12) lowers the
ceiling to where its predictions did come out feasible, and feasible trials proposed just under
the ceiling raise it again. Leave-one-out because an in-sample residual hides the bias the planner
suffers from: the drop of an allocation the model has not seen. The clip at 2 x limit keeps one
collapsed trial (50 points down) from dragging the curve; the floor at limit / 2 keeps the
planner exploring.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from autosparse.search.allocation.problem import Allocation, AllocationProblem
from autosparse.space.candidate import DENSE, LayerChoice

Box = tuple[frozenset[int], ...]  # per decision, the option indices the box holds
CEILING_FLOOR = 0.5  # the ceiling never drops below this share of the limit
DROP_CLIP = 2.0  # drops count at most this many limits (calibration and the planner's refit)


def at_least_as_hard(x: LayerChoice, y: LayerChoice) -> bool:
    """``x`` compresses at least as hard as ``y`` (the module docstring's partial order)."""
    if x.bits > y.bits or x.sparsity < y.sparsity:
        return False
    return y.pattern == DENSE or (x.pattern == y.pattern and x.criterion == y.criterion)


def one_step(x: LayerChoice, y: LayerChoice, options: Sequence[LayerChoice]) -> bool:
    """``x`` and ``y`` differ by one step among a decision's ``options``."""
    if x == y:
        return False
    if x.bits == y.bits:
        pattern = x.pattern if x.pattern != DENSE else y.pattern
        if pattern == DENSE or {x.pattern, y.pattern} - {DENSE, pattern}:
            return False
        criterion = {c.criterion for c in (x, y) if c.pattern != DENSE}
        if len(criterion) != 1:
            return False
        levels = sorted({o.sparsity for o in options if o.bits == x.bits and (
            o.pattern == DENSE or (o.pattern == pattern and o.criterion in criterion))})
        lo, hi = sorted((x.sparsity, y.sparsity))
        return lo in levels and hi in levels and levels.index(hi) == levels.index(lo) + 1
    if (x.pattern, x.sparsity, x.criterion) != (y.pattern, y.sparsity, y.criterion):
        return False
    bits = sorted({o.bits for o in options
                   if (o.pattern, o.sparsity, o.criterion) == (x.pattern, x.sparsity, x.criterion)})
    lo, hi = sorted((x.bits, y.bits))
    return bits.index(hi) == bits.index(lo) + 1


def dominating_box(problem: AllocationProblem, allocation: Sequence[int]) -> Box:
    """Every allocation that compresses each decision at least as hard as ``allocation``."""
    return tuple(frozenset(o for o, choice in enumerate(opts)
                           if at_least_as_hard(choice, opts[allocation[d]]))
                 for d, opts in enumerate(problem.options))


def near_boxes(problem: AllocationProblem, allocation: Sequence[int]) -> list[Box]:
    """One box per decision: ``allocation`` with that decision moved by at most one step."""
    same = [frozenset([o]) for o in allocation]
    out = []
    for d, opts in enumerate(problem.options):
        mine = opts[allocation[d]]
        moved = frozenset(o for o, choice in enumerate(opts)
                          if choice == mine or one_step(choice, mine, opts))
        if len(moved) > 1:
            out.append(tuple(same[:d] + [moved] + same[d + 1:]))
    return out or [tuple(same)]


def in_box(allocation: Sequence[int], box: Box) -> bool:
    return all(o in allowed for o, allowed in zip(allocation, box))


def is_near_duplicate(problem: AllocationProblem, x: Sequence[int], y: Sequence[int]) -> bool:
    """``x`` equals ``y`` but for at most one decision, moved there by one step."""
    differ = [d for d in range(len(x)) if x[d] != y[d]]
    if not differ:
        return True
    if len(differ) > 1:
        return False
    d = differ[0]
    opts = problem.options[d]
    return one_step(opts[x[d]], opts[y[d]], opts)


def dominates(problem: AllocationProblem, x: Sequence[int], y: Sequence[int]) -> bool:
    """``x`` compresses every decision at least as hard as ``y``."""
    return all(at_least_as_hard(problem.options[d][x[d]], problem.options[d][y[d]])
               for d in range(len(x)))


def calibrated_ceiling(pairs: Sequence[tuple[Allocation, float]], limit: float,
                       refit: Callable[[list[tuple[Allocation, float]]],
                                       Callable[[Allocation], float]]) -> float:
    """The ceiling on the predicted drop (the module docstring's calibration); ``refit(pairs)``
    gives the prediction function of the model fitted on ``pairs``."""
    points = [(0.0, 0.0)]  # dense: predicted and observed 0
    for i, (allocation, drop) in enumerate(pairs):
        predicted = refit(list(pairs[:i]) + list(pairs[i + 1:]))(allocation)
        points.append((predicted, min(drop, DROP_CLIP * limit)))
    curve = _isotonic(sorted(points))
    if curve[0][1] > limit:
        return CEILING_FLOOR * limit
    ceiling = limit
    for (p0, y0), (p1, y1) in zip(curve, curve[1:]):
        if y1 > limit:
            if y0 > limit or p1 <= p0:
                ceiling = p0 if y0 <= limit else 0.0
            else:
                ceiling = p0 + (limit - y0) * (p1 - p0) / (y1 - y0)
            break
    return min(max(ceiling, CEILING_FLOOR * limit), limit)


def _isotonic(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Pool adjacent violators over points sorted by x: blocks (mean x, mean y), y
    non-decreasing."""
    blocks: list[list[float]] = []  # [sum x, sum y, count]
    for x, y in points:
        blocks.append([x, y, 1.0])
        while len(blocks) > 1 and blocks[-2][1] / blocks[-2][2] > blocks[-1][1] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last)]
    return [(sx / n, sy / n) for sx, sy, n in blocks]


@dataclass(frozen=True)
class Guard:
    """What a proposal must satisfy: predicted drop (intercept included) <= ``ceiling``, and in
    no box of ``boxes``."""

    ceiling: float
    margin: float
    boxes: tuple[Box, ...]
    infeasible: tuple[Allocation, ...]

    def forbids(self, allocation: Sequence[int]) -> bool:
        return any(in_box(allocation, box) for box in self.boxes)
