"""A measured per-layer latency table of one model on one machine, and the lookup the search uses.

``autosparse calibrate --config`` (``calibration/model_table.py``) times the user's own model in
onnxruntime, whole and in context, once dense and once per change of one layer (or channel
group): kept-channel levels of each group leader, int8, unstructured / N:M zeros. Each entry is
the latency *delta* of that one change against the dense model. A candidate's latency is then
the additive model

    total = measured dense + sum over layers of delta(layer's choice)

with channel deltas interpolated linearly between measured kept-channel counts (exact at the
measured points, clamped outside them) and, where the table has no entry for a choice, the
analytic profile's delta for that same single-layer change. So the table is used exactly where
it measured something and every layer says which source it came from.

Pure (no numpy/torch): the search side and the cost report read it like the layer table.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from .candidate import CHANNEL, DENSE, FLOAT_BITS, Candidate
from .cost import estimate_cost
from .hardware import HardwareProfile
from .layers import LayerTable
from .structure import leaders
from .validation import ConfigError

TABLE_FILE = "latency-table.json"  # written beside the study: runs/<name>/latency-table.json
FORMAT = 1
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
    """One measured change: ``x`` (kept channels, or sparsity) -> latency delta vs dense, µs.

    ``spread`` is the IQR / median of the round medians of the changed model's timing."""

    x: float
    delta_us: float
    spread: float = 0.0


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
        def pts(points):
            return [[p.x, p.delta_us, p.spread] for p in points]

        return {"channels": pts(self.channels),
                "int8": None if self.int8 is None else pts([self.int8])[0],
                "int8_context": None if self.int8_context is None else pts([self.int8_context])[0],
                "patterns": {k: pts(v) for k, v in self.patterns.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "LayerEntry":
        def pts(rows):
            return tuple(Point(float(x), float(d), float(s)) for x, d, s in rows)

        def one(row):
            return None if row is None else pts([row])[0]

        return cls(channels=tuple(sorted(pts(data.get("channels", ())), key=lambda p: p.x)),
                   int8=one(data.get("int8")), int8_context=one(data.get("int8_context")),
                   patterns={k: tuple(sorted(pts(v), key=lambda p: p.x))
                             for k, v in data.get("patterns", {}).items()})


@dataclass(frozen=True)
class LatencyTable:
    """Measured latency of one model on one machine: the dense total and per-layer deltas.

    ``profile`` names the analytic profile the table was built beside: it supplies the deltas of
    choices the table has no entry for, so a search only reads the table with that profile.
    """

    model_digest: str
    layers: tuple[str, ...]
    machine: str
    onnxruntime: str
    profile: str
    dense_us: float
    dense_spread: float
    entries: Mapping[str, LayerEntry]
    all_int8_us: float | None = None  # every layer int8 at once (whole-model QDQ), if measured
    settings: Mapping[str, object] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "format": FORMAT, "model_digest": self.model_digest, "layers": list(self.layers),
            "machine": self.machine, "onnxruntime": self.onnxruntime, "profile": self.profile,
            "dense_us": self.dense_us, "dense_spread": self.dense_spread,
            "all_int8_us": self.all_int8_us, "settings": dict(self.settings),
            "entries": {name: entry.to_dict() for name, entry in self.entries.items()},
        }, indent=1)

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> "LatencyTable":
        try:
            data = json.loads(text)
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            return cls(model_digest=data["model_digest"], layers=tuple(data["layers"]),
                       machine=data["machine"], onnxruntime=data["onnxruntime"],
                       profile=data["profile"], dense_us=float(data["dense_us"]),
                       dense_spread=float(data.get("dense_spread", 0.0)),
                       all_int8_us=data.get("all_int8_us"), settings=data.get("settings", {}),
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


def _kept_channels(table: LayerTable, name: str, sparsity: float) -> int | None:
    group = leaders(table).get(name)
    return None if group is None else group.channels - group.pruned_channels(sparsity)


def _int8_neighbours(table: LayerTable, candidate: Candidate, index: int) -> float:
    """Share of a layer's neighbours in table order (previous, next) that also run int8."""
    names = table.names
    around = [names[i] for i in (index - 1, index + 1) if 0 <= i < len(names)]
    if not around:
        return 0.0
    return sum(candidate.get_choice(n).bits <= INT8_BITS for n in around) / len(around)


def _table_delta(lt: LatencyTable, table: LayerTable, candidate: Candidate, index: int
                 ) -> float | None:
    """The layer's delta from measured entries, or None when one of its parts has no entry."""
    name = table.names[index]
    choice = candidate.get_choice(name)
    entry = lt.entries.get(name)
    if entry is None:
        return 0.0 if choice.pattern == DENSE and choice.bits == FLOAT_BITS else None
    delta = 0.0
    if choice.pattern == CHANNEL:
        kept = _kept_channels(table, name, choice.sparsity)
        if kept is None or len(entry.channels) < 2:
            return None
        delta += interpolate(entry.channels, kept)
    elif choice.pattern != DENSE:
        points = entry.patterns.get(choice.pattern)
        if not points:
            return None
        delta += interpolate((Point(0.0, 0.0), *points), choice.sparsity)
    if choice.bits < FLOAT_BITS:
        if choice.bits > INT8_BITS or entry.int8 is None:
            return None
        share = _int8_neighbours(table, candidate, index) if entry.int8_context else 0.0
        context = entry.int8_context.delta_us if entry.int8_context else 0.0
        delta += (1 - share) * entry.int8.delta_us + share * context
    return delta


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
    """Latency of ``candidate`` from the table, the ``fallback`` profile's delta where it has no
    entry. Raises ConfigError when the table was measured on another model.

    Per-layer figures split the measured dense total in the proportions the analytic profile
    gives the dense layers (the table measures deltas, not a layer's own time), plus each layer's
    delta: they sum, with the fixed share, to the total.
    """
    lt.check_model(table)
    dense_cost = estimate_cost(table, Candidate({}), fallback)
    dense_total_us = dense_cost.latency_s * 1e6
    scale = lt.dense_us / dense_total_us if dense_total_us > 0 else 0.0
    layer_us, source = {}, {}
    for index, layer in enumerate(dense_cost.layers):
        delta = _table_delta(lt, table, candidate, index)
        source[layer.name] = TABLE if delta is not None else ANALYTIC
        if delta is None:
            delta = analytic_delta_us(table, candidate, layer.name, fallback, dense_total_us)
        layer_us[layer.name] = layer.latency_s * 1e6 * scale + delta
    shared_us = (dense_cost.fixed_s + dense_cost.ops_s) * 1e6 * scale  # ops between layers too
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
