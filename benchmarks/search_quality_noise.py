"""How much of a search_quality ratio is the test split's own noise: every front point rebuilt,
its per-image test answers kept, and the ratio to grid-global re-drawn over resampled test sets.

    python benchmarks/search_quality_noise.py --csv RESULTS.csv --runs RUNS_DIR [RUNS_DIR ...] \
        --out RESULTS_noise

Why: the issue-20 target asks each method's test hypervolume (−5 pt reference) to be at least
5 % above grid-global's on *every* model and seed. On digits one test image is 0.28 point, and a
front near the dense accuracy has a hypervolume near 0.05 (5 points x almost all of the size
axis), so one image moves a ratio by about 5 %. This measures that resolution instead of
assuming it:

    for each run (model, method, seed) in --csv with its folder under --runs:
        rebuild each validation-front trial (same seed, same fine-tune: the benchmark's rebuild)
        keep its correct/wrong answer on every test image, and the dense model's
    check: the test hypervolume from these answers equals the csv's (else the rebuild differs)
    repeat B times, per model and seed, one resample (with replacement) of the test images
        shared by the dense model and every method's points (they saw the same images):
        ratio = HV(method) / HV(grid-global), the reference dense − 5 on the same resample
    report per model and seed: the observed ratio, its 90 % interval, P(ratio ≥ 1.05);
    per method: the expected count of model-seeds ≥ 1.05 and P(all of them), and for a method
    whose true ratio were g everywhere, P(all ≥ 1.05) = prod_i Phi((g - 1.05) / sd_i).

Only the test images are resampled: fine-tune and search seeds add noise on top, so these
intervals are a lower bound on a ratio's spread. The rebuild must use the searches' thread
count (``--threads``): a conv fine-tune's last bits differ between counts, and over 100 steps
that moves a front point by an image or two.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search_quality import MARGINS, hypervolume_at, normalised  # noqa: E402
from search_quality_targets import RUN_NAME, TARGET_EVERY  # noqa: E402

METHODS = ("hybrid", "knapsack", "ga")  # each against grid-global, equal compute, every model
REFERENCE = "grid-global"
GAINS = (1.05, 1.10, 1.15, 1.20, 1.30)
MARGIN = MARGINS[0]  # the target's hypervolume: reference 5 points below dense
# one point at the dense model's test accuracy and no size at all: 5 points x the whole size axis
CEILING_HV = MARGIN / 100.0


def run_folders(roots: list[Path]) -> dict[tuple[str, str, int], Path]:
    """(model, method, seed) -> the run folder the benchmark wrote (later roots win)."""
    found = {}
    for root in roots:
        for folder in sorted(root.glob("quality-*-s*")):
            match = RUN_NAME.fullmatch(folder.name)
            if match is not None and (folder / "trials.csv").exists():
                found[(match[1], match[2], int(match[3]))] = folder
    return found


def answers(model, loader) -> np.ndarray:
    """1 where the model's top class is the label, per test image, in the loader's order."""
    import torch

    from autosparse.workload.devices import eval_mode
    from autosparse.workload.task import model_outputs

    out = []
    with eval_mode(model), torch.no_grad():
        for x, y in loader:
            logits = model_outputs(model(x))
            out.append((logits.argmax(dim=1) == torch.as_tensor(y)).numpy())
    return np.concatenate(out).astype(np.int8)


def rebuild(folder: Path) -> dict:
    """The run's validation front rebuilt: sizes, and per-image test answers of each point and
    of the dense model."""
    from autosparse.search.preparation import prepare
    from autosparse.space.candidate import Candidate

    config = folder.parent / "_quality_configs" / f"{folder.name}.yaml"
    context = prepare(config, folder.parent)
    context.open_study()
    evaluator = context.objective().evaluator
    loader = context.data.loader("test", 512)
    frame = pd.read_csv(folder / "trials.csv")
    front = frame[frame["on_front"].astype(bool)].reset_index(drop=True)
    rows = [answers(evaluator.compress_and_tune(Candidate.from_json(c))[0], loader)
            for c in front["candidate"]]
    return {"objectives": list(context.config.objectives), "dense": dict(context.dense_metrics),
            "dense_answers": answers(context.dense, loader), "front": front,
            "answers": np.stack(rows) if rows else np.zeros((0, 0), np.int8)}


def hv_of(run: dict, index: np.ndarray | None = None) -> float:
    """Test hypervolume (−5 pt) of a rebuilt front on the images ``index`` (all if None)."""
    pick = slice(None) if index is None else index
    dense = {**run["dense"], "test_accuracy": 100.0 * run["dense_answers"][pick].mean()}
    front = run["front"].assign(test_accuracy=100.0 * run["answers"][:, pick].mean(axis=1)
                                if len(run["front"]) else [])
    points = normalised(front, run["objectives"], dense, "test_accuracy")
    return hypervolume_at(points, run["objectives"], dense["test_accuracy"], MARGIN)


def resampled_ratios(runs: dict[str, dict], draws: int, rng: np.random.Generator
                     ) -> dict[str, np.ndarray]:
    """Per method: its hypervolume over grid-global's on ``draws`` shared test resamples."""
    n = len(runs[REFERENCE]["dense_answers"])
    out = {m: np.empty(draws) for m in runs if m != REFERENCE}
    for b in range(draws):
        index = rng.integers(0, n, n)
        ref = hv_of(runs[REFERENCE], index)
        for method in out:
            out[method][b] = hv_of(runs[method], index) / ref if ref > 0 else math.nan
    return out


