"""What a user sees: progress in place in a terminal, plain lines in a pipe, tables that fit,
a word while the dense model trains, and a search whose first generation all misses one
constraint stopped early.

The terminal is a real pseudo-terminal (``pty``) with a set width, not a mock: tqdm, isatty and
the terminal size are the real ones.
"""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml

from autosparse.config.sections import StrategyConfig
from autosparse.config.task_metric import Constraint
from autosparse.search.early_stop import (
    InfeasibleStart,
    InfeasibleStartGuard,
    first_generation,
)
from autosparse.search.trial_attrs import METRICS_ATTR
from autosparse.tracking.progress import (
    LiveLine,
    dense_training,
    fit_table,
    is_terminal,
    terminal_width,
)


def _set_width(fd: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, columns, 0, 0))


def _drain(fd: int, timeout: float = 0.5) -> str:
    out = b""
    while select.select([fd], [], [], timeout)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


@pytest.fixture
def terminal():
    """(a writable text stream on a pseudo-terminal 70 columns wide, its master fd)."""
    master, slave = pty.openpty()
    _set_width(slave, 70)
    stream = open(slave, "w", buffering=1, encoding="utf-8", closefd=True)
    yield stream, master
    stream.close()
    os.close(master)


# ------------------------------------------------------------------ pieces, in a real pty


def test_progress_updates_in_place_in_a_terminal(terminal, monkeypatch):
    stream, master = terminal
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert is_terminal(stream) and terminal_width(stream) == 70
    line = LiveLine(3, 0, print, stream=stream)
    assert line.in_place
    for done in (1, 2, 3):
        line.update(done, f"failed 0 | front {done} | hypervolume 0.{done}000 | " + "x" * 80)
    line.close()
    stream.flush()
    shown = _drain(master)
    assert shown.count("\r") >= 3, shown  # rewritten, not appended
    assert shown.count("\n") <= 1, shown  # one line left on screen at the end
    assert "[3/3]" in shown and "front 3" in shown
    last = shown.replace("\r\n", "\n").split("\r")[-1].strip("\n")
    assert len(last) <= 70, last  # trimmed to the terminal's width, never wrapped


def test_progress_is_a_plain_line_per_update_elsewhere():
    lines: list[str] = []
    line = LiveLine(3, 0, lines.append)  # the caller's own printer: always plain lines
    assert not line.in_place
    for done in (1, 2, 3):
        line.update(done, f"failed 0 | front {done}")
    line.close()
    assert lines == [f"[{n}/3] failed 0 | front {n}" for n in (1, 2, 3)]
    pipe = io.StringIO()  # print to something that is not a terminal: plain too
    assert not LiveLine(None, 0, print, stream=pipe).in_place


def test_dense_training_says_what_it_does(terminal, tmp_path, monkeypatch):
    stream, master = terminal
    monkeypatch.setenv("TERM", "xterm")
    with dense_training("digits-cnn", 3, tmp_path / "d.pt", stream=stream) as on_epoch:
        for epoch in (1, 2, 3):
            on_epoch(epoch)
    stream.flush()
    shown = _drain(master)
    assert "training the dense model digits-cnn: epoch 3/3" in shown
    assert "trained in" in shown

    pipe = io.StringIO()
    with dense_training("digits-cnn", 3, tmp_path / "d.pt", stream=pipe) as on_epoch:
        on_epoch(1)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 2 and "\r" not in pipe.getvalue()
    assert lines[0].startswith("training the dense model digits-cnn (3 epochs; cached in")
    assert str(tmp_path / "d.pt") in lines[0] and "trained in" in lines[1]


FRONT = pd.DataFrame({
    "trial": [3, 7], "accuracy": [97.51, 95.2], "± std": [0.31, 0.52], "seeds": [3, 3],
    "test acc": [97.0, 94.9], "acc (1 seed)": [97.8, 95.0], "size_kb": [7.7, 3.6],
    "compression": [24.7, 52.9], "accuracy_drop": [0.09, 2.5],
    "layers": ["conv1=dense/int8, conv2=unstructured 70%/int2, conv3=channel 50%/int4, fc1=x",
               "conv1=unstructured 50%/int2, conv2=unstructured 70%/int2, fc1=dense/int8"]})
DROP = ("acc (1 seed)", "seeds", "compression", "accuracy_drop", "test acc", "± std")


@pytest.mark.parametrize("width", [200, 120, 80, 60, 40])
def test_the_front_table_fits_the_terminal(width):
    text, left_out = fit_table(FRONT, width, DROP)
    lines = text.splitlines()
    assert max(map(len, lines)) <= width, text
    header = lines[0].split()
    assert header[:2] == ["trial", "accuracy"] and "size_kb" in header  # never the objectives
    assert left_out == [c for c in [*DROP, "layers"] if c in left_out]  # in the stated order
    assert len(lines) == 3


def test_the_front_table_is_whole_without_a_width():
    text, left_out = fit_table(FRONT, None, DROP)
    assert left_out == [] and FRONT["layers"][0] in text
    cut, _ = fit_table(FRONT, 120, DROP)
    assert "…" in cut  # the per-layer summary is cut before any column is dropped


