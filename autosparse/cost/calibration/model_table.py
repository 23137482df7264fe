"""Measure the user's own model in context: whole-model ONNX variants, timed together.

Every variant is the *whole* model exported to ONNX with one kind of change: one channel group
physically narrower (removed by ``export.shrink``, as export deploys it) at each kept-channel
level; every searched group narrower at once at the same kept shares (the interaction of pruned
inputs and outputs); each pair of groups some layer reads and writes (a ResNet block's stage
and inner groups, two stages a downsample conv links) narrower together at ``PAIR_KEEP``, so
that pair's interaction is measured, not apportioned by the analytic profile; the whole
model in int8 as export quantizes it, at full width and at each uniform kept share (only where
the space lets every layer take <= 8 bits: export ships int8 only then, and a candidate with
some int8 layers ships as fp32, so no per-layer int8 file is measured); one layer's weights
zeroed by an unstructured / N:M pattern. All variants and the dense model are timed in the
same interleaved rounds (``timing.time_variants``: onnxruntime, one thread), so machine drift
hits them alike and each delta is a difference of two medians from the same rounds. They go
into a :class:`~autosparse.cost.latency_table.LatencyTable`, whose docstring gives the model built
on them.

Layer rule: torch / onnx / onnxruntime, never optuna or mlflow.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from autosparse.compress.apply import bake, compress_model
from autosparse.compress.shrink import shrink_as_compressed
from autosparse.config.hardware import HardwareProfile
from autosparse.cost.calibration.machine import this_machine
from autosparse.cost.calibration.timing import (
    DEFAULT_CALLS,
    DEFAULT_ROUNDS,
    Measurement,
    time_variants,
)
from autosparse.cost.latency_table import (
    INT8_BITS,
    LatencyTable,
    LayerEntry,
    Pair,
    Point,
    linked_pairs,
    model_digest,
    ships_int8,
)
from autosparse.cost.onnx_files import export_onnx as _export_as_shipped
from autosparse.cost.onnx_files import quantize_onnx_int8
from autosparse.space.candidate import (
    CHANNEL,
    DENSE,
    FLOAT_BITS,
    Candidate,
    LayerChoice,
    parse_nm,
)
from autosparse.space.layers import LayerTable

KEEP_LEVELS = (0.75, 0.5, 0.25)  # kept share of each group's channels (plus 1.0, the dense model)
# measured by default besides the space's own channel sparsities, so that a search point is
# exact and anything between measured counts is interpolated
PAIR_KEEP = 0.25  # both groups of a pair kept at the level nearest this share: 25 % gave a
# larger interaction against the timing noise than 50 % (ResNet-18, latency_fidelity.py), and
# no candidate's pair term is then scaled up from it by more than the clamp allows
PATTERN_LAYERS = 2  # sparse patterns are measured on this many of the largest layers only
DEFAULT_WARMUP = 10  # fewer than calibrate's 20: a table times ~100 variants
SESSIONS = 3  # sessions per variant, used in turn: one session's memory placement alone made
# the same ResNet-18 file 40.0-44.0 µs here (4 copies, one run), which every delta inherited
DENSE_COPIES = 3  # the reference of every delta: timed as this many variants, pooled


@dataclass(frozen=True)
class _Variant:
    """What ``time_variants`` reads, plus what the delta is an entry for."""

    name: str
    onnx_path: Path
    input_shape: tuple[int, ...]
    layer: str = ""
    kind: str = "dense"  # dense | channel | uniform | pair | whole_int8 | pattern:<p>
    x: float = 0.0
    pair: tuple = ()  # kind pair: (leader a, leader b, kept a, kept b)


def export_onnx(model: torch.nn.Module, input_shape: tuple[int, ...], path: Path) -> Path:
    """The model exported exactly as ``autosparse export`` writes it (dynamic batch axis: a
    batch-1-only file ran a Conv1d net 10 % and a ViT 6 % faster here, so timing that would
    not be timing what ships), its input renamed ``x`` for the quantizer's calibration reader."""
    path = _export_as_shipped(model, input_shape, path)
    proto = onnx.load(str(path))
    old = proto.graph.input[0].name
    if old != "x":
        proto.graph.input[0].name = "x"
        for node in proto.graph.node:
            node.input[:] = ["x" if name == old else name for name in node.input]
        onnx.save(proto, str(path))
    return path


