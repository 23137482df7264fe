"""Does a short lr probe (autosparse.compress.lr_probe) pick a better fine-tune lr than 1e-3?

    for model, seed:
        for lr in the probe's grid, candidate in EVALUATED + PROBED:
            session = FinetuneSession(compressed copy, dense, train loader, lr, seed)  # 150 steps
            validation accuracy after each of CHECKPOINTS steps (one session, run in pieces)
        probe = probe_learning_rate(dense, data, PROBED, cfg(seed))     # the module itself
        check: the probe's table equals the grid's PROBED rows at its horizon
        compare on EVALUATED after 150 steps: (a) lr 1e-3, the config's default, (b) the
        probe's chosen lr, (c) the best fixed lr in hindsight (per model, over the seeds)
    the pick rule's horizon and tolerance, replayed on the grid's PROBED rows
    write <out>.csv (one row per fine-tune and checkpoint) and <out>.md

The probe never sees an evaluated candidate. A benchmark, not a test (minutes on one core).
Dense models are trained on first use and cached under --runs-dir.

    OMP_NUM_THREADS=1 python benchmarks/lr_probe.py \
        --configs search_spaces/quickstart.yaml benchmarks/configs/digits-mlp.yaml \
        --seeds 0 1 2 --runs-dir runs/benchmarks --out benchmarks/results/lr_probe
    (add --report-only to rebuild the markdown from the CSV)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from autosparse.compress.apply import compress_model, structural_keep
from autosparse.compress.finetune import CandidateDiverged, FinetuneSession
from autosparse.compress.lr_probe import (
    DEFAULT_LRS,
    TOLERANCE,
    pick_lr,
    probe_learning_rate,
    probe_steps,
)
from autosparse.search.runner import prepare
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.workload.evaluate import evaluate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from finetune_recipes import CANDIDATES  # noqa: E402

FULL = 150
CHECKPOINTS = (10, 20, 30, 50, 75, FULL)
DEFAULT_LR = 1e-3
# finetune_recipes' six, name -> (pattern, sparsity, bits) for every layer (c50: channel where a
# layer leads a removable channel group, unstructured 50 % elsewhere)
EVALUATED = CANDIDATES
PROBED = {  # the probe's own candidates, mild to hard, none of them evaluated
    "p-u60-4b": ("unstructured", 0.6, 4),
    "p-u85-8b": ("unstructured", 0.85, 8),
    "p-u93-4b": ("unstructured", 0.93, 4),
}
TOLERANCES = (0.0, 0.005, 0.01, 0.02, 0.05)


def candidate_of(context, spec) -> Candidate:
    """Every layer alike; a channel choice only where the layer leads a channel group export
    can remove (the output layer does not: its rows are the classes), unstructured elsewhere."""
    pattern, sparsity, bits = spec
    graph = context.graph
    leaders = {g.producers[0] for g in (graph.groups if graph else ()) if g.blocked is None}
    return Candidate({n: LayerChoice.make(pattern if pattern != "channel" or n in leaders
                                          else "unstructured", sparsity, bits)
                      for n in context.table.names})


def grid_rows(context, model: str, seed: int) -> list[dict]:
    """Every (lr, candidate) fine-tune of 150 steps, validated at each checkpoint."""
    dense, data = context.dense, context.data
    validation = data.loader("validation", data.batch_size)
    rows = []
    for lr in DEFAULT_LRS:
        cfg = context.config.finetune.model_copy(
            update={"lr": lr, "steps": FULL, "epochs": None, "seed": seed})
        for name, spec in {**EVALUATED, **PROBED}.items():
            candidate = candidate_of(context, spec)
            keep = structural_keep(dense, candidate, context.graph)[:2]
            student = compress_model(dense, candidate, graph=context.graph, keep=keep)
            loader = data.loader("train", cfg.batch_size, shuffle=True, seed=seed)
            start = time.perf_counter()
            with FinetuneSession(student, dense, loader, cfg) as session:
                for step in CHECKPOINTS:
                    row = {"model": model, "seed": seed, "dense": context.dense_metrics["accuracy"],
                           "lr": lr, "candidate": name,
                           "probed": name in PROBED, "step": step}
                    try:
                        row["loss"] = session.run_until(step).final_loss
                        row["accuracy"] = evaluate(student, validation)
                    except CandidateDiverged as err:
                        row.update(loss=math.nan, accuracy=math.nan, diverged=str(err))
                    row["seconds"] = time.perf_counter() - start
                    rows.append(row)
                    if "diverged" in row:
                        break
    return rows


def replay(grid: pd.DataFrame, step: int, tolerance: float) -> float:
    """The rule of lr_probe on the grid's probed rows after ``step`` steps (an lr diverged on
    any probed candidate: excluded)."""
    rows = grid[grid.probed & (grid.step == step)]
    means = {}
    for lr in DEFAULT_LRS:
        values = rows[rows.lr == lr].accuracy
        means[lr] = (float(values.mean()) if len(values) == len(PROBED) and values.notna().all()
                     else math.nan)
    return pick_lr(means, tolerance)[0]


def evaluated_at(grid: pd.DataFrame, lr: float) -> float:
    """Mean accuracy after the full fine-tune over the evaluated candidates at ``lr``; a
    diverged fine-tune counts as 0 (the search would lose that trial)."""
    rows = grid[~grid.probed & (grid.lr == lr)]
    final = rows.groupby("candidate").apply(
        lambda g: g[g.step == FULL].accuracy.iloc[0] if (g.step == FULL).any() else 0.0,
        include_groups=False)
    return float(final.fillna(0.0).mean())


def probes_of(frame: pd.DataFrame) -> dict[tuple[str, int], dict]:
    """Per (model, seed): the probe's chosen lr, steps run, seconds and per-lr mean."""
    out = {}
    for (model, seed), rows in frame[frame.source == "probe"].groupby(["model", "seed"],
                                                                      sort=False):
        means = {lr: (float(g.accuracy.mean()) if (g.status == "ok").all() else math.nan)
                 for lr, g in rows.groupby("lr")}
        out[(model, int(seed))] = {"chosen": float(rows.chosen.iloc[0]),
                                   "steps": int(rows.ran.sum()),
                                   "seconds": float(rows.seconds.sum()), "means": means}
    return out


