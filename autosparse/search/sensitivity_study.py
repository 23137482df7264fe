"""Sensitivity kept with the study: reuse what is stored, measure the rest, one decision at a time.

    header, stored = what the study holds (method/samples differ from the config: measure afresh)
    store the header (complete = false) before the first new decision
    each decision measured: store it, and the seconds spent so far, at once (a kill loses one)
    mark complete; log sensitivity.csv / sensitivity.png to the search's MLflow parent run

Several workers or a resumed search therefore measure every decision once between them.
"""

from __future__ import annotations

import io
import time
import warnings
from contextlib import nullcontext
from typing import TYPE_CHECKING, Callable

import optuna

from autosparse.search.allocation.table import (
    ChoiceSensitivity,
    SensitivityTable,
    choice_id,
)
from autosparse.search.sensitivity import (
    dense_baseline,
    measure_sensitivity,
    measured_choices,
    scores_for_space,
)
from autosparse.search.study import (
    store_sensitivity_decision,
    store_sensitivity_header,
    stored_sensitivity,
)

if TYPE_CHECKING:
    from autosparse.search.context import SearchContext
    from autosparse.tracking.mlflow_tracker import Tracker

Printer = Callable[[str], None]


def _usable(context: "SearchContext", header: dict, stored: dict[str, list[ChoiceSensitivity]]
            ) -> dict[str, list[ChoiceSensitivity]]:
    """Stored decisions that the header lists (measured with its method) and whose choices are
    exactly the ones the space offers."""
    usable = {}
    listed = set(header.get("decisions", ()))
    for decision in context.space.decisions:
        entries = stored.get(decision.name) if decision.name in listed else None
        wanted = {choice_id(c) for c in measured_choices(decision)}
        if entries is not None and {e.choice for e in entries} == wanted:
            usable[decision.name] = entries
    return usable


def ensure_sensitivity(context: "SearchContext", study: optuna.Study, printer: Printer,
                       tracker: "Tracker | None" = None,
                       parent_run_id: str | None = None) -> SensitivityTable:
    """The study's sensitivity table for the context's space and config, measuring what is missing."""
    cfg = context.config.sensitivity
    task = getattr(context, "task", None)
    samples_used = min(cfg.samples, context.data.samples("validation"))
    header, stored = stored_sensitivity(study)
    if header is not None and (header.get("method"), header.get("samples")) != (cfg.method, cfg.samples):
        printer(f"sensitivity: the study holds a table measured with {header.get('method')} on "
                f"{header.get('samples')} samples, the config asks for {cfg.method} on "
                f"{cfg.samples}: measuring it again")
        header = None
    usable = _usable(context, header, stored) if header is not None else {}
    reused = set(usable)
    seconds = float(header["seconds"]) if header is not None else 0.0
    todo = [d for d in context.space.decisions if d.name not in usable]
    if todo:
        start = time.perf_counter()
        oneshot = getattr(context, "oneshot", None)  # levels stored: nothing to compress
        if header is None:
            with oneshot.running(context.dense) if oneshot is not None else nullcontext():
                baseline = dense_baseline(context.dense, context.data, cfg, task)
        else:
            baseline = (float(header["dense_loss"]), float(header["dense_accuracy"]))

        def save_header(complete: bool) -> float:
            total = seconds + time.perf_counter() - start
            store_sensitivity_header(study, dense_loss=baseline[0], dense_accuracy=baseline[1],
                                     samples=cfg.samples, samples_used=samples_used,
                                     method=cfg.method, seconds=total, complete=complete,
                                     decisions=list(usable))
            return total

        save_header(False)  # before any decision, so stored decisions always have a header

        def on_decision(name: str, entries: list[ChoiceSensitivity]) -> None:
            store_sensitivity_decision(study, name, entries)
            usable[name] = entries
            save_header(False)

        taylor = oneshot is None and any("taylor" in d.criteria for d in todo)
        scores = scores_for_space(context.dense, context.data, context.space,
                                  context.config.finetune, task) if taylor else None
        measure_sensitivity(context.dense, context.data, context.space, cfg, scores=scores,
                            skip=frozenset(usable), on_decision=on_decision, baseline=baseline,
                            graph=getattr(context, "graph", None), task=task,
                            tensors_for=None if oneshot is None else oneshot.layer_tensors,
                            running=None if oneshot is None else oneshot.running)
        seconds = save_header(True)
    else:
        baseline = (float(header["dense_loss"]), float(header["dense_accuracy"]))
        if not header.get("complete"):
            store_sensitivity_header(study, dense_loss=baseline[0], dense_accuracy=baseline[1],
                                     samples=cfg.samples, samples_used=samples_used,
                                     method=cfg.method, seconds=seconds, complete=True,
                                     decisions=list(usable))

    entries = tuple(e for d in context.space.decisions for e in usable[d.name])
    table = SensitivityTable(
        entries=entries, dense_loss=baseline[0], dense_accuracy=baseline[1],
        samples=samples_used, method=cfg.method, seconds=seconds,
        meta={"samples_requested": cfg.samples,
              "measured": [d.name for d in todo], "reused": sorted(reused)})
    printer(summary_line(table))
    if tracker is not None and parent_run_id is not None:
        log_sensitivity(tracker, parent_run_id, table, *metric_of(task))
    return table


