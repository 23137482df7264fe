"""Pictures and tables of a search: the Pareto front as interactive HTML, static PNG and a table.

Input is the trials DataFrame built from the Optuna study (one row per trial: ``trial``,
``state``, ``candidate`` JSON, ``fail_reason``, ``feasible``, ``on_front``, ``cached`` plus
metric columns). Every numeric column that is not bookkeeping is treated as a metric, so metrics
added later (latency, energy) show up in hover text and tables without changes here.

The task metric keeps its slot name ``accuracy`` in the frame; ``metric`` (its name: mse,
perplexity) and ``maximize`` (its direction) say how to show it. A minimised metric is drawn on an
inverted y axis (lower values higher up), so that in every plot up and left is better and the
front is the upper-left staircase, whatever the task.

``pareto.html`` is plain inline SVG (:mod:`autosparse.tracking.pareto_page`): no plotting library, a page
of tens of kB that MLflow's artifact viewer shows at once. matplotlib is imported inside the
functions that draw PNGs: importing this module stays cheap for callers that only need
:func:`front_table`.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from autosparse.config.objectives import OBJECTIVES, shown_metric
from autosparse.space.candidate import Candidate
from autosparse.tracking import pareto_page

# Columns of the trials frame that are bookkeeping, never metrics.
BOOKKEEPING_COLUMNS = (
    "trial",
    "state",
    "candidate",
    "fail_reason",
    "feasible",
    "on_front",
    "cached",
    "datetime_start",
    "datetime_complete",
)
ACCURACY = "accuracy"
MAX_HOVER_LAYERS = 40

_FRONT_COLOR = "#d62728"
_FEASIBLE_COLOR = "#1f77b4"
_INFEASIBLE_COLOR = "#b0b0b0"
_DENSE_COLOR = "#2ca02c"
# Columns of a front re-evaluated with extra seeds (front.trials_frame); absent otherwise.
REEVAL_COLUMNS = ("accuracy_std", "accuracy_seeds", "test_accuracy", "accuracy_single")


# --------------------------------------------------------------------------------------------
# helpers shared with tracking
# --------------------------------------------------------------------------------------------


def metric_columns(trials: pd.DataFrame) -> list[str]:
    """Numeric, non-boolean, non-bookkeeping columns, in frame order."""
    cols = []
    for col in trials.columns:
        if col in BOOKKEEPING_COLUMNS:
            continue
        dtype = trials[col].dtype
        if pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype):
            continue
        cols.append(str(col))
    return cols


def cost_objectives(objectives: Sequence[str]) -> list[str]:
    """The objectives plotted on x: every objective but accuracy, in the given order."""
    _check_objectives(objectives)
    return [name for name in objectives if name != ACCURACY]


def layer_choices(candidate_json: str | None) -> list[tuple[str, str]]:
    """``[(layer, "unstructured 50%/int8"), ...]``; empty for a missing or unreadable candidate."""
    if not isinstance(candidate_json, str) or not candidate_json.strip():
        return []
    try:
        candidate = Candidate.from_json(candidate_json)
    except (ValueError, KeyError, TypeError):
        return []
    return [(name, choice.describe()) for name, choice in candidate.items()]


def layers_summary(candidate_json: str | None, sep: str = ", ") -> str:
    """Short per-layer summary, e.g. ``conv1=unstructured 50%/int8, conv2=2:4/int4``."""
    return sep.join(f"{name}={text}" for name, text in layer_choices(candidate_json))


def _check_objectives(objectives: Sequence[str]) -> None:
    unknown = [name for name in objectives if name not in OBJECTIVES]
    if unknown:
        raise ValueError(
            f"objectives {unknown} unknown; known: {', '.join(OBJECTIVES)}"
        )
    if ACCURACY not in objectives or len(objectives) < 2:
        raise ValueError(f"objectives {list(objectives)} must contain 'accuracy' and a cost")


def _column(frame: pd.DataFrame, name: str, default) -> pd.Series:
    if name in frame.columns:
        return frame[name]
    return pd.Series([default] * len(frame), index=frame.index)


def _complete(trials: pd.DataFrame) -> pd.DataFrame:
    """Completed trials only (failures have no metrics to plot)."""
    state = _column(trials, "state", "COMPLETE").astype(str)
    return trials[state == "COMPLETE"]


def _front_mask(frame: pd.DataFrame) -> pd.Series:
    return _column(frame, "on_front", False).fillna(False).astype(bool)


def _feasible_mask(frame: pd.DataFrame) -> pd.Series:
    return _column(frame, "feasible", True).fillna(False).astype(bool)


def _require_metric(frame: pd.DataFrame, objective: str) -> str:
    metric = OBJECTIVES[objective].metric
    if metric not in frame.columns:
        raise ValueError(
            f"trials have no column {metric!r} for objective {objective!r}; "
            f"columns: {', '.join(map(str, frame.columns))}"
        )
    return metric


def _panel(complete: pd.DataFrame, cost: str, y: str):
    """The x column of one cost objective, its finite points vs accuracy, front and feasible masks."""
    x = _require_metric(complete, cost)
    if y not in complete.columns:
        raise ValueError(f"trials have no column {y!r}")
    points = _finite_xy(complete, x, y)
    return x, points, _front_mask(points), _feasible_mask(points)


def _finite_xy(frame: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    values = frame[[x, y]].apply(pd.to_numeric, errors="coerce")
    keep = np.isfinite(values[x].to_numpy(float)) & np.isfinite(values[y].to_numpy(float))
    return frame[keep]


def _front_2d(frame: pd.DataFrame, x: str, y: str, maximize: bool = True) -> pd.DataFrame:
    """Points of ``frame`` not dominated in the (min x, max y) plane (min y when the metric is
    minimised), sorted by x.

    With two objectives this is the whole front; with more it is the front's outline in this
    projection, which is what a step line can draw honestly.
    """
    ordered = frame.sort_values([x, y], ascending=[True, not maximize], kind="mergesort")
    sign = 1.0 if maximize else -1.0
    keep, best = [], -math.inf
    for index, value in zip(ordered.index, sign * ordered[y].to_numpy(float)):
        if value > best:
            keep.append(index)
            best = value
    return ordered.loc[keep]


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "nan"
        if value != 0 and (abs(value) >= 1e6 or abs(value) < 1e-3):
            return f"{value:.4g}"
        return f"{value:,.4g}" if abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return str(value)


def _hover_text(row: pd.Series, metrics: Sequence[str], metric: str = ACCURACY) -> str:
    lines = [f"<b>trial {int(row['trial'])}</b>" if "trial" in row.index else "<b>trial</b>"]
    flags = []
    if bool(row.get("on_front", False)):
        flags.append("on front")
    if not bool(row.get("feasible", True)):
        flags.append("infeasible")
    if bool(row.get("cached", False)):
        flags.append("cached")
    if flags:
        lines[0] += " (" + ", ".join(flags) + ")"
    for column in metrics:
        spread = _spread(row) if column == ACCURACY else ""
        lines.append(html.escape(f"{shown_metric(column, metric)}: {_fmt(row[column])}{spread}"))
    choices = layer_choices(row.get("candidate"))
    if choices:
        lines.append("<i>layers</i>")
        for name, text in choices[:MAX_HOVER_LAYERS]:
            lines.append(f"&nbsp;&nbsp;{html.escape(name)}: {html.escape(text)}")
        if len(choices) > MAX_HOVER_LAYERS:
            lines.append(f"&nbsp;&nbsp;… {len(choices) - MAX_HOVER_LAYERS} more layers")
    return "<br>".join(lines)


def _spread(row: pd.Series) -> str:
    """`` ± 0.21 (3 seeds, test 96.9)`` for a re-evaluated accuracy; empty otherwise."""
    std, seeds, test = (float(pd.to_numeric(row.get(c), errors="coerce"))
                        for c in ("accuracy_std", "accuracy_seeds", "test_accuracy"))
    if not math.isfinite(std):
        return ""
    details = [f"{int(seeds)} seeds"] if math.isfinite(seeds) else []
    if math.isfinite(test):
        details.append(f"test {_fmt(test)}")
    return f" ± {_fmt(std)}" + (f" ({', '.join(details)})" if details else "")


def _dense_point(dense: dict | None, x: str, y: str) -> tuple[float, float] | None:
    if not dense:
        return None
    try:
        xv, yv = float(dense[x]), float(dense[y])
    except (KeyError, TypeError, ValueError):
        return None
    if not (math.isfinite(xv) and math.isfinite(yv)):
        return None
    return xv, yv


# --------------------------------------------------------------------------------------------
# table
# --------------------------------------------------------------------------------------------


def front_table(trials: pd.DataFrame, objectives: list[str], maximize: bool = True) -> pd.DataFrame:
    """The front's rows sorted by the first cost objective (then accuracy, best first: the
    lowest first when the task metric is minimised, ``maximize`` False).

    Columns: ``trial``, the objective metrics, ``compression``, ``accuracy_drop``, ``bits_per_weight``
    and ``kl`` (one-shot searches; each when the trials
    have them) and ``layers``, a short per-layer summary; after accuracy (the mean, for a
    re-evaluated front) its ``accuracy_std``, ``accuracy_seeds``, ``test_accuracy`` and
    ``accuracy_single`` when the trials have them. Feeds ``pareto.csv`` and the terminal table.
    """
    costs = cost_objectives(objectives)
    metrics: list[str] = []
    for name in [ACCURACY, *costs]:
        metric = OBJECTIVES[name].metric
        if metric not in metrics:
            metrics.append(metric)
    for extra in ("compression", "accuracy_drop", "bits_per_weight", "kl"):  # the last two: oneshot
        if extra in trials.columns and extra not in metrics:
            metrics.append(extra)
    # the spread of a re-evaluated front (front.trials_frame), right after the mean accuracy
    metrics[1:1] = [c for c in REEVAL_COLUMNS if c in trials.columns and c not in metrics]
    columns = ["trial", *metrics, "layers"]

    complete = _complete(trials)
    front = complete[_front_mask(complete)]
    if front.empty:
        return pd.DataFrame({col: pd.Series(dtype=object) for col in columns})
    for metric in metrics:
        if metric not in front.columns:
            raise ValueError(f"trials have no column {metric!r}")
    x = OBJECTIVES[costs[0]].metric
    front = front.sort_values(
        [x, OBJECTIVES[ACCURACY].metric, "trial"], ascending=[True, not maximize, True],
        kind="mergesort"
    )
    table = front[["trial", *metrics]].copy()
    table["trial"] = table["trial"].astype(int)
    table["layers"] = [layers_summary(c) for c in _column(front, "candidate", "")]
    return table.reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# interactive HTML (inline SVG, see pareto_page)
# --------------------------------------------------------------------------------------------


def _kinds(front: pd.Series, feasible: pd.Series) -> list[str]:
    return ["front" if f else "feasible" if ok else "infeasible"
            for f, ok in zip(front.to_numpy(bool), feasible.to_numpy(bool))]


def quality_label(metric: str = ACCURACY, maximize: bool = True) -> str:
    """The y axis' label: ``validation accuracy (%)``, ``validation mse (axis inverted: up is
    better)``."""
    if metric == ACCURACY:
        return OBJECTIVES[ACCURACY].label
    return f"validation {metric}" + ("" if maximize else " (axis inverted: up is better)")


def pareto_figure_html(
    trials: pd.DataFrame,
    objectives: list[str],
    path: Path,
    dense: dict | None = None,
    metric: str = ACCURACY,
    maximize: bool = True,
) -> None:
    """Write ``pareto.html``: one self-contained page (inline SVG, no library, nothing fetched)
    of accuracy vs each cost objective, switched by a drop-down when there are several.

    Front points are red, labelled with their trial number and joined by a step line, other
    feasible points blue, infeasible ones grey crosses; failed trials are left out; the dense
    model is a green star. Hover shows the trial, every metric (with the spread of a
    re-evaluated accuracy) and the per-layer choices. The axes fit the feasible points: the
    others sit on the edge (see :mod:`autosparse.tracking.pareto_page`). ``metric``/``maximize``: the
    task metric's name and direction (a minimised one on an inverted axis).
    """
    costs = cost_objectives(objectives)
    y = OBJECTIVES[ACCURACY].metric
    complete = _complete(trials)
    metrics = metric_columns(trials)
    tips = [_hover_text(row, metrics, metric) for _, row in complete.iterrows()]
    tip_of = {index: number for number, index in enumerate(complete.index)}
    panels = []
    for cost in costs:
        x, points, front, feasible = _panel(complete, cost, y)
        marks = [
            pareto_page.Point(float(px), float(py), kind, tip_of[index],
                              _trial_label(number) if kind == "front" else "")
            for index, px, py, kind, number in zip(
                points.index, points[x].to_numpy(float), points[y].to_numpy(float),
                _kinds(front, feasible), _column(points, "trial", None))
        ]
        outline = _front_2d(points[front], x, y, maximize)
        panels.append(pareto_page.Panel(
            name=f"{metric} vs {cost}",
            title=_title(cost, complete, metric),
            x_label=OBJECTIVES[cost].label,
            y_label=quality_label(metric, maximize),
            points=marks,
            outline=list(zip(outline[x].to_numpy(float), outline[y].to_numpy(float))),
            dense=_dense_point(dense, x, y),
            note="" if len(complete) else "no completed trials yet",
            y_inverted=not maximize,
        ))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(pareto_page.page(panels, tips), encoding="utf-8")


def _trial_label(number) -> str:
    value = pd.to_numeric(number, errors="coerce")
    return "" if pd.isna(value) else str(int(value))


def _title(cost: str, complete: pd.DataFrame, metric: str = ACCURACY) -> str:
    n_front = int(_front_mask(complete).sum())
    return (
        f"Pareto front: {metric} vs {cost} "
        f"({len(complete)} completed trials, {n_front} on the front)"
    )


# --------------------------------------------------------------------------------------------
# static PNG (matplotlib, Agg canvas: no pyplot global state, no display needed)
# --------------------------------------------------------------------------------------------


def pareto_figure_png(
    trials: pd.DataFrame,
    objectives: list[str],
    path: Path,
    dense: dict | None = None,
    metric: str = ACCURACY,
    maximize: bool = True,
) -> None:
    """Write a PNG with one subplot of accuracy vs each cost objective.

    Front points carry their trial number. The axes fit the feasible points and the dense
    model, as in ``pareto.html``: points outside are drawn on the edge as hollow triangles
    pointing outwards and counted in the corner. ``dense`` (metric name -> value, e.g.
    ``{"accuracy": 98.1, "size_kb": 120.0}``) is drawn as a star when it has the plotted metrics.
    """
    fig = pareto_figure(trials, objectives, dense, metric, maximize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=110, format="png")


def pareto_figure(trials: pd.DataFrame, objectives: list[str], dense: dict | None = None,
                  metric: str = ACCURACY, maximize: bool = True):
    """The matplotlib ``Figure`` behind :func:`pareto_figure_png` (Agg canvas, no pyplot); a
    minimised task metric (``maximize`` False) on an inverted y axis, as in ``pareto.html``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    costs = cost_objectives(objectives)
    y = OBJECTIVES[ACCURACY].metric
    complete = _complete(trials)
    fig = Figure(figsize=(5.6 * len(costs), 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(costs), squeeze=False)[0]
    for ax, cost in zip(axes, costs):
        x, points, front, feasible = _panel(complete, cost, y)
        dense_xy = _dense_point(dense, x, y)
        xs, ys = points[x].to_numpy(float), points[y].to_numpy(float)
        kinds = np.array(_kinds(front, feasible), dtype=object)
        limits = pareto_page.fit_axes(list(zip(xs, ys, kinds)), dense_xy, maximize)
        inside = np.array([limits.inside(a, b) for a, b in zip(xs, ys)], dtype=bool)
        for kind, style in (
            ("infeasible", dict(marker="x", s=22, color=_INFEASIBLE_COLOR, label="infeasible",
                                zorder=1)),
            ("feasible", dict(s=22, color=_FEASIBLE_COLOR, alpha=0.55, label="feasible",
                              zorder=2)),
        ):
            keep = inside & (kinds == kind)
            if keep.any():
                ax.scatter(xs[keep], ys[keep], **style)
        on_front = points[front]
        if len(on_front):
            outline = _front_2d(on_front, x, y, maximize)
            ax.step(outline[x], outline[y], where="post", color=_FRONT_COLOR, linewidth=1.5,
                    zorder=3)
            keep = inside & (kinds == "front")
            ax.scatter(xs[keep], ys[keep], s=46, color=_FRONT_COLOR, edgecolors="#333",
                       linewidths=0.6, label="front", zorder=4)
            numbers = _column(points, "trial", None).to_numpy(object)
            for a, b, number in zip(xs[keep], ys[keep], numbers[keep]):
                ax.annotate(_trial_label(number), (a, b), xytext=(4, 4),
                            textcoords="offset points", fontsize=7, color="#7a1414", zorder=6)
        outside = limits.outside
        if outside:
            _edge_marks(ax, limits, xs[~inside], ys[~inside], inverted=not maximize)
        if dense_xy is not None:
            ax.scatter([dense_xy[0]], [dense_xy[1]], marker="*", s=260, color=_DENSE_COLOR,
                       edgecolors="#222", linewidths=0.7, label="dense model", zorder=5)
        if limits.log_x:
            from matplotlib.ticker import FuncFormatter

            ax.set_xscale("log")
            plain = FuncFormatter(lambda value, _: f"{value:g}")  # 20, not 2×10¹
            ax.xaxis.set_major_formatter(plain)
            ax.xaxis.set_minor_formatter(FuncFormatter(
                lambda value, _: f"{value:g}" if f"{value:g}"[0] in "25" else ""))
        ax.set_xlim(limits.x_lo, limits.x_hi)
        # a minimised metric: lower values up, so up is better in every plot
        ax.set_ylim(*((limits.y_lo, limits.y_hi) if maximize else (limits.y_hi, limits.y_lo)))
        ax.set_xlabel(OBJECTIVES[cost].label)
        ax.set_ylabel(quality_label(metric, maximize))
        ax.set_title(f"{metric} vs {cost}")
        ax.grid(True, alpha=0.3, which="both")
        if points.empty and dense_xy is None:
            ax.text(0.5, 0.5, "no completed trials yet", ha="center", va="center",
                    transform=ax.transAxes)
        elif ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right", fontsize="small", title_fontsize="small",
                      title=f"{outside} outside the axes (▽ on the edge)" if outside else None)
    n_front = int(_front_mask(complete).sum())
    fig.suptitle(f"Pareto front ({len(complete)} completed trials, {n_front} on the front)")
    return fig


