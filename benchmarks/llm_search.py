"""One-shot LLM search benchmark: per-layer bits / sparsity allocation on the benchmark LM,
searched methods against uniform and OWL at equal candidate evaluations, held-out perplexity,
and the searched GGUF run in llama.cpp.

    python benchmarks/llm_search.py --tiny --out /tmp/llm_search_tiny     # smoke, minutes
    nice -n 5 python benchmarks/llm_search.py                             # the benchmark

Procedure::

    model     = train_or_load(LMSpec(steps=300))        (benchmarks/llm_model.py; --tiny: TINY)
    windows   = calibration / validation / test windows of 256 bytes from whole stdlib files of
                the three held-out splits (text_corpus; test files are never used to pick)
    database  = every searched Linear (the 56 of the 8 blocks; embeddings, norms and LM head
                stay dense) compressed once per level on the dense calibration Hessians:
                GPTQ bits {2,3,4,5,6,8} (Q2_K, Q3_K, Q4_K, Q5_0, Q6_K, Q8_0), SparseGPT
                unstructured {0.30, 0.35, ..., 0.90}, SparseGPT 2:4 joint with GPTQ 4 and 3
                bits (Q4_0, Q3_K) under runs/llm-bench/<hash>/levels/ (resumable)
    fitness   = KL(dense || candidate) per token on the first --fitness-windows calibration
                windows (the GA's successive halving scores 1/8 and 1/2 of them first)
    sensitivity = each layer alone at each level on --sensitivity-windows windows (resumable
                JSON); input of the knapsack and of the GA's seed; NOT charged to their ledgers
                (reported apart, in full-evaluation equivalents)
    for target in targets:  for method in methods (same --evaluations each, ledger-charged):
        result = method(...); pick = best validation KL among its --top-k calibration best
        report calibration KL, validation KL / perplexity, test perplexity of the pick
    export    = bits targets: best searched and uniform picks as GGUF (database bytes for the
                searched layers, everything else F32), tensor bytes vs scored size, llama.cpp
                perplexity on the test windows vs torch, llama.cpp tokens/s vs dense GGUFs

Budgets: bits targets count NOMINAL bits per weight (Q4_K counts 4, not its stored 4.5; see
``search.levels.costs``): with the stored bits the cheapest type (Q2_K, 2.625) already exceeds
2.5, so a 2.5-bit target would be infeasible; the stored (GGUF) bits of every pick are reported
beside. Sparsity targets bound kept weights. "2:4 + 4 bits": layers choose among Q8_0, Q4_K,
2:4 + Q4_0 and 2:4 + Q3_K, nominal bits with 2 index bits per kept weight (2:4 + 4 bits = 3.0
bits per weight), total at most uniform 2:4 + 4 bits'.

Results: <out>.md and <out>.csv (default benchmarks/results/llm_search), the exact command on
top; picks (level per layer) in runs/llm-bench/<hash>/search/picks-seed<seed>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_model import DEFAULT_OUT, TINY, LMSpec, train_or_load
from llm_search_parts import (
    METHODS,
    SEARCHED,
    Judge,
    Target,
    achieved,
    export_gguf,
    fmt,
    gguf_bits,
    key_of,
    level_mix,
    llama_cpp_reason,
    machine_note,
    mib,
    options_for,
    paired,
    parse_target,
    problem_for,
    tiny_grid_for_bits,
    top_candidates,
    write_csv,
    write_report,
)

from autosparse.compress.oneshot import gguf_grids
from autosparse.compress.oneshot.calibration import collect_layer_stats
from autosparse.compress.oneshot.database import (
    LevelDatabase,
    build_level_database,
    lm_forward,
)
from autosparse.compress.oneshot.fitness import (
    CandidateScorer,
    DenseReference,
    layer_sensitivity,
)
from autosparse.compress.oneshot.level_files import tokens_fingerprint
from autosparse.compress.oneshot.levels import Level
from autosparse.search.levels import bayesian, evolutionary, knapsack, owl, uniform
from autosparse.search.levels.outliers import outlier_ratios
from autosparse.workload.text_corpus import ByteTokenizer, text_token_sets

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("bits:2.5", "bits:3", "bits:4", "sparsity:0.5", "sparsity:0.6", "sparsity:0.7",
           "2:4+4bit")
TINY_TARGETS = ("bits:4.5", "bits:5", "sparsity:0.5", "sparsity:0.7", "2:4+4bit")


START = time.perf_counter()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {message}", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the TINY model (2 x 64), smoke run")
    p.add_argument("--steps", type=int, default=None,
                   help="the cached model trained this many steps (default 300; --tiny: TINY's "
                        "1-minute budget)")
    p.add_argument("--evaluations", type=int, default=None,
                   help="candidate evaluations per method and target (default 64; --tiny 12)")
    p.add_argument("--targets", nargs="+", default=None,
                   help=f"bits:<avg>, sparsity:<avg>, 2:4+4bit (default {' '.join(TARGETS)})")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seed", type=int, default=0, help="search seed (windows are fixed)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm_search",
                   help="results prefix: <out>.md and <out>.csv")
    p.add_argument("--threads", type=int, default=1,
                   help="torch and llama.cpp threads (default 1: on the 2 shared cores, 2 torch "
                        "threads ran the model's forward 3-4x and GPTQ 10-20x slower than 1, "
                        "measured while other jobs ran)")
    p.add_argument("--runs", type=Path, default=DEFAULT_OUT, help="model/database cache root")
    p.add_argument("--calibration-windows", type=int, default=None,
                   help="256-token windows for the Hessians (default 64; --tiny 16)")
    p.add_argument("--fitness-windows", type=int, default=None,
                   help="first calibration windows the KL fitness scores (default 16; --tiny 8)")
    p.add_argument("--sensitivity-windows", type=int, default=None,
                   help="windows for per-layer sensitivity (default 4; --tiny 2)")
    p.add_argument("--validation-windows", type=int, default=None, help="default 16 (--tiny 8)")
    p.add_argument("--test-windows", type=int, default=None, help="default 64 (--tiny 16)")
    p.add_argument("--top-k", type=int, default=3,
                   help="calibration-best candidates of each method re-ranked on validation")
    p.add_argument("--overhead", type=float, default=None,
                   help="the ledger's per-call overhead for the GA's partial-window calls "
                        "(default: measured, rounded to 0.05)")
    p.add_argument("--build-only", action="store_true", help="build the database and stop")
    p.add_argument("--no-export", action="store_true", help="skip the GGUF / llama.cpp part")
    p.add_argument("--report-only", action="store_true",
                   help="re-render <out>.md/.csv from the last run's saved state (same --tiny, "
                        "--steps, --seed, --runs)")
    args = p.parse_args(argv)
    small = args.tiny
    for name, full, tiny in (("evaluations", 64, 12), ("calibration_windows", 64, 16),
                             ("fitness_windows", 16, 8), ("sensitivity_windows", 4, 2),
                             ("validation_windows", 16, 8), ("test_windows", 64, 16)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if small else full)
    if args.targets is None:
        args.targets = list(TINY_TARGETS if small else TARGETS)
    if not 1 <= args.sensitivity_windows <= args.fitness_windows <= args.calibration_windows:
        p.error("need 1 <= sensitivity windows <= fitness windows <= calibration windows")
    return args


def load_model(args: argparse.Namespace) -> tuple[nn.Module, LMSpec, dict[str, Any], Path]:
    from transformers import LlamaForCausalLM

    spec = LMSpec(**TINY) if args.tiny else LMSpec(steps=300)
    if args.steps is not None:
        spec = replace(spec, steps=args.steps)
    folder, info = train_or_load(spec, args.runs, log=log)
    model = LlamaForCausalLM.from_pretrained(folder).float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, spec, info, folder.parent


def input_norms(model: nn.Module, layers: list[str], windows: torch.Tensor,
                path: Path) -> dict[str, torch.Tensor]:
    """Wanda's per-feature input norms of each layer (OWL's outlier ratios), cached."""
    stamp = tokens_fingerprint(windows)
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("stamp") == stamp and set(saved["norms"]) == set(layers):
            return saved["norms"]
    stats = collect_layer_stats(model, layers, windows.split(8), lm_forward)
    norms = {name: s.input_norm for name, s in stats.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"stamp": stamp, "norms": norms}, path)
    return norms


def measure_overhead(scorer: CandidateScorer, assignment: dict[str, Level], n_fit: int) -> float:
    """The share of a scoring call that does not shrink with the windows (the ledger's
    ``overhead``): time of 2 windows vs all, after one untimed call loads the weights."""
    if n_fit < 4:
        return 0.0
    scorer.score(assignment, 1)
    t0 = time.perf_counter()
    scorer.score(assignment, n_fit)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    scorer.score(assignment, 2)
    small = time.perf_counter() - t0
    f = 2 / n_fit
    return float(min(1.0, max(0.0, (small / full - f) / (1 - f))))


def run_method(method: str, target: Target, common: dict[str, Any], ctx: dict[str, Any]) -> Any:
    if method == "uniform":
        return uniform(**common)
    if method == "owl":
        return owl(**common, outlier_ratios=ctx["ratios"], target=target.value,
                   sizes=ctx["sizes"])
    if method == "knapsack":
        return knapsack(**common, sensitivity=ctx["sensitivity"])
    if method == "evolutionary":
        return evolutionary(**common, evaluate_at=ctx["evaluate_at"],
                            sensitivity=ctx["sensitivity"], overhead=ctx["overhead"])
    if method == "bayesian":
        return bayesian(**common)
    raise ValueError(method)


def method_note(result: Any) -> str:
    info = result.info
    if result.method == "owl":
        mixed = [h for h in result.history
                 if h.fidelity >= 1.0 and len({lv.key for lv in h.assignment.values()}) > 1]
        text = f"lambda {info['lambda']:g}, M {info['M']:g}"
        if mixed:
            text += (f"; best non-uniform grid point calib KL "
                     f"{min(h.fitness for h in mixed):.5f} ({len(mixed)} scored)")
        return text
    if result.method == "evolutionary":
        return f"{info['generations']} generations, {info['seeded']} seeds"
    if result.method == "knapsack":
        return f"{info['solves']} solves"
    if result.method == "bayesian":
        return f"{info['trials']} trials, {info['repaired']} repaired"
    return ", ".join(info.get("levels", []))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    words = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/llm_search.py", shlex.join(words)]).strip()
    started = time.perf_counter()
    machine = machine_note(args.threads)
    timing: dict[str, float] = {}
    targets = [parse_target(t) for t in args.targets]

    # --- model and windows ---------------------------------------------------------------------
    model, spec, train_info, run = load_model(args)
    if args.report_only:
        with (run / "search" / f"report-seed{args.seed}.pkl").open("rb") as handle:
            render(pickle.load(handle), args.out)
        log(f"re-rendered {args.out.with_suffix('.md')} and .csv")
        return 0
    counts = {"calibration": args.calibration_windows, "validation": args.validation_windows,
              "test": args.test_windows}
    sets = text_token_sets(spec.source, ByteTokenizer(), spec.seq_len, counts, seed=spec.seed)
    calibration = sets.calibration
    modules = dict(model.named_modules())
    layers = [n for n, m in modules.items() if isinstance(m, nn.Linear)
              and n.startswith("model.layers.")]
    shapes = {n: tuple(modules[n].weight.shape) for n in layers}
    sizes = {n: int(modules[n].weight.numel()) for n in layers}
    params = sum(p.numel() for p in model.parameters())
    log(f"model {run.name}: {params:,} parameters, {len(layers)} searched Linear layers "
        f"({sum(sizes.values()):,} weights); windows {counts} x {spec.seq_len}")

    # --- level database --------------------------------------------------------------------------
    grid = tiny_grid_for_bits if args.tiny else gguf_grids.grid_for_bits
    families = list(dict.fromkeys(t.family for t in targets))
    options = {f: options_for(f, shapes, grid) for f in families}
    per_layer = {n: list(dict.fromkeys(lv for f in families for lv in options[f][n]
                                       if not lv.is_dense)) for n in layers}
    t0 = time.perf_counter()
    done_at = [t0]

    def progress(done: int, total: int, layer: str, level: Level, seconds: float) -> None:
        if done == 1 or done % 25 == 0 or done == total:
            rate = (time.perf_counter() - done_at[0]) / done
            log(f"database {done}/{total} ({layer} {level.key} {seconds:.1f} s; "
                f"ETA {rate * (total - done) / 60:.1f} min)")

    db_info = build_level_database(model, layers, per_layer, calibration, run / "levels",
                                   grid_for_bits=grid, layers_at_once=len(layers),
                                   batch_size=8, progress=progress)
    timing["database (this run)"] = time.perf_counter() - t0
    db = LevelDatabase(run / "levels", model=model, calibration_windows=calibration,
                       cache_bytes=3 << 30)
    log(f"database: {db_info.entries} entries ({db_info.built} built now), "
        f"{mib(db_info.bytes_on_disk)} on disk, GGUF stored {mib(db_info.stored_bytes)}, "
        f"build {db_info.build_seconds / 60:.1f} min summed over entries")
    if args.build_only:
        return 0

    # --- fitness, sensitivity, outlier ratios --------------------------------------------------
    n_fit = args.fitness_windows
    reference = DenseReference(model, calibration[:n_fit], batch_size=8)
    scorer = CandidateScorer(model, db, reference)
    judge = Judge(model, db, sets.validation, sets.test)
    search_dir = run / "search"
    search_dir.mkdir(parents=True, exist_ok=True)
    ctx: dict[str, Any] = {"sizes": sizes, "overhead": 0.0, "sensitivity": None}
    ctx["evaluate_at"] = lambda a, f: scorer.score(a, max(1, round(f * n_fit)))
    sens_note = "not measured (no knapsack or GA)"
    if {"knapsack", "evolutionary"} & set(args.methods):
        wanted = {n: list(dict.fromkeys(lv for f in families for lv in options[f][n]))
                  for n in layers}
        pairs = sum(1 for n in layers for lv in wanted[n] if not lv.is_dense)
        runs_before, t0 = scorer.evaluations, time.perf_counter()
        path = search_dir / f"sensitivity-fit{n_fit}-w{args.sensitivity_windows}.json"
        shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        ctx["sensitivity"] = layer_sensitivity(scorer, layers, wanted,
                                               args.sensitivity_windows, path=path)
        timing["sensitivity"] = time.perf_counter() - t0
        ran = scorer.evaluations - runs_before
        equiv = pairs * args.sensitivity_windows / n_fit
        sens_note = (f"{pairs} (layer, level) pairs on {args.sensitivity_windows} windows = "
                     f"{equiv:.0f} full-evaluation equivalents (shared by all targets; "
                     f"{ran} run now, the rest read from {shown}); "
                     f"NOT charged to the knapsack's or the GA's {args.evaluations} evaluations")
        log(f"sensitivity: {sens_note}; {timing['sensitivity']:.0f} s")
    if "evolutionary" in args.methods and args.overhead is not None:
        ctx["overhead"] = args.overhead
    elif "evolutionary" in args.methods:
        probe = {n: options[families[0]][n][len(options[families[0]][n]) // 2] for n in layers}
        measured = measure_overhead(scorer, probe, n_fit)
        ctx["overhead"] = round(round(measured / 0.05) * 0.05, 2)
        log(f"scoring overhead (share of a call independent of windows): {measured:.3f} "
            f"-> {ctx['overhead']}")
    if "owl" in args.methods and any(t.family == "sparsity" for t in targets):
        norms = input_norms(model, layers, calibration, search_dir / "input_norms.pt")
        groups = {n: n.rsplit(".", 2)[0] for n in layers}  # model.layers.N: OWL's block ratio
        weights = {n: modules[n].weight.detach() for n in layers}
        ctx["ratios"] = outlier_ratios(weights, norms, groups=groups)

    dense = judge.validation({})
    judge.test_scores({})
    log(f"dense: validation perplexity {dense.val_ppl:.4f}, test {dense.test_ppl:.4f}")

    # --- the searches --------------------------------------------------------------------------
    rows: list[dict[str, Any]] = []
    picks: dict[str, dict[str, dict[str, str]]] = {}
    results: dict[tuple[str, str], tuple[dict[str, Any], dict[str, Level]]] = {}

    def evaluate(assignment: dict[str, Level]) -> float:
        return scorer.score(assignment, n_fit)

    for target in targets:
        opts = options[target.family]
        cost, budget = problem_for(target, opts, sizes)
        common = {"layers": layers, "options": opts, "cost": cost, "evaluate": evaluate,
                  "budget": budget, "evaluations": args.evaluations, "seed": args.seed}
        for method in args.methods:
            if method == "owl" and target.family != "sparsity":
                continue
            t0 = time.perf_counter()
            runs_before = scorer.evaluations
            try:
                result = run_method(method, target, common, ctx)
            except ValueError as exc:
                log(f"{target.name} {method}: skipped ({exc})")
                continue
            seconds = time.perf_counter() - t0
            candidates = top_candidates(result.history, args.top_k)
            judged = [(judge.validation(a), a, kl) for a, kl in candidates]
            val, pick, calib_kl = min(judged, key=lambda j: j[0].val_kl)
            test = judge.test_scores(pick)
            row = {
                "kind": "search", "target": target.name, "method": method,
                "achieved": achieved(target, pick, sizes),
                "gguf_bits_per_weight": gguf_bits(db, pick, sizes),
                "calibration_kl": calib_kl, "calibration_kl_best": result.fitness,
                "validation_kl": val.val_kl, "validation_ppl": val.val_ppl,
                "test_ppl": test.test_ppl, "test_kl": test.test_kl,
                "test_increase_pct": (test.test_ppl / dense.test_ppl - 1) * 100,
                "evaluations_used": result.evaluations_used, "evaluations": args.evaluations,
                "model_runs": scorer.evaluations - runs_before, "search_seconds": seconds,
                "picked_rank": [key_of(a) for a, _ in candidates].index(key_of(pick)) + 1,
                "note": method_note(result), "mix": level_mix(pick, sizes),
                "validation_candidates": len(candidates),
            }
            rows.append(row)
            results[(target.name, method)] = (row, pick)
            picks.setdefault(target.name, {})[method] = {n: lv.key for n, lv in pick.items()}
            log(f"{target.name:>13} {method:>12}: calib KL {calib_kl:.4f}, val KL "
                f"{val.val_kl:.4f}, test ppl {test.test_ppl:.4f} "
                f"({row['test_increase_pct']:+.2f} %), test KL {test.test_kl:.4f}, "
                f"{result.evaluations_used:g} evals, "
                f"{seconds:.0f} s [{row['mix']}]")
    timing["searches + judging"] = sum(r["search_seconds"] for r in rows) + judge.seconds
    (search_dir / f"picks-seed{args.seed}.json").write_text(json.dumps(picks, indent=1) + "\n")

    # --- best searched, paired noise, the targets -----------------------------------------
    best: dict[str, str] = {}
    for target in targets:
        searched = [m for m in SEARCHED if (target.name, m) in results]
        if searched:
            best[target.name] = min(searched,
                                    key=lambda m: results[(target.name, m)][0]["validation_kl"])
        base = results.get((target.name, "uniform"))
        for method in args.methods:
            if (target.name, method) in results and base is not None:
                row, pick = results[(target.name, method)]
                diff, se = paired(judge.test_scores(pick).test_nll,
                                  judge.test_scores(base[1]).test_nll)
                row["vs_uniform_log_ppl"], row["vs_uniform_se"] = diff, se
                row["best_searched"] = method == best.get(target.name)

    # --- export --------------------------------------------------------------------------------
    exports: list[dict[str, Any]] = []
    speed_rows: list[dict[str, Any]] = []
    export_note = ""
    if not args.no_export and any(t.family == "bits" for t in targets):
        t0 = time.perf_counter()
        reason = llama_cpp_reason()
        gguf_dir = run / "gguf"
        files: list[tuple[str, dict[str, Any], float]] = []  # (label, figures, torch test ppl)
        for ft in ("F32", "F16"):
            fig = export_gguf(gguf_dir / f"dense-{ft.lower()}.gguf", model, None, None, ft)
            files.append((f"dense {ft}", fig, dense.test_ppl if ft == "F32" else math.nan))
        for target in targets:
            if target.family != "bits":
                continue
            for method in dict.fromkeys([best.get(target.name), "uniform"]):
                if method is None or (target.name, method) not in results:
                    continue
                row, pick = results[(target.name, method)]
                fig = export_gguf(gguf_dir / f"{target.name.replace(':', '')}-{method}.gguf",
                                  model, db, pick, "F32")
                files.append((f"{target.name} {method}", fig, row["test_ppl"]))
        windows = [w.tolist() for w in sets.test]
        for label, fig, torch_ppl in files:
            out = {"kind": "export", "target": label, "file_bytes": fig["file_bytes"],
                   "tensor_bytes": fig["tensor_bytes"],
                   "predicted_tensor_bytes": fig["predicted_tensor_bytes"],
                   "tensor_bytes_match": fig["tensor_bytes"] == fig["predicted_tensor_bytes"],
                   "file_vs_predicted_pct":
                       (fig["file_bytes"] / fig["predicted_tensor_bytes"] - 1) * 100,
                   "types": " ".join(fig["types"]), "test_ppl": torch_ppl}
            if reason is None:
                from autosparse.cost.llama_cpp import llama_cpp_perplexity
                try:
                    ppl = llama_cpp_perplexity(fig["path"], windows, n_threads=args.threads)
                    out["llama_cpp_ppl"] = ppl
                    if not math.isnan(torch_ppl):
                        out["llama_vs_torch_pct"] = (ppl / torch_ppl - 1) * 100
                except Exception as exc:  # noqa: BLE001 - a load failure is a result to report
                    out["llama_cpp_ppl_note"] = f"failed: {type(exc).__name__}: {exc}"
            exports.append(out)
            log(f"export {label}: {fig['file_bytes']:,} bytes, tensors "
                f"{fig['tensor_bytes']:,} vs scored {fig['predicted_tensor_bytes']:,}; llama.cpp "
                f"ppl {fmt(out.get('llama_cpp_ppl'))} vs torch {fmt(torch_ppl)}")
        if reason is None:
            from autosparse.cost.llama_cpp import llama_cpp_tokens_per_second
            rates: dict[str, list[tuple[float, float]]] = {}
            for _ in range(2):  # two interleaved rounds: the shared machine's load drifts
                for label, fig, _ in files:
                    try:
                        s = llama_cpp_tokens_per_second(fig["path"], n_prompt=128, n_gen=64,
                                                        n_threads=args.threads, repeats=5)
                        rates.setdefault(label, []).append((s.prompt_tokens_per_s,
                                                            s.gen_tokens_per_s))
                    except Exception as exc:  # noqa: BLE001 - reported, the rest goes on
                        log(f"tokens/s {label}: failed ({exc})")
            for label, values in rates.items():
                speed_rows.append({"kind": "speed", "target": label,
                                   "prompt_tok_s": statistics.median(v[0] for v in values),
                                   "gen_tok_s": statistics.median(v[1] for v in values)})
        else:
            export_note = f"llama.cpp perplexity and tokens/s not measured: {reason}"
        timing["export"] = time.perf_counter() - t0

    timing["total"] = time.perf_counter() - started
    state = {"args": vars(args), "command": command, "machine": machine, "spec": spec,
             "train_info": train_info, "run": run, "sets": sets, "layers": layers,
             "sizes": sizes, "params": params, "db_info": db_info, "targets": targets,
             "rows": rows, "results": results, "best": best, "dense": dense,
             "exports": exports, "speed_rows": speed_rows, "export_note": export_note,
             "sens_note": sens_note, "overhead": ctx["overhead"], "timing": timing,
             "ratios": ctx.get("ratios"),
             "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with (search_dir / f"report-seed{args.seed}.pkl").open("wb") as handle:
        pickle.dump(state, handle)
    render(state, args.out)
    log(f"wrote {args.out.with_suffix('.md')} and .csv; total {timing['total'] / 60:.1f} min")
    return 0


def render(state: dict[str, Any], out: Path) -> None:
    """<out>.csv and <out>.md from a run's saved state (``--report-only`` re-renders it)."""
    args = argparse.Namespace(**{**state["args"], "out": out})
    dense = state["dense"]
    rows_all = state["rows"] + state["exports"] + state["speed_rows"]
    write_csv(out.with_suffix(".csv"), state["command"], [
        {"kind": "dense", "target": "dense", "method": "dense", "validation_ppl": dense.val_ppl,
         "test_ppl": dense.test_ppl}] + rows_all)
    write_report(args, state["command"], state["machine"], state["spec"], state["train_info"],
                 state["run"], state["sets"], state["layers"], state["sizes"], state["params"],
                 state["db_info"], state["targets"], state["rows"], state["results"],
                 state["best"], dense, state["exports"], state["speed_rows"],
                 state["export_note"], state["sens_note"], state["overhead"], state["timing"],
                 state["date"], state.get("ratios"))


if __name__ == "__main__":
    sys.exit(main())
