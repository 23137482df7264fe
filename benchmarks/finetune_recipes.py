"""Compare fine-tune recipes (learning-rate schedule, warm-up, lr) on fixed candidates.

    for recipe, candidate, seed:
        session = FinetuneSession(compressed copy, dense, train loader, recipe)   # 150 steps
        session.run_until(40)  -> validation accuracy (the short fidelity: schedule over 150)
        session.run_until(150) -> validation accuracy (the full fine-tune)
    write <out>.csv (one row per fine-tune) and <out>.md (means over candidates and seeds)

A benchmark, not a test (minutes on one core). The dense model is trained on first use and
cached under --runs-dir.

    OMP_NUM_THREADS=1 python benchmarks/finetune_recipes.py \
        --config search_spaces/quickstart.yaml --seeds 0 1 2 \
        --runs-dir runs/benchmarks --out benchmarks/results/finetune_recipes
    (add --report-only DENSE_ACC to rebuild the markdown from the CSV)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from autosparse.compress.apply import compress_model
from autosparse.compress.finetune import CandidateDiverged, FinetuneSession
from autosparse.search.runner import prepare
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.workload.evaluate import evaluate

SHORT, FULL = 40, 150
RECIPES = {  # name -> FinetuneConfig fields over the config's own
    "constant 1e-3 (default)": {},
    "cosine 1e-3": {"schedule": "cosine"},
    "linear 1e-3": {"schedule": "linear"},
    "cosine 1e-3, warm-up 15": {"schedule": "cosine", "warmup_steps": 15},
    "constant 3e-3": {"lr": 3e-3},
    "cosine 3e-3": {"schedule": "cosine", "lr": 3e-3},
    "cosine 3e-3, warm-up 15": {"schedule": "cosine", "warmup_steps": 15, "lr": 3e-3},
    "constant 1e-2": {"lr": 1e-2},
    "cosine 1e-2, warm-up 15": {"schedule": "cosine", "warmup_steps": 15, "lr": 1e-2},
}
CANDIDATES = {  # name -> (pattern, sparsity, bits) for every layer
    "u70-2b": ("unstructured", 0.7, 2),
    "u80-4b": ("unstructured", 0.8, 4),
    "u90-4b": ("unstructured", 0.9, 4),
    "u95-8b": ("unstructured", 0.95, 8),
    "c50-8b": ("channel", 0.5, 8),
    "u50-32b": ("unstructured", 0.5, 32),
}


def markdown_table(frame: pd.DataFrame) -> list[str]:
    """The frame as markdown lines (pandas' to_markdown needs the optional tabulate)."""
    header = [frame.index.name or "", *map(str, frame.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index), *(f"{v:g}" for v in row)]) + " |")
    return lines


def report(frame: pd.DataFrame, config: str, dense_acc: float) -> str:
    """Markdown: per recipe the mean accuracy at both lengths and the mean gain over the
    default; per candidate the accuracy after the full fine-tune."""
    short, full = f"acc_{SHORT}", f"acc_{FULL}"
    summary = frame.groupby("recipe", sort=False)[[short, full]].mean()
    default = frame.recipe.iloc[0]
    base = frame[frame.recipe == default].set_index(["candidate", "seed"])[full]
    summary[f"vs default at {FULL} (points)"] = pd.Series(
        {r: float((g.set_index(["candidate", "seed"])[full] - base).mean())
         for r, g in frame.groupby("recipe", sort=False)})
    summary[f"worst candidate vs default at {FULL}"] = pd.Series(
        {r: float((g.groupby("candidate")[full].mean()
                   - frame[frame.recipe == default].groupby("candidate")[full].mean()).min())
         for r, g in frame.groupby("recipe", sort=False)})
    per_candidate = frame.pivot_table(index="recipe", columns="candidate", values=full,
                                      sort=False)
    seeds = sorted(int(s) for s in frame.seed.unique())
    return "\n".join([
        f"# Fine-tune recipes on {config}", "",
        f"Dense validation accuracy {dense_acc:.2f} %. Candidates "
        f"{', '.join(frame.candidate.unique())} (every layer alike), seeds {seeds}; validation "
        f"accuracy (%) after {SHORT} and {FULL} steps of one {FULL}-step session (the schedule "
        f"laid over {FULL}), mean over candidates and seeds.", "",
        *markdown_table(summary.round(2)), "",
        f"Per candidate, after {FULL} steps (mean over seeds):", "",
        *markdown_table(per_candidate.round(1)), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="search_spaces/quickstart.yaml")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/finetune_recipes"))
    parser.add_argument("--report-only", type=float, metavar="DENSE_ACC", default=None,
                        help="rebuild the markdown from <out>.csv, given the dense accuracy")
    args = parser.parse_args()
    if args.report_only is not None:
        frame = pd.read_csv(args.out.with_suffix(".csv"))
        args.out.with_suffix(".md").write_text(report(frame, args.config, args.report_only))
        return
    torch.set_num_threads(1)
    context = prepare(args.config, args.runs_dir)
    names = context.table.names
    rows = []
    for recipe, fields in RECIPES.items():
        for cand_name, (pattern, sparsity, bits) in CANDIDATES.items():
            candidate = Candidate({n: LayerChoice.make(pattern, sparsity, bits) for n in names})
            for seed in args.seeds:
                cfg = context.config.finetune.model_copy(
                    update={**fields, "steps": FULL, "epochs": None, "seed": seed})
                student = compress_model(context.dense, candidate)
                loader = context.data.loader("train", cfg.batch_size, shuffle=True, seed=seed)
                validation = context.data.loader("validation", 512)
                row = {"recipe": recipe, "candidate": cand_name, "seed": seed}
                start = time.perf_counter()
                try:
                    with FinetuneSession(student, context.dense, loader, cfg) as session:
                        session.run_until(SHORT)
                        row[f"acc_{SHORT}"] = evaluate(student, validation)
                        row["loss"] = session.run_until(FULL).final_loss
                        row[f"acc_{FULL}"] = evaluate(student, validation)
                except CandidateDiverged as err:
                    row["diverged"] = str(err)
                row["seconds"] = time.perf_counter() - start
                rows.append(row)
                print(row, flush=True)
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out.with_suffix(".csv"), index=False)
    text = report(frame, args.config, context.dense_metrics["accuracy"])
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
