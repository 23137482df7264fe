"""Does a search run on the GPU, and how much faster is it? The same short search on cuda and cpu.

    for device in (cuda when torch sees one, cpu):
        copy the config with name gpu-check-<device>, device: <device>, budget --trials,
        fine-tune --steps, no re-evaluation seeds
        run_search (one worker); the dense model is cached once and shared (its cache key does
        not name the device), so the loop times compare trials only
        record trials/hour (finished trials / trial-loop wall time), mean fine-tune seconds per
        trial, dense and best accuracy, and on cuda torch.cuda.max_memory_allocated
    write <out> (markdown) with both columns side by side, and the command line

On a machine without a GPU only the CPU half runs and the file says that no GPU was present.

    python benchmarks/gpu_check.py search_spaces/custom-loader.yaml --trials 8 --steps 100 \
        --out benchmarks/results/gpu_check.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from autosparse.search.runner import run_search


def _run(config: dict, device: str, args: argparse.Namespace, runs_dir: Path) -> dict:
    config = {**config, "name": f"gpu-check-{device.replace(':', '')}", "device": device,
              "budget": {"trials": args.trials},
              "finetune": {**config.get("finetune", {}), "reeval_seeds": 0,
                           "amp": bool(args.amp)}}
    if args.steps is not None:
        config["finetune"] = {**{k: v for k, v in config["finetune"].items() if k != "epochs"},
                              "steps": args.steps}
    if args.train_epochs is not None and "builtin" in config["model"]:
        config["model"] = {**config["model"], "train_epochs": args.train_epochs}
    path = runs_dir / f"{config['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    outcome = run_search(path, runs_dir=runs_dir, printer=lambda line: None)
    wall = time.perf_counter() - start
    trials = outcome.trials
    done = trials[trials["state"] == "COMPLETE"]
    tuned = done[done["finetune_seconds"] > 0] if "finetune_seconds" in done else done.iloc[:0]
    loop = outcome.search_seconds
    return {
        "device": device,
        "trials finished": len(done),
        "trial loop (s)": round(loop, 1),
        "trials/hour": round(3600 * len(done) / loop, 1) if loop > 0 else float("nan"),
        "fine-tune s/trial": round(float(tuned["finetune_seconds"].mean()), 3)
        if len(tuned) else float("nan"),
        "eval s/trial": round(float(tuned["eval_seconds"].mean()), 3) if len(tuned) else
        float("nan"),
        "best accuracy (%)": round(float(done["accuracy"].max()), 2) if len(done) else
        float("nan"),
        "peak GPU memory (MiB)": round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
        if cuda else "-",
        "whole command (s)": round(wall, 1),
    }


def _command() -> str:
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _markdown(rows: list[dict], args: argparse.Namespace, gpu: str | None) -> str:
    keys = [k for k in rows[0] if k != "device"]
    lines = ["# GPU check: the same short search on each device", "",
             f"Command: `{_command()}`", "",
             f"Machine: {platform.processor() or platform.machine()}, "
             f"{torch.get_num_threads()} torch threads, torch {torch.__version__}; "
             f"GPU: {gpu or 'none present (only the CPU half ran)'}", "",
             f"Config {args.config}: {args.trials} trials, fine-tune "
             f"{args.steps if args.steps is not None else 'as configured'} steps, "
             f"amp {'on' if args.amp else 'off'}, one worker. trials/hour = finished trials / "
             "trial-loop wall time (dense training excluded: it is cached and shared).", "",
             "| | " + " | ".join(r["device"] for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(str(r[key]) for r in rows) + " |")
    if gpu is None:
        lines += ["", "No GPU was present on this machine: the cuda column is missing. Run the "
                  "same command where `torch.cuda.is_available()` to fill it."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default="search_spaces/custom-loader.yaml")
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="fine-tune steps per trial")
    parser.add_argument("--train-epochs", type=int, default=None,
                        help="dense training epochs of a built-in model")
    parser.add_argument("--amp", action="store_true", help="finetune.amp on both devices")
    parser.add_argument("--runs-dir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_check.md"))
    args = parser.parse_args()
    config = yaml.safe_load(Path(args.config).read_text())
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    devices = (["cuda:0"] if gpu else []) + ["cpu"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for device in devices:
            rows.append(_run(config, device, args, runs_dir))
            print(rows[-1], flush=True)
    text = _markdown(rows, args, gpu)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
