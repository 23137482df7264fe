"""The allocation problem: per decision, its options, what each costs and what it loses.

A budgeted allocation is one option per decision. The additive view (total cost = fixed + sum of
the chosen options' costs; predicted loss = sum of their sensitivities) is what makes it a
multiple-choice knapsack that an exact MILP solves in milliseconds. Size, MACs and BOPs are
exactly additive (the footprint is a per-layer sum); latency and energy are not quite (a
precision switch between layers, the memory level that holds all weights, the conversion back to
float at the output depend on neighbours), so their per-option costs are measured one decision at
a time with every other layer dense fp32, and :func:`additive_error` says how far off that is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from autosparse.compress.footprint import layer_footprint
from autosparse.config.hardware import HardwareProfile
from autosparse.config.objectives import OBJECTIVES, QUALITY_OBJECTIVES, metric_of
from autosparse.cost.estimate import estimate_cost
from autosparse.search.allocation.table import SensitivityTable, choice_id
from autosparse.space.candidate import DENSE, DENSE_FP32, Candidate, LayerChoice
from autosparse.space.layers import LayerTable
from autosparse.space.search_space import SearchSpace

Allocation = tuple[int, ...]  # option index per decision, in problem.decisions order

FOOTPRINT_OBJECTIVES = ("size", "macs", "bops")  # exactly additive
HARDWARE_OBJECTIVES = ("latency", "energy")  # additive up to neighbour effects; need a profile
# one-shot: from the level database (stored types; "density", the kept share of the searched
# weights, is internal: it budgets a constraint 'sparsity >= s' as density <= 1 - s)
STORED_OBJECTIVES = ("bits", "density")
COST_OBJECTIVES = FOOTPRINT_OBJECTIVES + HARDWARE_OBJECTIVES + STORED_OBJECTIVES
# constraint metric -> cost objective, for the metrics that are sums over layers
ADDITIVE_METRICS = {metric_of(name): name for name in COST_OBJECTIVES if name in OBJECTIVES}


@dataclass(frozen=True)
class StoredSizes:
    """What a one-shot search stores, exactly: ``weight_bytes(layer, choice)`` is the bytes of
    the layer's weight at that choice's level in its GGUF type (block scales included), and every
    other parameter is stored F32. With it, ``size`` (kB) and ``bits`` (per searched weight) are
    the file's own sums rather than the footprint's prediction."""

    weight_bytes: Callable[[str, LayerChoice], int]
    weight_numel: Mapping[str, int]  # searched layer -> weight elements
    dense_bytes: int  # every parameter at F32

    def option_cost(self, objective: str, layers: Sequence[str], choice: LayerChoice) -> float:
        if objective == "density":  # kept share of all searched weights
            kept = sum((1.0 - choice.sparsity if choice.pattern != DENSE else 1.0)
                       * self.weight_numel[name] for name in layers)
            return kept / sum(self.weight_numel.values())
        stored = sum(self.weight_bytes(name, choice) for name in layers)
        if objective == "size":
            return stored / 1000
        return 8.0 * stored / sum(self.weight_numel.values())  # bits

    def fixed_and_dense(self, objective: str) -> tuple[float, float]:
        if objective == "size":
            searched = 4 * sum(self.weight_numel.values())
            return (self.dense_bytes - searched) / 1000, self.dense_bytes / 1000
        return 0.0, (1.0 if objective == "density" else 32.0)  # bits: F32 everywhere


@dataclass(frozen=True)
class AllocationProblem:
    """Everything the solver needs, as plain numbers indexed ``[decision][option]``.

    ``options[d]`` are the decision's distinct canonical choices, sorted (dense fp32 among them
    when the decision allows it); ``loss`` is the sensitivity table's ``loss_delta`` (nats) and
    ``accuracy_delta`` its accuracy change (points, negative = worse), both 0 for dense fp32;
    ``costs[objective][d][o]`` is the option's additive cost in the objective's unit (size kB,
    MACs, BOPs, latency ms, energy µJ), ``fixed[objective]`` the cost outside the decisions and
    ``dense[objective]`` the dense fp32 model's total.
    """

    decisions: tuple[str, ...]
    layers: tuple[tuple[str, ...], ...]
    options: tuple[tuple[LayerChoice, ...], ...]
    loss: tuple[tuple[float, ...], ...]
    accuracy_delta: tuple[tuple[float, ...], ...]
    costs: Mapping[str, tuple[tuple[float, ...], ...]]
    fixed: Mapping[str, float]
    dense: Mapping[str, float]

    def __post_init__(self) -> None:
        shape = [len(o) for o in self.options]
        for name, table in [("loss", self.loss), ("accuracy_delta", self.accuracy_delta),
                            *self.costs.items()]:
            if [len(row) for row in table] != shape:
                raise ValueError(f"{name} must have one value per option of each decision "
                                 f"(shape {shape})")
        missing = set(self.costs) - set(self.fixed) | set(self.costs) - set(self.dense)
        if missing:
            raise ValueError(f"objectives {sorted(missing)} lack a fixed or dense total")

    @property
    def objectives(self) -> tuple[str, ...]:
        return tuple(self.costs)

    def total(self, objective: str, allocation: Sequence[int]) -> float:
        """Additive total cost of an allocation (fixed part included)."""
        table = self.costs_of(objective)
        self.check(allocation)
        return self.fixed[objective] + sum(table[d][o] for d, o in enumerate(allocation))

    def candidate(self, allocation: Sequence[int]) -> Candidate:
        """The candidate (every searched layer listed, as ``space.decode`` gives it)."""
        self.check(allocation)
        return Candidate({layer: self.options[d][o]
                          for d, o in enumerate(allocation) for layer in self.layers[d]})

    def allocation_of(self, candidate: Candidate) -> Allocation:
        """Option index per decision of a candidate of the space (its first layer decides)."""
        out = []
        for d, name in enumerate(self.decisions):
            choice = candidate.get_choice(self.layers[d][0])
            try:
                out.append(self.options[d].index(choice))
            except ValueError:
                raise ValueError(f"decision {name!r}: {choice.describe()} is not one of its "
                                 f"options") from None
        return tuple(out)

    def dense_allocation(self) -> Allocation | None:
        """Dense fp32 everywhere, when every decision allows it."""
        try:
            return tuple(opts.index(DENSE_FP32) for opts in self.options)
        except ValueError:
            return None

    def costs_of(self, objective: str) -> tuple[tuple[float, ...], ...]:
        if objective not in self.costs:
            raise ValueError(f"objective {objective!r} has no costs in this problem "
                             f"(it has: {', '.join(self.costs) or 'none'})")
        return self.costs[objective]

    def check(self, allocation: Sequence[int]) -> None:
        if len(allocation) != len(self.options) or any(
                not 0 <= o < len(opts) for o, opts in zip(allocation, self.options)):
            raise ValueError(f"allocation {tuple(allocation)} does not pick one option index per "
                             f"decision (options per decision: {[len(o) for o in self.options]})")


def cost_objectives(objectives: Iterable[str], constraint_metrics: Iterable[str] = ()) -> list[str]:
    """The additive cost objectives a search needs costs for: its cost objectives, then the
    objectives behind its constraints on additive metrics (``size_kb`` -> ``size``)."""
    out = [o for o in objectives if o not in QUALITY_OBJECTIVES]
    out += [ADDITIVE_METRICS[m] for m in constraint_metrics if m in ADDITIVE_METRICS]
    out += ["density" for m in constraint_metrics if m == "sparsity"]
    unknown = [o for o in out if o not in COST_OBJECTIVES]
    if unknown:
        raise ValueError(f"objectives {unknown} are not additive cost objectives "
                         f"({', '.join(COST_OBJECTIVES)})")
    return list(dict.fromkeys(out))


def build_problem(space: SearchSpace, table: LayerTable, sensitivity: SensitivityTable,
                  objectives: Iterable[str], profile: HardwareProfile | None = None,
                  stored: StoredSizes | None = None) -> AllocationProblem:
    """The problem for ``space``; ``objectives`` may list accuracy (ignored) and cost objectives.
    With ``stored`` (one-shot), ``size`` and ``bits`` are the stored file's exact sums.

    Raises ValueError naming the first (decision, choice) the sensitivity table lacks.
    """
    wanted = cost_objectives(objectives)
    hardware = [o for o in wanted if o in HARDWARE_OBJECTIVES]
    if hardware and profile is None:
        raise ValueError(f"objectives {hardware} need a hardware profile")
    options = tuple(tuple(sorted(d.distinct_choices())) for d in space.decisions)
    loss, accuracy = [], []
    for d, opts in zip(space.decisions, options):
        row_loss, row_acc = [], []
        for choice in opts:
            if choice == DENSE_FP32:
                row_loss.append(0.0)
                row_acc.append(0.0)
                continue
            entry = sensitivity.get(d.name, choice)
            if entry is None:
                raise ValueError(f"sensitivity table has no entry for decision {d.name!r}, "
                                 f"choice {choice_id(choice)} ({choice.describe()})")
            row_loss.append(float(entry.loss_delta))
            row_acc.append(float(entry.accuracy_delta))
        loss.append(tuple(row_loss))
        accuracy.append(tuple(row_acc))

    costs: dict[str, tuple[tuple[float, ...], ...]] = {}
    fixed: dict[str, float] = {}
    dense: dict[str, float] = {}
    stored_wanted = [o for o in wanted if o in STORED_OBJECTIVES
                     or (stored is not None and o == "size")]
    if stored_wanted and stored is None:
        raise ValueError(f"objectives {stored_wanted} need the one-shot level database's sizes")
    for objective in stored_wanted:
        assert stored is not None
        costs[objective] = tuple(tuple(stored.option_cost(objective, d.layers, choice)
                                       for choice in opts)
                                 for d, opts in zip(space.decisions, options))
        fixed[objective], dense[objective] = stored.fixed_and_dense(objective)
    footprint_wanted = [o for o in wanted if o in FOOTPRINT_OBJECTIVES and o not in stored_wanted]
    if footprint_wanted:
        c, f, t = _footprint_costs(space, table, options, footprint_wanted)
        costs.update(c), fixed.update(f), dense.update(t)
    if hardware:
        c, f, t = _hardware_costs(space, table, options, hardware, profile)  # type: ignore[arg-type]
        costs.update(c), fixed.update(f), dense.update(t)
    return AllocationProblem(
        decisions=tuple(d.name for d in space.decisions),
        layers=tuple(d.layers for d in space.decisions),
        options=options,
        loss=tuple(loss),
        accuracy_delta=tuple(accuracy),
        costs={o: costs[o] for o in wanted},
        fixed={o: fixed[o] for o in wanted},
        dense={o: dense[o] for o in wanted},
    )


def _footprint_value(objective: str, fp) -> float:
    if objective == "size":
        return fp.total_bits / 8000
    return float(fp.macs if objective == "macs" else fp.bops)


def _footprint_costs(space, table, options, wanted):
    costs = {}
    dense_layers = {layer.name: layer_footprint(layer, DENSE_FP32) for layer in table.layers}
    for objective in wanted:
        costs[objective] = tuple(
            tuple(sum(_footprint_value(objective, layer_footprint(table[name], choice))
                      for name in d.layers) for choice in opts)
            for d, opts in zip(space.decisions, options))
    dense, fixed = {}, {}
    searched = set(space.layer_names)
    for objective in wanted:
        layer_sum = sum(_footprint_value(objective, fp) for fp in dense_layers.values())
        other = table.other_params * 32 / 8000 if objective == "size" else 0.0
        dense[objective] = layer_sum + other
        fixed[objective] = other + sum(_footprint_value(objective, fp)
                                       for name, fp in dense_layers.items() if name not in searched)
    return costs, fixed, dense


def _hardware_value(objective: str, layer_cost) -> float:
    return layer_cost.latency_s * 1e3 if objective == "latency" else layer_cost.energy_j * 1e6


def _hardware_costs(space, table, options, wanted, profile):
    """Per option: the decision's own layers' cost with only that decision compressed."""
    base = estimate_cost(table, Candidate({}), profile)
    base_layers = {c.name: c for c in base.layers}
    costs: dict[str, list] = {o: [] for o in wanted}
    for d, opts in zip(space.decisions, options):
        rows: dict[str, list[float]] = {o: [] for o in wanted}
        for choice in opts:
            cost = estimate_cost(table, Candidate({n: choice for n in d.layers}), profile)
            mine = [c for c in cost.layers if c.name in d.layers]
            for o in wanted:
                rows[o].append(sum(_hardware_value(o, c) for c in mine))
        for o in wanted:
            costs[o].append(tuple(rows[o]))
    dense = {"latency": base.latency_ms, "energy": base.energy_uj}
    fixed = {o: dense[o] - sum(_hardware_value(o, base_layers[n]) for n in space.layer_names)
             for o in wanted}
    return ({o: tuple(v) for o, v in costs.items()}, fixed, {o: dense[o] for o in wanted})


def additive_error(problem: AllocationProblem, table: LayerTable, profile: HardwareProfile,
                   candidates: Iterable[Candidate]) -> dict[str, list[float]]:
    """Relative error (additive total / cost model - 1) per hardware objective, per candidate."""
    out: dict[str, list[float]] = {o: [] for o in problem.objectives if o in HARDWARE_OBJECTIVES}
    for candidate in candidates:
        allocation = problem.allocation_of(candidate)
        truth = estimate_cost(table, candidate, profile).metrics()
        for o in out:
            out[o].append(problem.total(o, allocation) / truth[OBJECTIVES[o].metric] - 1.0)
    return out
