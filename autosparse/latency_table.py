"""A measured per-layer latency table of one model on one machine, and the lookup the search uses.

``autosparse calibrate --config`` (``calibration/model_table.py``) times the user's own model in
onnxruntime, whole and in context: dense; each channel group leader shrunk alone to several
kept-channel counts; the *whole* model shrunk uniformly at the same kept shares; each layer alone
in int8 and each layer's switch inside an otherwise int8 model; the whole model in int8 (as
export quantizes it) at full width and at each uniform share; unstructured / N:M zeros. A
candidate's latency is then

    total = measured dense
          + sum over groups of the single-group delta(kept channels)       (interpolated)
          + interaction: gamma(keep) * sum over layers of w_l (1 - k_in)(1 - k_out)
          + int8: whole-model entry when every layer is int8, else
                  sum over int8 layers of its kernel change * k_in k_out
                  + sum over int8/fp32 edges of the Q/DQ boundary cost * k_edge

Why the interaction term: a layer's kernel costs ~ c_in * c_out, so pruning its input group and
its output group together saves less than the two single-group deltas add up to; the missing
part is (1 - k_in)(1 - k_out) of the layer's cost. ``w_l`` are the analytic profile's dense
per-layer latencies (only their proportions matter) and ``gamma`` is fitted so that the uniformly
shrunk models measured are predicted exactly. The int8 terms come from two measurements per
layer: alone (kernel + its boundaries to fp32 neighbours) and in an int8 context (kernel minus
them), so kernel = their mean and the boundary cost per edge = half their difference spread over
the layer's edges. Whole-model int8 is its own measured entry because onnxruntime runs it
differently (adds and pools quantized too, most QDQ convs left in float).

Where the table has no entry for a layer's choice (e.g. int16, or a pattern measured on other
layers only), that layer takes the analytic profile's delta for the same single change, and says
so. Pure (no numpy/torch): the search side and the cost report read it like the layer table.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .candidate import CHANNEL, DENSE, FLOAT_BITS, Candidate, LayerChoice
from .cost import estimate_cost
from .hardware import HardwareProfile
from .layers import ChannelGroup, LayerTable
from .structure import channel_groups, leaders, pruned_by_group
from .validation import ConfigError

TABLE_FILE = "latency-table.json"  # written beside the study: runs/<name>/latency-table.json
FORMAT = 2  # 1: single-layer deltas only (no uniform shrinks, no whole-model int8 at them)
TABLE, ANALYTIC = "table", "analytic"
INT8_BITS = 8  # onnxruntime's CPU integer kernels: any weight of <= 8 bits runs on int8


def model_digest(table: LayerTable) -> str:
    """Names, kinds and weight shapes of the layers: a table measured on another model (or
    another discovery of it) must not be read for this one."""
    layers = [[layer.name, layer.kind, list(layer.weight_shape), layer.groups]
              for layer in table.layers]
    return hashlib.sha1(json.dumps(layers).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Point:
    """One measured change: ``x`` (kept channels, kept share, or sparsity) -> latency delta vs
    dense, µs. ``spread`` is the IQR / median of the round medians of the changed model."""

    x: float
    delta_us: float
    spread: float = 0.0


def _pts(points) -> list:
    return [[p.x, p.delta_us, p.spread] for p in points]


def _from_rows(rows) -> tuple[Point, ...]:
    return tuple(sorted((Point(float(x), float(d), float(s)) for x, d, s in rows),
                        key=lambda p: p.x))


@dataclass(frozen=True)
class LayerEntry:
    """What was measured for one layer: changing only this layer (its group, for channels).

    ``channels``: kept channel counts of the group this layer leads (the full count with delta 0
    included). ``int8``: this layer alone in int8 among fp32 layers; ``int8_context``: this
    layer's switch to int8 when every other layer is already int8 (no Q/DQ at its borders then).
    ``patterns``: pattern -> points by sparsity (onnxruntime has no sparse kernels: expect ~0).
    """

    channels: tuple[Point, ...] = ()
    int8: Point | None = None
    int8_context: Point | None = None
    patterns: Mapping[str, tuple[Point, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"channels": _pts(self.channels),
                "int8": None if self.int8 is None else _pts([self.int8])[0],
                "int8_context": None if self.int8_context is None else _pts([self.int8_context])[0],
                "patterns": {k: _pts(v) for k, v in self.patterns.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerEntry":
        def one(row):
            return None if row is None else _from_rows([row])[0]

        return cls(channels=_from_rows(data.get("channels", ())),
                   int8=one(data.get("int8")), int8_context=one(data.get("int8_context")),
                   patterns={k: _from_rows(v) for k, v in data.get("patterns", {}).items()})

    @property
    def int8_kernel_us(self) -> float | None:
        """The layer's own int8 change with its boundaries to fp32 neighbours taken out (the
        mean of the isolated and in-context entries); the isolated entry without a context."""
        if self.int8 is None:
            return None
        if self.int8_context is None:
            return self.int8.delta_us
        return (self.int8.delta_us + self.int8_context.delta_us) / 2

    @property
    def int8_boundary_us(self) -> float:
        """Q/DQ cost of all this layer's edges to other weight layers, when they run fp32."""
        if self.int8 is None or self.int8_context is None:
            return 0.0
        return (self.int8.delta_us - self.int8_context.delta_us) / 2


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency of one model on one machine: the dense total and the parts above.

    ``profile`` names the analytic profile the table was built beside: it supplies the deltas of
    choices the table has no entry for, so a search only reads the table with that profile.
    ``uniform``: kept share -> delta of the whole model shrunk at that share (every leader in
    ``uniform_layers`` at once). ``whole_int8``: kept share (1.0 = full width) -> delta of the
    whole model in int8 (every op the quantizer takes, as export ships it) against fp32 dense.
    """

    model_digest: str
    layers: tuple[str, ...]
    machine: str
    onnxruntime: str
    profile: str
    dense_us: float
    dense_spread: float
    entries: Mapping[str, LayerEntry]
    all_int8_us: float | None = None  # every layer's node in int8 (QDQ per node), if measured
    uniform: tuple[Point, ...] = ()
    uniform_layers: tuple[str, ...] = ()
    whole_int8: tuple[Point, ...] = ()
    settings: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "model_digest": self.model_digest, "layers": list(self.layers),
            "machine": self.machine, "onnxruntime": self.onnxruntime, "profile": self.profile,
            "dense_us": self.dense_us, "dense_spread": self.dense_spread,
            "all_int8_us": self.all_int8_us, "uniform": _pts(self.uniform),
            "uniform_layers": list(self.uniform_layers), "whole_int8": _pts(self.whole_int8),
            "settings": dict(self.settings),
            "entries": {name: entry.to_dict() for name, entry in self.entries.items()},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "LatencyTable":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(
                    f"format {data.get('format')!r}, this autosparse reads format {FORMAT} "
                    "(format 1 had single-layer deltas only): run `autosparse calibrate "
                    "--config CONFIG` again")
            return cls(model_digest=data["model_digest"], layers=tuple(data["layers"]),
                       machine=data["machine"], onnxruntime=data["onnxruntime"],
                       profile=data["profile"], dense_us=float(data["dense_us"]),
                       dense_spread=float(data.get("dense_spread", 0.0)),
                       all_int8_us=data.get("all_int8_us"),
                       uniform=_from_rows(data.get("uniform", ())),
                       uniform_layers=tuple(data.get("uniform_layers", ())),
                       whole_int8=_from_rows(data.get("whole_int8", ())),
                       settings=data.get("settings", {}),
                       entries={k: LayerEntry.from_dict(v) for k, v in data["entries"].items()})
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"latency table {source} is not valid: {err}") from None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())
        return path

    def check_model(self, table: LayerTable) -> None:
        """Refuse a table measured on another model (layer names or weight shapes differ)."""
        digest = model_digest(table)
        if digest != self.model_digest:
            mine, theirs = set(table.names), set(self.layers)
            detail = (f"layers only in the model: {sorted(mine - theirs)}, only in the table: "
                      f"{sorted(theirs - mine)}" if mine != theirs
                      else "same layer names, different kinds or weight shapes")
            raise ConfigError(f"latency table was measured on another model (digest "
                              f"{self.model_digest}, this model {digest}; {detail}): run "
                              "`autosparse calibrate --config CONFIG` again")

    def mismatch(self, table: LayerTable, profile: HardwareProfile | None,
                 machine: str) -> str | None:
        """Why this table must not be used for (model, profile) on ``machine`` (the CPU model,
        ``calibration.machine.this_machine()["cpu"]``), or None."""
        try:
            self.check_model(table)
        except ConfigError as err:
            return str(err)
        if profile is None:
            return "the config names no hardware profile (the table needs one for its gaps)"
        if profile.name != self.profile:
            return (f"it was built beside profile {self.profile!r}, the config uses "
                    f"{profile.name!r}")
        if machine != self.machine:
            return f"it was measured on {self.machine!r}, this machine is {machine!r}"
        return None


def load_latency_table(path: str | Path) -> LatencyTable:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no latency table at {path}: run `autosparse calibrate --config CONFIG`")
    return LatencyTable.from_json(path.read_text(), str(path))


def interpolate(points: tuple[Point, ...], x: float) -> float:
    """Linear between the measured points (sorted by x), exact on them, clamped outside."""
    if not points:
        raise ValueError("no measured points to interpolate")
    if x <= points[0].x:
        return points[0].delta_us
    for low, high in zip(points, points[1:]):
        if x <= high.x:
            if high.x == low.x:
                return high.delta_us
            t = (x - low.x) / (high.x - low.x)
            return low.delta_us + t * (high.delta_us - low.delta_us)
    return points[-1].delta_us


@dataclass(frozen=True)
class TableLatency:
    """A candidate's latency from the table: total, per layer (µs), and each layer's source."""

    total_ms: float
    layer_us: Mapping[str, float]
    source: Mapping[str, str]

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for s in self.source.values() if s == kind) for kind in (TABLE, ANALYTIC)}


# --------------------------------------------------------------------------------------------
# the model's structure as the lookup needs it: which group each layer reads and writes


@dataclass(frozen=True)
class _Shape:
    """Per layer: the group it reads (first one) and writes; edges between weight layers."""

    reads: Mapping[str, ChannelGroup]
    writes: Mapping[str, ChannelGroup]
    edges: tuple[tuple[str, str, ChannelGroup | None], ...]  # None: not a group's edge

    @classmethod
    def of(cls, table: LayerTable) -> "_Shape":
        reads: dict[str, ChannelGroup] = {}
        writes: dict[str, ChannelGroup] = {}
        edges: dict[tuple[str, str], ChannelGroup | None] = {}
        names = set(table.names)
        for group in channel_groups(table):
            for producer in group.producers:
                writes.setdefault(producer, group)
            for consumer, _ in group.consumers:
                reads.setdefault(consumer, group)
                for producer in group.producers:
                    if producer != consumer and {producer, consumer} <= names:
                        edges.setdefault((producer, consumer), group)
        order = table.names  # a layer the groups connect to nothing (a table built by hand):
        linked = {n for pair in edges for n in pair}  # its neighbours in table order
        for i, name in enumerate(order):
            if name not in linked:
                for j in (i - 1, i + 1):
                    if 0 <= j < len(order):
                        u, v = sorted((name, order[j]), key=order.index)
                        edges.setdefault((u, v), writes.get(u))
        return cls(reads, writes, tuple((u, v, g) for (u, v), g in edges.items()))

    def kept(self, table: LayerTable, candidate: Mapping[str, LayerChoice]
             ) -> tuple[dict[str, float], dict[str, tuple[float, float, bool]]]:
        """(group -> kept share, layer -> (kept input share, kept output share, depthwise))."""
        pruned = pruned_by_group(table, candidate)
        share = {g.name: 1 - pruned.get(g.name, 0) / g.channels for g in channel_groups(table)
                 if g.channels}
        out = {}
        for name in table.names:
            read, write = self.reads.get(name), self.writes.get(name)
            k_in = share.get(read.name, 1.0) if read is not None else 1.0
            k_out = share.get(write.name, 1.0) if write is not None else 1.0
            depthwise = read is not None and write is not None and read.name == write.name
            out[name] = (k_in, k_out, depthwise)
        return share, out


def _interaction(weights: Mapping[str, float], kept: Mapping[str, tuple[float, float, bool]]
                 ) -> tuple[float, float]:
    """(sum of w_l (1 - k_in)(1 - k_out), its weighted mean keep sqrt(k_in k_out))."""
    total = keep = 0.0
    for name, (k_in, k_out, depthwise) in kept.items():
        if depthwise:
            continue  # one group on both sides: the cost is linear in it
        p = weights.get(name, 0.0) * (1 - k_in) * (1 - k_out)
        total += p
        keep += p * math.sqrt(k_in * k_out)
    return total, (keep / total if total > 0 else 1.0)


def _pairs(leaders_: Mapping[str, ChannelGroup], share: Mapping[str, float]
           ) -> tuple[float, float, dict[str, float]]:
    """Where no layer reads and writes pruned groups (a transformer's heads and MLP units both
    feed its residual stream), every pair of pruned groups is taken to interact alike:
    (sum over pairs g != h of d_g d_h with d = 1 - kept share, the mean keep weighted by d,
    each leader's d)."""
    d = {name: 1 - share.get(group.name, 1.0) for name, group in leaders_.items()}
    total = sum(d.values())
    pairs = total * total - sum(v * v for v in d.values())
    keep = sum(v * (1 - v) for v in d.values()) / total if total > 0 else 1.0
    return pairs, keep, d


def _compute_share(kept: tuple[float, float, bool]) -> float:
    """The share of a layer's dense kernel work left: k_in k_out (k_out for depthwise)."""
    k_in, k_out, depthwise = kept
    return k_out if depthwise else k_in * k_out


def _mean_share(weights: Mapping[str, float], kept: Mapping[str, tuple[float, float, bool]]
                ) -> float:
    total = sum(weights.values())
    return (sum(w * _compute_share(kept[n]) for n, w in weights.items()) / total
            if total > 0 else 1.0)


def _uniform(lt: LatencyTable, keep: float) -> Candidate:
    return Candidate({name: LayerChoice.make(CHANNEL, 1.0 - keep, FLOAT_BITS)
                      for name in lt.uniform_layers})


class _Lookup:
    """The table against one model and fallback profile: per-layer parts, and the interaction
    and whole-int8 curves fitted on the uniform shrinks with exactly those parts."""

    def __init__(self, lt: LatencyTable, table: LayerTable, fallback: HardwareProfile):
        self.lt, self.table, self.fallback = lt, table, fallback
        self.dense_cost = estimate_cost(table, Candidate({}), fallback)
        self.dense_total_us = self.dense_cost.latency_s * 1e6
        self.scale = lt.dense_us / self.dense_total_us if self.dense_total_us > 0 else 0.0
        self.weights = {layer.name: layer.latency_s for layer in self.dense_cost.layers}
        self.leaders = leaders(table)
        self.shape = _Shape.of(table)
        int8_points = []
        if lt.whole_int8 and lt.whole_int8[-1].x >= 1.0:  # full width: against dense itself
            int8_points.append(Point(1.0, lt.whole_int8[-1].delta_us))
        gamma, pairs = [], []
        whole = {p.x: p.delta_us for p in lt.whole_int8}
        for point in lt.uniform:
            candidate = _uniform(lt, point.x)
            share, kept = self.shape.kept(table, candidate)
            layer_us, _ = self.parts(candidate, kept, whole_int8=False)
            rest = point.delta_us - (sum(layer_us.values()) - sum(map(self.base_us, layer_us)))
            weight, keep = _interaction(self.weights, kept)
            if weight > 0:
                gamma.append(Point(keep, rest / weight))
            pair_weight, pair_keep, _ = _pairs(self.leaders, share)
            if pair_weight > 0:
                pairs.append(Point(pair_keep, rest / pair_weight))
            if point.x in whole:
                int8_points.append(Point(_mean_share(self.weights, kept),
                                         whole[point.x] - point.delta_us))
        # the layers' c_in * c_out term where the model has such layers, else pairs of groups
        self.gamma = tuple(sorted(gamma, key=lambda p: p.x))
        self.pairs = () if self.gamma else tuple(sorted(pairs, key=lambda p: p.x))
        self.whole = tuple(sorted(int8_points, key=lambda p: p.x))

    def base_us(self, name: str) -> float:
        """The layer's share of the measured dense total (the analytic proportions)."""
        return self.weights[name] * 1e6 * self.scale

    def channel_delta(self, name: str, choice: LayerChoice) -> float | None:
        entry = self.lt.entries.get(name)
        group = self.leaders.get(name)
        if entry is None or group is None or len(entry.channels) < 2:
            return None
        return interpolate(entry.channels, group.channels - group.pruned_channels(choice.sparsity))

    def structural_delta(self, name: str, choice: LayerChoice) -> float | None:
        """The layer's channel or sparse-pattern delta from the table, None without an entry."""
        if choice.pattern == DENSE:
            return 0.0
        if choice.pattern == CHANNEL:
            return self.channel_delta(name, choice)
        entry = self.lt.entries.get(name)
        points = entry.patterns.get(choice.pattern) if entry is not None else None
        if not points:
            return None
        return interpolate((Point(0.0, 0.0), *points), choice.sparsity)

    def parts(self, candidate: Candidate, kept: Mapping[str, tuple[float, float, bool]],
              whole_int8: bool) -> tuple[dict[str, float], dict[str, str]]:
        """Per layer: its dense share + its single-change delta (table, else analytic) + its
        int8 kernel change unless the whole model is int8; and where each came from."""
        layer_us, source = {}, {}
        for name in self.table.names:
            choice = candidate.get_choice(name)
            delta = self.structural_delta(name, choice)
            entry = self.lt.entries.get(name)
            int8_ok = choice.bits == FLOAT_BITS or whole_int8 or (
                choice.bits <= INT8_BITS and entry is not None
                and entry.int8_kernel_us is not None)
            if delta is None or not int8_ok:
                source[name] = ANALYTIC
                alone = (LayerChoice.make(choice.pattern, choice.sparsity, FLOAT_BITS)
                         if whole_int8 else choice)  # whole-model int8 is the measured entry's
                delta = analytic_delta_us(self.table, Candidate({name: alone}), name,
                                          self.fallback, self.dense_total_us)
            else:
                source[name] = TABLE
                if choice.bits <= INT8_BITS and not whole_int8:
                    delta += entry.int8_kernel_us * _compute_share(kept[name])
            layer_us[name] = self.base_us(name) + delta
        return layer_us, source


def analytic_delta_us(table: LayerTable, candidate: Candidate, name: str,
                      profile: HardwareProfile, dense_us: float | None = None) -> float:
    """The analytic profile's delta for the same single change the table measures: only this
    layer's choice applied (with its group's effect on consumers), against the dense model."""
    if dense_us is None:
        dense_us = estimate_cost(table, Candidate({}), profile).latency_s * 1e6
    alone = Candidate({name: candidate.get_choice(name)})
    return estimate_cost(table, alone, profile).latency_s * 1e6 - dense_us


def table_latency(lt: LatencyTable, table: LayerTable, candidate: Candidate,
                  fallback: HardwareProfile) -> TableLatency:
    """Latency of ``candidate`` from the table (module docstring), the ``fallback`` profile's
    single-change delta for a layer whose choice has no entry. Raises ConfigError when the
    table was measured on another model.

    Per-layer figures split the measured dense total in the proportions the analytic profile
    gives the dense layers, plus each layer's own terms (its group's delta on its leader, its
    interaction, its int8 kernel, half of each cut edge): they sum, with the fixed share, to
    the total.
    """
    lt.check_model(table)
    look = _Lookup(lt, table, fallback)
    weights = look.weights
    share, kept = look.shape.kept(table, candidate)
    low = {name for name in table.names if candidate.get_choice(name).bits <= INT8_BITS}
    whole_int8 = bool(look.whole) and low == set(table.names)
    layer_us, source = look.parts(candidate, kept, whole_int8)

    # interaction of pruned input and output groups, fitted on the uniform shrinks
    weight, keep = _interaction(weights, kept)
    if weight > 0 and look.gamma:
        gamma = interpolate(look.gamma, keep)
        for name, (k_in, k_out, depthwise) in kept.items():
            if not depthwise:
                layer_us[name] += gamma * weights[name] * (1 - k_in) * (1 - k_out)
    pair_weight, pair_keep, pruned = _pairs(look.leaders, share)
    if pair_weight > 0 and look.pairs:
        extra = interpolate(look.pairs, pair_keep) * pair_weight
        total_pruned = sum(pruned.values())
        for name, d in pruned.items():
            layer_us[name] += extra * d / total_pruned
    if whole_int8:  # its own measured entry, spread over the layers by their kernel work
        delta = interpolate(look.whole, _mean_share(weights, kept))
        work = {n: weights[n] * _compute_share(kept[n]) for n in table.names}
        total_work = sum(work.values()) or 1.0
        for name in table.names:
            layer_us[name] += delta * work[name] / total_work
    elif low:  # Q/DQ on every edge between an int8 and an fp32 layer
        per_edge = {}
        for name in table.names:
            entry = lt.entries.get(name)
            count = sum(1 for u, v, _ in look.shape.edges if name in (u, v))
            if entry is not None and entry.int8_context is not None and count:
                per_edge[name] = entry.int8_boundary_us / count
        for u, v, group in look.shape.edges:
            if (u in low) == (v in low) or source[u if u in low else v] == ANALYTIC:
                continue  # an analytic int8 layer's own single-change delta has its borders
            estimates = [per_edge[n] for n in (u, v) if n in per_edge]
            if estimates:
                kept_share = share.get(group.name, 1.0) if group is not None else 1.0
                cost = sum(estimates) / len(estimates) * kept_share
                layer_us[u] += cost / 2
                layer_us[v] += cost / 2
    dense_cost = look.dense_cost
    shared_us = (dense_cost.fixed_s + dense_cost.ops_s) * 1e6 * look.scale  # ops between layers
    total_us = sum(layer_us.values()) + shared_us
    return TableLatency(total_us / 1e3, layer_us, source)


def find_latency_table(folder: str | Path, table: LayerTable, profile: HardwareProfile | None,
                       machine: str) -> tuple[LatencyTable | None, str | None]:
    """The table in ``folder`` if it fits this model, profile and machine, and a line saying
    whether it is used and why (None when there is no table at all)."""
    path = Path(folder) / TABLE_FILE
    if not path.is_file():
        return None, None
    try:
        lt = load_latency_table(path)
    except ConfigError as err:
        return None, f"latency table not used: {err}"
    why = lt.mismatch(table, profile, machine)
    if why is not None:
        return None, f"latency table {path} not used: {why}"
    return lt, (f"latency from the measured table {path} ({len(lt.entries)} layers, dense "
                f"{lt.dense_us:.1f} µs on {lt.machine}); {lt.profile} where it has no entry")
