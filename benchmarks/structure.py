"""Structure: is what the search scores what export deploys? Predicted vs exported, per architecture.

    for arch in (digits-cnn, digits-resnet18, digits-mobilenet, digits-vit, digits-conv1d: the
                 trained dense models of the shipped configs; plus a ResNet-18 layout at 32x32 for
                 speed, see below):
        candidates: channel 25 / 50 / 75 % on every group leader export can remove (every other
                    layer dense fp32), and a front point: the knee (accuracy vs latency) of a
                    short real search of the shipped space (GA, objectives accuracy + latency on
                    the calibrated profile of this machine)
        for each: compress, fine-tune (the search's recipe), bake, shrink (Torch-Pruning removes
                  every pruned group), write the packed checkpoint and the fp32 ONNX model
            parameters: structure.parameter_count (what the search counts) vs the shrunk model's
            stored bits: the size formula (footprint.model_footprint) vs the packed payload
            groups: pruned by the candidate vs removed by export
            latency: dense and all candidates' ONNX fp32 timed together (onnxruntime, 1 thread,
                     batch 1, interleaved rounds, medians; the export's protocol), repeated;
                     measured speedup vs the cost model's (calibrated and datasheet profile)
    write <out>.csv and <out>.md

The 32x32 net (``DigitsResNet18(1, 10)`` at 1x32x32, ~37 MMAC) takes the trained digits-resnet18
weights (its convs do not depend on the resolution) with batch-norm statistics re-estimated on
upsampled digits; its accuracy is not measured (the weights were trained at 8x8). Its front point
is the digits-resnet18 knee's candidate (same layer names).

    python benchmarks/structure.py --out benchmarks/results/structure
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

# as the CLI does: idle OpenMP threads sleep instead of spinning (run_search uses every core,
# and spinning threads on a shared 2-core machine slowed fine-tuning many times over)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pandas as pd
import torch
import yaml
from torch.nn import functional as F

from autosparse.compress.apply import (
    bake,
    compress_model,
    structural_keep,
    taylor_scores,
)
from autosparse.compress.footprint import model_footprint
from autosparse.compress.shrink import shrink_model
from autosparse.compress.storage import model_zeros
from autosparse.config.hardware import load_profile
from autosparse.cost.calibrate import CalibrationSettings, run_calibration
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.onnx_files import export_onnx, onnx_outputs, time_onnx_files
from autosparse.export.packed import save_packed
from autosparse.search.runner import prepare, run_search
from autosparse.search.selection import knee
from autosparse.space.candidate import CHANNEL, Candidate, LayerChoice
from autosparse.space.discovery import discover, example_input
from autosparse.space.structure import leaders, parameter_count, pruned_by_group
from autosparse.workload.evaluate import evaluate
from autosparse.workload.models import DigitsResNet18

MEASURED = Path("benchmarks/results/calibration/measured-ci-epyc.yaml")
DATASHEET = "x86-server-vnni"
ARCHS = {  # label -> shipped config
    "digits-cnn": "search_spaces/quickstart.yaml",
    "digits-resnet18": "search_spaces/digits-resnet18.yaml",
    "digits-mobilenet": "search_spaces/digits-mobilenet.yaml",
    "digits-vit": "search_spaces/digits-vit.yaml",
    "digits-conv1d": "search_spaces/digits-conv1d.yaml",
}
BIG = "resnet18-32x32"
UNIFORM = (0.25, 0.5, 0.75)


def uniform(table, sparsity: float) -> Candidate:
    return Candidate({name: LayerChoice.make(CHANNEL, sparsity, 32) for name in leaders(table)})


def bench_config(shipped: str, runs_dir: Path, trials: int, steps: int, profile: Path) -> Path:
    """The shipped config for a short search: its space and model, GA, accuracy + latency on
    ``profile``, ``trials`` trials of ``steps`` fine-tune steps, Fisher sensitivity, no
    re-evaluation seeds."""
    config = yaml.safe_load(Path(shipped).read_text())
    arch = config["model"]["builtin"]
    tag = hashlib.sha1(profile.read_bytes()).hexdigest()[:8]  # a refitted profile: new study
    config.update(name=f"bench-structure-{arch}-{tag}", objectives=["accuracy", "latency"],
                  hardware=str(profile.resolve()))
    config["budget"] = {"trials": trials}
    config["strategy"] = {"name": "ga", "population_size": 8}
    config["finetune"] = {**config.get("finetune", {}), "steps": steps, "reeval_seeds": 0}
    config["sensitivity"] = {"method": "fisher"}  # one pass, not a forward per choice
    path = runs_dir / "configs" / f"{arch}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def front_point(config: Path, runs_dir: Path) -> tuple[Candidate, str]:
    """Run (or resume: the study lives under runs_dir) the short search; its knee by latency."""
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    torch.set_num_threads(1)  # run_search sets all cores
    chosen = knee(outcome.trials, "latency")
    row = outcome.trials.set_index("trial").loc[chosen.trial]
    front = int(outcome.trials["on_front"].sum())
    label = (f"front knee (trial {chosen.trial} of {len(outcome.trials)}, front of {front}, "
             f"val acc {row['accuracy']:.1f})")
    return Candidate.from_json(row["candidate"]), label


def describe(candidate: Candidate, table) -> str:
    """Compact per-layer summary: pattern/sparsity/bits counts."""
    counts: dict[str, int] = {}
    for name in table.names:
        c = candidate.get_choice(name)
        key = "dense" if c.pattern == "dense" or c.sparsity == 0 else f"{c.pattern} {c.sparsity:g}"
        key += f"/{c.bits}b"
        counts[key] = counts.get(key, 0) + 1
    return "; ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))


def export_candidate(dense, table, graph, input_shape, candidate, stem: Path, *, tune=None,
                     scores=None, test_loader=None) -> dict:
    """Compress (and fine-tune with ``tune``), bake, shrink, pack, ONNX: the figures of one row."""
    if tune is not None:
        student, _ = tune(candidate)
    else:
        student = compress_model(dense, candidate, scores, graph)
    baked = bake(student)
    _, _, kept = structural_keep(dense, candidate, graph, scores)
    example = example_input(baked, input_shape)
    shrunk, report = shrink_model(baked, candidate, table, graph, kept, example)
    info = save_packed(shrunk, candidate, stem.with_suffix(".packed"), table=table, kept=kept)
    onnx_path = export_onnx(shrunk, input_shape, stem.with_suffix(".onnx"))
    x = torch.randn((4, *input_shape), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = shrunk.eval()(x).numpy()
    onnx_error = float(np.abs(onnx_outputs(onnx_path, x.numpy()) - want).max()
                       / max(float(np.abs(want).max()), 1e-12))
    pruned = {g: n for g, n in pruned_by_group(table, candidate).items() if n}
    exported = {g.name: g.channels_before - g.channels_after for g in report.groups}
    row = {
        "params_dense": report.parameters_before,
        "params_predicted": parameter_count(table, candidate),
        "params_exported": sum(p.numel() for p in shrunk.parameters()),
        # what the size objective scores: the formula with the fine-tuned weights' own zeros
        "bits_predicted": model_footprint(table, candidate,
                                          model_zeros(shrunk, table, candidate)).total_bits,
        "bits_formula_pattern_only": model_footprint(table, candidate).total_bits,
        "bits_packed": info.payload_bits,
        "payload_bytes": info.payload_bytes,
        "file_bytes": info.file_bytes,
        "header_bytes": info.header_bytes,
        "buffer_bytes": info.buffer_bytes,
        "groups_removable": len(leaders(table)),
        "groups_pruned": len(pruned),
        "groups_shrunk": sum(1 for g, n in pruned.items() if exported.get(g) == n),
        "onnx_rel_error": onnx_error,
        "onnx_path": str(onnx_path),
    }
    if test_loader is not None:
        row["test_acc_exported"] = evaluate(shrunk, test_loader)
    return row


def predicted_ms(table, candidate, profiles) -> dict:
    """Cost-model latency of the dense model and of what the fp32 ONNX file runs: the
    candidate's structure at 32 bits (its fake-quantized weights are stored dequantized there);
    ``pred_scored_ms_*`` is the candidate as the search scored it (with its bits)."""
    fp32 = Candidate({n: LayerChoice.make(c.pattern, c.sparsity, 32, c.criterion)
                      for n, c in candidate.items()})
    out = {}
    for name, profile in profiles.items():
        out[f"pred_dense_ms_{name}"] = estimate_cost(table, Candidate({}), profile).latency_ms
        out[f"pred_ms_{name}"] = estimate_cost(table, fp32, profile).latency_ms
        out[f"pred_scored_ms_{name}"] = estimate_cost(table, candidate, profile).latency_ms
    return out


def time_arch(rows: list[dict], dense_onnx: Path, input_shape, rounds: int, calls: int,
              repeats: int) -> None:
    """Dense and every candidate of one architecture in the same interleaved call, ``repeats``
    times; medians of the latencies and of the per-repeat speedups."""
    files = {"dense": dense_onnx, **{f"c{i}": r["onnx_path"] for i, r in enumerate(rows)}}
    runs = [time_onnx_files(files, input_shape, rounds, calls, seed=s) for s in range(repeats)]
    for i, row in enumerate(rows):
        row["meas_dense_ms"] = statistics.median(r["dense"] for r in runs) * 1e3
        row["meas_ms"] = statistics.median(r[f"c{i}"] for r in runs) * 1e3
        speedups = [r["dense"] / r[f"c{i}"] for r in runs]
        row["meas_speedup"] = statistics.median(speedups)
        row["meas_speedup_min"], row["meas_speedup_max"] = min(speedups), max(speedups)


def big_resnet(trained_state: dict, data) -> torch.nn.Module:
    """DigitsResNet18 at 32x32: the trained 8x8 weights, batch-norm statistics re-estimated by
    20 train-mode passes over upsampled training digits (cumulative average)."""
    model = DigitsResNet18(1, 10)
    model.load_state_dict(trained_state)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        for step, (x, _) in enumerate(data.loader("train", 64, shuffle=True, seed=0)):
            if step == 20:
                break
            model(F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False))
    return model.eval()


def run(args) -> pd.DataFrame:
    torch.set_num_threads(1)
    profiles = {"calibrated": load_profile(args.calibrated), "datasheet": load_profile(DATASHEET)}
    if args.local:
        profiles["local"] = load_profile(args.local)
    search_profile = args.local or args.calibrated
    all_rows: list[dict] = []
    resnet18 = None  # (dense state, data, front candidate, label) for the 32x32 net
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for arch in args.archs:
            start = time.perf_counter()
            config = bench_config(ARCHS[arch], args.runs_dir, args.trials, args.finetune_steps,
                                  search_profile)
            front, front_label = front_point(config, args.runs_dir)
            context = prepare(config, args.runs_dir)
            torch.set_num_threads(1)
            evaluator = context.objective().evaluator
            table, graph, shape = context.table, context.graph, context.data.input_shape
            candidates = {f"channel {int(s * 100)} %": uniform(table, s) for s in UNIFORM}
            candidates[front_label] = front
            test = context.data.loader("test", 256)
            rows = []
            for label, candidate in candidates.items():
                row = {"arch": arch, "candidate": label, "layers": describe(candidate, table),
                       "test_acc_dense": context.dense_metrics["test_accuracy"],
                       **export_candidate(context.dense, table, graph, shape, candidate,
                                          work / f"{arch}-{len(rows)}",
                                          tune=lambda c: evaluator.compress_and_tune(c),
                                          scores=evaluator._scores(candidate), test_loader=test),
                       **predicted_ms(table, candidate, profiles)}
                rows.append(row)
            dense_onnx = export_onnx(context.dense, shape, work / f"{arch}-dense.onnx")
            time_arch(rows, dense_onnx, shape, args.rounds, args.calls, args.repeats)
            all_rows += rows
            print(f"{arch}: {time.perf_counter() - start:.0f} s", flush=True)
            if arch == "digits-resnet18":
                resnet18 = (copy.deepcopy(context.dense.state_dict()), context.data, front,
                            front_label)
        if resnet18 is not None and args.big:
            start = time.perf_counter()
            state, data, front, front_label = resnet18
            model = big_resnet(state, data)
            shape = (1, 32, 32)
            table, graph = discover(model, shape)
            candidates = {f"channel {int(s * 100)} %": uniform(table, s) for s in UNIFORM}
            candidates[f"digits-resnet18 {front_label}"] = front
            scores = None
            if any(c.criterion == "taylor" for c in front.values()):
                batches = ((F.interpolate(x, size=(32, 32), mode="bilinear",
                                          align_corners=False), y)
                           for x, y in data.loader("train", 64, shuffle=True, seed=0))
                scores = taylor_scores(model, batches, table.names, 4)
            rows = []
            for label, candidate in candidates.items():
                rows.append({"arch": BIG, "candidate": label, "layers": describe(candidate, table),
                             **export_candidate(model, table, graph, shape, candidate,
                                                work / f"{BIG}-{len(rows)}", scores=scores),
                             **predicted_ms(table, candidate, profiles)})
            dense_onnx = export_onnx(model, shape, work / f"{BIG}-dense.onnx")
            time_arch(rows, dense_onnx, shape, args.rounds, args.calls, args.repeats)
            all_rows += rows
            print(f"{BIG}: {time.perf_counter() - start:.0f} s", flush=True)
    frame = pd.DataFrame(all_rows).drop(columns=["onnx_path"])
    frame["params_equal"] = frame.params_predicted == frame.params_exported
    frame["bits_equal"] = frame.bits_predicted == frame.bits_packed
    for name in profiles:
        frame[f"pred_speedup_{name}"] = frame[f"pred_dense_ms_{name}"] / frame[f"pred_ms_{name}"]
        frame[f"speedup_ratio_{name}"] = frame.meas_speedup / frame[f"pred_speedup_{name}"]
    return frame


def _yes(value: bool) -> str:
    return "yes" if value else "**no**"


def _met(ok: bool) -> str:
    return "met" if ok else "not met"


def reading(frame: pd.DataFrame, names: list[str], tolerance: float) -> list[str]:
    """The targets, checked on the figures."""
    rows = len(frame)
    params = int(frame.params_equal.sum())
    bits = int(frame.bits_equal.sum())
    shrunk, pruned = int(frame.groups_shrunk.sum()), int(frame.groups_pruned.sum())
    uniform_rows = frame[frame.candidate.str.startswith("channel")]
    full = bool((uniform_rows.groups_pruned == uniform_rows.groups_removable).all())
    lines = [
        "## Reading", "",
        f"- **Parameters predicted = exported: {_met(params == rows)}** ({params} of {rows} "
        "rows; `structure.parameter_count` is what the search counts, the shrunk model's "
        "`parameters()` what deploys).",
        f"- **Stored bits predicted = packed: {_met(bits == rows)}** ({bits} of {rows} rows, "
        "to the bit; the file adds a header and the batch-norm buffers, in the CSV).",
        f"- **Every offered group shrunk: {_met(shrunk == pruned and full)}** ({shrunk} of "
        f"{pruned} pruned groups removed; the uniform candidates prune every removable group "
        f"of their model: {'yes' if full else 'no'}). ONNX agrees with the shrunk model to "
        f"{frame.onnx_rel_error.max():.1e} relative at worst.",
    ]
    resnets = frame[frame.arch.str.contains("resnet") & (frame.candidate == "channel 50 %")]
    for name in names:
        parts = [f"{r.arch} {r.meas_speedup:.2f}× measured vs {getattr(r, f'pred_speedup_{name}'):.2f}× "
                 f"predicted (ratio {getattr(r, f'speedup_ratio_{name}'):.2f})"
                 for r in resnets.itertuples()]
        ok = bool((abs(resnets[f"speedup_ratio_{name}"] - 1) <= tolerance).all())
        lines.append(f"- **ResNet channel 50 %: measured speedup within {tolerance:.0%} of "
                     f"the predicted one with the {name} profile: {_met(ok)}** "
                     f"({'; '.join(parts)}).")
    ratios = {name: frame[f"speedup_ratio_{name}"] for name in names}
    lines.append("- Measured / predicted speedup over all rows (median, range): " + "; ".join(
        f"{name} {r.median():.2f} ({r.min():.2f}–{r.max():.2f}), within 10 %: "
        f"{int((abs(r - 1) <= 0.1).sum())} of {rows}" for name, r in ratios.items()) + ".")
    return lines


def markdown(frame: pd.DataFrame, command: str, wall: float, args, names: list[str]) -> str:
    search_profile = args.local or args.calibrated
    local = (f" and `{args.local}` (fitted on this machine by `autosparse calibrate`: "
             f"`local`;{args.calibration})" if args.local else "")
    lines = [
        "# Structure: what the search scores is what export deploys", "",
        f"Command: `{command}` ({wall / 60:.1f} min wall on 2 shared cores). "
        "Per architecture: channel 25 / 50 / 75 % on every group leader export can remove "
        "(every other layer dense fp32) and the knee (accuracy vs latency) of a short real search "
        f"of the shipped space (GA, {args.trials} trials x {args.finetune_steps} fine-tune steps, "
        f"objectives accuracy + latency on `{search_profile}`, Fisher sensitivity, no "
        "re-evaluation seeds; with fewer than 3 front points the knee rule takes the most "
        f"accurate). Every candidate is fine-tuned with the search's recipe ({args.finetune_steps} "
        "steps, distillation), baked, shrunk by Torch-Pruning, packed and exported to ONNX fp32. "
        "Parameters: `structure.parameter_count` vs the shrunk model's; stored bits: the size "
        "formula as the search's size objective scores it (`footprint.model_footprint` with the "
        "fine-tuned model's own zeros, `storage.model_zeros`; the pattern-only formula is "
        "`bits_formula_pattern_only` in the CSV) vs the packed payload "
        "(`PackedInfo.payload_bits`; header and batch-norm buffers are outside the formula); groups: removed by export / "
        "pruned by the candidate / removable in the model. Latency: dense and the four "
        f"candidates of an architecture timed in the same interleaved call ({args.rounds} rounds "
        f"x {args.calls} calls, 1 thread, batch 1; the export's protocol), {args.repeats} "
        "repeats; medians of latencies and of per-repeat speedups (range in the CSV). Predicted "
        "speedup: the cost model's dense / candidate latency with the shipped calibrated profile "
        f"`{args.calibrated}` (`calibrated`: fitted on the 2-core AMD EPYC CI machine){local}, "
        f"and the datasheet profile `{DATASHEET}`. Test accuracy: the exported (shrunk) PyTorch "
        "model after the fine-tune, on the 360 test images (dense in brackets). A front point "
        "with int8 layers is timed as the fp32 ONNX file (dequantized weights), so its "
        "prediction is for that file: its structure at 32 bits (`pred_scored_ms_*` in the CSV "
        "is the candidate as scored, with its bits).",
        "",
        f"`{BIG}`: `DigitsResNet18(1, 10)` at 1x32x32 with the trained digits-resnet18 weights "
        "and batch-norm statistics re-estimated by 20 train-mode passes over upsampled training "
        "digits; not fine-tuned, accuracy not measured. Its front point is the digits-resnet18 "
        "knee's candidate.", "",
    ]
    head = ("| arch | candidate | params predicted = exported | stored bits predicted = packed "
            "| groups shrunk / pruned / removable | dense → candidate ms (measured) "
            "| speedup measured | " + " | ".join(f"predicted ({n})" for n in names)
            + " | predicted (datasheet) | test acc |")
    lines += [head, "|" + "---|" * (9 + len(names))]
    for r in frame.itertuples():
        acc = "" if pd.isna(getattr(r, "test_acc_exported", np.nan)) else \
            f"{r.test_acc_exported:.1f} ({r.test_acc_dense:.1f})"
        predicted = " | ".join(f"{getattr(r, f'pred_speedup_{n}'):.2f}× "
                               f"({getattr(r, f'speedup_ratio_{n}'):.2f})" for n in names)
        lines.append(
            f"| {r.arch} | {r.candidate} | {r.params_predicted:,} = {r.params_exported:,} "
            f"{_yes(r.params_equal)} | {r.bits_predicted:,} = {r.bits_packed:,} {_yes(r.bits_equal)} "
            f"| {r.groups_shrunk} / {r.groups_pruned} / {r.groups_removable} "
            f"| {r.meas_dense_ms:.4f} → {r.meas_ms:.4f} | {r.meas_speedup:.2f}× "
            f"| {predicted} | {r.pred_speedup_datasheet:.2f}× | {acc} |")
    lines += ["", "Predicted columns: speedup (measured / predicted in brackets).", "",
              *reading(frame, names, 0.10), "",
              "Front points (pattern sparsity / bits × layers):", ""]
    lines += [f"- {r.arch}, {r.candidate}: {r.layers}" for r in frame.itertuples()
              if not r.candidate.startswith("channel")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--no-big", dest="big", action="store_false",
                        help=f"skip {BIG} (needs digits-resnet18 in --archs)")
    parser.add_argument("--calibrated", type=Path, default=MEASURED,
                        help="the shipped calibrated profile (fitted on the CI machine)")
    parser.add_argument("--local", type=Path, default=None,
                        help="a profile fitted on this machine by `autosparse calibrate`; the "
                        "short searches then score latency with it")
    parser.add_argument("--calibrate", action="store_true",
                        help="first fit a profile on this machine (`autosparse calibrate`, "
                        "defaults, into <runs-dir>/calibration) and use it as --local")
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--finetune-steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--calls", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/bench-structure"),
                        help="dense models and the short searches' studies (a rerun resumes)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/structure"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    args.calibration = ""
    if args.calibrate:
        outcome = run_calibration(CalibrationSettings(), args.runs_dir / "calibration",
                                  printer=print)
        seconds = time.perf_counter() - start
        args.local = outcome.profile_path
        fp32 = next(p for p in outcome.profile.precisions if p.bits == 32)
        held = outcome.held_out
        args.calibration = (
            f" fitted by this command first with `autosparse calibrate`'s defaults, 90 "
            f"variants, in {seconds:.0f} s: held-out Spearman "
            f"{held['spearman']:.3f}, {held['within_10_percent']:.0f} % of "
            f"{held['count']:.0f} within ±10 %, MAPE {held['mape_percent']:.1f} %; fp32 "
            f"{fp32.macs_per_second / 1e9:.1f} GMAC/s, {fp32.layer_overhead_us:.2f} µs per "
            f"layer, channel block {fp32.channel_block}.")
    frame = run(args)
    wall = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out.with_suffix(".csv"), index=False, float_format="%.5g")
    command = "python benchmarks/structure.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    names = ["calibrated"] + (["local"] if args.local else [])
    args.out.with_suffix(".md").write_text(markdown(frame, command, wall, args, names))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
