"""EvoPress's level switch as a GA mutation: move one decision to another option and pay for it
with another decision, so the child costs what its parent cost.

Why: a multi-objective GA's reset mutation changes a candidate's cost at random, so a child
usually lands at another point of the cost axis than its parent and competes with other
parents there. Under a fixed budget (EvoPress keeps the average bits; here the search's first
cost objective: stored bits, size, ...), the level switch explores allocations AT the parent's
cost, which is where a multi-objective front is improved one cost at a time::

    a        = allocation of the parent (one option index per decision)
    d1       = a random decision with another option; o1 = a random other option of d1
    delta    = cost[d1][o1] - cost[d1][a[d1]]
    (d2, o2) = among the other decisions and their other options, those that bring the change
               of the total cost closest to 0 (ties, and anything within 1 % of |delta| of the
               closest, drawn at random); none when no move brings it closer than |delta|
    child    = a with a[d1] = o1, a[d2] = o2

Costs come from the budget planner's allocation problem (exact stored sizes in a one-shot
search). Pure: ``random`` is the caller's (the GA fences a seeded state around it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from autosparse.search.allocation.problem import AllocationProblem
from autosparse.space.candidate import Candidate

__all__ = ["LevelSwitch"]

NEAR = 0.01  # compensations within this share of |delta| of the best count as ties


class LevelSwitch:
    """``switch(candidate, rng)`` -> a child at (about) the parent's cost of ``objective``, or
    None when the space has fewer than two decisions with a choice."""

    def __init__(self, problem: AllocationProblem, objective: str) -> None:
        self.problem = problem
        self.objective = objective
        self.costs = problem.costs_of(objective)  # raises naming an objective the problem lacks
        self._movable = [d for d, options in enumerate(problem.options) if len(options) > 1]

    def switch_allocation(self, allocation: Sequence[int], rng: random.Random) -> tuple[int, ...]:
        """The allocation after one switch (unchanged when nothing can move)."""
        out = list(allocation)
        if len(self._movable) < 2:
            return tuple(out)
        d1 = rng.choice(self._movable)
        o1 = rng.choice([o for o in range(len(self.problem.options[d1])) if o != out[d1]])
        delta = self.costs[d1][o1] - self.costs[d1][out[d1]]
        out[d1] = o1
        moves = [(abs(delta + self.costs[d2][o2] - self.costs[d2][out[d2]]), d2, o2)
                 for d2 in self._movable if d2 != d1
                 for o2 in range(len(self.problem.options[d2])) if o2 != out[d2]]
        best = min(gap for gap, _, _ in moves)
        if best < abs(delta):  # only a move that brings the cost back is worth making
            near = min(best + NEAR * abs(delta), abs(delta))
            _, d2, o2 = rng.choice([m for m in moves if m[0] <= near and m[0] < abs(delta)])
            out[d2] = o2
        return tuple(out)

    def __call__(self, candidate: Candidate, rng: random.Random) -> Candidate | None:
        if len(self._movable) < 2:
            return None
        allocation = self.problem.allocation_of(candidate)
        return self.problem.candidate(self.switch_allocation(allocation, rng))