def _edge_marks(ax, limits: "pareto_page.Axes", xs: np.ndarray, ys: np.ndarray,
                inverted: bool = False) -> None:
    """Points beyond the fitted axes: on the edge, a hollow triangle pointing their way (on an
    inverted y axis, low values lie beyond the top)."""
    cx, cy = np.clip(xs, limits.x_lo, limits.x_hi), np.clip(ys, limits.y_lo, limits.y_hi)
    low, high = ("^", "v") if inverted else ("v", "^")
    side = np.where(ys < limits.y_lo, low, np.where(ys > limits.y_hi, high,
                                                    np.where(xs < limits.x_lo, "<", ">")))
    for marker in ("v", "^", "<", ">"):
        keep = side == marker
        if keep.any():
            ax.scatter(cx[keep], cy[keep], marker=marker, s=30, facecolors="white",
                       edgecolors=_INFEASIBLE_COLOR, linewidths=1.0, zorder=5, clip_on=False)


_PATTERN_ORDER = {"dense": 0, "unstructured": 2, "channel": 3}  # N:M patterns sit at 1


def _sensitivity_column_key(row: dict) -> tuple:
    """Mildest first: wider bits, then dense < N:M < unstructured < channel, then sparsity."""
    return (-int(row["bits"]), _PATTERN_ORDER.get(row["pattern"], 1), float(row["sparsity"]),
            row["criterion"])