def measure(results: pd.DataFrame, folders: dict, cache: Path, draws: int, seed: int
            ) -> pd.DataFrame:
    """One row per (model, seed, method): observed and resampled ratios to grid-global."""
    rows = []
    rng = np.random.default_rng(seed)
    cache.mkdir(parents=True, exist_ok=True)
    for (model, s), group in results.groupby(["model", "seed"]):
        methods = [m for m in (REFERENCE, *METHODS) if (model, m, s) in folders
                   and m in set(group["method"])]
        if REFERENCE not in methods or len(methods) < 2:
            continue
        runs = {}
        for method in methods:
            path = cache / f"{model}-{method}-s{s}.pkl"
            if path.exists():
                runs[method] = pd.read_pickle(path)
                continue
            start = time.perf_counter()
            runs[method] = rebuild(folders[(model, method, s)])
            pd.to_pickle(runs[method], path)
            print(f"rebuilt {model} {method} s{s}: {len(runs[method]['front'])} points, "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        recorded = group.set_index("method")["hv5_test"]
        draws_of = resampled_ratios(runs, draws, rng)
        ref_hv = hv_of(runs[REFERENCE])
        for method, ratios in draws_of.items():
            hv = hv_of(runs[method])
            ratios = ratios[np.isfinite(ratios)]
            rows.append({
                "model": model, "seed": s, "method": method,
                "test_images": len(runs[REFERENCE]["dense_answers"]),
                "hv_rebuilt": hv, "hv_recorded": recorded.get(method, math.nan),
                "ref_rebuilt": ref_hv, "ref_recorded": recorded.get(REFERENCE, math.nan),
                "ratio": hv / ref_hv, "ceiling": CEILING_HV / ref_hv,
                "ratio_recorded": recorded.get(method, math.nan)
                / recorded.get(REFERENCE, math.nan),
                "ratio_sd": ratios.std(ddof=1),
                "ratio_p05": np.quantile(ratios, 0.05), "ratio_p95": np.quantile(ratios, 0.95),
                "p_at_least_target": float((ratios >= 1 + TARGET_EVERY).mean()),
            })
    return pd.DataFrame(rows)


def p_all(sds: np.ndarray, gain: float) -> float:
    """P(every ratio ≥ 1 + target) for a method whose true ratio is ``gain`` everywhere, each
    ratio normal with its resampled spread, independent across model-seeds."""
    normal = NormalDist()
    return float(np.prod([normal.cdf((gain - 1 - TARGET_EVERY) / sd) for sd in sds]))


def reproduced(table: pd.DataFrame) -> pd.Series:
    """Rows whose rebuilt hypervolumes (method and grid-global) equal the recorded ones."""
    return (np.isclose(table["hv_rebuilt"], table["hv_recorded"], rtol=1e-6)
            & np.isclose(table["ref_rebuilt"], table["ref_recorded"], rtol=1e-6))


def render(table: pd.DataFrame, command: str, draws: int) -> str:
    same = reproduced(table)
    moved = (table["ratio"] - table["ratio_recorded"]).abs()[~same]
    images = sorted(table["test_images"].unique())
    lines = ["# Search quality: how much of a ratio is test noise", "", f"    {command}", "",
             f"Every validation-front point of each run rebuilt (same seed and fine-tune as the "
             f"benchmark's rebuild) and its answer on each test image kept; {draws} resamples of "
             f"the test images per model and seed, shared by the dense model and every method. "
             "Test images per model-seed: " + "; ".join(
                 f"{n} (one image = {100 / n:.2f} point, about {100 / n / 5:.1%} of a "
                 f"hypervolume whose front sits at the dense accuracy)" for n in images)
             + ". Only test images are resampled (fine-tune and search seeds add more).",
             "", f"Rebuilt hypervolumes (the method's and grid-global's) equal to the recorded "
             f"ones: {int(same.sum())} of {len(table)} pairings. Where they differ, the same "
             f"front candidates with the same seeds were fine-tuned with another torch thread "
             f"count than the search's (`--threads`; the last bits of a conv fine-tune differ "
             f"between counts): the ratio moved by {moved.median():.3f} in the median "
             f"(at most {moved.max():.3f}) over those {len(moved)} pairings — noise the test "
             f"resampling below does not even count. The resampling uses the rebuilt models."
             if len(moved) else f"Rebuilt hypervolumes equal to the recorded ones: all "
             f"{len(table)} pairings.", "",
             "Columns: the ratio to grid-global as recorded and as rebuilt here, the 5–95 % "
             "range and spread of the rebuilt ratio over resampled test sets, the share of "
             "resamples at or above 1.05, and the ceiling: an ideal front point (the dense "
             "model's test accuracy at no size at all) over grid-global's hypervolume, the most "
             "a front can reach without beating the dense model on test.", "",
             "| model | seed | method | ratio recorded | ratio rebuilt | 90 % interval | sd | "
             "P(ratio ≥ 1.05) | ceiling |", "|---|---|---|--:|--:|--:|--:|--:|--:|"]
    for _, r in table.sort_values(["model", "seed", "method"]).iterrows():
        lines.append(f"| {r['model']} | {r['seed']} | {r['method']} | "
                     f"{r['ratio_recorded']:.3f} | {r['ratio']:.3f} | "
                     f"{r['ratio_p05']:.2f}–{r['ratio_p95']:.2f} | {r['ratio_sd']:.3f} | "
                     f"{r['p_at_least_target']:.2f} | {r['ceiling']:.2f} |")
    ceilings = table.drop_duplicates(["model", "seed"])
    low = ceilings[ceilings["ceiling"] < 1 + TARGET_EVERY]
    lines += ["", f"Ceiling below 1.05 on {len(low)} of {len(ceilings)} model-seeds"
              + (f" ({', '.join(f'{m} {s}' for m, s in zip(low['model'], low['seed']))}): "
                 "there grid-global already sits within 5 % of the ideal point, and only a "
                 "front more accurate on test than the dense model reaches 1.05." if len(low)
                 else ".")]
    lines += ["", "Per method over its model-seeds: how many reach ≥ 1.05 (observed), how many "
              "to expect on resampled test sets, the chance that all do, and that chance for a "
              "method whose true ratio were g on every model-seed (same spreads):", "",
              "| method | model-seeds | ≥ 1.05 observed | expected | P(all) | "
              + " | ".join(f"P(all) at g = {g:.2f}" for g in GAINS) + " |",
              "|---|--:|--:|--:|--:|" + "--:|" * len(GAINS)]
    for method, part in table.groupby("method"):
        p = part["p_at_least_target"].to_numpy()
        sds = part["ratio_sd"].to_numpy()
        lines.append(f"| {method} | {len(part)} | {int((part['ratio'] >= 1.05).sum())} | "
                     f"{p.sum():.1f} | {np.prod(p):.1e} | "
                     + " | ".join(f"{p_all(sds, g):.2f}" for g in GAINS) + " |")
    lines += ["", "Spread of one ratio from test images alone, per model (median sd, range): "
              + "; ".join(f"{model} {part.median():.3f} ({part.min():.3f}–{part.max():.3f})"
                          for model, part in table.groupby("model")["ratio_sd"]) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", type=Path, nargs="+", required=True,
                        help="merged search_quality results (several: concatenated)")
    parser.add_argument("--runs", type=Path, nargs="+", required=True,
                        help="runs folders holding quality-*/ (their _quality_configs beside)")
    parser.add_argument("--out", type=Path, required=True, help="writes OUT.md and OUT.csv")
    parser.add_argument("--cache", type=Path, default=Path("runs/sq-noise"),
                        help="rebuilt answers kept here (re-rendering skips the rebuild)")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--models", nargs="*", default=None, help="only these models")
    parser.add_argument("--seed", type=int, default=0, help="the resampling's seed")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the rebuild: the count the searches used "
                        "(default: run_search's, the CPUs this process may use); conv "
                        "fine-tunes differ in the last bits between thread counts")
    args = parser.parse_args(argv)
    import torch

    from autosparse.search.workers import thread_count

    torch.set_num_threads(thread_count(1, args.threads))
    results = pd.concat([pd.read_csv(path) for path in args.csv], ignore_index=True)
    if args.models:
        results = results[results["model"].isin(args.models)]
    table = measure(results, run_folders(args.runs), args.cache, args.draws, args.seed)
    table.to_csv(args.out.with_suffix(".csv"), index=False)
    command = "python benchmarks/search_quality_noise.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    args.out.with_suffix(".md").write_text(render(table, command, args.draws))
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