# ------------------------------------------------------------------ the first generation


def _study(violations: list[dict[str, float]], sizes: list[float]) -> optuna.Study:
    study = optuna.create_study(directions=["maximize", "minimize"])
    for violation, size in zip(violations, sizes):
        trial = study.ask()
        for key, value in violation.items():
            trial.set_constraint(key, value)
        trial.set_user_attr(METRICS_ATTR, {"size_kb": size, "accuracy_drop": 1.0})
        study.tell(trial, [90.0, size])
    return study


SIZE, DROP_C = Constraint(metric="size_kb", op="<=", bound=5), \
    Constraint(metric="accuracy_drop", op="<=", bound=1)


def test_a_first_generation_all_missing_one_constraint_stops_with_a_hint():
    sizes = [40.0 + i for i in range(8)]
    study = _study([{str(SIZE): s - 5, str(DROP_C): -1} for s in sizes], sizes)
    guard = InfeasibleStartGuard([SIZE, DROP_C], 8, completed_before=0, budget=40)
    with pytest.raises(InfeasibleStart) as caught:
        guard(study)
    message = str(caught.value)
    assert "first 8 trials" in message and "size_kb <= 5" in message and "40" in message
    assert "fewer bits, higher sparsity" in message and "run the same command again" in message
    guard(study)  # judged once: never again in this run


@pytest.mark.parametrize("case", ["one-feasible", "different-constraints", "too-few",
                                  "small-budget", "resumed"])
def test_a_search_slow_to_find_feasible_points_is_not_stopped(case):
    sizes = [40.0] * 8
    violations = [{str(SIZE): 35.0, str(DROP_C): -1.0} for _ in sizes]
    if case == "one-feasible":
        violations[5] = {str(SIZE): -1.0, str(DROP_C): -1.0}
    if case == "different-constraints":  # infeasible, but no single bound is to blame
        violations[::2] = [{str(SIZE): -1.0, str(DROP_C): 2.0}] * 4
    if case == "too-few":
        violations, sizes = violations[:7], sizes[:7]
    study = _study(violations, sizes)
    guard = InfeasibleStartGuard([SIZE, DROP_C], 8, completed_before=8 if case == "resumed" else 0,
                                 budget=8 if case == "small-budget" else 40)
    guard(study)  # no InfeasibleStart


def test_the_first_generation_is_the_population_or_the_startup_trials():
    assert first_generation(StrategyConfig(name="ga", population_size=16)) == 16
    assert first_generation(StrategyConfig(name="ga", population_size=4)) == 8
    assert first_generation(StrategyConfig(name="bo", startup_trials=12)) == 12
    assert first_generation(StrategyConfig(name="random")) == 8


# ------------------------------------------------------------------ the command, end to end

CONFIG = {"name": "term", "model": {"builtin": "digits-mlp", "train_epochs": 1},
          "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                "bits": [8]}},
          "strategy": {"name": "random"}, "budget": {"trials": 3},
          "constraints": ["accuracy_drop <= 90"], "finetune": {"steps": 2, "reeval_seeds": 0}}


def _in_pty(argv: list[str], cwd: Path, columns: int, env: dict) -> tuple[int, str]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: a real terminal on stdin/stdout/stderr
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    _set_width(fd, columns)
    out = b""
    while True:
        try:
            ready = select.select([fd], [], [], 120)[0]
            chunk = os.read(fd, 65536) if ready else b""
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.mark.integration
def test_search_in_a_terminal_and_in_a_pipe(tmp_path):
    config = tmp_path / "term.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    env = {k: v for k, v in os.environ.items()
           if k not in ("COLUMNS", "LINES", "MLFLOW_TRACKING_URI")}
    env.update(TERM="xterm", OMP_NUM_THREADS="1")
    argv = [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(tmp_path / "runs"),
            "search", str(config)]

    code, shown = _in_pty(argv, tmp_path, 80, env)
    assert code == 0, shown
    assert "training the dense model digits-mlp: epoch" in shown  # said while it trains
    assert "\r[3/3]" in shown and shown.count("[3/3]") <= 3  # in place, not a line per trial
    assert "[1/3]" not in shown.replace("\r\n", "\n").split("\n")[-20:]  # overwritten
    table = shown[shown.index("Pareto front"):].replace("\r\n", "\n").split("\n\n")[0]
    assert len(table.splitlines()) >= 3 and all(len(line) <= 80 for line in table.splitlines())
    assert "INFO" not in shown and "Traceback" not in shown

    done = subprocess.run([*argv, "--extend", "2"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    progress = [line for line in done.stdout.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in progress] == ["[4/5", "[5/5"], done.stdout
    assert all(" failed 0 | front " in line for line in progress)
    assert "\r" not in done.stdout + done.stderr and "\x1b" not in done.stdout + done.stderr
    assert "training the dense model" not in done.stderr  # cached by the first run
    assert "INFO" not in done.stdout + done.stderr