def whole_int8(fp32_path: Path, out_path: Path, input_shape: tuple[int, ...],
               seed: int = 0) -> Path:
    """The whole model in int8 exactly as export writes ``model.int8.onnx``
    (``quantize_onnx_int8``: QDQ on every op the quantizer takes, 7-bit weights), with ranges
    from random batches: what onnxruntime then runs in float or integer is its own choice, so
    it is measured, not assumed (the ranges do not change which kernels run)."""
    rng = np.random.default_rng(seed)
    batches = [rng.standard_normal((1, *input_shape)).astype(np.float32)  # batch-1 files
               for _ in range(16)]
    return quantize_onnx_int8(fp32_path, out_path, batches)


@dataclass(frozen=True)
class TableModel:
    """What a table is measured on: a dense model, its discovery, its input shape and, per
    searched layer, the (patterns, sparsities, bits) the space allows it. ``autosparse
    calibrate --config`` builds it from the config (``SearchContext.table_model``); the held-out
    benchmark builds one per architecture."""

    dense: torch.nn.Module
    table: LayerTable
    graph: object
    input_shape: tuple[int, ...]
    allowed: Mapping[str, tuple[tuple[str, ...], tuple[float, ...], tuple[int, ...]]]
    name: str


def _shrunk(model: TableModel, candidate: Candidate) -> torch.nn.Module:
    """The candidate compressed, baked and its channel groups physically removed."""
    baked = bake(compress_model(model.dense, candidate, graph=model.graph))
    return shrink_as_compressed(baked, model.dense, candidate, model.table, model.graph)[0]


def channel_leaders(model: TableModel) -> list[str]:
    """Leaders of removable groups whose layer the space lets channel-prune."""
    groups = {g.producers[0] for g in model.table.channel_groups if g.blocked is None}
    return [n for n, (pats, _, _) in model.allowed.items() if CHANNEL in pats and n in groups]


def int8_everywhere(model: TableModel) -> bool:
    """Whether the space lets every layer of the table take <= 8 bits: only then can a
    candidate ship as model.int8.onnx (a layer outside the space stays fp32)."""
    return all(name in model.allowed and any(b <= INT8_BITS for b in model.allowed[name][2])
               for name in model.table.names)


