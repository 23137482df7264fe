"""The issue-20 targets from a search_quality run: each method's hypervolume against the by-hand
recipe (``grid-global``) per model and seed, and the share of its trials past the constraint.

    python benchmarks/search_quality_targets.py --csv RESULTS.csv --runs RUNS_DIR [RUNS_DIR ...] \
        --out RESULTS_targets.md

Reads the merged results (``search_quality.py --merge``) and each run's ``trials.csv`` (the runs
folders the benchmark wrote, ``quality-<model>-<method>-s<seed>/``). Chooses the default on
validation (mean ratio to grid-global over every model and seed), reports test beside it.

A ``--csv`` or ``--runs`` argument written ``PATH:SUFFIX`` appends SUFFIX to the method names it
holds, so runs of a changed method sit beside the earlier ones (``ga`` and ``ga+guard``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import MARGINS, METHODS  # noqa: E402

FIRST = 8  # trials of the first generation, not judged (the rule)
TARGET_EVERY, TARGET_DEEPEST, TARGET_PAST = 0.05, 0.10, 0.10
DEEPEST = "digits-resnet"
# a run's folder, as search_quality.method_config names it; longer method names tried first
RUN_NAME = re.compile(r"quality-(.+)-(" + "|".join(
    re.escape(m) for m in sorted(METHODS, key=len, reverse=True)) + r")-s(\d+)")
CURRENT_DEFAULT = "hybrid"  # StrategyConfig's default name and the quickstart's


def labelled(argument: str) -> tuple[Path, str]:
    """``PATH`` or ``PATH:SUFFIX`` -> (path, suffix for the method names found there)."""
    path, _, suffix = argument.partition(":")
    return Path(path), suffix


def read_results(arguments: list[str]) -> pd.DataFrame:
    frames = []
    for argument in arguments:
        path, suffix = labelled(argument)
        frame = pd.read_csv(path)
        frames.append(frame.assign(method=frame["method"] + suffix))
    return pd.concat(frames, ignore_index=True)


def past_constraint(runs: list[str], bound: float = 5.0) -> pd.DataFrame:
    """Per run: finished trials, and how many after the first ``FIRST`` exceed the drop bound."""
    rows = []
    for argument in runs:
        root, suffix = labelled(argument)
        for trials in sorted(root.glob("quality-*-s*/trials.csv")):
            match = RUN_NAME.fullmatch(trials.parent.name)
            if match is None:
                continue
            frame = pd.read_csv(trials)
            done = frame[frame["state"] == "COMPLETE"].sort_values("trial")
            later = done.iloc[FIRST:]
            rows.append({"model": match[1], "method": match[2] + suffix, "seed": int(match[3]),
                         "finished": len(done), "after_first": len(later),
                         "past_after_first": int((later["accuracy_drop"] > bound).sum())})
    return pd.DataFrame(rows)


def ratios(results: pd.DataFrame, split: str) -> pd.DataFrame:
    """hv5_<split> of every method divided by grid-global's, per model and seed."""
    ref = results[results["method"] == "grid-global"].set_index(["model", "seed"])[f"hv5_{split}"]
    out = results[results["method"] != "grid-global"].copy()
    out["ratio"] = out[f"hv5_{split}"].to_numpy() / ref.reindex(
        list(zip(out["model"], out["seed"]))).to_numpy()
    return out[["model", "method", "seed", "ratio"]]


def compression_gains(results: pd.DataFrame, drop: float = 1.0) -> pd.DataFrame:
    """Per method, model and seed: the compression of the front's most compressed point within
    ``drop`` points of dense on validation, over grid-global's, and that point's test drop.

    What a linear-size hypervolume hardly sees: from 10x to 20x the size axis moves by 0.05 of
    the box. The compression itself is exact (the size formula), so only the test drop is noisy.
    """
    column, test_column = f"cr_drop{drop:g}", f"test_drop_at_cr_drop{drop:g}"
    ref = results[results["method"] == "grid-global"].set_index(["model", "seed"])
    out = results[results["method"] != "grid-global"].copy()
    keys = list(zip(out["model"], out["seed"]))
    out["compression_ratio"] = out[column].to_numpy() / ref[column].reindex(keys).to_numpy()
    out["test_drop"] = out[test_column].to_numpy()
    out["reference_test_drop"] = ref[test_column].reindex(keys).to_numpy()
    return out[["model", "method", "seed", "compression_ratio", "test_drop",
                "reference_test_drop"]].dropna(subset=["compression_ratio"])


