"""Measure the user's own model in context: one ONNX file per single-layer change, timed together.

Every variant is the *whole* model exported to ONNX with exactly one layer (or one channel
group) changed: physically narrower (the group removed by ``export.shrink``, as export deploys
it), that layer alone in int8 (QDQ on its node only), that layer back in fp32 inside an
otherwise int8 model, or that layer's weights zeroed by an unstructured / N:M pattern. All
variants and the dense model are timed in the same interleaved rounds (``timing.time_variants``:
onnxruntime, one thread), so machine drift hits them alike and each delta is a difference of two
medians from the same rounds. The deltas go into a :class:`~autosparse.latency_table.LatencyTable`.

Layer rule: torch / onnx / onnxruntime, never optuna or mlflow.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnxruntime as ort
import torch

from ..candidate import CHANNEL, DENSE, FLOAT_BITS, Candidate, LayerChoice, parse_nm
from ..compress import bake, compress_model
from ..export.shrink import shrink_as_compressed
from ..hardware import HardwareProfile
from ..latency_table import INT8_BITS, LatencyTable, LayerEntry, Point, model_digest
from .machine import this_machine
from .export import WEIGHT_OPS, export_onnx, quantize_layers
from .timing import DEFAULT_CALLS, DEFAULT_ROUNDS, time_variants

if TYPE_CHECKING:  # the runner imports optuna: only its type is needed here
    from ..runner import SearchContext

KEEP_LEVELS = (0.75, 0.5, 0.25)  # kept share of each group's channels (plus 1.0, the dense model)
# measured by default besides the space's own channel sparsities, so that a search point is
# exact and anything between measured counts is interpolated
PATTERN_LAYERS = 2  # sparse patterns are measured on this many of the largest layers only
DEFAULT_WARMUP = 10  # fewer than calibrate's 20: a table times ~100 variants


@dataclass(frozen=True)
class _Variant:
    """What ``time_variants`` reads, plus what the delta is an entry for."""

    name: str
    onnx_path: Path
    input_shape: tuple[int, ...]
    layer: str = ""
    kind: str = "dense"  # dense | channel | int8 | int8_context | all_int8 | pattern:<p>
    x: float = 0.0


def _scope_path(node_name: str) -> str:
    """``/blocks/blocks.2/shortcut/shortcut.0/Conv`` -> ``blocks.2.shortcut.0``: the legacy
    exporter names a child of a container by its dotted name under the container's scope."""
    path: list[str] = []
    for segment in node_name.strip("/").split("/")[:-1]:
        if path and segment.startswith(path[-1] + "."):
            path[-1] = segment
        else:
            path.append(segment)
    return ".".join(path)


def weight_nodes(graph: onnx.GraphProto, layers: Collection[str]) -> dict[str, onnx.NodeProto]:
    """Torch layer name -> its Conv/Gemm/MatMul node: by weight initializer name, else (a batch
    norm folded into the conv renames the weight) by the node's scope path."""
    out: dict[str, onnx.NodeProto] = {}
    wanted = set(layers)
    for node in graph.node:
        if node.op_type not in WEIGHT_OPS or len(node.input) < 2:
            continue
        by_weight = node.input[1].removesuffix(".weight")
        name = by_weight if by_weight in wanted else _scope_path(node.name)
        if name in wanted and name not in out:
            out[name] = node
    return out


def quantize_nodes(fp32_path: Path, out_path: Path, layers: Collection[str],
                   input_shape: tuple[int, ...], seed: int = 0) -> Path:
    """QDQ int8 (U8S8, per-channel weights) on exactly ``layers``' nodes and the Relu each one
    feeds alone, found by weight name or scope path (batch-norm folding renames weights)."""
    return quantize_layers(fp32_path, out_path, layers, input_shape, seed,
                           find_nodes=lambda graph: weight_nodes(graph, layers))