def plan_variants(model: TableModel, folder: Path, levels: Sequence[float] = KEEP_LEVELS,
                  int8: bool = True, patterns: bool = True,
                  printer: Callable[[str], None] = print) -> list[_Variant]:
    """Export every change the table measures (module docstring); the dense model first."""
    shape = model.input_shape
    dense = model.dense.eval()
    table, allowed = model.table, model.allowed
    groups = {g.producers[0]: g for g in table.channel_groups if g.blocked is None}
    dense_path = export_onnx(dense, shape, folder / "dense.onnx")
    variants = [_Variant("dense" if i == 0 else f"dense:{i}", dense_path, shape)
                for i in range(DENSE_COPIES)]

    channel = channel_leaders(model)
    for name in channel:
        group, sparsities = groups[name], allowed[name][1]
        seen = {group.channels}
        for keep in sorted({*levels, *(1.0 - s for s in sparsities if s > 0)}, reverse=True):
            kept = group.channels - group.pruned_channels(1.0 - keep)
            if kept in seen:
                continue
            seen.add(kept)
            candidate = Candidate({name: LayerChoice.make(CHANNEL, 1.0 - keep, FLOAT_BITS)})
            path = export_onnx(_shrunk(model, candidate).eval(), shape,
                               folder / f"channel-{name}-{kept}.onnx")
            variants.append(_Variant(f"channel:{name}:{kept}", path, shape, name, "channel", kept))
    uniform: dict[float, Path] = {}
    if len(channel) > 1:  # the whole model shrunk at once: the interaction of in/out pruning
        for keep in sorted(levels, reverse=True):
            candidate = Candidate({n: LayerChoice.make(CHANNEL, 1.0 - keep, FLOAT_BITS)
                                   for n in channel})
            path = export_onnx(_shrunk(model, candidate).eval(), shape,
                               folder / f"uniform-{keep:g}.onnx")
            uniform[keep] = path
            variants.append(_Variant(f"uniform:{keep:g}", path, shape, "", "uniform", keep))
    # each pair some layer reads and writes, shrunk together at a level its singles are
    # measured at (so I_ab = d_ab - d_a - d_b is three measurements, nothing interpolated)
    pair_keep = min(levels, key=lambda level: abs(level - PAIR_KEEP)) if levels else PAIR_KEEP
    for a, b in linked_pairs(table):
        if a not in channel or b not in channel:
            continue
        kept = tuple(groups[n].channels - groups[n].pruned_channels(1.0 - pair_keep)
                     for n in (a, b))
        if any(k >= groups[n].channels for k, n in zip(kept, (a, b))):
            continue  # a group too small to shrink at that level
        candidate = Candidate({n: LayerChoice.make(CHANNEL, 1.0 - pair_keep, FLOAT_BITS)
                               for n in (a, b)})
        path = export_onnx(_shrunk(model, candidate).eval(), shape,
                           folder / f"pair-{a}-{b}.onnx")
        variants.append(_Variant(f"pair:{a}:{b}", path, shape, "", "pair", pair_keep,
                                 (a, b, *kept)))
    printer(f"  {len(variants) - 1} channel variants exported")

    if int8 and int8_everywhere(model):  # the whole model, as export ships model.int8.onnx
        for keep, fp32 in {1.0: dense_path, **uniform}.items():
            path = whole_int8(fp32, folder / f"whole-int8-{keep:g}.onnx", shape)
            variants.append(_Variant(f"whole_int8:{keep:g}", path, shape, "", "whole_int8", keep))
        printer(f"  {1 + len(uniform)} whole-model int8 variants exported")

    if patterns:
        by_macs = sorted(allowed, key=lambda n: -table[n].macs)[:PATTERN_LAYERS]
        for name in by_macs:
            pats, sparsities, _ = allowed[name]
            for pattern in pats:
                if pattern in (CHANNEL, DENSE):
                    continue
                sparsity = 1 - parse_nm(pattern)[0] / parse_nm(pattern)[1] if parse_nm(pattern) \
                    else max(sparsities)
                if sparsity <= 0:
                    continue
                choice = LayerChoice.make(pattern, sparsity, FLOAT_BITS)
                baked = bake(compress_model(dense, Candidate({name: choice}), graph=model.graph))
                path = export_onnx(baked.eval(), shape,
                                   folder / f"pattern-{name}-{pattern.replace(':', 'of')}.onnx")
                variants.append(_Variant(f"pattern:{name}:{pattern}", path, shape, name,
                                         f"pattern:{pattern}", choice.sparsity))
    return variants


