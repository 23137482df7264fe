"""A steady-state NSGA-II genetic algorithm as an Optuna sampler, on DEAP operators.

The study is the state: every generation is recomputed from the finished trials in storage, so any
number of workers (threads, processes, machines) can share one study, and a killed search resumes
where it stopped. Nothing private is written into Optuna storage.
"""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import moocore
import numpy as np
from deap import base, tools
from deap.tools.emo import assignCrowdingDist
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from autosparse.search.samplers._proposing import ProposingSampler
from autosparse.search.samplers.level_switch import LevelSwitch
from autosparse.search.samplers.screening import Predictor, admits_none, pick_screened
from autosparse.search.samplers.seeding import isolated_global_random, stable_seed
from autosparse.space.search_space import SearchSpace

__all__ = ["GeneticSampler"]

_DEDUP_TRIES = 20
_BIG = 1e300  # stands in for +-inf objective values, so crowding distances stay finite


class _Recorder:
    """Stands in for an Optuna trial in ``space.suggest``: answers from a full param dict and
    records which params were actually asked (the active genes)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values
        self.asked: list[str] = []

    def suggest_categorical(self, name: str, choices: Any) -> Any:
        self.asked.append(name)
        return self.values[name]


class GeneticSampler(ProposingSampler):
    """Steady-state constrained NSGA-II over the space's categorical params (DEAP operators)::

        population = selNSGA2(feasible completed trials) + least-violating infeasible, size P
        parents = binary_tournament(population, 2)     # Deb: feasible, then rank, then crowding
        child = cxUniform(*parents) if random() < crossover_prob else copy(parents[0])
        trial.params = decode(mutate(child))           # mutate again while it is a duplicate

    With a ``level_switch`` (EvoPress's cost-keeping mutation, :mod:`.level_switch`), a child is
    mutated by one switch with probability ``switch_prob`` instead of by gene resets.

    With a ``predictor`` (per-layer sensitivity), ``screen`` distinct children are bred per trial
    and the one whose predicted point adds most hypervolume to the observed front is kept
    (:mod:`.screening`); under an ``accuracy_drop`` bound only children the budget planner
    would propose compete (another batch is bred when none is);
    ``gene_weights`` (per decision) scale each gene's mutation probability.

    Genome: one integer index per param of the full space (``space.param_names()``, conditional
    ``sparsity`` params included, so a gene survives while its pattern does not use it) into
    ``space.choices(param)``.

    Until ``population_size`` trials have completed, a child is either a uniformly random genome
    or (with probability 1/2, when any trial has completed) a mutant of a random completed trial,
    so enqueued warm-start seeds spread into their neighbours while the first generation still
    covers the space when no seeds were given.

    Mutation resets each gene, with probability ``mutation_prob``, to a uniformly random *other*
    index. Chosen over a +-1 step on ordered fields (sparsity, bits) because the choice lists are
    short (3-5 values) and budgets give only a few generations: a reset reaches any value in one
    step, and patterns are unordered anyway, so one operator serves every gene. When a mutation
    must change the candidate (startup mutants, duplicates) and no gene was hit, one *active* gene
    (one that ``space.suggest`` asks for) is reset.

    Parents come from a binary tournament written here rather than ``tools.selTournamentDCD``:
    it needs no population size multiple of 4 and ranks by Deb's constrained domination
    (feasible first; infeasible by total violation; feasible by front rank, then crowding).

    The per-trial generator is seeded from ``(seed, trial.number)`` with a stable hash, and
    DEAP's draws from the global ``random`` are fenced in (state swapped in and restored), so a
    given seed and trial order repeats exactly, and the caller's ``random`` is left untouched.
    Trial constraints are read from ``FrozenTrial.constraints`` (feasible when all are <= 0).
    """

    def __init__(
        self,
        *,
        space: SearchSpace,
        population_size: int = 16,
        crossover_prob: float = 0.9,
        mutation_prob: float | None = None,
        seed: int | None = None,
        screen: int = 1,
        predictor: Predictor | None = None,
        gene_weights: Mapping[str, float] | None = None,
        level_switch: LevelSwitch | None = None,
        switch_prob: float = 0.0,
    ) -> None:
        if not isinstance(space, SearchSpace):
            raise ValueError(f"space must be a SearchSpace, got {type(space).__name__}")
        if isinstance(population_size, bool) or not isinstance(population_size, int) \
                or population_size < 2:
            raise ValueError(f"population_size must be an integer >= 2, got {population_size!r}")
        if isinstance(crossover_prob, bool) or not isinstance(crossover_prob, (int, float)) \
                or not 0.0 <= crossover_prob <= 1.0:
            raise ValueError(f"crossover_prob must be a number in [0, 1], got {crossover_prob!r}")
        if mutation_prob is not None and (
            isinstance(mutation_prob, bool) or not isinstance(mutation_prob, (int, float))
            or not 0.0 <= mutation_prob <= 1.0
        ):
            raise ValueError(
                f"mutation_prob must be None or a number in [0, 1], got {mutation_prob!r}"
            )
        if isinstance(screen, bool) or not isinstance(screen, int) or screen < 1:
            raise ValueError(f"screen must be an integer >= 1, got {screen!r}")
        if not 0.0 <= switch_prob <= 1.0 or (switch_prob > 0 and level_switch is None):
            raise ValueError(f"switch_prob must be in [0, 1] (and > 0 only with a "
                             f"level_switch), got {switch_prob!r}")
        self._switch, self._switch_prob = level_switch, float(switch_prob)
        super().__init__(seed)
        self._space = space
        self._screen = screen if predictor is not None else 1
        self._predictor = predictor
        self._params: list[str] = space.param_names()
        self._choices: list[tuple] = [space.choices(p) for p in self._params]
        self._population_size = population_size
        self._crossover_prob = float(crossover_prob)
        n_genes = max(len(self._params), 1)
        self._mutation_prob = 1.0 / n_genes if mutation_prob is None else float(mutation_prob)
        self._gene_weights = _normalised_weights(
            [float((gene_weights or {}).get(p.rsplit("/", 1)[0], 1.0)) for p in self._params])

        # DEAP types and toolbox live in this instance: nothing is registered in deap.creator.
        self._individual_cls = type("Individual", (list,), {})
        self._fitness_classes: dict[tuple[float, ...], type] = {}
        self._toolbox = base.Toolbox()
        self._toolbox.register("mate", tools.cxUniform, indpb=0.5)
        self._toolbox.register("mutate", self._mutate)
        self._toolbox.register("select", tools.selNSGA2)

        # Pure functions of a trial's params, memoised (finished trials never change):
        self._indices: dict[tuple, tuple[int | None, ...]] = {}
        self._keys: dict[tuple, str | None] = {}

    def _decode(self, genome: Sequence[int]):
        """Candidate and active gene positions of a genome, exactly as ``space.suggest`` asks."""
        values = {p: c[g] for p, c, g in zip(self._params, self._choices, genome)}
        recorder = _Recorder(values)
        candidate = self._space.suggest(recorder)
        index = {p: i for i, p in enumerate(self._params)}
        return candidate, [index[p] for p in recorder.asked], values

    def _genome_of(self, trial: FrozenTrial) -> list[int]:
        """Indices of a finished trial's params; absent/unknown values get a random index."""
        signature = _signature(trial.params)
        indices = self._indices.get(signature)
        if indices is None:
            indices = self._indices[signature] = tuple(
                choices.index(trial.params[p]) if trial.params.get(p, _MISSING) in choices
                else None
                for p, choices in zip(self._params, self._choices)
            )
        return [random.randrange(len(c)) if i is None else i
                for i, c in zip(indices, self._choices)]

    def _key_of(self, params: dict[str, Any]) -> str | None:
        """Candidate key of a trial's params; None while incomplete (or foreign)."""
        signature = _signature(params)
        if signature not in self._keys:
            try:
                self._keys[signature] = self._space.decode(params).key
            except (ValueError, KeyError):
                return None  # not memoised: a running trial's params still grow
        return self._keys[signature]

    def _mutate(self, genome: list[int], force: bool = False,
                active: Sequence[int] | None = None) -> list[int]:
        """Reset each gene with ``mutation_prob`` to a random other index (global ``random``);
        with a level switch, instead (with ``switch_prob``) one cost-keeping level switch.

        With ``force``, at least one gene of ``active`` (default: any gene) changes.
        """
        if self._switch is not None and random.random() < self._switch_prob:
            switched = self._switched(genome)
            if switched is not None:
                return switched
        pool = list(active) if active else list(range(len(self._choices)))
        changed = False
        for i, choices in enumerate(self._choices):
            if random.random() < min(1.0, self._mutation_prob * self._gene_weights[i]):
                genome[i] = _other_index(genome[i], len(choices))
                changed = changed or i in pool
        if force and not changed and pool:
            i = random.choices(pool, weights=[self._gene_weights[j] for j in pool])[0]
            genome[i] = _other_index(genome[i], len(self._choices[i]))
        return genome

    def _switched(self, genome: list[int]) -> list[int] | None:
        """The genome after one level switch (``level_switch``), or None when it changes
        nothing; genes the child's candidate does not ask for keep their values."""
        assert self._switch is not None
        candidate, _, _ = self._decode(genome)
        child = self._switch(candidate, random)  # the fenced global state: reproducible
        if child is None or child.key == candidate.key:
            return None
        position = {p: i for i, p in enumerate(self._params)}
        for param, value in self._space.params_of(child).items():
            genome[position[param]] = self._choices[position[param]].index(value)
        return genome

    def _fitness_class(self, directions: Sequence[StudyDirection]) -> type:
        weights = tuple(1.0 if d == StudyDirection.MAXIMIZE else -1.0 for d in directions)
        cls = self._fitness_classes.get(weights)
        if cls is None:
            cls = self._fitness_classes[weights] = type(
                "Fitness", (base.Fitness,), {"weights": weights}
            )
        return cls

    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        rng = random.Random(stable_seed(self._seed, trial.number))
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.RUNNING))
        completed = [t for t in trials if t.state == TrialState.COMPLETE]
        predictor = self._predictor if self._screen > 1 else None
        if predictor is not None:
            predictor.refit(completed)
        with isolated_global_random(rng):
            seen = self._seen_keys(trials, trial.number)
            proposals: dict[str, tuple[Any, dict[str, Any]]] = {}
            for batch in (self._screen, 2 * self._screen):  # again when none is admitted
                wanted = len(proposals) + batch
                for _ in range(batch * 2):  # a few spare draws for children already proposed
                    candidate, values = self._child(study, completed, seen | set(proposals))
                    proposals.setdefault(candidate.key, (candidate, values))
                    if len(proposals) == wanted:
                        break
                if not admits_none(list(proposals.values()), predictor):
                    break
        chosen = list(proposals.values())
        if predictor is not None:
            return pick_screened(chosen, predictor, study)
        return chosen[0][1]

    def _child(self, study: Study, completed: list[FrozenTrial], seen: set[str]):
        """One bred child, mutated again while it repeats a candidate in ``seen``."""
        genome = self._breed(study, completed)
        candidate, active, values = self._decode(genome)
        tries = 0
        while candidate.key in seen and tries < _DEDUP_TRIES:
            self._toolbox.mutate(genome, force=True, active=active)
            candidate, active, values = self._decode(genome)
            tries += 1
        return candidate, values

    def _seen_keys(self, trials: list[FrozenTrial], number: int) -> set[str]:
        seen = {self._key_of(t.params) for t in trials if t.number != number}
        seen.update(self._key_of(params) for params in self._in_flight(number).values())
        seen.discard(None)
        return seen

    def _breed(self, study: Study, completed: list[FrozenTrial]) -> list[int]:
        if not self._choices:
            return []
        if len(completed) < self._population_size:
            if completed and random.random() < 0.5:
                parent = self._genome_of(random.choice(completed))
                _, active, _ = self._decode(parent)
                return self._toolbox.mutate(parent, force=True, active=active)
            return [random.randrange(len(c)) for c in self._choices]

        population = self._select(study, completed)
        first = self._individual_cls(self._tournament(population))
        second = self._individual_cls(self._tournament(population))
        if random.random() < self._crossover_prob:
            self._toolbox.mate(first, second)
            if random.random() < 0.5:
                first = second
        return self._toolbox.mutate(list(first))

    def _select(self, study: Study, completed: list[FrozenTrial]) -> list:
        """Constrained NSGA-II survivor selection of ``population_size`` completed trials.

        Feasible trials go through ``selNSGA2``; infeasible ones fill any remaining places by
        smallest total violation (Deb's constrained domination). ``moocore.pareto_rank`` (in C)
        first cuts the feasible set to the whole fronts that ``selNSGA2`` can choose from, so a
        study with thousands of trials costs little more than one with a hundred.
        """
        k = self._population_size
        values = np.nan_to_num(np.asarray([t.values for t in completed], dtype=float),
                               nan=0.0, posinf=_BIG, neginf=-_BIG)
        violation = np.asarray([sum(max(0.0, c) for c in t.constraints.values())
                                for t in completed], dtype=float)
        weights = self._fitness_class(study.directions).weights
        feasible = np.flatnonzero(violation <= 0)
        if len(feasible) > 2 * k:
            ranks = moocore.pareto_rank(-values[feasible] * np.asarray(weights))
            last = int(np.searchsorted(np.cumsum(np.bincount(ranks)), k))
            feasible = feasible[ranks <= last]
        infeasible = np.flatnonzero(violation > 0)
        infeasible = infeasible[np.argsort(violation[infeasible], kind="stable")]
        infeasible = infeasible[: max(0, k - len(feasible))]

        def individual(i: int):
            ind = self._individual_cls(self._genome_of(completed[i]))
            ind.fitness = self._fitness_class(study.directions)(tuple(values[i].tolist()))
            ind.violation, ind.rank = float(violation[i]), 0
            ind.fitness.crowding_dist = 0.0
            return ind

        chosen: list = []
        if len(feasible):
            pool = [individual(i) for i in feasible]
            chosen = self._toolbox.select(pool, min(k, len(pool)))
            for rank, front in enumerate(tools.sortNondominated(chosen, len(chosen))):
                assignCrowdingDist(front)
                for ind in front:
                    ind.rank = rank
        chosen.extend(individual(i) for i in infeasible)
        return chosen

    @staticmethod
    def _tournament(population: list):
        a, b = random.sample(population, 2) if len(population) > 1 else population * 2

        def key(ind):
            return (ind.violation, ind.rank, -ind.fitness.crowding_dist)

        return a if key(a) <= key(b) else b


_MISSING = object()


def _signature(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def _normalised_weights(weights: list[float]) -> list[float]:
    """Per-gene mutation weights with mean 1 (clipped to [0.25, 4] x the mean), so the
    expected number of mutated genes stays that of ``mutation_prob``."""
    if not weights:
        return []
    arr = np.maximum(np.asarray(weights, dtype=float), 0.0)
    mean = arr.mean()
    if mean <= 0:
        return [1.0] * len(weights)
    arr = np.clip(arr / mean, 0.25, 4.0)
    return (arr / arr.mean()).tolist()


def _other_index(current: int, n: int) -> int:
    if n < 2:
        return current
    new = random.randrange(n - 1)
    return new + 1 if new >= current else new