def _decisions(context: "SearchContext") -> dict[str, tuple[tuple[str, ...], tuple[float, ...],
                                                             tuple[int, ...]]]:
    """Searched layer -> (patterns, sparsities, bits) the space allows it."""
    return {name: (d.patterns, d.sparsities, d.bits)
            for d in context.space.decisions for name in d.layers}


def _shrunk(context: "SearchContext", candidate: Candidate) -> torch.nn.Module:
    """The candidate compressed, baked and its channel groups physically removed."""
    baked = bake(compress_model(context.dense, candidate, graph=context.graph))
    return shrink_as_compressed(baked, context.dense, candidate, context.table, context.graph)[0]


def plan_variants(context: "SearchContext", folder: Path, levels: Sequence[float] = KEEP_LEVELS,
                  int8: bool = True, int8_context: bool = True, patterns: bool = True,
                  printer: Callable[[str], None] = print) -> list[_Variant]:
    """Export every single-layer change the space makes latency-relevant; the dense model first."""
    shape = tuple(context.data.input_shape)
    dense = context.dense.eval()
    table, allowed = context.table, _decisions(context)
    groups = {g.producers[0]: g for g in table.channel_groups if g.blocked is None}
    dense_path = export_onnx(dense, shape, folder / "dense.onnx")
    variants = [_Variant("dense", dense_path, shape)]

    for name, (pats, sparsities, _) in allowed.items():
        group = groups.get(name)
        if CHANNEL not in pats or group is None:
            continue
        seen = {group.channels}
        for keep in sorted({*levels, *(1.0 - s for s in sparsities if s > 0)}, reverse=True):
            kept = group.channels - group.pruned_channels(1.0 - keep)
            if kept in seen:
                continue
            seen.add(kept)
            candidate = Candidate({name: LayerChoice.make(CHANNEL, 1.0 - keep, FLOAT_BITS)})
            path = export_onnx(_shrunk(context, candidate).eval(), shape,
                               folder / f"channel-{name}-{kept}.onnx")
            variants.append(_Variant(f"channel:{name}:{kept}", path, shape, name, "channel", kept))
    printer(f"  {len(variants) - 1} channel variants exported")

    quantized = [n for n, (_, _, bits) in allowed.items() if any(b <= INT8_BITS for b in bits)]
    if int8 and quantized:
        for name in quantized:
            path = quantize_nodes(dense_path, folder / f"int8-{name}.onnx", [name], shape)
            variants.append(_Variant(f"int8:{name}", path, shape, name, "int8"))
        if int8_context and len(quantized) > 1:
            path = quantize_nodes(dense_path, folder / "int8-all.onnx", quantized, shape)
            variants.append(_Variant("int8:all", path, shape, "", "all_int8"))
            for name in quantized:
                others = [n for n in quantized if n != name]
                path = quantize_nodes(dense_path, folder / f"int8-but-{name}.onnx", others, shape)
                variants.append(_Variant(f"int8_context:{name}", path, shape, name,
                                         "int8_context"))
        printer(f"  int8 variants of {len(quantized)} layers exported")

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
                model = bake(compress_model(dense, Candidate({name: choice}), graph=context.graph))
                path = export_onnx(model.eval(), shape,
                                   folder / f"pattern-{name}-{pattern.replace(':', 'of')}.onnx")
                variants.append(_Variant(f"pattern:{name}:{pattern}", path, shape, name,
                                         f"pattern:{pattern}", choice.sparsity))
    return variants


