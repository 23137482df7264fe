"""Pieces of ``benchmarks/llm_search.py``: targets and level families, scoring of picks on
validation and test windows, the GGUF export check, and the report.

Split off so the script itself reads as the procedure; nothing here is part of the package.
"""

from __future__ import annotations

import csv
import math
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from autosparse.compress.oneshot import gguf_grids
from autosparse.compress.oneshot.database import LevelDatabase, assemble
from autosparse.compress.oneshot.fitness import DenseReference, model_logits
from autosparse.compress.oneshot.levels import Level
from autosparse.search.levels import budget_from_average, nominal_bits_per_weight

# 5-point steps: OWL moves a block's sparsity by at most lambda (<= 0.1) from the target, which a
# 10-point grid snaps back to the target level (a first run's OWL picks were all uniform)
SPARSITIES = tuple(round(0.30 + 0.05 * i, 2) for i in range(13))  # 0.30, 0.35, ..., 0.90
BITS = (8, 6, 5, 4, 3, 2)  # increasing compression
NM_PATTERN = "2:4"
SEARCHED = ("knapsack", "evolutionary", "bayesian")  # the searches (not the baselines)
METHODS = ("uniform", "owl", "knapsack", "evolutionary", "bayesian")


# ----------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class Target:
    """One budget: ``family`` bits (average nominal bits per weight <= value), sparsity (average
    unstructured sparsity >= value) or nm (2:4 + 4 bits: nominal bits <= uniform 2:4+4-bit's)."""

    name: str
    family: str
    value: float

    @property
    def label(self) -> str:
        if self.family == "bits":
            return f"{self.value:g} bits per weight"
        if self.family == "sparsity":
            return f"{self.value * 100:g} % sparsity"
        return "2:4 + 4 bits"


def parse_target(text: str) -> Target:
    """``bits:2.5``, ``sparsity:0.7`` (or ``sparsity:70``), ``2:4+4bit``."""
    if text.replace(" ", "").lower() in ("2:4+4bit", "2:4+4bits", "nm", "2:4"):
        return Target("2:4+4bit", "nm", 3.0)
    kind, _, value = text.partition(":")
    number = float(value)
    if kind == "bits" and number > 0:
        return Target(f"bits:{number:g}", "bits", number)
    if kind == "sparsity":
        number = number / 100 if number >= 1 else number
        if 0 < number < 1:
            return Target(f"sparsity:{number:g}", "sparsity", number)
    raise ValueError(f"target {text!r}: use bits:<average>, sparsity:<fraction> or 2:4+4bit")


def tiny_grid_for_bits(bits: int, *, exact_zero: bool = False) -> Any:
    """The tiny model's inputs are 64 wide, less than a K-quant block (256): 4 bits is Q4_0
    there (block 32); 2, 3 and 6 bits (K-quants) only reach layers whose inputs are 256 wide."""
    if bits == 4:
        return gguf_grids.GRIDS["Q4_0"]()
    return gguf_grids.grid_for_bits(bits, exact_zero=exact_zero)


def fits_grid(level: Level, shape: tuple[int, int], grid_for_bits: Callable[..., Any]) -> bool:
    if level.bits is None:
        return True
    try:
        gguf_grids.check_shape(grid_for_bits(level.bits, exact_zero=level.sparsity > 0), shape)
    except ValueError:
        return False
    return True


def family_levels(family: str) -> list[Level]:
    """A family's levels in increasing compression (the order the GA's level switch walks)."""
    if family == "bits":
        return [Level(bits=b, method="gptq") for b in BITS]
    if family == "sparsity":
        return [Level()] + [Level(sparsity=s, method="sparsegpt") for s in SPARSITIES]
    if family == "nm":
        return [Level(bits=8, method="gptq"), Level(bits=4, method="gptq"),
                Level(sparsity=0.5, pattern=NM_PATTERN, bits=4, method="sparsegpt+gptq"),
                Level(sparsity=0.5, pattern=NM_PATTERN, bits=3, method="sparsegpt+gptq")]
    raise ValueError(family)


def options_for(family: str, shapes: Mapping[str, tuple[int, int]],
                grid_for_bits: Callable[..., Any]) -> dict[str, list[Level]]:
    return {name: [lv for lv in family_levels(family) if fits_grid(lv, shape, grid_for_bits)]
            for name, shape in shapes.items()}