def metric_of(task) -> tuple[str, bool]:
    """(name, maximised) of a task's metric, for the table's headers; accuracy without one."""
    if task is None or task.is_default:
        return "accuracy", True
    return task.name, task.maximize


def summary_line(table: SensitivityTable) -> str:
    """e.g. ``sensitivity: 5 decisions x 48 choices in 2.4 s (zero-shot, 359 validation samples)``."""
    counts = [sum(1 for e in table.entries if e.decision == name) for name in table.decisions()]
    shape = (f"{len(counts)} decisions x {counts[0]} choices" if len(set(counts)) == 1
             else f"{len(counts)} decisions, {len(table.entries)} choices")
    line = (f"sensitivity: {shape} in {table.seconds:.1f} s ({table.method}, {table.samples} "
            "validation samples)")
    measured, reused = table.meta.get("measured", []), table.meta.get("reused", [])
    if not measured:
        line += "; all reused from the study"
    elif reused:
        line += f"; {len(measured)} measured now, {len(reused)} reused from the study"
    return line


def sensitivity_csv(table: SensitivityTable, metric: str = "accuracy",
                    maximize: bool = True) -> str:
    """One row per (decision, choice) with the choice spelled out, and the dense baseline (loss,
    accuracy) repeated on every row so the file stands alone. Another task's metric is named
    by its name (``mse_delta``, ``dense_mse``) and given as it is: the table stores a minimised
    metric negated (negative = worse), the file its real change (for mse, positive = worse)."""
    import pandas as pd

    frame = pd.DataFrame(table.rows())
    frame["dense_loss"] = table.dense_loss
    frame["dense_accuracy"] = table.dense_accuracy
    if metric != "accuracy":
        sign = 1.0 if maximize else -1.0
        frame = frame.rename(columns={"accuracy_delta": f"{metric}_delta",
                                      "dense_accuracy": f"dense_{metric}"})
        frame[f"{metric}_delta"] *= sign
        frame[f"dense_{metric}"] *= sign
    buffer = io.StringIO()
    frame.to_csv(buffer, index=False)
    return buffer.getvalue()


def log_sensitivity(tracker: "Tracker", parent_run_id: str, table: SensitivityTable,
                    metric: str = "accuracy", maximize: bool = True) -> None:
    """sensitivity.csv, the heatmap, wall time and method on the search's parent run."""
    from autosparse.tracking.plots import sensitivity_heatmap_png

    try:
        png = sensitivity_heatmap_png(table, metric, maximize)
    except Exception as err:  # noqa: BLE001 - a plot must not stop the search
        warnings.warn(f"could not draw sensitivity.png: {type(err).__name__}: {err}")
        png = b""
    tracker.log_sensitivity(parent_run_id, csv_text=sensitivity_csv(table, metric, maximize),
                            heatmap_png=png,
                            seconds=table.seconds, method=table.method)


# the choices the compact table shows a column for, when a decision offers them
_COLUMNS = {"int4": "dense:0:4:magnitude", "90%": "unstructured:0.9:32:magnitude"}


def format_sensitivity(table: SensitivityTable, metric: str = "accuracy",
                       maximize: bool = True) -> str:
    """Per decision: its least and most harmful choice, and the loss change at int4 and at 90 %
    unstructured (fp32) — what a user checks first to see which layers to leave alone. The
    worst choice's metric change is headed ``worst Δacc`` for accuracy, ``worst Δmse`` (its real
    change: positive = worse for a minimised metric) for another task."""
    import pandas as pd

    from autosparse.search.allocation.table import parse_choice_id

    def fmt(value: float) -> str:
        return "-" if value != value else f"{value:+.3g}"  # NaN (not measured) prints as -

    worst_header = "worst Δacc" if metric == "accuracy" else f"worst Δ{metric}"
    rows = []
    for name in table.decisions():
        entries = [e for e in table.entries if e.decision == name]
        best = min(entries, key=lambda e: e.loss_delta)
        worst = max(entries, key=lambda e: e.loss_delta)
        row = {"decision": name, "choices": len(entries),
               "best": parse_choice_id(best.choice).describe(), "best Δloss": fmt(best.loss_delta),
               "worst": parse_choice_id(worst.choice).describe(),
               "worst Δloss": fmt(worst.loss_delta),
               worst_header: fmt(worst.accuracy_delta * (1.0 if maximize else -1.0))}
        for label, key in _COLUMNS.items():
            entry = table.get(name, key)
            row[f"Δloss {label}"] = "n/a" if entry is None else fmt(entry.loss_delta)
        rows.append(row)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        return pd.DataFrame(rows).to_string(index=False)
