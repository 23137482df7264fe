"""Latency fidelity: the cost model's predictions against onnxruntime on architectures it never
saw while fitting.

    for arch in (digits-mobilenet 16x16 (depthwise), digits-resnet18 16x16 (residual + BN),
                 wide MLP 1536-3072-1024 (31 MB fp32; calibration's is 1024-2048-2048),
                 digits-conv1d 16x32, digits-vit 8x8 (transformer blocks); random weights):
        variants: dense fp32; channel 25 / 50 / 75 % on every group leader; unstructured 50 /
                  90 %; 2:4 where the layer allows it; int8 (whole model, export's
                  quantize_onnx_int8); channel 50 % + int8
        each: compress, bake, shrink (export.shrink), export ONNX (+ int8 QDQ)
        all variants of an architecture timed together (onnxruntime, 1 thread, interleaved
        rounds, medians), the whole timing repeated --repeats times (the spread is reported)
    predicted: cost.estimate_cost(table of the dense model, candidate, profile) per profile;
               and the measured per-layer table: built on the architecture's own dense model
               (what `autosparse calibrate --config` does for a user's model, same code:
               calibration.model_table.build_latency_table), once per repeat, then
               latency_table.table_latency per variant
    mixed:   --mixed random candidates per architecture off the table's grid (channel pruning
             on some groups at random shares, int8 on some layers), each timed as the file
             export ships for it (some layers int8: its fp32 channel file, model.onnx; every
             layer int8: whole-model int8), with the others: the table's interpolation and
             interaction model, not its grid points
    report: Spearman, MAPE, share within ±10 / ±20 %, per architecture and per kind of change;
            predicted vs measured speedup over dense for channel and int8 variants

    python benchmarks/latency_fidelity.py \
        --local benchmarks/results/latency_fidelity_profile/measured-dev-xeon.yaml \
        --rounds 41 --calls 21 --table-rounds 41 --repeats 2 --mixed 6 \
        --out benchmarks/results/latency_fidelity      # ~5 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import warnings

import numpy as np
import pandas as pd
import torch

from autosparse.compress.apply import bake, compress_model, structural_keep
from autosparse.compress.shrink import shrink_model
from autosparse.config.hardware import load_profile
from autosparse.cost.calibration.fit import prediction_stats
from autosparse.cost.calibration.model_table import (
    TableModel,
    build_latency_table,
    candidate_onnx,
    mixed_candidates,
)
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.latency_table import ships_int8, table_latency
from autosparse.cost.onnx_files import export_onnx, quantize_onnx_int8, time_onnx_files
from autosparse.space.candidate import CHANNEL, Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import leaders
from autosparse.workload.models import (
    DigitsConv1d,
    DigitsMLP,
    DigitsMobileNet,
    DigitsResNet18,
    DigitsViT,
)

SHIPPED = {"ci_epyc": "benchmarks/results/calibration/measured-ci-epyc.yaml",
           "datasheet": "x86-server-vnni"}


def architectures() -> dict:
    """label -> (builder, per-sample input shape). None of them is a calibration architecture."""
    return {
        "mobilenet-16": (lambda: DigitsMobileNet(1, 10), (1, 16, 16)),
        "resnet18-16": (lambda: DigitsResNet18(1, 10), (1, 16, 16)),
        "mlp-31MB": (lambda: DigitsMLP(1536, 10, {"fc1": 3072, "fc2": 1024}), (1, 48, 32)),
        "conv1d-16x32": (lambda: DigitsConv1d(16, 32, 10), (1, 16, 32)),
        "vit-8": (lambda: DigitsViT(1, 8, 10), (1, 8, 8)),
    }


def variants(table) -> dict[str, tuple[str, Candidate, bool]]:
    """name -> (kind of change, candidate as the search scores it, int8 file)."""
    lead = leaders(table)
    out = {"dense": ("dense", Candidate({}), False)}
    for s in (0.25, 0.5, 0.75):
        out[f"channel {int(s * 100)} %"] = (
            "channel", Candidate({n: LayerChoice.make(CHANNEL, s, 32) for n in lead}), False)
    for s in (0.5, 0.9):
        out[f"unstructured {int(s * 100)} %"] = ("unstructured", Candidate(
            {n: LayerChoice.make("unstructured", s, 32) for n in table.names}), False)
    out["2:4"] = ("2:4", Candidate({layer.name: LayerChoice.make("2:4", 0.5, 32)
                                    for layer in table.layers if layer.supports("2:4")}), False)
    out["int8"] = ("int8", Candidate({n: LayerChoice.make("dense", 0.0, 8)
                                      for n in table.names}), True)
    half = {n: LayerChoice.make(CHANNEL, 0.5, 8) for n in lead}
    out["channel 50 % + int8"] = ("channel+int8", Candidate(
        {n: half.get(n, LayerChoice.make("dense", 0.0, 8)) for n in table.names}), True)
    return out


TABLE_SPARSITIES = (0.25, 0.5, 0.75, 0.9)  # the choices a table is measured for: the variants'


def table_model(model, table, graph, shape, label: str) -> TableModel:
    """What `calibrate --config` would measure for a space searching every layer with channel /
    unstructured / 2:4 at the variants' sparsities and 8 or 32 bits."""
    allowed = {layer.name: (("dense", "channel", "unstructured",
                             *(("2:4",) if layer.supports("2:4") else ())),
                            TABLE_SPARSITIES, (8, 32)) for layer in table.layers}
    return TableModel(model, table, graph, tuple(shape), allowed, label)


