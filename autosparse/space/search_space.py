"""The search space: config rules + layer table -> decisions -> Optuna params <-> candidates.

One *decision* is one (pattern, sparsity, bits, criterion) choice; it covers one layer, or several
when a rule ties them. Params are categorical and named ``<decision>/<field>``; ``sparsity`` is
asked only for patterns that take an amount (an N:M pattern fixes its own), so the space holds no
dead dimensions. Fields with a single allowed value are not params at all.
"""

from __future__ import annotations

import difflib
import itertools
import math
import random
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Protocol

from autosparse.config.schema import ConfigError
from autosparse.config.space_rules import DEFAULT_CHOICES, ChoiceSet, SpaceConfig
from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    UNSTRUCTURED,
    Candidate,
    LayerChoice,
)
from autosparse.space.layers import NM_KINDS, LayerInfo, LayerTable
from autosparse.space.structure import channel_blocker

FIELDS = ("pattern", "sparsity", "bits", "criterion")
GRID_PARAM = "grid/point"


class SuggestsCategorical(Protocol):
    """The part of ``optuna.trial.Trial`` the space uses (keeps this module free of optuna)."""

    def suggest_categorical(self, name: str, choices: Any) -> Any: ...


def takes_amount(pattern: str) -> bool:
    """Patterns whose sparsity is a free amount (N:M and dense fix theirs)."""
    return pattern in (UNSTRUCTURED, CHANNEL)


@dataclass(frozen=True)
class Decision:
    """One searched choice shared by ``layers``; each tuple lists the allowed values in order."""

    name: str
    layers: tuple[str, ...]
    patterns: tuple[str, ...]
    sparsities: tuple[float, ...]
    bits: tuple[int, ...]
    criteria: tuple[str, ...]

    def param(self, field: str) -> str:
        return f"{self.name}/{field}"

    def choices(self, field: str) -> tuple:
        return {
            "pattern": self.patterns,
            "sparsity": self.sparsities,
            "bits": self.bits,
            "criterion": self.criteria,
        }[field]

    def searched_fields(self) -> list[str]:
        return [f for f in FIELDS if len(self.choices(f)) > 1]

    def distinct_choices(self) -> set[LayerChoice]:
        out = set()
        for pattern, bits, criterion in itertools.product(self.patterns, self.bits, self.criteria):
            amounts = self.sparsities if takes_amount(pattern) else (0.0,)
            for sparsity in amounts:
                out.add(LayerChoice.make(pattern, sparsity, bits, criterion))
        return out

    def snap(self, choice: LayerChoice) -> LayerChoice:
        """The allowed choice nearest to ``choice`` (same pattern when allowed)."""
        pattern = choice.pattern
        if pattern not in self.patterns:
            if choice.pattern == DENSE and choice.sparsity == 0 and 0.0 in self.sparsities:
                pattern = next((p for p in self.patterns if takes_amount(p)), self.patterns[0])
            else:
                pattern = UNSTRUCTURED if UNSTRUCTURED in self.patterns else self.patterns[0]
        sparsity = min(self.sparsities, key=lambda s: (abs(s - choice.sparsity), s))
        bits = min(self.bits, key=lambda b: (abs(b - choice.bits), -b))
        criterion = choice.criterion if choice.criterion in self.criteria else self.criteria[0]
        return LayerChoice.make(pattern, sparsity, bits, criterion)

    def params_of(self, choice: LayerChoice) -> dict[str, Any]:
        """Optuna params that decode to ``choice`` (which must be allowed, e.g. snapped)."""
        params: dict[str, Any] = {}
        pattern = choice.pattern
        if pattern == DENSE:
            pattern = next(
                (p for p in self.patterns if p == DENSE or (takes_amount(p) and 0.0 in self.sparsities)),
                None,
            )
            if pattern is None:
                raise ValueError(f"{self.name}: dense is not in the space")
        values = {"pattern": pattern, "sparsity": choice.sparsity, "bits": choice.bits,
                  "criterion": choice.criterion}
        for field in self.searched_fields():
            if field == "sparsity" and not takes_amount(pattern):
                continue
            if values[field] not in self.choices(field):
                raise ValueError(f"{self.name}: {field}={values[field]!r} is not in the space")
            params[self.param(field)] = values[field]
        return params

    def decode(self, params: Mapping[str, Any]) -> LayerChoice:
        def value(field: str):
            options = self.choices(field)
            return params[self.param(field)] if len(options) > 1 else options[0]

        pattern = value("pattern")
        sparsity = value("sparsity") if takes_amount(pattern) else 0.0
        return LayerChoice.make(pattern, sparsity, value("bits"), value("criterion"))


def _group_sparsity(decision: "Decision", allocation: Mapping[str, float]) -> float:
    values = [allocation.get(name, 0.0) for name in decision.layers]
    return min(0.99, sum(values) / len(values)) if len(values) > 1 else min(0.99, values[0])