def sensitivity_heatmap_png(table, metric: str = "accuracy", maximize: bool = True) -> bytes:
    """PNG heatmap of a :class:`~autosparse.search.allocation.SensitivityTable`: decisions x choices,
    colour = validation-loss change (nats) on a symmetric log scale, each cell annotated; a
    choice a decision does not offer is left blank."""
    from io import BytesIO

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import SymLogNorm
    from matplotlib.figure import Figure

    rows = table.rows()
    decisions = table.decisions()
    columns: dict[str, dict] = {}
    for row in sorted(rows, key=_sensitivity_column_key):
        columns.setdefault(row["choice"], row)
    names = list(columns)
    grid = np.full((len(decisions), len(names)), np.nan)
    for row in rows:
        grid[decisions.index(row["decision"]), names.index(row["choice"])] = row["loss_delta"]
    finite = np.abs(grid[np.isfinite(grid)])
    top = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    linthresh = max(top * 1e-3, 1e-6)

    fig = Figure(figsize=(max(6.0, 0.42 * len(names) + 2.5), max(3.0, 0.5 * len(decisions) + 2.2)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    norm = SymLogNorm(linthresh=linthresh, vmin=-top, vmax=top, base=10)
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="RdBu_r", norm=norm)
    for i, j in zip(*np.nonzero(np.isfinite(grid))):
        value = grid[i, j]
        strong = abs(float(norm(value)) - 0.5) > 0.35  # dark cell: white text
        ax.text(j, i, f"{value:.2g}", ha="center", va="center", fontsize=6,
                color="white" if strong else "black", rotation=90 if len(names) > 24 else 0)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(decisions)), decisions, fontsize=8)
    fig.colorbar(image, ax=ax, label="validation loss change (nats, symlog)")
    dense = (f"accuracy {table.dense_accuracy:.2f} %" if metric == "accuracy" else  # stored signed
             f"{metric} {table.dense_accuracy * (1.0 if maximize else -1.0):.4g}")
    ax.set_title(f"per-layer sensitivity ({table.method}, {table.samples} validation samples; "
                 f"dense loss {table.dense_loss:.3f}, {dense})", fontsize=9)
    buffer = BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    return buffer.getvalue()