def problem_for(target: Target, options: Mapping[str, list[Level]],
                sizes: Mapping[str, int]) -> tuple[dict[str, list[float]], float]:
    """Costs and budget: nominal bits (``costs.nominal_bits_per_weight``, block scales not
    counted) for bits and 2:4; kept weights for sparsity."""
    if target.family == "sparsity":
        return budget_from_average(options, sizes, average_sparsity=target.value)
    return budget_from_average(options, sizes, average_bits=target.value)


def achieved(target: Target, assignment: Mapping[str, Level], sizes: Mapping[str, int]) -> float:
    """Average nominal bits per weight, or average sparsity, over the searched layers."""
    n = sum(sizes[name] for name in assignment)
    if target.family == "sparsity":
        return sum(sizes[k] * lv.sparsity for k, lv in assignment.items()) / n
    return sum(sizes[k] * nominal_bits_per_weight(lv) for k, lv in assignment.items()) / n


def gguf_bits(db: LevelDatabase, assignment: Mapping[str, Level],
              sizes: Mapping[str, int]) -> float:
    """Bits per weight the GGUF file stores for the searched layers (block scales included;
    a sparse unquantized layer is stored dense, in its values' float type)."""
    n = sum(sizes[name] for name in assignment)
    return 8 * sum(db.stored_bytes(k, lv) for k, lv in assignment.items()) / n


def level_mix(assignment: Mapping[str, Level], sizes: Mapping[str, int]) -> str:
    """``b2 62% / b3 38%``: the share of weights at each level, most used first."""
    share: dict[str, int] = {}
    for name, level in assignment.items():
        share[short(level)] = share.get(short(level), 0) + sizes[name]
    total = sum(share.values())
    return " / ".join(f"{k} {v / total * 100:.0f}%"
                      for k, v in sorted(share.items(), key=lambda kv: -kv[1]))


def short(level: Level) -> str:
    """``b4``, ``s0.7``, ``2:4+b4``, ``dense``."""
    if level.is_dense:
        return "dense"
    parts = []
    if level.sparsity > 0:
        parts.append(level.pattern if level.pattern != "unstructured" else f"s{level.sparsity:g}")
    if level.bits is not None:
        parts.append(f"b{level.bits}")
    return "+".join(parts)


def key_of(assignment: Mapping[str, Level]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, lv.key) for k, lv in assignment.items() if not lv.is_dense))


# ------------------------------------------------------------------------------ judging picks


@dataclass
class Scores:
    """One assignment on held-out windows: validation KL and perplexity, test perplexity and
    the test windows' mean NLL each (for paired differences)."""

    val_kl: float = math.nan
    val_ppl: float = math.nan
    test_ppl: float = math.nan
    test_kl: float = math.nan
    test_nll: np.ndarray | None = None


