"""Pareto plots (HTML, PNG) and the front table, on a small hand-made trials frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from helpers import two_conv_candidate  # noqa: E402

from autosparse.tracking.plots import (
    front_table,
    layers_summary,
    metric_columns,
    pareto_figure_html,
    pareto_figure_png,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


_candidate = two_conv_candidate


def make_trials() -> pd.DataFrame:
    """Trials 0..6: 3 on the front, 1 feasible off-front, 1 infeasible, 2 failed."""
    rows = [
        # trial, state, candidate, fail, feasible, front, cached, acc, size_kb, macs
        (0, "COMPLETE", _candidate(("dense", 0, 32), ("dense", 0, 32)), "", True, True, False,
         98.0, 400.0, 2.0e6),
        (1, "COMPLETE", _candidate(("unstructured", 0.5, 8), ("2:4", 0.5, 4)), "", True, True,
         False, 97.5, 40.0, 1.5e6),
        (2, "COMPLETE", _candidate(("channel", 0.75, 4), ("unstructured", 0.9, 4)), "", True, True,
         True, 95.0, 8.0, 0.5e6),
        (3, "COMPLETE", _candidate(("unstructured", 0.25, 8), ("dense", 0, 8)), "", True, False,
         False, 96.0, 60.0, 1.9e6),
        (4, "COMPLETE", _candidate(("channel", 0.9, 2), ("channel", 0.9, 2)), "", False, False,
         False, 40.0, 2.0, 0.1e6),
        (5, "FAIL", _candidate(("unstructured", 0.5, 4), ("dense", 0, 4)), "RuntimeError: boom",
         False, False, False, math.nan, math.nan, math.nan),
        (6, "FAIL", "", "ValueError: before sampling", False, False, False,
         math.nan, math.nan, math.nan),
    ]
    frame = pd.DataFrame(
        rows,
        columns=["trial", "state", "candidate", "fail_reason", "feasible", "on_front", "cached",
                 "accuracy", "size_kb", "macs"],
    )
    frame["accuracy_drop"] = 98.0 - frame["accuracy"]
    frame["compression"] = 400.0 / frame["size_kb"]
    frame["bops"] = frame["macs"] * 8
    frame["latency_ms"] = frame["macs"] / 1e6  # a metric column no module knows by name
    return frame


DENSE = {"accuracy": 98.2, "size_kb": 400.0, "macs": 2.0e6, "bops": 6.4e7}


def test_metric_columns_are_the_numeric_non_bookkeeping_ones():
    cols = metric_columns(make_trials())
    assert set(cols) == {"accuracy", "size_kb", "macs", "accuracy_drop", "compression", "bops",
                         "latency_ms"}


def test_front_table_has_only_front_rows_sorted_by_first_cost():
    table = front_table(make_trials(), ["accuracy", "size"])
    assert list(table["trial"]) == [2, 1, 0]
    assert list(table["size_kb"]) == sorted(table["size_kb"])
    assert list(table.columns) == ["trial", "accuracy", "size_kb", "compression", "accuracy_drop",
                                   "layers"]
    assert table.loc[1, "layers"] == "conv1=unstructured 50%/int8, conv2=2:4/int4"


def test_front_table_with_three_objectives_sorts_by_the_first_cost():
    table = front_table(make_trials(), ["accuracy", "macs", "size"])
    assert list(table.columns[:4]) == ["trial", "accuracy", "macs", "size_kb"]
    assert list(table["macs"]) == sorted(table["macs"])


def test_front_table_empty_front_keeps_columns():
    trials = make_trials().assign(on_front=False)
    table = front_table(trials, ["accuracy", "size"])
    assert table.empty and "layers" in table.columns and "trial" in table.columns


def test_layers_summary_of_empty_candidate_is_empty():
    assert layers_summary("") == ""
    assert layers_summary(None) == ""


def test_html_is_self_contained_and_shows_the_trials(tmp_path):
    path = tmp_path / "pareto.html"
    pareto_figure_html(make_trials(), ["accuracy", "size"], path, dense=DENSE)
    html = path.read_text()
    # inline SVG, no library and nothing to fetch: MLflow's artifact viewer shows it at once
    assert "<svg" in html and "plotly" not in html.lower()
    assert "src=" not in html and "http://" not in html.replace("http://www.w3.org", "")
    assert len(html.encode()) < 50_000
    for number in range(5):
        assert f"trial {number}" in html
    assert "trial 5" not in html and "trial 6" not in html  # failed trials are left out
    # layer choices and every metric (also ones no module names) in the hover text
    assert "conv2: 2:4" in html and "latency_ms" in html
    assert 'data-xscale="log"' in html  # 8 .. 400 kB among the feasible: over a decade
    assert html.count('fill="#d62728" stroke="#333"') == 3 + 1  # 3 front points + legend
    assert "dense model" in html


def test_html_axes_fit_the_feasible_points():
    """Trial 4 (infeasible, 40 %, 2 kB) must not stretch the axes: it sits on the edge."""
    from autosparse.tracking.pareto_page import fit_axes

    frame = make_trials()
    frame = frame[frame["state"] == "COMPLETE"]
    kinds = ["front" if f else "feasible" if ok else "infeasible"
             for f, ok in zip(frame["on_front"], frame["feasible"])]
    axes = fit_axes(list(zip(frame["size_kb"], frame["accuracy"], kinds)))
    assert axes.log_x and 94 < axes.y_lo < 95 and 98 < axes.y_hi < 98.5
    assert 6 < axes.x_lo < 8 and axes.outside == 1
    assert not axes.inside(2.0, 40.0) and axes.inside(60.0, 96.0)


def test_html_marks_points_outside_the_axes(tmp_path):
    path = tmp_path / "pareto.html"
    pareto_figure_html(make_trials(), ["accuracy", "size"], path)
    html = path.read_text()
    assert "1 trial(s) outside the axes" in html
    assert html.count("<polygon") >= 2  # the edge triangle and the legend's


def test_html_hover_text_is_escaped(tmp_path):
    trials = make_trials()
    trials["<script>"] = 1.0  # a metric column with a hostile name
    path = tmp_path / "pareto.html"
    pareto_figure_html(trials, ["accuracy", "size"], path)
    html = path.read_text()
    assert "<script>:" not in html and "&lt;script&gt;" in html


def test_html_with_three_objectives_has_a_dropdown(tmp_path):
    path = tmp_path / "pareto3.html"
    pareto_figure_html(make_trials(), ["accuracy", "size", "macs", "bops"], path)
    html = path.read_text()
    assert '<select id="view">' in html and html.count('class="panel"') == 3
    for label in ("accuracy vs size", "accuracy vs macs", "accuracy vs bops"):
        assert label in html


def test_html_without_completed_trials_still_renders(tmp_path):
    trials = make_trials()
    trials = trials[trials["state"] == "FAIL"]
    path = tmp_path / "empty.html"
    pareto_figure_html(trials, ["accuracy", "size"], path)
    assert "no completed trials yet" in path.read_text()


def test_ticks_are_round_and_inside():
    from autosparse.tracking.pareto_page import ticks

    assert ticks(94.8, 98.2) == [95.0, 96.0, 97.0, 98.0]
    assert ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert ticks(7.0, 450.0, log=True) == [10.0, 20.0, 50.0, 100.0, 200.0]
    assert ticks(1e2, 1e9, log=True) == [10.0**k for k in range(2, 10)]


@pytest.mark.parametrize("objectives", [["accuracy", "size"], ["accuracy", "size", "macs"]])
def test_png_is_a_png(tmp_path, objectives):
    path = tmp_path / "pareto.png"
    pareto_figure_png(make_trials(), objectives, path, dense=DENSE)
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000


def test_png_labels_front_points_and_fits_the_axes():
    from autosparse.tracking.plots import pareto_figure

    ax = pareto_figure(make_trials(), ["accuracy", "size"], dense=DENSE).axes[0]
    labels = {t.get_text() for t in ax.texts}
    assert {"0", "1", "2"} <= labels and "4" not in labels  # front points by trial number
    assert "1 outside the axes" in ax.get_legend().get_title().get_text()
    low, high = ax.get_ylim()
    assert 94 < low < 95 and high < 99  # the 40 % infeasible trial does not stretch y


def test_png_with_only_failures(tmp_path):
    trials = make_trials()
    path = tmp_path / "failed.png"
    pareto_figure_png(trials[trials["state"] == "FAIL"], ["accuracy", "size"], path)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_unknown_objective_is_named(tmp_path):
    with pytest.raises(ValueError, match="nonsense"):
        front_table(make_trials(), ["accuracy", "nonsense"])


def test_missing_metric_column_is_named(tmp_path):
    with pytest.raises(ValueError, match="bops"):
        pareto_figure_png(make_trials().drop(columns="bops"), ["accuracy", "bops"],
                          tmp_path / "x.png")


def test_projection_of_a_three_objective_front_is_a_staircase(tmp_path):
    """With three objectives, a front point can be dominated in one 2-D view; the step line
    must only join the points that form the staircase of that view."""
    from autosparse.tracking.plots import _front_2d

    frame = pd.DataFrame({"size_kb": [10.0, 20.0, 30.0], "accuracy": [90.0, 85.0, 95.0]})
    outline = _front_2d(frame, "size_kb", "accuracy")
    assert list(outline["size_kb"]) == [10.0, 30.0]
    assert np.all(np.diff(outline["accuracy"].to_numpy()) > 0)