@dataclass(frozen=True)
class GridSpace:
    """A fixed list of candidates searched by index, for grids whose points are not in the
    categorical space (grid-global's exact per-layer sparsities): one param, ``grid/point``."""

    points: tuple[Candidate, ...]

    def suggest(self, trial: SuggestsCategorical) -> Candidate:
        return self.points[trial.suggest_categorical(GRID_PARAM, tuple(range(len(self.points))))]

    def decode(self, params: Mapping[str, Any]) -> Candidate:
        try:
            return self.points[params[GRID_PARAM]]
        except KeyError:
            raise ValueError(f"params miss {GRID_PARAM!r}") from None

    def params_of(self, candidate: Candidate) -> dict[str, Any]:
        return {GRID_PARAM: self.points.index(candidate)}

    def size(self) -> int:
        return len(self.points)


def _check_patterns_match(config: SpaceConfig, names: list[str]) -> None:
    """A layer name or regex in include/exclude/rules that matches no layer is a typo, not a
    no-op: the search would silently run without it."""
    places = [("space.include", config.include or []), ("space.exclude", config.exclude)]
    places += [(f"space.rules[{i}].layers", rule.layers) for i, rule in enumerate(config.rules)]
    for where, patterns in places:
        for pattern in patterns:
            if not any(_matches([pattern], name) for name in names):
                close = difflib.get_close_matches(pattern, names, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ConfigError(f"{where}: {pattern!r} matches no layer{hint} (layers: "
                                  f"{', '.join(names)})")


def _why_not(layer: LayerInfo) -> str:
    if layer.kind not in NM_KINDS:
        return f"{layer.kind} weights are not stored (out, in)"
    return f"reduction length {layer.row_length}"


def _matches(patterns: Iterable[str], name: str) -> bool:
    return any(p == name or re.fullmatch(p, name) for p in patterns)


def _merge(rule: ChoiceSet, default: ChoiceSet) -> ChoiceSet:
    return ChoiceSet(
        sparsity=rule.sparsity if rule.sparsity is not None else default.sparsity,
        patterns=rule.patterns if rule.patterns is not None else default.patterns,
        bits=rule.bits if rule.bits is not None else default.bits,
        criterion=rule.criterion if rule.criterion is not None else default.criterion,
    )


@dataclass(frozen=True)
class SearchSpace:
    decisions: tuple[Decision, ...]
    excluded: tuple[str, ...]
    notes: tuple[str, ...] = ()  # patterns dropped for layers that cannot take them

    @classmethod
    def build(cls, config: SpaceConfig, table: LayerTable) -> "SearchSpace":
        """Apply include/exclude and the first matching rule to every discovered layer."""
        _check_patterns_match(config, table.names)
        searched, excluded = [], []
        for name in table.names:
            included = config.include is None or _matches(config.include, name)
            (searched if included and not _matches(config.exclude, name) else excluded).append(name)
        if not searched:
            raise ConfigError(
                f"space: no layer left to search (discovered: {', '.join(table.names)})"
            )
        default = _merge(config.default, DEFAULT_CHOICES)
        groups: dict[str, tuple[list[str], ChoiceSet]] = {}
        for name in searched:
            index, rule = next(
                ((i, r) for i, r in enumerate(config.rules) if _matches(r.layers, name)),
                (None, None),
            )
            choices = default if rule is None else _merge(rule, default)
            key = name if rule is None or not rule.tie else (rule.name or f"tied{index}")
            groups.setdefault(key, ([], choices))[0].append(name)

        decisions, notes = [], []
        for key, (names, choices) in groups.items():
            patterns = []
            for pattern in choices.patterns:
                if pattern == CHANNEL:
                    blocked = {n: channel_blocker(table, n, searched) for n in names}
                    unable = [n for n, why in blocked.items() if why is not None]
                    notes.extend(f"channel not offered for {n}: {blocked[n]}" for n in unable)
                else:
                    unable = [n for n in names if not table[n].supports(pattern)]
                    if unable:
                        notes.append(f"{pattern} not possible for {', '.join(unable)} "
                                     f"({_why_not(table[unable[0]])})")
                if not unable:
                    patterns.append(pattern)
            if not patterns:
                raise ConfigError(
                    f"space: no allowed pattern fits layer(s) {', '.join(names)}: "
                    f"{'; '.join(notes[-len(choices.patterns):])}"
                )
            decisions.append(
                Decision(
                    name=key,
                    layers=tuple(names),
                    patterns=tuple(dict.fromkeys(patterns)),
                    sparsities=tuple(sorted(set(choices.sparsity_values() or [0.0]))),
                    bits=tuple(sorted(set(choices.bits))),
                    criteria=tuple(dict.fromkeys(choices.criterion)),
                )
            )
        return cls(tuple(decisions), tuple(excluded), tuple(notes))

    @property
    def layer_names(self) -> list[str]:
        return [name for d in self.decisions for name in d.layers]

    def param_names(self) -> list[str]:
        return [d.param(f) for d in self.decisions for f in d.searched_fields()]

    def choices(self, param: str) -> tuple:
        name, field = param.rsplit("/", 1)
        return next(d for d in self.decisions if d.name == name).choices(field)

    def size(self) -> int:
        """Number of distinct candidates (canonical, so duplicates are counted once)."""
        return math.prod(len(d.distinct_choices()) for d in self.decisions)

    def suggest(self, trial: SuggestsCategorical) -> Candidate:
        """Define-by-run sampling of one candidate through an Optuna trial."""
        params: dict[str, Any] = {}
        for d in self.decisions:
            for field in d.searched_fields():
                if field == "sparsity":
                    pattern = params.get(d.param("pattern"), d.patterns[0])
                    if not takes_amount(pattern):
                        continue
                params[d.param(field)] = trial.suggest_categorical(d.param(field), d.choices(field))
        return self.decode(params)

    def decode(self, params: Mapping[str, Any]) -> Candidate:
        try:
            choices = {}
            for d in self.decisions:
                choice = d.decode(params)
                choices.update({name: choice for name in d.layers})
        except KeyError as err:
            raise ValueError(f"params miss {err.args[0]!r}") from None
        return Candidate(choices)

    def params_of(self, candidate: Candidate) -> dict[str, Any]:
        """Params for ``study.enqueue_trial``; the candidate's choices must be in the space."""
        params: dict[str, Any] = {}
        for d in self.decisions:
            params.update(d.params_of(candidate.get_choice(d.layers[0])))
        return params

    def snap(self, per_layer: Mapping[str, LayerChoice]) -> Candidate:
        """Nearest candidate in the space; a tied group takes its first member's wish."""
        choices = {}
        for d in self.decisions:
            wish = per_layer.get(d.layers[0], LayerChoice.make(DENSE, 0.0, 32))
            choice = d.snap(wish)
            choices.update({name: choice for name in d.layers})
        return Candidate(choices)

    def uniform_candidates(self, skip_patterns: Iterable[str] = ()) -> list[Candidate]:
        """Same pattern, sparsity and bits on every layer (snapped per decision): the by-hand grid."""
        grid = set()
        for d in self.decisions:
            grid |= {(c.pattern, c.sparsity, c.bits) for c in d.distinct_choices()
                     if c.pattern not in skip_patterns}
        out = {}
        for pattern, sparsity, bits in sorted(grid):
            wish = LayerChoice.make(pattern, sparsity, bits)
            candidate = self.snap({name: wish for name in self.layer_names})
            out.setdefault(candidate.key, candidate)
        return list(out.values())

    def global_grid_candidates(self, allocations: Mapping[float, Mapping[str, float]]) -> list[Candidate]:
        """The by-hand recipe: one global magnitude threshold x one uniform bit-width.

        ``allocations`` maps each global sparsity (the space's own list) to the exact per-layer
        sparsity one threshold over all searched layers gives (``global_magnitude_allocation``
        with ``digits=None``), so the zeros are exactly those of ``prune.global_unstructured``.
        Every other allowed pattern (channel, N:M, dense) is applied uniformly, as in
        :meth:`uniform_candidates`. A decision that cannot take unstructured is snapped; a tied
        group (one choice for several layers) takes the mean of its layers' sparsities.
        """
        out = {c.key: c for c in self.uniform_candidates(skip_patterns=(UNSTRUCTURED,))}
        bits_options = sorted({b for d in self.decisions for b in d.bits})
        for target, allocation in sorted(allocations.items()):
            for bits in bits_options:
                choices = {}
                for d in self.decisions:
                    wish = LayerChoice.make(UNSTRUCTURED, _group_sparsity(d, allocation), bits)
                    snapped = d.snap(wish)
                    if UNSTRUCTURED in d.patterns and snapped.bits == bits and wish.pattern != DENSE:
                        snapped = wish  # exact, off the space's sparsity list on purpose
                    choices.update({name: snapped for name in d.layers})
                candidate = Candidate(choices)
                out.setdefault(candidate.key, candidate)
        return list(out.values())

    def global_magnitude_candidates(self, table: LayerTable) -> list[Candidate]:
        """Per-layer sparsity from one global magnitude threshold, at each allowed bit-width."""
        out = {}
        bits_options = sorted({b for d in self.decisions for b in d.bits})
        for target, allocation in sorted(table.global_magnitude.items()):
            for bits in bits_options:
                wish = {
                    name: LayerChoice.make(UNSTRUCTURED, min(allocation.get(name, target), 0.99), bits)
                    for name in self.layer_names
                }
                candidate = self.snap(wish)
                out.setdefault(candidate.key, candidate)
        return list(out.values())

    def warm_start_candidates(self, table: LayerTable, count: int, seed: int) -> list[Candidate]:
        """Strong hand-made starting points: global-magnitude and uniform allocations, spread out.

        Measured (DESIGN.md): a uniform grid beats plain per-layer search at small budgets, so the
        GA's first generation and BO's startup trials begin from these.
        """
        rng = random.Random(seed)
        pools = [self.global_magnitude_candidates(table), self.uniform_candidates()]
        for pool in pools:
            rng.shuffle(pool)
        picked: dict[str, Candidate] = {}
        for candidate in itertools.chain.from_iterable(itertools.zip_longest(*pools)):
            if candidate is not None and len(picked) < count:
                picked.setdefault(candidate.key, candidate)
        return list(picked.values())