class Judge:
    """Scores assignments on validation (KL to dense + perplexity) and test windows (perplexity),
    cached by assignment. Nothing here is charged to a search: validation only re-ranks a
    method's own top candidates, test is for the report."""

    def __init__(self, model: nn.Module, db: LevelDatabase, validation: torch.Tensor,
                 test: torch.Tensor, batch_size: int = 8) -> None:
        self.model, self.db, self.batch_size = model, db, batch_size
        self.val_ref = DenseReference(model, validation, batch_size)
        self.test_ref = DenseReference(model, test, batch_size)
        self.test = self.test_ref.windows
        self.cache: dict[Any, Scores] = {}
        self.val_runs = self.test_runs = 0
        self.seconds = 0.0

    def _scores(self, assignment: Mapping[str, Level]) -> Scores:
        return self.cache.setdefault(key_of(assignment), Scores())

    def validation(self, assignment: Mapping[str, Level]) -> Scores:
        s = self._scores(assignment)
        if not math.isnan(s.val_kl):
            return s
        started = time.perf_counter()
        ref, kl, nll, count = self.val_ref, 0.0, 0.0, 0
        with torch.no_grad(), assemble(self.model, self.db, assignment):
            for start in range(0, ref.n_windows, ref.batch_size):
                stop = min(start + ref.batch_size, ref.n_windows)
                batch = ref.windows[start:stop]
                logq = torch.log_softmax(model_logits(self.model, batch)[:, :-1].float(), -1)
                kl += float(ref.kl(start, stop, logq).double().sum())
                nll -= float(logq.gather(-1, batch[:, 1:, None]).double().sum())
                count += batch[:, 1:].numel()
        s.val_kl, s.val_ppl = kl / count, math.exp(nll / count)
        self.val_runs += 1
        self.seconds += time.perf_counter() - started
        return s

    def test_scores(self, assignment: Mapping[str, Level]) -> Scores:
        s = self._scores(assignment)
        if s.test_nll is not None:
            return s
        started = time.perf_counter()
        per_window, kl = [], 0.0
        with torch.no_grad(), assemble(self.model, self.db, assignment):
            for start in range(0, len(self.test), self.batch_size):
                stop = min(start + self.batch_size, len(self.test))
                batch = self.test[start:stop]
                logq = torch.log_softmax(model_logits(self.model, batch)[:, :-1].float(), -1)
                nll = -logq.gather(-1, batch[:, 1:, None])[..., 0].double()
                per_window.append(nll.mean(dim=1))
                kl += float(self.test_ref.kl(start, stop, logq).double().sum())
        s.test_nll = torch.cat(per_window).numpy()
        s.test_ppl = float(math.exp(s.test_nll.mean()))
        s.test_kl = kl / (len(self.test) * self.test_ref.tokens_per_window)
        self.test_runs += 1
        self.seconds += time.perf_counter() - started
        return s


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean per-token log-perplexity difference a - b over test windows and its standard error
    (windows as the unit): ``exp`` of the first is the perplexity ratio."""
    d = np.asarray(a) - np.asarray(b)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan


def top_candidates(history: Sequence[Any], k: int) -> list[tuple[dict[str, Level], float]]:
    """A search's ``k`` best distinct full-fidelity assignments by calibration KL."""
    seen, out = set(), []
    for item in sorted((h for h in history if h.fidelity >= 1.0), key=lambda h: h.fitness):
        key = key_of(item.assignment)
        if key in seen:
            continue
        seen.add(key)
        out.append((dict(item.assignment), float(item.fitness)))
        if len(out) == k:
            break
    return out


# ------------------------------------------------------------------------------------ export


def export_gguf(path: Path, model: nn.Module, db: LevelDatabase | None,
                assignment: Mapping[str, Level] | None, float_type: str = "F32") -> dict[str, Any]:
    """Write ``model`` as GGUF: the searched layers as the database's packed bytes, everything
    else (embeddings, norms, output head) as ``float_type`` floats (norms always F32). Returns
    the file's figures and the size the scoring predicts (stored bytes + fixed tensors)."""
    from autosparse.compress.oneshot.gguf_candidate import candidate_tensors
    from autosparse.compress.oneshot.gguf_file import write_llama_gguf

    chosen = dict(assignment or {})
    tensors = candidate_tensors(model, db, chosen)  # searched layers: the stored bytes
    float_size = {"F32": 4, "F16": 2}[float_type]
    predicted = sum(db.stored_bytes(layer, level) for layer, level in chosen.items()) if chosen \
        else 0
    predicted += sum(value.numel() * (4 if value.ndim == 1 else float_size)
                     for name, value in model.state_dict().items()
                     if name.removesuffix(".weight") not in chosen)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = write_llama_gguf(path, model.config, tensors, float_type=float_type)
    return {"path": str(path), "file_bytes": info.file_size, "tensor_bytes": info.tensor_bytes,
            "predicted_tensor_bytes": predicted, "metadata_bytes": info.metadata_bytes,
            "padding_bytes": info.padding_bytes, "types": sorted(set(info.tensor_types.values()))}


def llama_cpp_reason() -> str | None:
    """None when llama.cpp can be run here, else why not."""
    try:
        import llama_cpp  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, or a broken library (OSError)
        return f"llama_cpp not importable ({type(exc).__name__}: {str(exc).splitlines()[0]})"
    return None


# ------------------------------------------------------------------------------------ report


def machine_note(threads: int) -> str:
    from autosparse.cost.calibration.machine import this_machine

    cpu = this_machine().get("cpu") or platform.machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{os.cpu_count()} CPU cores ({cpu}), no GPU, torch {torch.__version__} with "
            f"{threads} threads, Python {platform.python_version()}, load average at start "
            f"{load:.2f} (shared machine: other jobs ran alongside, so timings are noisy)")


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def write_csv(path: Path, command: str, rows: list[dict[str, Any]]) -> None:
    """Rows (union of their keys as columns), the command as a ``#`` line above the header."""
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with path.open("w", newline="") as handle:
        handle.write(f"# {command}\n")
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v)
                             for k, v in row.items()})