def compression_lines(gains: pd.DataFrame, drop: float = 1.0) -> list[str]:
    """The compression-at-equal-accuracy table: geometric mean ratio, wins, test drops."""
    lines = ["", "Compression at equal accuracy: the front's most compressed point within "
             f"{drop:g} point of dense on validation, divided by grid-global's on the same "
             "model and seed (geometric mean; exact sizes), and the test drop of those points "
             "(grid-global's in brackets, same model-seeds):", "",
             "| method | compression vs grid-global | log₂ of it ± SE | model-seeds above / "
             "below | test drop, points |", "|---|--:|--:|--:|--:|"]
    means = gains.groupby("method")["compression_ratio"].apply(
        lambda r: float(np.exp(np.log(r).mean()))).sort_values(ascending=False)
    for method in means.index:
        part = gains[gains["method"] == method]
        above = int((part["compression_ratio"] > 1 + 1e-9).sum())
        below = int((part["compression_ratio"] < 1 - 1e-9).sum())
        logs = np.log2(part["compression_ratio"])
        se = logs.std(ddof=1) / len(logs) ** 0.5 if len(logs) > 1 else float("nan")
        lines.append(f"| {method} | {means[method]:.2f}× | {logs.mean():+.2f} ± {se:.2f} | "
                     f"{above} / {below} of {len(part)} | "
                     f"{part['test_drop'].mean():.2f} ({part['reference_test_drop'].mean():.2f}) |")
    return lines


def ceilings_on_test(results: pd.DataFrame) -> pd.Series:
    """Per (model, seed): the ideal point's hypervolume (a front at the dense model's test
    accuracy and zero size fills the whole box) over grid-global's test hypervolume."""
    ref = results[results["method"] == "grid-global"].set_index(["model", "seed"])["hv5_test"]
    return (MARGINS[0] / 100.0) / ref


def _signed(fraction: float) -> str:
    return f"{'+' if fraction >= 0 else '−'}{abs(fraction) * 100:.1f} %"


def choose_default(val: pd.DataFrame, best: str, current: str = CURRENT_DEFAULT
                   ) -> tuple[str, str]:
    """Replace the current default only when ``best`` beats it on validation by more than two
    standard errors of the paired (same model and seed) difference: else the ranking is noise."""
    if best == current:
        return best, f"It is the current default ({current})."
    pairs = val.pivot_table(index=["model", "seed"], columns="method", values="ratio")
    if current not in pairs.columns:
        return current, f"The current default {current} was not run: kept."
    diff = (pairs[best] - pairs[current]).dropna()
    se = diff.std(ddof=1) / max(len(diff), 1) ** 0.5 if len(diff) > 1 else float("inf")
    verdict = (f"Paired with the current default {current} over {len(diff)} model-seeds: "
               f"{best} − {current} = {diff.mean():+.4f} (standard error {se:.4f}).")
    if diff.mean() > 2 * se:
        return best, verdict + " More than 2 standard errors: it becomes the default."
    return current, verdict + " Within 2 standard errors: the default stays."


