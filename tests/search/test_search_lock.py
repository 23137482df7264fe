"""One search process per study and runs folder: a second one is refused naming the first, a
killed holder leaves no stale lock, and ``front`` during a search leaves MLflow and the report
files to it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from autosparse.cli import main
from autosparse.search.lock import LOCK_FILE, SearchLock, SearchRunning, running_search
from autosparse.search.runner import run_search
from tests.search_helpers import mlflow_runs, write_config


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
    folder = tmp_path / "runs" / "s"
    assert running_search(folder) is None
    with SearchLock(folder, "s"):
        holder = running_search(folder)
        assert holder is not None and f"pid {os.getpid()}" in holder
        with pytest.raises(SearchRunning, match=r"the search 's' is already running .*pid "):
            SearchLock(folder, "s").acquire()
    assert running_search(folder) is None  # released with the block
    with SearchLock(folder, "s"):  # and taken again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "s"
    code = ("import sys, time; from pathlib import Path; from autosparse.search.lock import "
            "SearchLock; SearchLock(Path(sys.argv[1]), 's').acquire(); print('held', flush=True);"
            " time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert f"pid {holder.pid}" in (running_search(folder) or "")
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
    finally:
        holder.kill()
    assert (folder / LOCK_FILE).is_file()  # the file stays; the lock went with the process
    assert running_search(folder) is None
    with SearchLock(folder, "s"):
        pass


@pytest.mark.integration
def test_search_and_front_while_another_search_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    path = write_config(tmp_path, "busy", budget={"trials": 2})
    run_search(path, runs_dir=runs, printer=lambda line: None)
    capsys.readouterr()
    trials_csv = runs / "busy" / "trials.csv"
    stamp = trials_csv.stat().st_mtime_ns
    client, parents, children = mlflow_runs(runs, "busy")
    before = (parents[0].info.status, parents[0].info.end_time, len(children))

    with SearchLock(runs / "busy", "busy"):  # "another" search holds the study
        assert main(["--runs-dir", str(runs), "search", str(path), "--extend", "2"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the search 'busy' is already running" in err[0]
        assert f"pid {os.getpid()}" in err[0]

        time.sleep(0.01)
        assert main(["--runs-dir", str(runs), "front", str(path)]) == 0
        out = capsys.readouterr().out
        assert "the search 'busy' is running" in out and "Pareto front" in out
    assert trials_csv.stat().st_mtime_ns == stamp  # the report files are the search's
    _, parents, children = mlflow_runs(runs, "busy")
    assert (parents[0].info.status, parents[0].info.end_time, len(children)) == before
