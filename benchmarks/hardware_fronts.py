"""Does the target device change what the search keeps? One search per hardware profile.

    for profile in profiles:
        the quickstart config with `hardware: <profile>`, objectives accuracy + latency + energy
        and the constraint accuracy_drop <= MAX_DROP, as study `hw-<profile>` (fresh each time)
        outcome = run_search(...)
        row = front size, best predicted latency / energy within the drop vs the dense model's,
              what the front's layers use: pattern shares, precision the layers run on
    plus, without any search: the predicted speedup and energy saving of uniform choices (int8,
    channel 50 %, 2:4, 90 % unstructured...) over dense fp32 on three layer tables of growing
    size (the quickstart CNN, a 32x32 CNN, an LLM-sized MLP block), per profile
    write <out>.csv (one row per front point and layer), <out>_uniform.csv, <out>.md

    python benchmarks/hardware_fronts.py --profiles x86-server-vnni edge-arm-a76 gpu-h100 \
        accel-bitfusion --trials 40 --runs-dir runs/benchmarks --out benchmarks/results/hardware_fronts
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from autosparse.config.hardware import load_profile
from autosparse.cost.calibration.architectures import ARCHITECTURES
from autosparse.cost.estimate import estimate_cost
from autosparse.search.runner import prepare, run_search
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover_layers
from autosparse.space.layers import LayerInfo, LayerTable

MAX_DROP = 1.0


def write_config(base: dict, profile: str, trials: int, runs_dir: Path) -> Path:
    data = json.loads(json.dumps(base))
    data.update(name=f"hw-{profile}", hardware=profile, objectives=["accuracy", "latency", "energy"],
                constraints=[f"accuracy_drop <= {MAX_DROP}"])
    data["budget"] = {"trials": trials}
    path = runs_dir / f"hw-{profile}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def front_layers(config_path: Path, runs_dir: Path, front: pd.DataFrame,
                 trials: pd.DataFrame) -> pd.DataFrame:
    """One row per (front point, layer): the choice, the precision it runs on, accelerated?"""
    context = prepare(config_path, runs_dir)
    rows = []
    by_trial = trials.set_index("trial")
    for trial in front["trial"]:
        candidate = Candidate.from_json(by_trial.loc[trial, "candidate"])
        cost = estimate_cost(context.table, candidate, context.profile)
        for layer in cost.layers:
            choice = candidate.get_choice(layer.name)
            rows.append({"trial": int(trial), "layer": layer.name, "pattern": choice.pattern,
                         "sparsity": choice.sparsity, "bits": choice.bits,
                         "runs_on": layer.precision, "accelerated": layer.accelerated,
                         "latency_us": layer.latency_s * 1e6, "energy_uj": layer.energy_j * 1e6})
    return pd.DataFrame(rows)


def summarise(profile: str, outcome, layers: pd.DataFrame, dense: dict) -> dict:
    front = outcome.front
    within = front[front["accuracy_drop"] <= MAX_DROP]
    shares = layers["pattern"].value_counts(normalize=True)
    runs_on = layers["runs_on"].value_counts(normalize=True)
    return {
        "profile": profile,
        "front": len(front),
        "dense_latency_ms": dense["latency_ms"],
        "best_latency_ms": within["latency_ms"].min(),
        "latency_gain": dense["latency_ms"] / within["latency_ms"].min(),
        "dense_energy_uj": dense["energy_uj"],
        "best_energy_uj": within["energy_uj"].min(),
        "energy_gain": dense["energy_uj"] / within["energy_uj"].min(),
        **{f"pattern_{p}": round(float(shares.get(p, 0.0)), 2)
           for p in ("dense", "unstructured", "channel", "2:4")},
        "runs_on": ", ".join(f"{k} {v:.0%}" for k, v in runs_on.items()),
        "seconds": round(outcome.search_seconds, 1),
    }


UNIFORM = {  # label -> (pattern, sparsity, bits); layers the pattern does not fit stay dense at bits
    "int8": ("dense", 0.0, 8),
    "channel 50 %": ("channel", 0.5, 32),
    "channel 50 % + int8": ("channel", 0.5, 8),
    "16-bit": ("dense", 0.0, 16),
    "2:4 16-bit": ("2:4", 0.5, 16),
    "2:4 int8": ("2:4", 0.5, 8),
    "unstructured 90 % fp32": ("unstructured", 0.9, 32),
    "unstructured 90 % int8": ("unstructured", 0.9, 8),
    "int4": ("dense", 0.0, 4),
    "int2": ("dense", 0.0, 2),
}


def llm_mlp_table(tokens: int = 512, width: int = 4096, hidden: int = 11008) -> LayerTable:
    """An LLM feed-forward block (up, down projections) applied to `tokens` tokens at once."""
    def linear(name: str, n_in: int, n_out: int) -> LayerInfo:
        return LayerInfo(name, "Linear", (n_out, n_in), False, tokens * n_in * n_out,
                         tokens * n_in, tokens * n_out)
    return LayerTable((linear("up", width, hidden), linear("down", hidden, width)))


def uniform_tables(quickstart: LayerTable) -> dict[str, LayerTable]:
    cifar = ARCHITECTURES["cifar-cnn"]
    return {"quickstart digits-cnn (0.5 MMAC)": quickstart,
            "cifar-cnn 32x32 (29 MMAC)": discover_layers(cifar.build(), cifar.input_shape),
            "LLM MLP block, 512 tokens (46 GMAC)": llm_mlp_table()}


def uniform_speedups(tables: dict[str, LayerTable], profiles: list[str]) -> pd.DataFrame:
    """Predicted latency and energy of each uniform choice relative to dense fp32."""
    rows = []
    for table_name, table in tables.items():
        for profile_name in profiles:
            profile = load_profile(profile_name)
            dense = estimate_cost(table, Candidate({}), profile)
            for label, (pattern, sparsity, bits) in UNIFORM.items():
                choices = {layer.name: LayerChoice.make(pattern, sparsity, bits)
                           if layer.supports(pattern) else LayerChoice.make("dense", 0.0, bits)
                           for layer in table.layers}
                cost = estimate_cost(table, Candidate(choices), profile)
                rows.append({"model": table_name, "profile": profile_name, "choice": label,
                             "speedup": dense.latency_s / cost.latency_s,
                             "energy_saving": dense.energy_j / cost.energy_j})
    return pd.DataFrame(rows)


def uniform_markdown(frame: pd.DataFrame) -> str:
    lines = ["## What each device accelerates (cost model, no search)", "",
             "Predicted speedup over dense fp32 (energy saving in brackets) when every layer "
             "takes the same choice; batch 1. 16-bit weights run on the device's int16 if it has "
             "one, else fp16 (GPU, A76); 2:4 is accelerated only on the GPU, at 8 and 16 bits, so "
             "compare each 2:4 row with the dense row of the same width.", ""]
    for model, part in frame.groupby("model", sort=False):
        profiles = list(dict.fromkeys(part["profile"]))
        lines += [f"**{model}**", "", "| choice | " + " | ".join(profiles) + " |",
                  "|---|" + "---|" * len(profiles)]
        for choice, rows in part.groupby("choice", sort=False):
            cells = [f"{r.speedup:.2f}x ({r.energy_saving:.2f}x)" for r in rows.itertuples()]
            lines.append(f"| {choice} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def markdown(rows: list[dict], command: str) -> str:
    lines = [
        "# Hardware profiles change the front (quickstart, objectives accuracy + latency + energy)",
        "",
        f"Command: `{command}`",
        "",
        f"Each row is one GA search of the quickstart space with the constraint accuracy_drop <= "
        f"{MAX_DROP:g}. Gains are the dense model's predicted latency / energy over the best front "
        "point's. Pattern shares and precisions count every layer of every front point.",
        "",
        "| profile | front | dense latency | best latency | gain | dense energy | best energy | gain "
        "| dense | unstructured | channel | 2:4 | layers run on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['profile']} | {r['front']} | {r['dense_latency_ms'] * 1e3:.3g} µs | "
            f"{r['best_latency_ms'] * 1e3:.3g} µs | {r['latency_gain']:.2f}x | "
            f"{r['dense_energy_uj']:.3g} µJ | {r['best_energy_uj']:.3g} µJ | "
            f"{r['energy_gain']:.2f}x | {r['pattern_dense']:.0%} | {r['pattern_unstructured']:.0%} | "
            f"{r['pattern_channel']:.0%} | {r['pattern_2:4']:.0%} | {r['runs_on']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="search_spaces/quickstart.yaml")
    parser.add_argument("--profiles", nargs="+",
                        default=["x86-server-vnni", "edge-arm-a76", "gpu-h100", "accel-bitfusion"])
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/hardware_fronts"))
    parser.add_argument("--uniform-only", action="store_true",
                        help="skip the searches; rebuild the report from the committed CSV")
    args = parser.parse_args(argv)
    base = yaml.safe_load(Path(args.config).read_text())
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    rows, all_layers = [], []
    summary_path = args.out.parent / f"{args.out.name}_summary.csv"
    if args.uniform_only:
        rows = pd.read_csv(summary_path).to_dict("records")
    for profile in [] if args.uniform_only else args.profiles:
        load_profile(profile)
        shutil.rmtree(args.runs_dir / f"hw-{profile}", ignore_errors=True)
        config = write_config(base, profile, args.trials, args.runs_dir)
        start = time.perf_counter()
        outcome = run_search(config, runs_dir=args.runs_dir, printer=lambda *_: None)
        context = prepare(config, args.runs_dir)
        layers = front_layers(config, args.runs_dir, outcome.front, outcome.trials)
        rows.append(summarise(profile, outcome, layers, context.dense_metrics))
        all_layers.append(layers.assign(profile=profile))
        print(f"{profile}: {len(outcome.front)} front points, {time.perf_counter() - start:.0f} s",
              flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.uniform_only:
        pd.concat(all_layers).to_csv(args.out.with_suffix(".csv"), index=False,
                                     float_format="%.5g")
        pd.DataFrame(rows).to_csv(summary_path, index=False, float_format="%.5g")
    command = "python benchmarks/hardware_fronts.py " + shlex.join(sys.argv[1:] if argv is None
                                                                   else argv)
    context = prepare(write_config(base, args.profiles[0], args.trials, args.runs_dir),
                      args.runs_dir)
    uniform = uniform_speedups(uniform_tables(context.table), args.profiles)
    uniform.to_csv(args.out.parent / f"{args.out.name}_uniform.csv", index=False,
                   float_format="%.4g")
    args.out.with_suffix(".md").write_text(markdown(rows, command) + "\n" +
                                           uniform_markdown(uniform))
    print(args.out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
