"""What is deployed against what was scored: every exported file's size, test metric and
measured latency, for a front of each built-in model.

    for config in the shipped configs (search_spaces/*.yaml, a built-in model each):
        search it (its own space; budget and re-evaluation cut to --trials / 0 so that all of
                   them fit a benchmark run) into --runs
        for each picked front point (the knee, the smallest, the most accurate; distinct):
            autosparse export (no MLflow registration): every file written and re-checked
            row per file: bytes, bytes / scored size, test metric, measured latency (onnxruntime,
                          1 thread, batch 1, interleaved rounds, medians) vs the dense fp32 ONNX
    write <out>.csv and <out>.md

    python benchmarks/deploy.py --out benchmarks/results/deploy

``--deploy TARGET`` searches every config with ``deploy: TARGET`` (the file the search scores:
``onnx``, ``onnx-int8``); with ``onnx-int8`` the configs' own bits and patterns are dropped so that
the target's space applies (int8 weights; channel removal, dense).

The scored size is the trial's ``size_kb`` (what the search optimised). A file that is not
meant to realise it (the fp32 reference ONNX, the torch.export program) is listed all the same:
the table says which file realises the front's figure. Timings are from a shared 2-core machine:
noisy; compare within a row group.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["quickstart", "digits-resnet", "digits-conv1d", "digits-mobilenet", "digits-vit",
           "diabetes-regression", "tiny-lm"]
MODEL_FILES = ("model.packed", "model.compact.onnx", "model.int8.onnx", "model.onnx",
               "model.pt2", "model.gguf")
FORMAT_OF = {"model.onnx": "onnx", "model.int8.onnx": "onnx_int8", "model.pt2": "pt2",
             "model.packed": "packed", "model.compact.onnx": "onnx_compact"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=CONFIGS, help="shipped config names")
    p.add_argument("--trials", type=int, default=24, help="search budget per config "
                   "(the quickstart keeps its own 40 with --full-quickstart)")
    p.add_argument("--full-quickstart", action="store_true",
                   help="search the quickstart with its own budget, as the README does")
    p.add_argument("--points", type=int, default=3, help="front points exported per config")
    p.add_argument("--deploy", choices=["packed", "onnx", "onnx-int8"], default=None,
                   help="search with this deploy target (default: the configs' own)")
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "deploy-bench")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "deploy")
    return p.parse_args(argv)


def config_for(name: str, args: argparse.Namespace) -> Path:
    """The shipped config with a benchmark budget, written under --runs."""
    data = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    data["name"] = f"deploy-{name}" + (f"-{args.deploy}" if args.deploy else "")
    if args.deploy:
        data["deploy"] = args.deploy
    if args.deploy == "onnx-int8":  # the target's own space: int8 weights, channel or dense
        for rule in [data.get("space", {}).get("default", {}), *data.get("space", {})
                     .get("rules", [])]:
            rule.pop("bits", None)
            rule.pop("patterns", None)
    if not (name == "quickstart" and args.full_quickstart):
        data["budget"] = {"trials": args.trials}
    data.setdefault("finetune", {})["reeval_seeds"] = 0
    args.runs.mkdir(parents=True, exist_ok=True)
    path = args.runs / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def picks(front: pd.DataFrame, count: int) -> list[tuple[str, int | None]]:
    """(why, trial) for the knee (None: ``export --knee`` picks it), the smallest and the most
    accurate front points (the smallest metric drop, whatever the task's metric)."""
    drop = "accuracy_drop" if "accuracy_drop" in front else "metric_drop"
    chosen: list[tuple[str, int | None]] = [("knee", None)]
    for why, trial in (("smallest", int(front.sort_values("size_kb").iloc[0]["trial"])),
                       ("best", int(front.sort_values(drop).iloc[0]["trial"]))):
        if trial not in [t for _, t in chosen]:
            chosen.append((why, trial))
    return chosen[:count]


def rows_of(config: str, why: str, report: dict, folder: Path) -> list[dict]:
    metric = report["metric"]["name"]
    test = report.get(f"test_{metric}") or report.get("test_accuracy") or {}
    latency = report.get("latency_ms_measured", {})
    scored = float(report["size_kb"]["search"] or report["size_kb"]["predicted"])
    size, compact = report["size_kb"], report.get("compact_onnx", {})
    counted = {  # the bytes of each file that hold what the search counted; the rest is apart
        "model.packed": round(size.get("packed_payload", 0) * 1000) or None,
        "model.compact.onnx": (compact.get("layer_bytes", 0) + compact.get("other_bytes", 0))
        or None}
    rows = []
    for name in MODEL_FILES:
        path = folder / name
        if not path.is_file():
            continue
        fmt = FORMAT_OF.get(name)
        rows.append({
            "config": config, "pick": why, "trial": report["trial"], "file": name,
            "bytes": path.stat().st_size, "scored_bytes": round(scored * 1000),
            "x_scored": path.stat().st_size / (scored * 1000),
            "counted_bytes": counted.get(name),
            f"test_{metric}" if metric != "accuracy" else "test_accuracy": test.get(fmt),
            "metric": metric,
            "latency_ms": latency.get(fmt),
            "dense_latency_ms": latency.get("dense_fp32"),
        })
    return rows


def markdown(frame: pd.DataFrame, command: str, seconds: float) -> str:
    lines = ["# Deployed files against the scored size", "",
             f"Generated by `benchmarks/deploy.py`. Command: `{command}`", "",
             f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; wall time "
             f"{seconds / 60:.1f} min on a shared 2-core machine (timings noisy).",
             "- `x scored` = file bytes / the trial's scored size (what the search optimised). "
             "`counted bytes` = the part of the file holding what the size objective counts "
             "(model.packed: its payload; model.compact.onnx: its searched layers and other "
             "parameters); header, graph, decode functions and batch-norm statistics are apart. "
             "Latency: onnxruntime, 1 thread, batch 1, medians of interleaved rounds, beside "
             "the dense fp32 ONNX measured in the same rounds; empty where the export does not "
             "time that file.", ""]
    for (config, pick, trial), group in frame.groupby(["config", "pick", "trial"], sort=False):
        metric = group["metric"].iloc[0]
        column = "test_accuracy" if metric == "accuracy" else f"test_{metric}"
        lines += [f"## {config}: {pick} (trial {trial}, scored {group['scored_bytes'].iloc[0]:,} "
                  "bytes)", "", f"| file | bytes | x scored | counted bytes | test {metric} | "
                  "latency ms | dense ms |", "|---|--:|--:|--:|--:|--:|--:|"]
        for _, row in group.iterrows():
            value = row.get(column)
            lat, dense = row["latency_ms"], row["dense_latency_ms"]
            counted = row["counted_bytes"]
            lines.append(f"| {row['file']} | {row['bytes']:,} | {row['x_scored']:.2f} | "
                         f"{'' if pd.isna(counted) else f'{int(counted):,}'} | "
                         f"{'' if pd.isna(value) else f'{value:.4g}'} | "
                         f"{'' if pd.isna(lat) else f'{lat:.4f}'} | "
                         f"{'' if pd.isna(dense) else f'{dense:.4f}'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from autosparse.export.exporter import run_export
    from autosparse.export.request import ExportRequest
    from autosparse.search.runner import run_search

    start = time.perf_counter()
    rows: list[dict] = []
    for name in args.configs:
        path = config_for(name, args)
        outcome = run_search(path, runs_dir=args.runs, printer=print)
        seen: set[int] = set()
        for why, trial in picks(outcome.front, args.points):
            request = (ExportRequest(knee=True, mlflow=False) if trial is None
                       else ExportRequest(trial=trial, mlflow=False))
            if trial in seen:
                continue
            exported = run_export(path, request, runs_dir=args.runs, printer=print)
            if exported.report["trial"] in seen:
                continue
            seen.add(exported.report["trial"])
            rows += rows_of(name, why, exported.report, exported.out_dir)
            print(json.dumps(rows[-1], default=str))
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    command = "python benchmarks/deploy.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".md").write_text(markdown(frame, command.strip(),
                                                    time.perf_counter() - start))
    print(f"written: {args.out.with_suffix('.md')}, {args.out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