def build_latency_table(model: TableModel, profile: HardwareProfile, *,
                        rounds: int = DEFAULT_ROUNDS, calls: int = DEFAULT_CALLS,
                        warmup: int = DEFAULT_WARMUP, levels: Sequence[float] = KEEP_LEVELS,
                        int8: bool = True, patterns: bool = True,
                        seed: int = 0, workdir: Path | None = None, sessions: int = SESSIONS,
                        printer: Callable[[str], None] = print) -> LatencyTable:
    """Measure the model's dense latency and each change in context (module docstring) and
    return the table; ``profile`` is the analytic profile it is paired with (fills the gaps of
    the table; recorded by name). ``calibrate --config`` and the held-out benchmark both pass a
    :class:`TableModel` and go through the same code."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        printer(f"exporting the variants of {model.name} ...")
        variants = plan_variants(model, Path(tmp), levels, int8, patterns, printer)
        exported = time.perf_counter() - start
        printer(f"timing {len(variants)} models in {rounds} interleaved rounds x {calls} calls "
                f"(onnxruntime, 1 thread, {sessions} sessions each) ...")
        measured = time_variants(variants, rounds=rounds, calls=calls, warmup=warmup, seed=seed,
                                 sessions=sessions)
    by_name = {m.name: m for m in measured}
    copies = [m for m in measured if m.name.split(":")[0] == "dense"]
    dense = Measurement.of("dense", [v for m in copies for v in m.round_medians])
    dense_us = dense.median_seconds * 1e6

    def delta(variant: _Variant, base_us: float = dense_us) -> Point:
        m = by_name[variant.name]
        return Point(variant.x, m.median_seconds * 1e6 - base_us, m.spread)

    parts: dict[str, dict] = {}
    for v in variants:
        if not v.layer:
            continue
        part = parts.setdefault(v.layer, {"channels": [], "patterns": {}})
        if v.kind == "channel":
            part["channels"].append(delta(v))
        elif v.kind.startswith("pattern:"):
            part["patterns"].setdefault(v.kind.removeprefix("pattern:"), []).append(delta(v))
    groups = {g.producers[0]: g for g in model.table.channel_groups}
    entries = {}
    for name, part in parts.items():
        channels = part["channels"]
        if channels:  # the dense model is the full-width point
            channels = [*channels, Point(groups[name].channels, 0.0, dense.spread)]
        entries[name] = LayerEntry(
            channels=tuple(sorted(channels, key=lambda p: p.x)),
            patterns={k: tuple(sorted(v, key=lambda p: p.x)) for k, v in part["patterns"].items()})
    uniform = tuple(delta(v) for v in variants if v.kind == "uniform")
    whole = tuple(delta(v) for v in variants if v.kind == "whole_int8")
    pairs = tuple(Pair(*v.pair, delta(v).delta_us, delta(v).spread)
                  for v in variants if v.kind == "pair")
    return LatencyTable(
        model_digest=model_digest(model.table), layers=tuple(model.table.names),
        machine=this_machine()["cpu"], onnxruntime=ort.__version__, profile=profile.name,
        dense_us=dense_us, dense_spread=dense.spread, entries=entries,
        uniform=tuple(sorted(uniform, key=lambda p: p.x)),
        uniform_layers=tuple(channel_leaders(model)) if uniform else (),
        whole_int8=tuple(sorted(whole, key=lambda p: p.x)), pairs=pairs,
        settings={"rounds": rounds, "calls": calls, "warmup": warmup, "levels": list(levels),
                  "variants": len(variants), "sessions": sessions,
                  "export_seconds": round(exported, 1),
                  "seconds": round(time.perf_counter() - start, 1), "config": model.name})


# --------------------------------------------------------------------------------------------
# the check: the table's prediction against a direct measurement of whole candidates


def candidate_onnx(model: TableModel, candidate: Candidate, path: Path) -> Path:
    """The file export ships for the candidate, for timing: channel groups physically removed;
    every layer int8 -> the whole model quantized as model.int8.onnx, else the fp32 file (a
    candidate with some int8 layers ships as model.onnx; weights zeroed by other patterns stay
    dense tensors)."""
    shape = model.input_shape
    fp32 = export_onnx(_shrunk(model, candidate).eval(), shape, path.with_suffix(".fp32.onnx"))
    return whole_int8(fp32, path, shape) if ships_int8(model.table, candidate) else fp32


def measure_candidates(model: TableModel, candidates: Sequence[Candidate], *,
                       rounds: int = DEFAULT_ROUNDS, calls: int = DEFAULT_CALLS,
                       warmup: int = DEFAULT_WARMUP, seed: int = 0, sessions: int = SESSIONS,
                       workdir: Path | None = None) -> tuple[float, list[float]]:
    """(dense µs, each candidate's µs), all timed in the same interleaved rounds."""
    shape = model.input_shape
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        variants = [_Variant("dense", export_onnx(model.dense.eval(), shape,
                                                  folder / "dense.onnx"), shape)]
        for i, candidate in enumerate(candidates):
            variants.append(_Variant(f"c{i}", candidate_onnx(model, candidate,
                                                             folder / f"c{i}.onnx"), shape))
        measured = time_variants(variants, rounds=rounds, calls=calls, warmup=warmup, seed=seed,
                                 sessions=sessions)
    us = [m.median_seconds * 1e6 for m in measured]
    return us[0], us[1:]


def mixed_candidates(model: TableModel, count: int, seed: int = 0
                     ) -> list[Candidate]:
    """Random candidates of channel pruning on several groups and int8 on some layers, drawn
    from what the space allows (the kind of change the table is meant to predict)."""
    import random

    rng = random.Random(seed)
    groups = set(channel_leaders(model))
    out: list[Candidate] = []
    while len(out) < count:
        choices = {}
        for name, (pats, sparsities, bits) in model.allowed.items():
            channel = name in groups and rng.random() < 0.5
            sparsity = rng.choice([s for s in sparsities if s > 0]) if channel else 0.0
            low = [b for b in bits if b <= INT8_BITS]
            width = INT8_BITS if low and rng.random() < 0.4 else FLOAT_BITS
            choice = LayerChoice.make(CHANNEL if channel else DENSE, sparsity, width)
            if choice.pattern != DENSE or choice.bits != FLOAT_BITS:
                choices[name] = choice
        if choices:
            out.append(Candidate(choices))
    return out
