"""``autosparse runs``: the searches of a runs folder from their files, and two fronts compared."""

from __future__ import annotations

import pandas as pd

from autosparse.cli import main
from autosparse.search.lock import SearchLock
from autosparse.tracking.runs_list import compare_fronts, search_rows


def _search(runs, name, front, states=("COMPLETE", "COMPLETE", "FAIL")):
    folder = runs / name
    folder.mkdir(parents=True)
    pd.DataFrame({"trial": range(len(states)), "state": list(states)}).to_csv(
        folder / "trials.csv", index=False)
    pd.DataFrame(front, columns=["trial", "accuracy", "size_kb"]).to_csv(
        folder / "pareto.csv", index=False)


def test_searches_are_listed_with_status_counts_and_best_points(tmp_path):
    runs = tmp_path / "runs"
    _search(runs, "a", [(0, 98.6, 20.0), (1, 98.1, 6.7), (2, 96.0, 3.0)])
    _search(runs, "b", [(0, 97.0, 5.0)], states=("COMPLETE",))
    (runs / "dense").mkdir()  # a folder of autosparse's own, not a search
    with SearchLock(runs / "b", "b"):
        rows = search_rows(runs).set_index("search")
    assert list(rows.index) == ["a", "b"]
    assert rows.loc["a", "status"] == "stopped" and rows.loc["b", "status"] == "running"
    assert (rows.loc["a", "trials"], rows.loc["a", "failed"], rows.loc["a", "front"]) == (2, 1, 3)
    assert rows.loc["a", "best"] == "accuracy 98.6 at 20 kB"
    assert rows.loc["a", "smallest within 1"] == "6.7 kB (98.1)"


def test_two_fronts_compared_point_by_point(tmp_path, capsys):
    runs = tmp_path / "runs"
    _search(runs, "a", [(0, 98.6, 20.0), (1, 98.0, 8.0)])
    _search(runs, "b", [(4, 98.6, 10.0), (5, 97.0, 5.0)])
    table = compare_fronts(runs, "a", "b")
    dominated = {(r.search, r.trial): r.dominated for r in table.itertuples()}
    assert dominated == {("a", 0): True, ("a", 1): False, ("b", 4): False, ("b", 5): False}
    assert main(["--runs-dir", str(runs), "runs", "a", "b"]) == 0
    out = capsys.readouterr().out
    assert "a: 1 of 2 front points dominated by the other search" in out
    assert main(["--runs-dir", str(runs), "runs", "a", "zz"]) == 2
    assert "no search 'zz'" in capsys.readouterr().err