@dataclass
class Report:
    """The markdown, built section by section."""

    lines: list[str] = field(default_factory=list)

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        """First column left-aligned, the others right-aligned."""
        self.add("| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1))
        for row in rows:
            self.add("| " + " | ".join(str(c) for c in row) + " |")
        self.add("")

    def write(self, path: Path) -> None:
        path.write_text("\n".join(self.lines).rstrip() + "\n")


def write_report(args, command, machine, spec, train_info, run, sets, layers, sizes, params,
                 db_info, targets, rows, results, best, dense, exports, speed_rows, export_note,
                 sens_note, overhead, timing, date, ratios=None) -> None:
    """<out>.md: setup, a table per target, the issue's targets, export, what is left out."""
    r = Report()
    r.add("# One-shot LLM search: uniform vs OWL vs knapsack vs GA vs BO, held-out perplexity",
          "", "Generated by `benchmarks/llm_search.py` (issue 18). Command:", "", "```",
          command, "```", "",
          f"- Date: {date}; total wall time "
          f"{timing['total'] / 60:.1f} min "
          f"({', '.join(f'{k} {v / 60:.1f} min' for k, v in timing.items() if k != 'total')}).",
          f"- Machine: {machine}.")
    tr = train_info.get("train", {})
    r.add(f"- Model: `runs/llm-bench/{run.name}` — byte-level Llama, {spec.layers} blocks x "
          f"{spec.hidden} wide (intermediate {spec.intermediate}), {params:,} parameters, trained "
          f"{tr.get('steps')} steps ({tr.get('tokens', 0):,} tokens) on the stdlib's train split; "
          f"{len(layers)} searched Linear layers = {sum(sizes.values()):,} weights "
          f"({sum(sizes.values()) / params * 100:.0f} % of the parameters); embeddings, norms and "
          f"the LM head stay dense (F32).",
          f"- Windows of {spec.seq_len} bytes, drawn from whole files of each split (files: "
          f"{sets.files}): calibration {len(sets.calibration)} "
          f"({len(sets.calibration) * spec.seq_len:,} tokens: Hessians of the database), of which "
          f"the first {args.fitness_windows} ({args.fitness_windows * (spec.seq_len - 1):,} "
          f"predicted tokens) score the KL fitness; validation {len(sets.validation)} (re-ranks "
          f"each method's top {args.top_k} and picks the best searched method); test "
          f"{len(sets.test)} ({len(sets.test) * (spec.seq_len - 1):,} predicted tokens; report "
          f"only, never used to pick). EvoPress scores up to 64k calibration tokens per "
          f"candidate; {args.fitness_windows * (spec.seq_len - 1):,} is what fits "
          f"{args.evaluations} "
          f"evaluations x {len(targets)} targets x 4-5 methods on 2 shared cores.",
          f"- Dense: validation perplexity {dense.val_ppl:.4f}, **test perplexity "
          f"{dense.test_ppl:.4f}** ({math.log2(dense.test_ppl):.3f} bits per byte).",
          f"- Level database `runs/llm-bench/{run.name}/levels/`: {db_info.entries} entries "
          f"({db_info.layers} layers), {mib(db_info.bytes_on_disk)} on disk, GGUF stored bytes of "
          f"all entries {mib(db_info.stored_bytes)} (dense layers {mib(db_info.dense_bytes)} F32); "
          f"build time {db_info.build_seconds / 60:.1f} min summed over entries (compression + "
          f"packing), {db_info.seconds / 60:.1f} min wall in this run ({db_info.built} entries "
          f"built now). Levels: GPTQ weight-only 2/3/4/5/6/8 bits as Q2_K/Q3_K/Q4_K/Q5_0/Q6_K/"
          f"Q8_0; SparseGPT unstructured 30-90 % in 5-point steps (unquantized; GGUF stores them "
          f"dense F32; 5-point rather than the issue's 10-point steps so that OWL's allocations, "
          f"within lambda <= 0.1 of the target, are not snapped back to uniform); "
          f"SparseGPT 2:4 jointly with GPTQ 4 bits (Q4_0: sparse layers need a type with an exact "
          f"zero) and 3 bits (Q3_K). Every level is compressed on the dense model's inputs.",
          f"- Fitness: mean KL(dense || candidate) per token. Sensitivity (each layer alone at "
          f"each "
          f"level): {sens_note}. The knapsack solves on it; the GA takes the knapsack's solution "
          f"as one seed. Uniform, OWL and BO do not use it.",
          f"- Methods at equal candidate evaluations ({args.evaluations} per method and target, "
          f"charged by the ledger; a GA call on a fraction f of the fitness windows costs "
          f"{overhead} + {1 - overhead:.2f} f, the overhead measured here to the nearest 0.05 or "
          f"given by --overhead): uniform (the common "
          f"level that fits the budget most tightly: 1 evaluation), OWL (sparsity only: outlier "
          f"ratios of Wanda scores per block, M x lambda grid of 20, realised with the SparseGPT "
          f"levels - the OWL paper pairs OWL with Wanda and with SparseGPT; SparseGPT here so that "
          f"every method draws on the same database), knapsack (MILP on sensitivities + sweep), "
          f"evolutionary (EvoPress-like (1 + 16) GA, level-switch mutation, successive halving on "
          f"1/8, 1/2, all fitness windows), bayesian (Optuna TPE, repair into the budget, uniform "
          f"enqueued first). Seed {args.seed}.",
          "- Budgets: bits targets count nominal bits per weight (block scales not counted: "
          "with GGUF's stored bits - Q2_K 2.625, Q3_K 3.4375, Q4_K 4.5, Q5_0 5.5, Q6_K 6.5625, "
          "Q8_0 8.5 - a 2.5-bit average is infeasible); the GGUF column gives what the file "
          "stores. Sparsity targets: kept weights <= (1 - s) x weights. **2:4 + 4 bits**: each "
          "layer is Q8_0, Q4_K, 2:4 + Q4_0 or 2:4 + Q3_K, nominal bits counting 2 index bits per "
          "kept weight (2:4 + 4 bits = 3.0), total at most uniform 2:4 + 4 bits'; GGUF has no "
          "sparse storage, so the GGUF column counts the 2:4 layers dense.",
          "",
          "Columns: **achieved** = average nominal bits per weight (or sparsity) of the pick over "
          "the searched layers; **GGUF bpw** = bits per weight the GGUF file stores for them; "
          "**calib KL** = the pick's fitness; **val KL / val ppl** on the validation windows; "
          "**test ppl** and **increase** over dense, and **test KL** to dense, on the test windows "
          "(KL is the less noisy view of fidelity when the increase is a few 0.01 %); "
          "**vs uniform** = "
          "test log-perplexity difference to uniform's pick, ± its standard error over the "
          f"{len(sets.test)} test windows (paired); **evals** = ledger-charged evaluations (of "
          f"{args.evaluations}); **s** = search wall time (validation/test scoring apart). "
          "**bold** method = best searched on validation.", "")
    for target in targets:
        trows = [row for row in rows if row["target"] == target.name]
        if not trows:
            continue
        r.add(f"## {target.label}", "")
        table = [["dense", "–", "–", "0", "0", fmt(dense.val_ppl), fmt(dense.test_ppl), "–",
                  "0", "–", "–", "–", ""]]
        for row in trows:
            ach = (f"{row['achieved'] * 100:.1f} %" if target.family == "sparsity"
                   else f"{row['achieved']:.3f}")
            vs = (f"{row['vs_uniform_log_ppl']:+.5f} ± {row['vs_uniform_se']:.5f}"
                  if "vs_uniform_log_ppl" in row and row["method"] != "uniform" else "–")
            name = f"**{row['method']}**" if row.get("best_searched") else row["method"]
            table.append([name, ach, f"{row['gguf_bits_per_weight']:.3f}",
                          fmt(row["calibration_kl"], 5), fmt(row["validation_kl"], 5),
                          fmt(row["validation_ppl"]), fmt(row["test_ppl"]),
                          f"{row['test_increase_pct']:+.2f} %", fmt(row["test_kl"], 5), vs,
                          f"{row['evaluations_used']:g}", f"{row['search_seconds']:.0f}",
                          f"{row['mix']}; {row['note']}"
                          + (f"; validation picked its calibration #{row['picked_rank']}"
                             if row["picked_rank"] > 1 else "")])
        r.table(["method", "achieved", "GGUF bpw", "calib KL", "val KL", "val ppl", "test ppl",
                 "increase", "test KL", "vs uniform", "evals", "s",
                 "levels (share of weights); notes"],
                table)

    allocation_section(r, targets, results, best, sizes, layers, ratios)

    # the targets
    r.add("## The issue's targets", "")
    verdicts = []
    for name in ("sparsity:0.7", "bits:2.5"):
        if (name, "uniform") not in results or name not in best:
            verdicts.append(f"- {name}: not run.")
            continue
        b = results[(name, best[name])][0]
        u = results[(name, "uniform")][0]
        ok = b["test_increase_pct"] <= 0.5 * u["test_increase_pct"]
        text = (f"- {name}: best searched ({best[name]}) {b['test_increase_pct']:+.2f} % vs "
                f"uniform {u['test_increase_pct']:+.2f} % (half: {u['test_increase_pct'] / 2:+.2f} "
                f"%) -> {'met' if ok else 'NOT met'}")
        if (name, "owl") in results:
            o = results[(name, "owl")][0]
            ok_owl = b["test_increase_pct"] < o["test_increase_pct"]
            text += (f"; OWL {o['test_increase_pct']:+.2f} % -> below OWL "
                     f"{'met' if ok_owl else 'NOT met'}")
        verdicts.append(text + ".")
    for target in targets:
        if target.family != "bits" or target.value < 4 or target.name not in best:
            continue
        b = results[(target.name, best[target.name])][0]
        u = results[(target.name, "uniform")][0]
        ok = b["vs_uniform_log_ppl"] <= 2 * b["vs_uniform_se"]
        verdicts.append(f"- {target.name} (>= 4 bits): best searched ({best[target.name]}) "
                        f"{b['test_increase_pct']:+.3f} % vs uniform {u['test_increase_pct']:+.3f} "
                        f"%; paired difference {b['vs_uniform_log_ppl']:+.5f} ± "
                        f"{b['vs_uniform_se']:.5f} log-ppl (noise = 2 SE over the test windows) "
                        f"-> no worse beyond noise {'met' if ok else 'NOT met'} (test KL to dense "
                        f"{b['test_kl']:.5f} vs uniform {u['test_kl']:.5f}).")
    for e in exports:
        if e["target"].startswith("dense"):
            continue
        size_ok = e["tensor_bytes_match"] and abs(e["file_vs_predicted_pct"]) <= 1
        llama = e.get("llama_vs_torch_pct")
        verdicts.append(
            f"- export {e['target']}: tensor bytes "
            f"{'equal' if e['tensor_bytes_match'] else 'DIFFER from'} "
            f"the scored size, file {e['file_vs_predicted_pct']:+.3f} % over it (metadata + "
            f"alignment) -> size within 1 % {'met' if size_ok else 'NOT met'}; llama.cpp "
            f"perplexity " + (f"{llama:+.3f} % vs torch -> within 1 % "
                              f"{'met' if abs(llama) <= 1 else 'NOT met'}."
                              if llama is not None else
                              f"not measured ({export_note or e.get('llama_cpp_ppl_note')})."))
    r.add(*verdicts, "")

    if exports:
        r.add("## Export (GGUF, llama.cpp)", "",
              "Searched layers from the database's packed bytes (`db.packed`), embeddings, LM head "
              "and norms F32 (the dense reference files: every tensor F32, or F16 with norms F32). "
              "llama.cpp perplexity: llama-cpp-python, F32 key/value cache, each test window from "
              "an empty context, the same windows as torch's test perplexity. Tokens/s: "
              f"llama-bench style (128 prompt tokens, 64 generated), threads: {args.threads}, "
              "median of 2 interleaved rounds x 5 repeats.", "")
        speed = {s["target"]: s for s in speed_rows}
        table = []
        for e in exports:
            s = speed.get(e["target"], {})
            table.append([e["target"], e["types"], f"{e['file_bytes']:,}",
                          f"{e['tensor_bytes']:,}", f"{e['predicted_tensor_bytes']:,}",
                          f"{e['file_vs_predicted_pct']:+.3f} %", fmt(e["test_ppl"]),
                          fmt(e.get("llama_cpp_ppl")),
                          (f"{e['llama_vs_torch_pct']:+.3f} %" if "llama_vs_torch_pct" in e
                           else e.get("llama_cpp_ppl_note", "–")),
                          fmt(s.get("prompt_tok_s"), 0), fmt(s.get("gen_tok_s"), 0)])
        r.table(["file", "types", "file bytes", "tensor bytes", "scored bytes", "file vs scored",
                 "torch test ppl", "llama.cpp ppl", "llama vs torch", "prompt tok/s",
                 "gen tok/s"], table)
        if export_note:
            r.add(f"- {export_note}", "")
    r.add("## Left out", "",
          "- One seed per method (search noise not measured; the ± column is test-window noise "
          "only, not search noise).",
          "- The GA is EvoPress's elitist (1 + 16) scheme with a population of 1 and 4 seeds; BO "
          "is seeded with the uniform assignment only (not with the knapsack's), so it is the "
          "one search that spends no sensitivity measurements.",
          "- Wanda levels (OWL is run on SparseGPT levels), magnitude levels, and levels between "
          "dense and 30 % sparsity.",
          f"- Calibration is far smaller than EvoPress's ({args.fitness_windows} windows for the "
          "fitness, sensitivities on "
          f"{args.sensitivity_windows}); layers are compressed on dense inputs only (no "
          "sequential propagation through compressed blocks).",
          "- The 2:4 and sparsity picks are not exported (GGUF stores them dense; llama.cpp has "
          "no sparse kernels).", "")
    r.write(args.out.with_suffix(".md"))


def _group_mean(assignment: Mapping[str, Level], sizes: Mapping[str, int], names: list[str],
                family: str) -> float:
    """Weight-averaged sparsity (sparsity family) or nominal bits of ``names``."""
    total = sum(sizes[n] for n in names)
    if family == "sparsity":
        return sum(assignment[n].sparsity * sizes[n] for n in names) / total
    return sum(nominal_bits_per_weight(assignment[n]) * sizes[n] for n in names) / total


def allocation_section(r: Report, targets: Sequence[Target], results: Mapping[Any, Any],
                       best: Mapping[str, str], sizes: Mapping[str, int], layers: list[str],
                       ratios: Mapping[float, Mapping[str, float]] | None) -> None:
    """Where the best searched pick of each target spends its budget: by block, by layer kind;
    and, for sparsity, what OWL's outlier ratios would have done instead."""
    blocks = sorted({int(n.split(".")[2]) for n in layers})
    kinds = list(dict.fromkeys(n.rsplit(".", 1)[1] for n in layers))
    by_block = {b: [n for n in layers if int(n.split(".")[2]) == b] for b in blocks}
    by_kind = {k: [n for n in layers if n.rsplit(".", 1)[1] == k] for k in kinds}
    rows_block, rows_kind = [], []
    for target in targets:
        if target.name not in best:
            continue
        pick = results[(target.name, best[target.name])][1]
        unit = "sparsity" if target.family == "sparsity" else "bits"
        show = (lambda v: f"{v * 100:.1f}") if unit == "sparsity" else (lambda v: f"{v:.2f}")
        what = "% sparse" if unit == "sparsity" else "bits"
        label = f"{target.label} ({best[target.name]}; {what})"
        rows_block.append([label] + [show(_group_mean(pick, sizes, by_block[b], target.family))
                                     for b in blocks])
        rows_kind.append([label] + [show(_group_mean(pick, sizes, by_kind[k], target.family))
                                    for k in kinds])
        if target.family == "sparsity" and ratios and 5.0 in ratios and target.value == max(
                t.value for t in targets if t.family == "sparsity"):
            from autosparse.search.levels import owl_sparsities

            d = [ratios[5.0][by_block[b][0]] for b in blocks]
            rows_block.append(["OWL outlier ratio, M 5 (%)"] + [f"{v * 100:.2f}" for v in d])
            wanted = owl_sparsities(d, target.value, 0.08)
            rows_block.append([f"OWL wanted sparsity at {target.label}, lambda 0.08 (%)"]
                              + [f"{v * 100:.1f}" for v in wanted])
    if not rows_block:
        return
    r.add("## Where the best searched picks spend the budget", "",
          "Weight-averaged sparsity (%) or nominal bits per weight of each target's best searched "
          "pick, per decoder block and per layer kind. OWL gives a block less sparsity the more "
          "outliers (Wanda scores above M x their mean) it has; the rows under the largest "
          "sparsity target show its ratios and the allocation they imply.", "")
    r.table(["target"] + [f"block {b}" for b in blocks], rows_block)
    r.table(["target"] + kinds, rows_kind)