def near_dense(grid: pd.DataFrame, lr: float, dense: float, points: float = 5.0) -> int:
    """Evaluated candidates within ``points`` of dense after the full fine-tune at ``lr``: the
    region a search's front is judged in (issue 20's hypervolume reference)."""
    rows = grid[~grid.probed & (grid.lr == lr) & (grid.step == FULL)]
    return int((rows.accuracy >= dense - points).sum())


def report(frame: pd.DataFrame, meta: str, command: str) -> str:
    probes = probes_of(frame)
    frame = frame[frame.source == "grid"].assign(probed=lambda f: f.probed.astype(bool))
    lines = ["# Fine-tune lr chosen by a short probe (`autosparse.compress.lr_probe`)", "",
             "```", command, "```", ""]
    lines += [
        f"Evaluated candidates (every layer alike): {', '.join(EVALUATED)}. The probe runs on "
        f"{', '.join(PROBED)} only (never on an evaluated candidate), lrs "
        f"{', '.join(f'{lr:g}' for lr in DEFAULT_LRS)}, the first {probe_steps(FULL)} steps of "
        f"the {FULL}-step fine-tune (constant lr, the config's distillation), tolerance "
        f"{TOLERANCE:g} (relative). Validation accuracy (%) after {FULL} steps, mean over the "
        f"{len(EVALUATED)} evaluated candidates; the fine-tune seed varies, the dense model is "
        "the config's. A diverged fine-tune counts 0. The tolerance was chosen on this grid "
        "(the replay table below), so (b) at the default tolerance is in-sample for it.", ""]
    header = ["model", "seed", f"(a) lr {DEFAULT_LR:g}", "(b) probe: lr", "(b) accuracy",
              "(c) hindsight lr", "(c) accuracy", "per-seed best lr", "per-seed best",
              f"within 5 of dense (a / b / c, of {len(EVALUATED)})", "probe steps", "probe s",
              "one fine-tune s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    summary = []
    for model, by_model in frame.groupby("model", sort=False):
        seeds = sorted(int(s) for s in by_model.seed.unique())
        hindsight = max(DEFAULT_LRS, key=lambda lr: sum(
            evaluated_at(by_model[by_model.seed == s], lr) for s in seeds))
        for seed in seeds:
            grid = by_model[by_model.seed == seed]
            probe = probes[(model, seed)]
            per_seed = max(DEFAULT_LRS, key=lambda lr: evaluated_at(grid, lr))
            one = grid[~grid.probed & (grid.lr == DEFAULT_LR) & (grid.step == FULL)].seconds
            values = {"a": evaluated_at(grid, DEFAULT_LR),
                      "b": evaluated_at(grid, probe["chosen"]),
                      "c": evaluated_at(grid, hindsight), "o": evaluated_at(grid, per_seed)}
            summary.append({"model": model, **values})
            lines.append("| " + " | ".join([
                model, str(seed), f"{values['a']:.2f}", f"{probe['chosen']:g}",
                f"{values['b']:.2f}", f"{hindsight:g}", f"{values['c']:.2f}", f"{per_seed:g}",
                f"{values['o']:.2f}", " / ".join(str(near_dense(grid, lr, float(grid.dense.iloc[0])))
                                                 for lr in (DEFAULT_LR, probe["chosen"], hindsight)),
                f"{probe['steps']} ({probe['steps'] / FULL:.1f} fine-tunes)",
                f"{probe['seconds']:.1f}", f"{one.mean():.2f}"]) + " |")
    means = pd.DataFrame(summary).groupby("model", sort=False).mean()
    lines += ["", "Mean over seeds (points of validation accuracy):", "",
              "| model | (a) 1e-3 | (b) probe | (c) hindsight | per-seed best | (b) - (a) "
              "| (c) - (b) |", "|---|---|---|---|---|---|---|"]
    for model, row in means.iterrows():
        lines.append(f"| {model} | {row.a:.2f} | {row.b:.2f} | {row.c:.2f} | {row.o:.2f} | "
                     f"{row.b - row.a:+.2f} | {row.c - row.b:+.2f} |")
    lines += ["", "The probe's table (mean validation accuracy over the probed candidates after "
              f"{probe_steps(FULL)} steps; `x`: excluded, diverged):", "",
              "| model | seed | " + " | ".join(f"{lr:g}" for lr in DEFAULT_LRS) + " | chosen |",
              "|" + "---|" * (len(DEFAULT_LRS) + 3)]
    for (model, seed), probe in probes.items():
        cells = [("x" if math.isnan(probe["means"][lr]) else f"{probe['means'][lr]:.1f}")
                 for lr in DEFAULT_LRS]
        lines.append(f"| {model} | {seed} | " + " | ".join(cells) + f" | {probe['chosen']:g} |")
    lines += rule_tables(frame)
    lines += ["", f"Run: {meta}.", ""]
    return "\n".join(lines)


def rule_tables(frame: pd.DataFrame) -> list[str]:
    """The rule's horizon and tolerance replayed on the grid: mean accuracy after 150 steps on
    the evaluated candidates with the replayed choice, and how the lrs rank at each horizon."""
    horizons = [s for s in CHECKPOINTS if s < FULL]
    lines = ["", "The rule replayed on the same grid (probed candidates' accuracy after k steps "
             "-> chosen lr -> mean accuracy of the evaluated candidates after 150 steps, mean "
             "over seeds; the probe costs k x 15 steps):", "",
             "| model | k | " + " | ".join(f"tol {t:g}" for t in TOLERANCES) + " |",
             "|" + "---|" * (len(TOLERANCES) + 2)]
    for model, by_model in frame.groupby("model", sort=False):
        seeds = sorted(by_model.seed.unique())
        for step in horizons:
            cells = []
            for tol in TOLERANCES:
                picks = [replay(by_model[by_model.seed == s], step, tol) for s in seeds]
                acc = sum(evaluated_at(by_model[by_model.seed == s], lr)
                          for s, lr in zip(seeds, picks)) / len(seeds)
                cells.append(f"{acc:.2f} ({'/'.join(f'{lr:g}' for lr in picks)})")
            lines.append(f"| {model} | {step} | " + " | ".join(cells) + " |")
    lines += ["", "Mean validation accuracy by lr and horizon (evaluated candidates, mean over "
              "seeds; diverged: 0): the short horizon's ranking vs the full one's", "",
              "| model | step | " + " | ".join(f"{lr:g}" for lr in DEFAULT_LRS) + " |",
              "|" + "---|" * (len(DEFAULT_LRS) + 2)]
    evaluated = frame[~frame.probed]
    for model, by_model in evaluated.groupby("model", sort=False):
        for step in CHECKPOINTS:
            cells = []
            for lr in DEFAULT_LRS:
                rows = by_model[(by_model.lr == lr)]
                per = rows.groupby(["seed", "candidate"]).apply(
                    lambda g: (g[g.step == step].accuracy.iloc[0] if (g.step == step).any()
                               else 0.0), include_groups=False)
                cells.append(f"{per.fillna(0.0).mean():.1f}")
            lines.append(f"| {model} | {step} | " + " | ".join(cells) + " |")
    lines += ["", "Per evaluated candidate after 150 steps (mean over seeds):", "",
              "| model | lr | " + " | ".join(EVALUATED) + " |",
              "|" + "---|" * (len(EVALUATED) + 2)]
    for model, by_model in evaluated[evaluated.step == FULL].groupby("model", sort=False):
        table = by_model.pivot_table(index="lr", columns="candidate", values="accuracy")
        for lr, row in table.iterrows():
            lines.append(f"| {model} | {lr:g} | "
                         + " | ".join(f"{row.get(c, math.nan):.1f}" for c in EVALUATED) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["search_spaces/quickstart.yaml",
                                                         "benchmarks/configs/digits-mlp.yaml"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/benchmarks"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/lr_probe"))
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild the markdown from <out>.csv")
    args = parser.parse_args()
    command = ("OMP_NUM_THREADS=1 python benchmarks/lr_probe.py --configs "
               f"{' '.join(args.configs)} --seeds {' '.join(map(str, args.seeds))} "
               f"--runs-dir {args.runs_dir} --out {args.out}")
    csv = args.out.with_suffix(".csv")
    if args.report_only:
        args.out.with_suffix(".md").write_text(report(pd.read_csv(csv), "from the CSV", command))
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, probe_rows = [], []
    for config in args.configs:
        context = prepare(config, args.runs_dir)
        model = context.config.model.builtin or context.config.name
        for seed in args.seeds:
            rows += grid_rows(context, model, seed)
            cfg = context.config.finetune.model_copy(
                update={"steps": FULL, "epochs": None, "seed": seed})
            probe = probe_learning_rate(context.dense, context.data,
                                        [candidate_of(context, s) for s in PROBED.values()], cfg,
                                        graph=context.graph)
            grid = pd.DataFrame(rows)
            grid = grid[(grid.model == model) & (grid.seed == seed)]
            replayed = replay(grid, probe.steps_per_run, TOLERANCE)
            if replayed != probe.chosen:  # the probe is the first k steps of the same sessions
                raise AssertionError(f"{model}/{seed}: probe chose {probe.chosen}, the grid's "
                                     f"rows at {probe.steps_per_run} give {replayed}")
            probe_rows += [{"model": model, "seed": seed, "lr": r.lr,
                            "candidate": list(PROBED)[r.candidate], "step": probe.steps_per_run,
                            "loss": r.loss, "accuracy": r.metric, "seconds": r.seconds,
                            "source": "probe", "probed": True, "status": r.status, "ran": r.steps,
                            "chosen": probe.chosen} for r in probe.runs]
            print(model, seed, f"chosen {probe.chosen:g}", f"steps {probe.steps}",
                  f"{probe.seconds:.1f} s", flush=True)
    frame = pd.concat([pd.DataFrame(rows).assign(source="grid"), pd.DataFrame(probe_rows)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv, index=False)
    meta = f"{time.perf_counter() - start:.0f} s on one thread, torch {torch.__version__}"
    text = report(frame, meta, command)
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
