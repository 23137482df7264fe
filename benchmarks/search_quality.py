"""Does the search beat the by-hand recipe at equal compute? Every method gets the same total
fine-tune steps; fronts are picked on validation and reported on test.

    for model config in configs, seed in seeds, method in methods:
        fresh study; budget.finetune_steps = compute x fine-tunes x steps (tpe-4x: 4x that)
        methods that measure sensitivity first are charged its wall time in steps
        (seconds / measured seconds per fine-tune step), so it counts in compute and wall time
        row = hypervolume on validation at dense - 5 and dense - 1 points, the same front's
              hypervolume on test (each front point's model rebuilt, same seed, scored on the
              test split), best compression at <= 0.5 / <= 1 point validation drop with its test
              drop, fine-tunes spent, wall time, sensitivity share of it
        history = hypervolume (validation, dense - 5) against fine-tune steps spent
    write <out>.csv, <out>_history.csv, <out>.md and <out>.png

A benchmark, not a test: minutes per run. ``--report-only`` rebuilds the markdown and the plot.

    python benchmarks/search_quality.py \
        --configs search_spaces/digits-resnet.yaml search_spaces/quickstart.yaml \
        --seeds 0 1 2 --fine-tunes 48 --steps 100 --runs-dir runs/benchmarks \
        --out benchmarks/results/search_quality
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_strategies import delete_previous, machine_note  # noqa: E402

# What each method is, as config overrides. "compute" multiplies the shared fine-tune budget;
# "fidelity" turns the short-fine-tune screening on (a by-hand grid fine-tunes every point).
METHODS: dict[str, dict[str, Any]] = {
    "knapsack": {"strategy": {"name": "knapsack"}},
    "ga": {"strategy": {"name": "ga"}},
    "hybrid": {"strategy": {"name": "hybrid"}},
    "bo": {"strategy": {"name": "bo"}},
    "ga-mf": {"strategy": {"name": "ga"}, "fidelity": True},
    "random": {"strategy": {"name": "random"}},
    "grid-uniform": {"strategy": {"name": "grid-uniform"}},
    "grid-global": {"strategy": {"name": "grid-global"}},
    "tpe-4x": {"strategy": {"name": "bo", "warm_start": False, "use_sensitivity": False,
                            "screen": 1}, "compute": 4},
    # the fine-tune lr picked per search by the probe (finetune.lr: auto), charged to the budget
    "ga-lr-auto": {"strategy": {"name": "ga"}, "finetune": {"lr": "auto"}},
    "grid-global-lr-auto": {"strategy": {"name": "grid-global"}, "finetune": {"lr": "auto"}},
}
USES_SENSITIVITY = {"knapsack", "ga", "bo", "ga-mf", "hybrid", "ga-lr-auto"}
MARGINS = (5.0, 1.0)  # hypervolume references: dense accuracy minus this many points
DROPS = (0.5, 1.0)
_TOL = 1e-9


def method_config(base: dict, method: str, *, seed: int, fine_tunes: int, steps: int,
                  charged_steps: int, runs_dir: Path, model_tag: str) -> Path:
    """The base config with the method's strategy, the seed and the equal-compute budget."""
    spec = METHODS[method]
    data = json.loads(json.dumps(base))
    data["name"] = f"quality-{model_tag}-{method}-s{seed}"
    data["seed"] = seed
    data["strategy"] = {**data.get("strategy", {}), **spec["strategy"]}
    for key in [k for k in data["strategy"] if k not in ("name", "warm_start", "use_sensitivity",
                                                         "screen")]:
        data["strategy"].pop(key)  # population sizes etc. of the base config: method defaults
    budget = spec.get("compute", 1) * fine_tunes * steps - charged_steps
    data["budget"] = {"finetune_steps": max(steps, budget)}
    if method.startswith("grid"):
        data["budget"]["trials"] = spec.get("compute", 1) * fine_tunes
    data.setdefault("finetune", {})
    data["finetune"].update({"steps": steps, "reeval_seeds": 0, **spec.get("finetune", {})})
    data["fidelity"] = {"low_steps": max(1, steps // 4) if spec.get("fidelity") else 0}
    folder = runs_dir / "_quality_configs"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def normalised(frame: pd.DataFrame, objectives: list[str], dense: dict[str, float],
               accuracy_column: str = "accuracy") -> np.ndarray:
    from autosparse.config.objectives import OBJECTIVES

    columns = []
    for name in objectives:
        if name == "accuracy":
            columns.append(frame[accuracy_column].to_numpy(float) / 100.0)
        else:
            metric = OBJECTIVES[name].metric
            columns.append(frame[metric].to_numpy(float) / dense[metric])
    return np.column_stack(columns) if columns else np.zeros((0, 0))


def hypervolume_at(points: np.ndarray, objectives: list[str], dense_accuracy: float,
                   margin: float) -> float:
    from autosparse.config.objectives import OBJECTIVES
    from autosparse.search.pareto import hypervolume

    if len(points) == 0:
        return 0.0
    directions = [OBJECTIVES[n].direction for n in objectives]
    reference = [(dense_accuracy - margin) / 100.0 if n == "accuracy" else 1.0 for n in objectives]
    return float(hypervolume(points, directions, reference))


def seconds_per_step(context: Any) -> float:
    """Median wall time of one fine-tune step here, from three short fine-tunes of a candidate."""
    from autosparse.space.candidate import Candidate, LayerChoice

    candidate = Candidate({n: LayerChoice.make("unstructured", 0.5, 8)
                           for n in context.space.layer_names})
    cfg = context.config.finetune.model_copy(update={"steps": 30})
    evaluator = context.objective().evaluator
    times = []
    for _ in range(3):
        start = time.perf_counter()
        evaluator.compress_and_tune(candidate, cfg)
        times.append((time.perf_counter() - start) / 30)
    return float(np.median(times))


def test_scores(context: Any, frame: pd.DataFrame) -> dict[int, float]:
    """Test accuracy of each validation-front point: its model rebuilt (same seed) and scored."""
    from autosparse.space.candidate import Candidate
    from autosparse.workload.evaluate import evaluate

    evaluator = context.objective().evaluator
    out = {}
    for _, row in frame[frame["on_front"].astype(bool)].iterrows():
        model, _ = evaluator.compress_and_tune(Candidate.from_json(row["candidate"]))
        out[int(row["trial"])] = evaluate(model, context.data.loader("test", 512))
    return out


def best_compression(frame: pd.DataFrame, max_drop: float) -> pd.Series | None:
    ok = frame[(frame["state"] == "COMPLETE") & frame["feasible"].astype(bool)
               & (frame["accuracy_drop"] <= max_drop + _TOL)]
    if ok.empty:
        return None
    return ok.sort_values(["compression", "accuracy"], ascending=[False, False]).iloc[0]


def run_one(base: dict, method: str, *, seed: int, fine_tunes: int, steps: int, runs_dir: Path,
            model_tag: str, step_seconds: float, threads: int | None = None
            ) -> tuple[dict, pd.DataFrame]:
    from autosparse.search.early_stop import InfeasibleStart
    from autosparse.search.runner import prepare, run_search, run_sensitivity

    charged, sensitivity_seconds = 0, 0.0
    path = method_config(base, method, seed=seed, fine_tunes=fine_tunes, steps=steps,
                         charged_steps=0, runs_dir=runs_dir, model_tag=model_tag)
    delete_previous(path, runs_dir)
    start = time.perf_counter()
    if method in USES_SENSITIVITY:  # measured first, stored with the study, then charged
        table = run_sensitivity(path, runs_dir, printer=lambda line: None)
        sensitivity_seconds = float(table.seconds)
        charged = int(math.ceil(sensitivity_seconds / step_seconds))
        path = method_config(base, method, seed=seed, fine_tunes=fine_tunes, steps=steps,
                             charged_steps=charged, runs_dir=runs_dir, model_tag=model_tag)
    try:
        outcome = run_search(path, runs_dir=runs_dir, printer=lambda line: None, threads=threads)
    except InfeasibleStart:  # its first trials all past a bound (plain TPE's random start, say):
        # run again, as the message tells a user; the resumed study is not judged again
        outcome = run_search(path, runs_dir=runs_dir, printer=lambda line: None, threads=threads)
    wall = time.perf_counter() - start
    frame = outcome.trials
    context = prepare(path, runs_dir)
    context.open_study()  # reads what the study stored: sensitivity, the probed lr (lr: auto)
    objectives = context.config.objectives
    dense = context.dense_metrics
    tests = test_scores(context, frame)
    front = frame[frame["on_front"].astype(bool)].copy()
    front["test_accuracy"] = front["trial"].map(tests)
    row: dict[str, Any] = {
        "model": model_tag, "method": method, "seed": seed,
        "dense_val_acc": dense["accuracy"], "dense_test_acc": dense.get("test_accuracy", math.nan),
        "trials": len(frame), "full_finetunes": int((frame.get("fidelity", "") == "full").sum()
                                                    - frame["cached"].astype(bool).sum()),
        "pruned": int((frame["state"] == "PRUNED").sum()),
        "steps_spent": int(frame["finetune_steps_used"].sum()) + charged,
        "sensitivity_steps": charged, "sensitivity_seconds": sensitivity_seconds,
        "wall_seconds": wall, "front_size": len(front),
    }
    for margin in MARGINS:
        row[f"hv{margin:g}_val"] = hypervolume_at(normalised(front, objectives, dense), objectives,
                                                  dense["accuracy"], margin)
        row[f"hv{margin:g}_test"] = hypervolume_at(
            normalised(front, objectives, dense, "test_accuracy"), objectives,
            dense["test_accuracy"], margin)
    for drop in DROPS:
        best = best_compression(frame, drop)
        row[f"cr_drop{drop:g}"] = math.nan if best is None else float(best["compression"])
        test = math.nan
        if best is not None:
            test = tests.get(int(best["trial"]))
            if test is None:
                test = test_scores(context, frame.assign(on_front=frame["trial"] == best["trial"]))[
                    int(best["trial"])]
        row[f"test_drop_at_cr_drop{drop:g}"] = dense["test_accuracy"] - test
    history = hypervolume_history(frame, objectives, dense, charged)
    history.insert(0, "method", method)
    history.insert(0, "seed", seed)
    history.insert(0, "model", model_tag)
    return row, history


def hypervolume_history(frame: pd.DataFrame, objectives: list[str], dense: dict, charged: int
                        ) -> pd.DataFrame:
    """Validation hypervolume (dense - 5 points) after each trial against the steps spent."""
    from autosparse.config.objectives import OBJECTIVES
    from autosparse.search.pareto import hypervolume_history as history

    frame = frame.sort_values("trial")
    values = normalised(frame, objectives, dense)
    feasible = frame["feasible"].to_numpy(bool) & np.isfinite(values).all(axis=1)
    directions = [OBJECTIVES[n].direction for n in objectives]
    reference = [(dense["accuracy"] - 5) / 100 if n == "accuracy" else 1.0 for n in objectives]
    hv = history(np.nan_to_num(values), directions, reference, feasible)
    steps = charged + frame["finetune_steps_used"].cumsum().to_numpy()
    return pd.DataFrame({"trial": frame["trial"].to_numpy(), "steps": steps, "hypervolume": hv})


# --------------------------------------------------------------------------------------------
# report


def _median_range(values: pd.Series, spec: str) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    if len(values) == 1:
        return format(values.iloc[0], spec)
    return f"{format(values.median(), spec)} ({format(values.min(), spec)}–{format(values.max(), spec)})"


def render_markdown(runs: pd.DataFrame, meta: dict) -> str:
    made = f"`{meta['command']}`"
    if meta.get("parts"):
        made = "these runs, made in parallel, then merged by " + made + ":\n\n" + "\n".join(
            f"    {part}" for part in meta["parts"]) + "\n\nrun"
    lines = ["# Search quality at equal compute", "",
             f"Produced by {made} on {meta['machine']} ({meta['date']}).", "",
             f"Every method: {meta['fine_tunes']} fine-tunes x {meta['steps']} steps of compute "
             "(`budget.finetune_steps`; `tpe-4x` gets 4x). Methods that measure per-layer "
             "sensitivity are charged its wall time in fine-tune steps. Fronts are picked on "
             "validation; `test` columns score the same front points on the test split "
             "(models rebuilt with the same seed). Medians over seeds, range in brackets.", ""]
    for model, part in runs.groupby("model", sort=False):
        lines += [f"## {model}", "", "| method | HV val (−5 pt) | HV test (−5 pt) | HV val (−1 pt) "
                  "| HV test (−1 pt) | best CR ≤ 0.5 pt (val) | ≤ 1 pt (val) | test drop there "
                  "| full fine-tunes | screened out | sensitivity share of wall | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, rows in part.groupby("method", sort=False):
            share = (rows["sensitivity_seconds"] / rows["wall_seconds"])
            lines.append("| " + " | ".join([
                method, _median_range(rows["hv5_val"], ".4f"), _median_range(rows["hv5_test"], ".4f"),
                _median_range(rows["hv1_val"], ".5f"), _median_range(rows["hv1_test"], ".5f"),
                _median_range(rows["cr_drop0.5"], ".1f"), _median_range(rows["cr_drop1"], ".1f"),
                _median_range(rows["test_drop_at_cr_drop1"], ".2f"),
                _median_range(rows["full_finetunes"].astype(float), ".0f"),
                _median_range(rows["pruned"].astype(float), ".0f"),
                _median_range(share * 100, ".1f") + " %", _median_range(rows["wall_seconds"], ".0f"),
            ]) + " |")
        lines.append("")
        lines += targets(part)
        lines += per_seed(part)
    return "\n".join(lines) + "\n"


def per_seed(part: pd.DataFrame) -> list[str]:
    """Every run: HV on validation / test (−5 pt) and best CR at ≤ 1 pt validation drop."""
    seeds = sorted(part["seed"].unique())
    out = ["Per seed: HV val / HV test (−5 pt), best CR at ≤ 1 pt validation drop:", "",
           "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |",
           "|---|" + "---|" * len(seeds)]
    for method, rows in part.groupby("method", sort=False):
        by = rows.set_index("seed")
        cells = [f"{by.loc[s, 'hv5_val']:.4f} / {by.loc[s, 'hv5_test']:.4f}, "
                 f"{by.loc[s, 'cr_drop1']:.1f}x" if s in by.index else "–" for s in seeds]
        out.append(f"| {method} | " + " | ".join(cells) + " |")
    return out + [""]


def targets(part: pd.DataFrame) -> list[str]:
    """The issue's targets, checked per seed against grid-global and tpe-4x."""
    out = ["Targets (per seed: best of hybrid / knapsack / ga / bo / ga-mf against the "
           "baselines):", ""]
    for seed, rows in part.groupby("seed"):
        by = rows.set_index("method")
        if "grid-global" not in by.index:
            continue
        ours = by.loc[[m for m in ("hybrid", "knapsack", "ga", "bo", "ga-mf") if m in by.index]]
        if ours.empty:
            continue
        best_hv = ours["hv5_val"].max()
        ref = by.loc["grid-global", "hv5_val"]
        line = (f"- seed {seed}: best new-method HV (val, −5 pt) {best_hv:.4f} vs grid-global "
                f"{ref:.4f} ({(best_hv / ref - 1) * 100:+.1f} %)")
        best_test = ours["hv5_test"].max()
        line += f"; on test {best_test:.4f} vs {by.loc['grid-global', 'hv5_test']:.4f}"
        cr, cr_ref = ours["cr_drop1"].max(), by.loc["grid-global", "cr_drop1"]
        line += f"; best CR at ≤ 1 pt {cr:.1f}x vs {cr_ref:.1f}x ({cr / cr_ref:.2f}x)"
        if "tpe-4x" in by.index:
            line += f"; tpe-4x HV {by.loc['tpe-4x', 'hv5_val']:.4f}"
        out.append(line)
    return out + [""]


def plot_history(history: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(history["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        part = history[history["model"] == model]
        for method, rows in part.groupby("method", sort=False):
            grid = np.linspace(0, rows["steps"].max(), 60)
            curves = [np.interp(grid, r["steps"], r["hypervolume"], left=0.0)
                      for _, r in rows.groupby("seed")]
            ax.plot(grid, np.median(curves, axis=0), label=method)
        ax.set_title(model)
        ax.set_xlabel("fine-tune steps spent (sensitivity included)")
        ax.set_ylabel("hypervolume, validation (dense − 5 pt)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["search_spaces/digits-resnet.yaml"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--fine-tunes", type=int, default=48)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/search_quality"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of every fine-tune, search and rebuild alike "
                        "(default: run_search's, the CPUs this process may use; give 1 when "
                        "one process runs per core). Conv fine-tunes differ in the last bits "
                        "between thread counts, so a rebuild must use the search's count")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--merge", nargs="+", type=Path, default=[],
                        help="output prefixes of runs made in parallel (separate --runs-dir and "
                             "--out each): concatenate them into --out, then report")
    return parser.parse_args(argv)


def merge(prefixes: list[Path], out: Path, command: str) -> None:
    """One result set from runs made in parallel processes (one per core)."""
    runs = pd.concat([pd.read_csv(p.with_suffix(".csv")) for p in prefixes])
    history = pd.concat([pd.read_csv(f"{p}_history.csv") for p in prefixes])
    metas = [json.loads(p.with_suffix(".meta.json").read_text()) if p.with_suffix(".meta.json")
             .exists() else {"command": f"(stopped before writing {p}.meta.json; its finished "
                                        "runs are in its csv)"} for p in prefixes]
    known = next((m for m in metas if "fine_tunes" in m), {})
    metas[0] = {"machine": machine_note(), "date": time.strftime("%Y-%m-%d"),
                "fine_tunes": known.get("fine_tunes"), "steps": known.get("steps"), **metas[0]}
    out.parent.mkdir(parents=True, exist_ok=True)
    runs.to_csv(out.with_suffix(".csv"), index=False)
    history.to_csv(f"{out}_history.csv", index=False)
    meta = {**metas[0], "command": command, "parts": [m["command"] for m in metas]}
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=1))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    csv, hist_csv = args.out.with_suffix(".csv"), Path(f"{args.out}_history.csv")
    meta_path = args.out.with_suffix(".meta.json")
    if args.merge:
        merge(args.merge, args.out, "python benchmarks/search_quality.py " + shlex.join(
            sys.argv[1:] if argv is None else argv))
    elif not args.report_only:
        import optuna
        import torch

        from autosparse.search.runner import prepare

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        from autosparse.search.workers import thread_count

        torch.set_num_threads(thread_count(1, args.threads))  # run_search sets the same
        rows, histories = [], []
        if csv.exists():  # append to earlier runs of other models/seeds
            rows = pd.read_csv(csv).to_dict("records")
            histories = [pd.read_csv(hist_csv)]
        for config in args.configs:
            base = yaml.safe_load(Path(config).read_text())
            tag = Path(config).stem
            step_seconds = seconds_per_step(prepare(config, args.runs_dir))
            for seed in args.seeds:
                for method in args.methods:
                    rows = [r for r in rows if (r["model"], r["method"], r["seed"]) != (tag, method, seed)]
                    row, history = run_one(base, method, seed=seed, fine_tunes=args.fine_tunes,
                                           steps=args.steps, runs_dir=args.runs_dir,
                                           model_tag=tag, step_seconds=step_seconds,
                                           threads=args.threads)
                    rows.append(row)
                    histories = [h[~((h["model"] == tag) & (h["method"] == method)
                                     & (h["seed"] == seed))] for h in histories] + [history]
                    print(f"{tag} seed {seed} {method}: HV {row['hv5_val']:.4f} (test "
                          f"{row['hv5_test']:.4f}), CR<=1pt {row['cr_drop1']:.1f}, "
                          f"{row['wall_seconds']:.0f} s", flush=True)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    pd.DataFrame(rows).to_csv(csv, index=False)
                    pd.concat(histories).to_csv(hist_csv, index=False)
        meta = {"command": "python benchmarks/search_quality.py " + shlex.join(
                    sys.argv[1:] if argv is None else argv),
                "machine": machine_note(), "date": time.strftime("%Y-%m-%d"),
                "fine_tunes": args.fine_tunes, "steps": args.steps,
                "threads": torch.get_num_threads()}
        meta_path.write_text(json.dumps(meta, indent=1))
    meta = json.loads(meta_path.read_text())
    runs = pd.read_csv(csv)
    args.out.with_suffix(".md").write_text(render_markdown(runs, meta))
    plot_history(pd.read_csv(hist_csv), args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    raise SystemExit(main())
