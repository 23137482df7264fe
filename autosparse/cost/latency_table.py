"""A measured per-layer latency table of one model on one machine, and the lookup the search uses.

``autosparse calibrate --config`` (``calibration/model_table.py``) times the user's own model in
onnxruntime, whole and in context: dense; each channel group leader shrunk alone to several
kept-channel counts; the *whole* model shrunk uniformly at the same kept shares; the whole
model in int8 (as export quantizes it) at full width and at each uniform share; unstructured /
N:M zeros.

The table scores the file export ships (the deploy rule of ``measured_latency.
deployable_format``): a candidate whose every layer has <= 8 bits ships as ``model.int8.onnx``
(whole-model QDQ), any other as the fp32 ``model.onnx`` (its low bits live only in
``model.packed``). So a candidate's latency is

    total = measured dense
          + sum over groups of the single-group delta(kept channels)       (interpolated)
          + pairs: sum over measured pairs (a, b) of I_ab (1 - k_a)(1 - k_b)
                                                    / ((1 - k_a0)(1 - k_b0))
          + residual: gamma(keep) * sum over layers of w_l (1 - k_in)(1 - k_out)
          + every layer int8: the whole-model int8 entry at the mean kept share
            (some layers int8, others not: nothing, it ships as fp32)

Why the interaction term: a layer's kernel costs ~ c_in * c_out, so pruning its input group and
its output group together saves less than the two single-group deltas add up to; the missing
part is (1 - k_in)(1 - k_out) of the layer's cost. Where layers read one group and write another
(a ResNet block's conv1 / conv2 between the stage group and the block's inner group, a
downsample conv between two stages) that part is measured per pair, nn-Meter style: the model
with both groups shrunk to one kept level (k_a0, k_b0: the 25 % level, where the interaction is
largest against the timing noise) gives I_ab = d_ab - d_a - d_b, scaled bilinearly to the
candidate's shares (clamped, as the single deltas are, at the narrowest width measured). The
rest, ``gamma``, is fitted after the pair terms so that the uniformly shrunk models measured
are predicted exactly; ``w_l`` are the analytic profile's dense per-layer latencies (only their
proportions matter). Why measured pairs: on an overhead-dominated ResNet-18 the analytic
proportions are wrong, and one gamma fitted on uniform shrinks missed by -35 % .. +33 % on
candidates pruning a random half of the groups: what is saved depends on which groups are
pruned together. Whole-model int8 is measured as a whole because onnxruntime runs it
differently from a sum of int8 layers (adds and pools quantized too, most QDQ convs left in
float). Per-layer int8 inside an fp32 model (QDQ on some nodes) is a file
nobody deploys, so it is neither measured nor scored; the analytic profiles still model
per-layer mixed precision for their target devices.

Where the table has no entry for a layer's choice (a pattern measured on other layers only),
that layer takes the analytic profile's delta for the same single change (at fp32 when the
candidate ships as fp32), and says so; an all-int8 candidate without a whole-model int8 entry
takes the profile's delta for each layer's full choice. Pure (no numpy/torch): the search side
and the cost report read it like the layer table.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from autosparse.config.hardware import HardwareProfile
from autosparse.config.validation import ConfigError
from autosparse.cost.estimate import estimate_cost
from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    Candidate,
    LayerChoice,
)
from autosparse.space.layers import ChannelGroup, LayerTable
from autosparse.space.structure import channel_groups, leaders, pruned_by_group

TABLE_FILE = "latency-table.json"  # written beside the study: runs/<name>/latency-table.json
FORMAT = 3  # 1: single-layer deltas only (no uniform shrinks, no whole-model int8 at them);
# 2: no measured pairs of groups (its residual gamma was fitted without them)
TABLE, ANALYTIC = "table", "analytic"
INT8_BITS = 8  # onnxruntime's CPU integer kernels: any weight of <= 8 bits runs on int8
INT8, FP32 = "int8", "fp32"  # the file scored: model.int8.onnx or model.onnx (as measured_latency)


def ships_int8(table: LayerTable, candidate: Candidate) -> bool:
    """Whether export ships ``candidate`` as ``model.int8.onnx``: every layer of the table at
    <= 8 bits (``measured_latency.deployable_format``, which imports torch; a test keeps the
    two equal). Else it ships as the fp32 ``model.onnx``."""
    return all(candidate.get_choice(name).bits <= INT8_BITS for name in table.names)


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
    included). ``patterns``: pattern -> points by sparsity (onnxruntime has no sparse kernels:
    expect ~0). No per-layer int8: a candidate with some int8 layers ships as fp32.
    """

    channels: tuple[Point, ...] = ()
    patterns: Mapping[str, tuple[Point, ...]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"channels": _pts(self.channels),
                "patterns": {k: _pts(v) for k, v in self.patterns.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerEntry":
        # a format-2 file written before the deploy rule also holds per-layer "int8" /
        # "int8_context" points: what they measured is not scored any more, so they are skipped
        return cls(channels=_from_rows(data.get("channels", ())),
                   patterns={k: _from_rows(v) for k, v in data.get("patterns", {}).items()})


@dataclass(frozen=True)
class Pair:
    """Two channel groups (by their leaders) some layer reads and writes, measured shrunk
    together: ``kept_a`` / ``kept_b`` channels kept, ``delta_us`` the whole change vs dense (both
    single deltas included; the interaction is what is left after them)."""

    a: str
    b: str
    kept_a: int
    kept_b: int
    delta_us: float
    spread: float = 0.0

    def to_list(self) -> list:
        return [self.a, self.b, self.kept_a, self.kept_b, self.delta_us, self.spread]

    @classmethod
    def from_list(cls, row) -> "Pair":
        a, b, kept_a, kept_b, delta, spread = row
        return cls(str(a), str(b), int(kept_a), int(kept_b), float(delta), float(spread))


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency of one model on one machine: the dense total and the parts above.

    ``profile`` names the analytic profile the table was built beside: it supplies the deltas of
    choices the table has no entry for, so a search only reads the table with that profile.
    ``uniform``: kept share -> delta of the whole model shrunk at that share (every leader in
    ``uniform_layers`` at once). ``whole_int8``: kept share (1.0 = full width) -> delta of the
    whole model in int8 (every op the quantizer takes, as export ships it) against fp32 dense.
    ``pairs``: pairs of groups shrunk together (:class:`Pair`).
    """

    model_digest: str
    layers: tuple[str, ...]
    machine: str
    onnxruntime: str
    profile: str
    dense_us: float
    dense_spread: float
    entries: Mapping[str, LayerEntry]
    uniform: tuple[Point, ...] = ()
    uniform_layers: tuple[str, ...] = ()
    whole_int8: tuple[Point, ...] = ()
    pairs: tuple[Pair, ...] = ()
    settings: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "model_digest": self.model_digest, "layers": list(self.layers),
            "machine": self.machine, "onnxruntime": self.onnxruntime, "profile": self.profile,
            "dense_us": self.dense_us, "dense_spread": self.dense_spread,
            "uniform": _pts(self.uniform),
            "uniform_layers": list(self.uniform_layers), "whole_int8": _pts(self.whole_int8),
            "pairs": [pair.to_list() for pair in self.pairs],
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
                    "(format 1 had single-layer deltas only, format 2 no measured pairs of "
                    "groups): run `autosparse calibrate "
                    "--config CONFIG` again")
            return cls(model_digest=data["model_digest"], layers=tuple(data["layers"]),
                       machine=data["machine"], onnxruntime=data["onnxruntime"],
                       profile=data["profile"], dense_us=float(data["dense_us"]),
                       dense_spread=float(data.get("dense_spread", 0.0)),
                       uniform=_from_rows(data.get("uniform", ())),
                       uniform_layers=tuple(data.get("uniform_layers", ())),
                       whole_int8=_from_rows(data.get("whole_int8", ())),
                       pairs=tuple(Pair.from_list(row) for row in data.get("pairs", ())),
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
    """A candidate's latency from the table: total, per layer (µs), each layer's source, and
    ``format``: the file it is the latency of (``int8``: model.int8.onnx, ``fp32``: model.onnx)."""

    total_ms: float
    layer_us: Mapping[str, float]
    source: Mapping[str, str]
    format: str = FP32

    def counts(self) -> dict[str, int]:
        return {kind: sum(1 for s in self.source.values() if s == kind) for kind in (TABLE, ANALYTIC)}


# --------------------------------------------------------------------------------------------
# the model's structure as the lookup needs it: which group each layer reads and writes


@dataclass(frozen=True)
class _Shape:
    """Per layer: the group it reads (first one) and writes."""

    reads: Mapping[str, ChannelGroup]
    writes: Mapping[str, ChannelGroup]

    @classmethod
    def of(cls, table: LayerTable) -> "_Shape":
        reads: dict[str, ChannelGroup] = {}
        writes: dict[str, ChannelGroup] = {}
        for group in channel_groups(table):
            for producer in group.producers:
                writes.setdefault(producer, group)
            for consumer, _ in group.consumers:
                reads.setdefault(consumer, group)
        return cls(reads, writes)

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


def linked_pairs(table: LayerTable) -> dict[tuple[str, str], tuple[str, ...]]:
    """Pairs of removable groups, by leader names (sorted), that some layer reads and writes
    (one group on both sides, depthwise, is no pair) -> those layers: the pairs whose
    interaction calibrate measures (``Pair``)."""
    shape, led = _Shape.of(table), leaders(table)
    leader_of = {group.name: name for name, group in led.items()}
    out: dict[tuple[str, str], list[str]] = {}
    for name in table.names:
        read, write = shape.reads.get(name), shape.writes.get(name)
        if read is None or write is None or read.name == write.name:
            continue
        a, b = leader_of.get(read.name), leader_of.get(write.name)
        if a is not None and b is not None:
            out.setdefault(tuple(sorted((a, b))), []).append(name)
    return {key: tuple(names) for key, names in out.items()}


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


def _pair_terms(look: "_Lookup", share: Mapping[str, float]) -> dict[tuple[str, str], float]:
    """Each measured pair's interaction at the candidate's shares: I_ab scaled bilinearly from
    the measured level, I_ab (1 - k_a)(1 - k_b) / ((1 - k_a0)(1 - k_b0)); 0 when either group
    is unpruned."""
    out = {}
    for pair, interaction in look.pair_interactions.items():
        ga, gb = look.leaders[pair.a], look.leaders[pair.b]
        # clamped as the single deltas are: below a group's narrowest measured width nothing
        # is known, and a noisy I_ab extrapolated far past its level would carry its noise along
        d_a = 1 - max(share.get(ga.name, 1.0), look.narrowest(pair.a))
        d_b = 1 - max(share.get(gb.name, 1.0), look.narrowest(pair.b))
        d_a0, d_b0 = 1 - pair.kept_a / ga.channels, 1 - pair.kept_b / gb.channels
        if d_a > 0 and d_b > 0:
            out[(pair.a, pair.b)] = interaction * d_a * d_b / (d_a0 * d_b0)
    return out


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
        # each measured pair's interaction: what shrinking both saves beyond the two singles
        self.links = linked_pairs(table)
        self.pair_interactions: dict[Pair, float] = {}
        for pair in lt.pairs:
            if (pair.a, pair.b) not in self.links:
                continue  # a pair no layer links in this model (check_model guards the rest)
            ga, gb = self.leaders[pair.a], self.leaders[pair.b]
            if pair.kept_a >= ga.channels or pair.kept_b >= gb.channels:
                continue
            singles = [self.kept_delta(n, kept) for n, kept in ((pair.a, pair.kept_a),
                                                                  (pair.b, pair.kept_b))]
            if None not in singles:
                self.pair_interactions[pair] = pair.delta_us - sum(singles)
        int8_points = []
        if lt.whole_int8 and lt.whole_int8[-1].x >= 1.0:  # full width: against dense itself
            int8_points.append(Point(1.0, lt.whole_int8[-1].delta_us))
        gamma, pairs = [], []
        whole = {p.x: p.delta_us for p in lt.whole_int8}
        for point in lt.uniform:
            candidate = _uniform(lt, point.x)
            share, kept = self.shape.kept(table, candidate)
            layer_us, _ = self.parts(candidate)
            rest = point.delta_us - (sum(layer_us.values()) - sum(map(self.base_us, layer_us)))
            rest -= sum(_pair_terms(self, share).values())  # gamma: what the pairs leave
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

    def narrowest(self, name: str) -> float:
        """The smallest kept share measured for ``name``'s group alone."""
        return self.lt.entries[name].channels[0].x / self.leaders[name].channels

    def kept_delta(self, name: str, kept: int) -> float | None:
        """The single-group delta of ``name``'s group at ``kept`` channels, None without one."""
        entry = self.lt.entries.get(name)
        if entry is None or name not in self.leaders or len(entry.channels) < 2:
            return None
        return interpolate(entry.channels, kept)

    def channel_delta(self, name: str, choice: LayerChoice) -> float | None:
        group = self.leaders.get(name)
        if group is None:
            return None
        return self.kept_delta(name, group.channels - group.pruned_channels(choice.sparsity))

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

    def parts(self, candidate: Candidate, int8_analytic: bool = False
              ) -> tuple[dict[str, float], dict[str, str]]:
        """Per layer: its dense share + its single structural change's delta at fp32 (table,
        else analytic), and where each came from. Bits do not enter: a candidate ships as
        fp32, or as whole-model int8, whose entry ``table_latency`` adds. ``int8_analytic``: an
        all-int8 candidate with no whole-model entry, every layer the profile's full delta."""
        layer_us, source = {}, {}
        for name in self.table.names:
            choice = candidate.get_choice(name)
            delta = None if int8_analytic else self.structural_delta(name, choice)
            if delta is None:
                source[name] = ANALYTIC
                alone = (choice if int8_analytic
                         else LayerChoice.make(choice.pattern, choice.sparsity, FLOAT_BITS))
                delta = analytic_delta_us(self.table, Candidate({name: alone}), name,
                                          self.fallback, self.dense_total_us)
            else:
                source[name] = TABLE
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
    """Latency of the file export ships for ``candidate`` (module docstring): model.int8.onnx
    when every layer has <= 8 bits, else the fp32 model.onnx with the candidate's channel and
    pattern choices; the ``fallback`` profile's single-change delta for a layer whose choice has
    no entry. Raises ConfigError when the table was measured on another model.

    Per-layer figures split the measured dense total in the proportions the analytic profile
    gives the dense layers, plus each layer's own terms (its group's delta on its leader, its
    interaction, its share of whole-model int8 by kernel work): they sum, with the fixed share,
    to the total.
    """
    lt.check_model(table)
    look = _Lookup(lt, table, fallback)
    weights = look.weights
    share, kept = look.shape.kept(table, candidate)
    int8 = ships_int8(table, candidate)
    whole_int8 = int8 and bool(look.whole)
    layer_us, source = look.parts(candidate, int8_analytic=int8 and not whole_int8)

    # measured pairs of groups: each term on the layers linking the pair, by their weights
    for key, extra in _pair_terms(look, share).items():
        names = look.links[key]
        total_w = sum(weights.get(n, 0.0) for n in names)
        for name in names:
            layer_us[name] += extra * (weights.get(name, 0.0) / total_w if total_w > 0
                                       else 1 / len(names))
    # the rest of the interaction of pruned inputs and outputs, fitted on the uniform shrinks
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
    dense_cost = look.dense_cost
    shared_us = (dense_cost.fixed_s + dense_cost.ops_s) * 1e6 * look.scale  # ops between layers
    total_us = sum(layer_us.values()) + shared_us
    return TableLatency(total_us / 1e3, layer_us, source, INT8 if int8 else FP32)


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
