"""The measured latency table against direct measurement, on one config's own model.

Builds nothing: reads ``runs/<name>/latency-table.json`` (``autosparse calibrate --config``),
draws mixed candidates off the table's grid, times each one's exported file beside the dense
model, and prints the share of predictions within ±10 % / ±20 %, MAPE and Spearman for the table
and for analytic profiles.

    .venv/bin/python benchmarks/latency_table_check.py search_spaces/quickstart.yaml --candidates 10
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from pathlib import Path

from scipy.stats import spearmanr

from autosparse.config.hardware import load_profile
from autosparse.cost.calibration.model_table import measure_candidates, mixed_candidates
from autosparse.cost.calibration.timing import DEFAULT_CALLS, DEFAULT_ROUNDS
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.latency_table import TABLE_FILE, load_latency_table, table_latency
from autosparse.search.runner import prepare
from autosparse.space.candidate import Candidate


def main(argv: Sequence[str] | None = None) -> int:
    """Table vs analytic against direct measurement; prints share within ±10 % and MAPE."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("config")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--candidates", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--calls", type=int, default=DEFAULT_CALLS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--analytic", nargs="*", default=["x86-server-vnni"],
                        help="profiles to compare against (names or YAML paths)")
    args = parser.parse_args(argv)
    context = prepare(args.config, args.runs_dir, device="cpu")  # timing: CPU work
    lt = load_latency_table(args.runs_dir / context.config.name / TABLE_FILE)
    fallback = load_profile(lt.profile)
    target = context.table_model()
    candidates = mixed_candidates(target, args.candidates, args.seed)
    dense_us, measured = measure_candidates(target, candidates, rounds=args.rounds,
                                            calls=args.calls, seed=args.seed)
    predictions = {"table": [table_latency(lt, context.table, c, fallback).total_ms * 1e3
                             for c in candidates]}
    for name in args.analytic:
        profile = load_profile(name)
        dense = estimate_cost(context.table, Candidate({}), profile).latency_s * 1e6
        predictions[f"{profile.name} (absolute)"] = [
            estimate_cost(context.table, c, profile).latency_s * 1e6 for c in candidates]
        # the analytic speedup applied to the measured dense time: fair to a foreign profile
        predictions[f"{profile.name} (speedup x measured dense)"] = [
            estimate_cost(context.table, c, profile).latency_s * 1e6 / dense * dense_us
            for c in candidates]
    print(f"{context.config.name}: dense measured {dense_us:.1f} µs (table {lt.dense_us:.1f} µs); "
          f"{len(candidates)} mixed candidates, measured {min(measured):.1f}-{max(measured):.1f} µs")
    for name, values in predictions.items():
        errors = [abs(p / m - 1) for p, m in zip(values, measured)]
        within = sum(e <= 0.10 for e in errors) / len(errors)
        within20 = sum(e <= 0.20 for e in errors) / len(errors)
        rho = spearmanr(values, measured).statistic if len(set(values)) > 1 else float("nan")
        print(f"  {name:45s} within ±10 %: {within:4.0%}  ±20 %: {within20:4.0%}  "
              f"MAPE {statistics.mean(errors):6.1%}  Spearman {rho:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