def build_files(model, shape, work: Path, label: str) -> tuple[object, object, dict, dict]:
    """The dense table, its graph and, per variant, its ONNX file and (kind, candidate)."""
    model.eval()
    table, graph = discover(model, shape)
    example = example_input(model, shape)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((4, *shape)).astype(np.float32) for _ in range(2)]
    files, meta = {}, {}
    for name, (kind, candidate, int8) in variants(table).items():
        stem = work / f"{label}-{len(files)}"
        fp32 = Candidate({n: LayerChoice.make(c.pattern, c.sparsity, 32) for n, c in candidate.items()})
        student = bake(compress_model(model, fp32, None, graph))
        if any(c.pattern == CHANNEL for c in candidate.values()):
            _, _, kept = structural_keep(model, fp32, graph, None)
            student, _ = shrink_model(student, fp32, table, graph, kept, example)
        path = export_onnx(student, shape, stem.with_suffix(".onnx"))
        if int8:
            path = quantize_onnx_int8(path, stem.with_suffix(".int8.onnx"), calibration)
        files[name], meta[name] = path, (kind, candidate)
    return table, graph, files, meta


def fused_kernels(path: Path, work: Path) -> tuple[int, int]:
    """(integer weight kernels, float weight kernels) in the graph onnxruntime runs for an int8
    file: a Conv/Gemm left between DequantizeLinear and QuantizeLinear computes in fp32 on
    weights dequantized at every call."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(work / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]
    integer = sum(op in ("QLinearConv", "QGemm", "QLinearMatMul", "MatMulInteger",
                         "ConvInteger") for op in ops)
    return integer, sum(op in ("Conv", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                                "FusedMatMul") for op in ops)


def run(args) -> pd.DataFrame:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # tracer warnings of transformers' ViT at export
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's notes on LayerNorm weights
    profiles = {name: load_profile(path) for name, path in SHIPPED.items()}
    if args.local:
        profiles = {"local": load_profile(args.local), **profiles}
    fallback = profiles["local" if "local" in profiles else "datasheet"]  # the table's gaps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (builder, shape) in architectures().items():
            if args.archs and label not in args.archs:
                continue
            start = time.perf_counter()
            torch.manual_seed(0)
            model = builder().eval()
            table, graph, files, meta = build_files(model, shape, Path(tmp), label)
            target = table_model(model, table, graph, shape, label)
            timed_as = {}  # variant -> the file timed for it, where that is another's
            for i, mixed in enumerate(mixed_candidates(target, args.mixed, seed=0)):
                fp32 = Candidate({n: LayerChoice.make(c.pattern, c.sparsity, 32)
                                  for n, c in mixed.items() if c.pattern == CHANNEL})
                has_int8 = any(c.bits <= 8 for c in mixed.values())
                for tag, candidate in ((f"mixed {i}", mixed), (f"mixed {i} fp32", fp32)):
                    if not candidate or (candidate is fp32 and not has_int8):
                        continue  # no int8 in it: the fp32 version is the candidate itself
                    int8 = any(c.bits <= 8 for c in candidate.values())
                    if int8 and not ships_int8(table, candidate):  # export ships model.onnx:
                        timed_as[tag] = f"mixed {i} fp32" if fp32 else "dense"  # its fp32 file
                        meta[tag] = ("mixed+int8 (ships fp32)", candidate)
                        continue
                    files[tag] = candidate_onnx(target, candidate,
                                                Path(tmp) / f"{label}-{len(files)}.onnx")
                    meta[tag] = ("mixed all-int8" if int8 else "mixed channel", candidate)
            built = time.perf_counter() - start
            runs, tables, table_seconds = [], [], []
            for r in range(args.repeats):  # calibrate on this model, then time the variants
                begin = time.perf_counter()
                tables.append(build_latency_table(target, fallback, rounds=args.table_rounds,
                                                  calls=args.calls, seed=r,
                                                  sessions=args.sessions,
                                                  workdir=Path(tmp), printer=lambda _: None))
                table_seconds.append(time.perf_counter() - begin)
                runs.append(time_onnx_files(files, shape, args.rounds, args.calls, seed=r,
                                            sessions=args.sessions))
            dense_table_ms = [table_latency(lt, table, Candidate({}), fallback).total_ms
                              for lt in tables]
            for name, (kind, candidate) in meta.items():
                timed = timed_as.get(name, name)
                row = {"arch": label, "variant": name, "kind": kind, "timed_file": timed,
                       "weights_mb": sum(layer.weight_count for layer in table.layers) * 4 / 1e6}
                if ships_int8(table, candidate):
                    row["int8_kernels"], row["float_kernels"] = fused_kernels(Path(files[timed]),
                                                                              Path(tmp))
                for r, run_ in enumerate(runs):
                    row[f"meas_ms_{r}"] = run_[timed] * 1e3
                    row[f"meas_speedup_{r}"] = run_["dense"] / run_[timed]
                for p, profile in profiles.items():
                    cost = estimate_cost(table, candidate, profile)
                    dense = estimate_cost(table, Candidate({}), profile)
                    row[f"pred_ms_{p}"] = cost.latency_ms
                    row[f"pred_speedup_{p}"] = dense.latency_ms / cost.latency_ms
                    row[f"pred_ops_share_{p}"] = cost.ops_s / cost.latency_s
                for r, lt in enumerate(tables):
                    row[f"pred_ms_table_{r}"] = table_latency(lt, table, candidate,
                                                              fallback).total_ms
                    row[f"pred_speedup_table_{r}"] = dense_table_ms[r] / row[f"pred_ms_table_{r}"]
                row["table_variants"] = tables[0].settings["variants"]
                row["table_seconds"] = statistics.median(table_seconds)
                rows.append(row)
            print(f"{label}: built {built:.0f} s, tables {sum(table_seconds):.0f} s "
                  f"({tables[0].settings['variants']} models each), timed "
                  f"{time.perf_counter() - start - built - sum(table_seconds):.0f} s", flush=True)
    frame = pd.DataFrame(rows)
    frame.attrs["profiles"] = list(profiles)
    frame.attrs["fallback"] = fallback.name
    return frame


def _pred(frame: pd.DataFrame, what: str, profile: str, repeat: int) -> pd.Series:
    """A profile's prediction (one per variant), or the table's of that repeat (one table per
    repeat: calibration is part of what is repeated)."""
    per_repeat = f"pred_{what}_{profile}_{repeat}"
    return frame[per_repeat] if per_repeat in frame else frame[f"pred_{what}_{profile}"]


def _stats(frame: pd.DataFrame, profile: str, repeat: int) -> dict:
    return prediction_stats(_pred(frame, "ms", profile, repeat).to_numpy(),
                            frame[f"meas_ms_{repeat}"].to_numpy())


def _cell(values: list[dict], key: str, fmt: str) -> str:
    """First repeat's figure, with the other repeats' in brackets."""
    first = format(values[0][key], fmt)
    rest = "/".join(format(v[key], fmt) for v in values[1:])
    return f"{first} ({rest})" if rest else first


def stats_table(frame: pd.DataFrame, profile: str, repeats: int, by: str | None) -> list[str]:
    lines = [f"| {by or 'set'} | n | Spearman | MAPE % | within ±10 % | within ±20 % |",
             "|---|---|---|---|---|---|"]
    groups = [("all", frame)] if by is None else list(frame.groupby(by))
    for key, group in groups:
        if len(group) < 2:
            continue
        values = [_stats(group, profile, r) for r in range(repeats)]
        lines.append(f"| {key} | {len(group)} | {_cell(values, 'spearman', '.3f')} | "
                     f"{_cell(values, 'mape_percent', '.0f')} | "
                     f"{_cell(values, 'within_10_percent', '.0f')} | "
                     f"{_cell(values, 'within_20_percent', '.0f')} |")
    return lines


def speedup_share(frame: pd.DataFrame, profile: str, repeat: int) -> tuple[float, int]:
    rows = frame[frame.kind.isin(["channel", "int8", "channel+int8"])]
    ratio = rows[f"meas_speedup_{repeat}"] / _pred(rows, "speedup", profile, repeat)
    return float((abs(ratio - 1) <= 0.10).mean() * 100), len(rows)


MIXED = ("mixed channel", "mixed+int8 (ships fp32)", "mixed all-int8")


def markdown(frame: pd.DataFrame, command: str, wall: float, args, load: str) -> str:
    profiles = frame.attrs["profiles"]
    predictors = [*profiles, "table"]
    repeats = args.repeats
    core = frame[~frame.kind.isin(MIXED)]
    mixed = frame[frame.kind.isin(MIXED)]
    spread = np.median([abs(frame[f"meas_ms_{r}"] / frame["meas_ms_0"] - 1).median()
                        for r in range(1, repeats)]) * 100 if repeats > 1 else float("nan")
    table_spread = np.median([abs(frame[f"pred_ms_table_{r}"] / frame["pred_ms_table_0"] - 1)
                              .median() for r in range(1, repeats)]) * 100 \
        if repeats > 1 else float("nan")
    per_arch = frame.groupby("arch").first()
    lines = [
        "# Latency fidelity: predictions on architectures never calibrated on", "",
        f"Command: `{command}` ({wall / 60:.1f} min wall; load average before: {load}; the "
        "2-core machine was shared with other agents). Five architectures that are not "
        "calibration architectures (random seeded weights): "
        + ", ".join(f"`{a}` ({frame[frame.arch == a].weights_mb.iloc[0]:.2f} MB fp32)"
                    for a in frame.arch.unique())
        + ". Variants per architecture: dense, channel 25/50/75 % on every group leader, "
        "unstructured 50/90 %, 2:4, int8 (whole model, `quantize_onnx_int8`), channel 50 % + "
        "int8; each compressed, baked, shrunk, exported to ONNX. All variants of one "
        f"architecture timed together (onnxruntime, 1 thread, batch 1, {args.rounds} "
        f"interleaved rounds x {args.calls} calls, {args.sessions} sessions per file used in "
        f"turn, medians); the whole timing {repeats} times. "
        "Figures: first timing, the other timing(s) in brackets. Median per-variant deviation "
        f"between timings: {spread:.1f} %; per architecture, later timing / first (median "
        "over its variants; far from 1: the machine was disturbed during one of them): "
        + ", ".join(f"`{a}` " + "/".join(
            f"{(g[f'meas_ms_{r}'] / g['meas_ms_0']).median():.2f}" for r in range(1, repeats))
            for a, g in frame.groupby("arch", sort=False)) + ".", "",
        "Predictors: " + ", ".join(f"`{p}`" for p in predictors) + " — `local`: fitted by "
        f"`autosparse calibrate` on this machine (`{args.local}`), `ci_epyc`: the shipped "
        "profile fitted on another CPU (AMD EPYC, AVX2), `datasheet`: `x86-server-vnni`; "
        "`table`: the measured per-layer latency table (`latency_table.py`) built on each "
        "architecture's own dense model with the code `autosparse calibrate --config` runs "
        "(`build_latency_table`, for a space that searches channel / unstructured / 2:4 at "
        f"{', '.join(f'{s:g}' for s in TABLE_SPARSITIES)} and 8/32 bits on every layer, "
        f"{args.table_rounds} rounds x {args.calls} calls), rebuilt for every timing (so its "
        f"figures in brackets include a new calibration; median per-variant change of its "
        f"prediction between calibrations: {table_spread:.1f} %), with "
        f"`{frame.attrs['fallback']}` for the choices it has no entry for. Table size and "
        "build time per architecture: "
        + ", ".join(f"`{a}` {int(r.table_variants)} models, {r.table_seconds:.0f} s"
                    for a, r in per_arch.iterrows()) + ".", "",
        "The nine variants are uniform (every group at one share, every layer int8), and the "
        "table measures the uniformly shrunk models and whole-model int8 at 25/50/75 % as "
        "entries of their own: for those variants the table is a re-measurement (other "
        "sessions, another timing; the files exported by the calibration's own path), not a "
        f"prediction. The {len(mixed)} **mixed** candidates ({args.mixed} per "
        "architecture: channel pruning on a random half of the groups at random shares and "
        "int8 on ~40 % of the layers — `mixed+int8 (ships fp32)`; and the same channel "
        "pruning alone in fp32 — `mixed channel`) are off its grid and test its model "
        "(interpolation, interaction of pruned inputs and outputs). Each is timed as the file "
        "export ships for it: a candidate with some int8 layers ships as the fp32 `model.onnx` "
        "(its low bits live only in `model.packed`), so a `mixed+int8 (ships fp32)` row is "
        "measured on its fp32 channel file (the `mixed channel` row's, or dense without "
        "channel pruning) and the table scores it as that file (so for the table those rows "
        "repeat the `mixed channel` rows' figures), while the analytic profiles still model "
        "its int8 layers; one whose every layer drew int8 ships as "
        "`model.int8.onnx` (`mixed all-int8`). They are reported apart below.", "",
    ]
    for p in predictors:
        lines += [f"## `{p}` on the nine variants", ""]
        lines += stats_table(core, p, repeats, None) + [""]
        lines += stats_table(core, p, repeats, "arch") + [""]
        lines += stats_table(core, p, repeats, "kind") + [""]
    if len(mixed):
        lines += ["## Mixed candidates (off the table's grid)", ""]
        for p in ("table", *profiles[:1]):
            lines += [f"`{p}`:", ""]
            lines += stats_table(mixed, p, repeats, None) + [""]
            lines += stats_table(mixed, p, repeats, "arch") + [""]
            lines += stats_table(mixed, p, repeats, "kind") + [""]
    lines += ["## Speedups over dense (channel and int8 variants)", "",
              "| arch | variant | measured | " + " | ".join(predictors) + " |",
              "|---|---|---|" + "---|" * len(predictors)]
    for r in core[core.kind.isin(["channel", "int8", "channel+int8"])].itertuples():
        meas = "/".join(f"{getattr(r, f'meas_speedup_{i}'):.2f}" for i in range(repeats))
        table = "/".join(f"{getattr(r, f'pred_speedup_table_{i}'):.2f}" for i in range(repeats))
        lines.append(f"| {r.arch} | {r.variant} | {meas} | " + " | ".join(
            f"{getattr(r, f'pred_speedup_{p}'):.2f}" for p in profiles) + f" | {table} |")
    int8 = core[core.kind == "int8"]
    lines += ["", "## What onnxruntime runs for the int8 files", "",
              "Weight kernels in the optimized graph of each whole-model int8 file (integer: "
              "QLinearConv/QGemm/QLinearMatMul; float: a Conv/Gemm/MatMul left between "
              "DequantizeLinear and QuantizeLinear, computing in fp32 on weights dequantized at "
              "every call), and the measured int8 / fp32 speedup:", "",
              "| arch | integer kernels | float kernels | int8 speedup measured | predicted "
              f"({profiles[0]}) | table |", "|---|---|---|---|---|---|"]
    for r in int8.itertuples():
        lines.append(f"| {r.arch} | {int(r.int8_kernels)} | {int(r.float_kernels)} | "
                     f"{r.meas_speedup_0:.2f}× | {getattr(r, f'pred_speedup_{profiles[0]}'):.2f}× "
                     f"| {r.pred_speedup_table_0:.2f}× |")
    lines += ["", "The cost model assumes every int8 layer runs an integer kernel; where the "
              "runtime leaves layers in float with Q/DQ around them, int8 is slower than fp32 "
              "and the prediction misses by the size of that fallback. The table measures "
              "whole-model int8 instead.", ""]
    rest = core[~core.kind.isin(["int8", "channel+int8"])]
    for p in profiles[:1]:
        values = [_stats(rest, p, r) for r in range(repeats)]
        lines.append(f"Without the int8 variants (`{p}`, {len(rest)} variants): Spearman "
                     f"{_cell(values, 'spearman', '.3f')}, MAPE {_cell(values, 'mape_percent', '.0f')} %, "
                     f"within ±10 % {_cell(values, 'within_10_percent', '.0f')} %, within ±20 % "
                     f"{_cell(values, 'within_20_percent', '.0f')} %.")
    lines += ["", "## Targets", ""]
    for p in profiles:
        within20 = [_stats(core, p, r)["within_20_percent"] for r in range(repeats)]
        share = [speedup_share(core, p, r) for r in range(repeats)]
        ok20 = min(within20) >= 70
        okspeed = min(s for s, _ in share) >= 80
        lines.append(f"- `{p}`: analytic ≥ 70 % within ±20 %: **{'met' if ok20 else 'not met'}** "
                     f"({' / '.join(f'{v:.0f} %' for v in within20)}); predicted speedup within "
                     f"±10 % for ≥ 80 % of {share[0][1]} channel/int8 variants: "
                     f"**{'met' if okspeed else 'not met'}** "
                     f"({' / '.join(f'{s:.0f} %' for s, _ in share)}).")
    for label, subset in (("the nine variants", core), ("the mixed candidates", mixed)):
        if not len(subset):
            continue
        values = [_stats(subset, "table", r) for r in range(repeats)]
        ok = all(v["within_10_percent"] >= 90 and v["spearman"] >= 0.97 for v in values)
        lines.append(f"- `table` on {label} ({len(subset)}): ≥ 90 % within ±10 % and Spearman "
                     f"≥ 0.97: **{'met' if ok else 'not met'}** ("
                     + " / ".join(f"{v['within_10_percent']:.0f} %, {v['spearman']:.3f}"
                                  for v in values) + ")"
                     + (f"; speedup within ±10 % for ≥ 80 % of channel/int8 variants: " +
                        ("**met**" if min(speedup_share(core, "table", r)[0]
                                         for r in range(repeats)) >= 80 else "**not met**") +
                        " (" + " / ".join(f"{speedup_share(core, 'table', r)[0]:.0f} %"
                                          for r in range(repeats)) + ")"
                        if subset is core else "") + ".")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=Path, default=None,
                        help="a profile fitted by `autosparse calibrate` on this machine")
    parser.add_argument("--archs", nargs="*", default=None)
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--calls", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--table-rounds", type=int, default=41,
                        help="rounds of each table's timing (calibrate --config uses 61)")
    parser.add_argument("--sessions", type=int, default=3,
                        help="onnxruntime sessions per file, used in turn (tables and truth)")
    parser.add_argument("--mixed", type=int, default=6,
                        help="random mixed candidates per architecture, off the table's grid")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/latency_fidelity"))
    args = parser.parse_args(argv)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    start = time.perf_counter()
    frame = run(args)
    wall = time.perf_counter() - start
    command = "python benchmarks/latency_fidelity.py " + shlex.join(argv or sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.5g")
    args.out.with_suffix(".md").write_text(markdown(frame, command, wall, args, load))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