def render(results: pd.DataFrame, past: pd.DataFrame, command: str,
           current: str = CURRENT_DEFAULT) -> str:
    val, test = ratios(results, "val"), ratios(results, "test")
    mean_val = val.groupby("method")["ratio"].mean().sort_values(ascending=False)
    mean_test = test.groupby("method")["ratio"].mean()
    runs = val.groupby("method")["ratio"].count()
    eligible = [m for m in mean_val.index  # equal compute, and run on every model and seed
                if not m.endswith("-4x") and runs[m] == runs.max()]
    best = eligible[0]
    chosen, rule = choose_default(val, best, current)
    lines = ["# Search quality: the issue-20 targets", "", f"    {command}", "",
             "Hypervolume (−5 pt reference) of each method divided by grid-global's on the same "
             "model and seed (1.00 = the by-hand recipe); mean over every model and seed. The "
             "default is chosen on validation; test is reported beside it.", "",
             "| method | mean ratio, validation | mean ratio, test | model-seeds ≥ 1.05 on test |",
             "|---|--:|--:|--:|"]
    # a method run on fewer models is averaged over those only: compare it per row below
    for method in mean_val.index:
        part = test[test["method"] == method]
        lines.append(f"| {method} | {mean_val[method]:.3f} | {mean_test[method]:.3f} | "
                     f"{int((part['ratio'] >= 1 + TARGET_EVERY).sum())} of {len(part)} |")
    lines += ["", f"Best on validation among the methods at equal compute run on every model "
              f"and seed: **{best}**. {rule} Default: **{chosen}**.", "",
              "Per model and seed, test ratio (validation in brackets). Ceiling: an ideal front "
              "(the dense model's test accuracy at no size at all) over grid-global's test "
              "hypervolume, the most a front reaches without beating the dense model on test:", "",
              "| model | seed | ceiling | " + " | ".join(mean_val.index) + " |",
              "|---|---|--:|" + "---|" * len(mean_val.index)]
    ceilings = ceilings_on_test(results)
    for (model, seed), part in test.groupby(["model", "seed"]):
        v = val[(val["model"] == model) & (val["seed"] == seed)].set_index("method")["ratio"]
        t = part.set_index("method")["ratio"]
        cells = [f"{t[m]:.2f} ({v[m]:.2f})" if m in t.index else "–" for m in mean_val.index]
        lines.append(f"| {model} | {seed} | {ceilings[(model, seed)]:.2f} | "
                     + " | ".join(cells) + " |")
    low = int((ceilings < 1 + TARGET_EVERY).sum())
    lines += ["", f"Ceiling below {1 + TARGET_EVERY:.2f} on {low} of {len(ceilings)} model-seeds: "
              "there the per-seed target needs a front more accurate on test than the dense model."]
    lines += ["", "Targets for a default (test ratio, per model and seed):", ""]
    for method in mean_val.index:
        part = test[test["method"] == method].sort_values(["model", "seed"])
        every = part["ratio"] >= 1 + TARGET_EVERY
        deep = part[part["model"] == DEEPEST]["ratio"]
        deep_met = len(deep) > 0 and bool((deep >= 1 + TARGET_DEEPEST).all())
        lines.append(f"- {method}: ≥ +5 % on {int(every.sum())} of {len(part)} "
                     f"({'met' if every.all() else 'not met'}); {DEEPEST} ≥ +10 %: "
                     + (", ".join(_signed(r) for r in deep - 1) or "–")
                     + f" ({'met' if deep_met else 'not met'})")
    if not past.empty:
        lines += ["", f"Trials past the constraint (`accuracy_drop <= 5`) after the first {FIRST}, "
                  "summed over each method's runs (from their trials.csv):", "",
                  "| method | past / judged | share | runs over 10 % |", "|---|--:|--:|--:|"]
        for method, part in past.groupby("method"):
            share = part["past_after_first"].sum() / max(part["after_first"].sum(), 1)
            over = int((part["past_after_first"] > TARGET_PAST * part["after_first"]).sum())
            lines.append(f"| {method} | {part['past_after_first'].sum()} / "
                         f"{part['after_first'].sum()} | {share:.0%} | {over} of {len(part)} |")
    if "cr_drop1" in results.columns:
        lines += compression_lines(compression_gains(results))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", nargs="+", required=True,
                        help="merged search_quality results (several: concatenated; "
                        "PATH:SUFFIX renames its methods)")
    parser.add_argument("--runs", nargs="*", default=[],
                        help="runs folders holding quality-*/trials.csv (PATH:SUFFIX as --csv)")
    parser.add_argument("--past-csv", type=Path, default=None,
                        help="also read per-run constraint counts from this csv (runs whose "
                        "folders are gone); columns as this script writes them")
    parser.add_argument("--methods", nargs="+", default=None,
                        help="only these method labels (after renaming), e.g. the versions the "
                        "code now ships; grid-global is always kept")
    parser.add_argument("--default", default=CURRENT_DEFAULT,
                        help=f"label of the current default in these results ({CURRENT_DEFAULT})")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    results = read_results(args.csv)
    past = past_constraint(args.runs)
    if args.past_csv is not None and args.past_csv.exists():
        past = pd.concat([pd.read_csv(args.past_csv), past]).drop_duplicates(
            ["model", "method", "seed"], keep="last")
    if args.methods is not None:
        keep = set(args.methods) | {"grid-global"}
        results = results[results["method"].isin(keep)]
        past = past[past["method"].isin(keep)] if len(past) else past
    past.to_csv(args.out.with_suffix(".past.csv"), index=False)
    command = "python benchmarks/search_quality_targets.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.out.write_text(render(results, past, command, args.default))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