def build_latency_table(context: "SearchContext", profile: HardwareProfile, *,
                        rounds: int = DEFAULT_ROUNDS, calls: int = DEFAULT_CALLS,
                        warmup: int = DEFAULT_WARMUP, levels: Sequence[float] = KEEP_LEVELS,
                        int8: bool = True, int8_context: bool = True, patterns: bool = True,
                        seed: int = 0, workdir: Path | None = None,
                        printer: Callable[[str], None] = print) -> LatencyTable:
    """Measure ``context``'s dense model and each single-layer change in context (see module
    docstring) and return the table; ``profile`` is the analytic profile it is paired with
    (fills the gaps of the table; recorded by name)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        printer(f"exporting the single-layer variants of {context.config.name} ...")
        variants = plan_variants(context, Path(tmp), levels, int8, int8_context, patterns,
                                 printer)
        exported = time.perf_counter() - start
        printer(f"timing {len(variants)} models in {rounds} interleaved rounds x {calls} calls "
                "(onnxruntime, 1 thread) ...")
        measured = time_variants(variants, rounds=rounds, calls=calls, warmup=warmup, seed=seed)
    by_name = {m.name: m for m in measured}
    dense = by_name["dense"]
    dense_us = dense.median_seconds * 1e6

    def delta(variant: _Variant, base_us: float = dense_us) -> Point:
        m = by_name[variant.name]
        return Point(variant.x, m.median_seconds * 1e6 - base_us, m.spread)

    all_int8 = next((v for v in variants if v.kind == "all_int8"), None)
    all_int8_us = by_name[all_int8.name].median_seconds * 1e6 if all_int8 else None
    parts: dict[str, dict] = {}
    for v in variants:
        if not v.layer:
            continue
        part = parts.setdefault(v.layer, {"channels": [], "patterns": {}})
        if v.kind == "channel":
            part["channels"].append(delta(v))
        elif v.kind == "int8":
            part["int8"] = delta(v)
        elif v.kind == "int8_context":  # all int8 minus (all but this layer int8)
            m = by_name[v.name]
            part["int8_context"] = Point(0.0, all_int8_us - m.median_seconds * 1e6, m.spread)
        elif v.kind.startswith("pattern:"):
            part["patterns"].setdefault(v.kind.removeprefix("pattern:"), []).append(delta(v))
    groups = {g.producers[0]: g for g in context.table.channel_groups}
    entries = {}
    for name, part in parts.items():
        channels = part["channels"]
        if channels:  # the dense model is the full-width point
            channels = [*channels, Point(groups[name].channels, 0.0, dense.spread)]
        entries[name] = LayerEntry(
            channels=tuple(sorted(channels, key=lambda p: p.x)), int8=part.get("int8"),
            int8_context=part.get("int8_context"),
            patterns={k: tuple(sorted(v, key=lambda p: p.x)) for k, v in part["patterns"].items()})
    return LatencyTable(
        model_digest=model_digest(context.table), layers=tuple(context.table.names),
        machine=this_machine()["cpu"], onnxruntime=ort.__version__, profile=profile.name,
        dense_us=dense_us, dense_spread=dense.spread, entries=entries, all_int8_us=all_int8_us,
        settings={"rounds": rounds, "calls": calls, "warmup": warmup, "levels": list(levels),
                  "variants": len(variants), "export_seconds": round(exported, 1),
                  "seconds": round(time.perf_counter() - start, 1), "config": context.config.name})


# --------------------------------------------------------------------------------------------
# the check: the table's prediction against a direct measurement of whole candidates


def candidate_onnx(context: "SearchContext", candidate: Candidate, path: Path) -> Path:
    """The candidate as it deploys for timing: channel groups physically removed, layers of
    <= 8 bits in int8 QDQ (their weights zeroed by other patterns stay dense tensors)."""
    shape = tuple(context.data.input_shape)
    fp32 = export_onnx(_shrunk(context, candidate).eval(), shape, path.with_suffix(".fp32.onnx"))
    int8 = [n for n, c in candidate.items() if c.bits <= INT8_BITS]
    return quantize_nodes(fp32, path, int8, shape) if int8 else fp32


def measure_candidates(context: "SearchContext", candidates: Sequence[Candidate], *,
                       rounds: int = DEFAULT_ROUNDS, calls: int = DEFAULT_CALLS,
                       warmup: int = DEFAULT_WARMUP, seed: int = 0,
                       workdir: Path | None = None) -> tuple[float, list[float]]:
    """(dense µs, each candidate's µs), all timed in the same interleaved rounds."""
    shape = tuple(context.data.input_shape)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        variants = [_Variant("dense", export_onnx(context.dense.eval(), shape,
                                                  folder / "dense.onnx"), shape)]
        for i, candidate in enumerate(candidates):
            variants.append(_Variant(f"c{i}", candidate_onnx(context, candidate,
                                                             folder / f"c{i}.onnx"), shape))
        measured = time_variants(variants, rounds=rounds, calls=calls, warmup=warmup, seed=seed)
    us = [m.median_seconds * 1e6 for m in measured]
    return us[0], us[1:]


def mixed_candidates(context: "SearchContext", count: int, seed: int = 0) -> list[Candidate]:
    """Random candidates of channel pruning on several groups and int8 on some layers, drawn
    from what the space allows (the kind of change the table is meant to predict)."""
    import random

    rng = random.Random(seed)
    allowed = _decisions(context)
    groups = {g.producers[0] for g in context.table.channel_groups if g.blocked is None}
    out: list[Candidate] = []
    while len(out) < count:
        choices = {}
        for name, (pats, sparsities, bits) in allowed.items():
            channel = CHANNEL in pats and name in groups and rng.random() < 0.5
            sparsity = rng.choice([s for s in sparsities if s > 0]) if channel else 0.0
            low = [b for b in bits if b <= INT8_BITS]
            width = INT8_BITS if low and rng.random() < 0.4 else FLOAT_BITS
            choice = LayerChoice.make(CHANNEL if channel else DENSE, sparsity, width)
            if choice.pattern != DENSE or choice.bits != FLOAT_BITS:
                choices[name] = choice
        if choices:
            out.append(Candidate(choices))
    return out


def _main(argv: Sequence[str] | None = None) -> int:
    """Table vs analytic against direct measurement; prints share within ±10 % and MAPE."""
    import argparse
    import statistics

    from ..cost import estimate_cost
    from ..hardware import load_profile
    from ..latency_table import TABLE_FILE, load_latency_table, table_latency
    from ..runner import prepare

    parser = argparse.ArgumentParser(description=_main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analytic", nargs="*", default=["x86-server-vnni"],
                        help="profiles to compare against (names or YAML paths)")
    args = parser.parse_args(argv)
    context = prepare(args.config, args.runs_dir)
    lt = load_latency_table(args.runs_dir / context.config.name / TABLE_FILE)
    fallback = load_profile(lt.profile)
    candidates = mixed_candidates(context, args.candidates, args.seed)
    dense_us, measured = measure_candidates(context, candidates, rounds=args.rounds,
                                            calls=args.calls, seed=args.seed)
    predictions = {"table": [table_latency(lt, context.table, c, fallback).total_ms * 1e3
                             for c in candidates]}
    for name in args.analytic:
        profile = load_profile(name)
        dense = estimate_cost(context.table, Candidate({}), profile).latency_s * 1e6
        predictions[f"{profile.name} (absolute)"] = [
            estimate_cost(context.table, c, profile).latency_s * 1e6 for c in candidates]
        # the analytic speedup applied to the measured dense time: fair to a foreign profile
        predictions[f"{profile.name} (speedup x measured dense)"] = [
            estimate_cost(context.table, c, profile).latency_s * 1e6 / dense * dense_us
            for c in candidates]
    print(f"{context.config.name}: dense measured {dense_us:.1f} µs (table {lt.dense_us:.1f} µs); "
          f"{len(candidates)} mixed candidates, measured {min(measured):.1f}-{max(measured):.1f} µs")
    for name, values in predictions.items():
        errors = [abs(p / m - 1) for p, m in zip(values, measured)]
        within = sum(e <= 0.10 for e in errors) / len(errors)
        print(f"  {name:45s} within ±10 %: {within:4.0%}  MAPE {statistics.mean(errors):6.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
