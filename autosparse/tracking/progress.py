"""What the terminal shows while a command works.

In a terminal a progress line is rewritten in place (tqdm), so a 200-trial search is one line,
not 200; when the output is a pipe or a file each update is a plain line of its own, as a log
should be (no carriage returns, no escape codes). Tables are cut to the terminal's width instead
of wrapping. Nothing here imports torch, optuna or mlflow.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    import pandas as pd

Printer = Callable[[str], None]


def is_terminal(stream: TextIO | None) -> bool:
    """True for an interactive terminal (not a pipe, a file, pytest's capture or TERM=dumb)."""
    try:
        return bool(stream is not None and stream.isatty()) and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def terminal_width(stream: TextIO | None = None) -> int | None:
    """Columns to fit into: ``COLUMNS`` when set, else the terminal's width; None (no limit)
    when the output is not a terminal, so a file or pipe gets the whole table."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    stream = sys.stdout if stream is None else stream
    if not is_terminal(stream):
        return None
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError):
        return None


class LiveLine:
    """A status line: updated in place on a terminal, one printed line per update elsewhere.

    In place only where the lines would go to a terminal anyway (``printer`` is ``print`` and
    stdout is a terminal): a caller's own printer (tests, a log) always gets plain lines.
    """

    def __init__(self, total: int | None, initial: int = 0, printer: Printer = print,
                 stream: TextIO | None = None, unit: str = "trials"):
        self.total, self.printer = total, printer
        self._bar, self._updated = None, False
        stream = sys.stdout if stream is None else stream
        if printer is print and is_terminal(stream):
            from tqdm import tqdm

            count = "{n_fmt}/{total_fmt}" if total is not None else "{n_fmt}"
            self._bar = tqdm(total=total, initial=initial, file=stream, dynamic_ncols=True,
                             unit=unit, leave=True, mininterval=0, smoothing=0,
                             desc=f"first of the {unit} running ...",
                             bar_format=f"[{count}] " + ("|{bar:12}| " if total else "")
                             + "{desc}")  # tqdm trims the line to the terminal's width

    @property
    def in_place(self) -> bool:
        return self._bar is not None

    def update(self, done: int, detail: str) -> None:
        """``[done/total] detail``: in place, or as one more line."""
        if self._bar is None:
            self.printer(f"[{done}/{self.total if self.total is not None else '-'}] {detail}")
            return
        self._updated = True
        self._bar.n = min(done, self.total) if self.total is not None else done
        self._bar.set_description_str(detail, refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        """Leave the last state on screen and move to the next line (or clear the line when
        no trial ran: its placeholder text would mislead)."""
        if self._bar is not None:
            self._bar.leave = self._updated
            self._bar.close()
            self._bar = None


@contextmanager
def dense_training(model: str, epochs: int, cache: os.PathLike | str,
                   stream: TextIO | None = None) -> Iterator[Callable[[int], None]]:
    """Say what happens during the seconds to minutes of dense training, before the search
    prints anything: on stderr (stdout keeps a command's results), with an epoch bar in a
    terminal. Yields the per-epoch callback."""
    stream = sys.stderr if stream is None else stream
    cached = f"cached in {cache} for later runs"
    start = time.perf_counter()
    if is_terminal(stream):
        from tqdm import tqdm

        # the counter first: tqdm trims the line's end to the terminal's width
        bar = tqdm(total=epochs, file=stream, dynamic_ncols=True, leave=False, mininterval=0,
                   bar_format=f"training the dense model {model}: epoch {{n_fmt}}/{{total_fmt}} "
                   f"|{{bar:10}}| {{elapsed}} ({cached})")
        try:
            yield lambda epoch: bar.update(1)
        finally:
            bar.close()
    else:
        print(f"training the dense model {model} ({epochs} epochs; {cached}) ...",
              file=stream, flush=True)
        yield lambda epoch: None
    print(f"dense model {model} trained in {time.perf_counter() - start:.1f} s", file=stream,
          flush=True)


@contextmanager
def oneshot_progress(root: os.PathLike | str, stream: TextIO | None = None
                     ) -> Iterator[Callable[[int, int, str, str, float], None]]:
    """Say what happens while a level database is built (minutes on a CPU), on stderr: one
    line when the build starts, the count redrawn in a terminal (a line per tenth in a pipe),
    and one line at the end. Nothing at all when every entry was already stored."""
    stream = sys.stderr if stream is None else stream
    start = time.perf_counter()
    built = {"count": 0, "shown": -1}

    def progress(done: int, total: int, layer: str, level: object, seconds: float) -> None:
        level = getattr(level, "key", level)
        if built["count"] == 0:
            print(f"building the level database ({total} layer levels; kept in {root} for "
                  "later runs) ...", file=stream, flush=True)
        built["count"] += 1
        tenth = 10 * done // max(total, 1)
        if is_terminal(stream):
            print(f"\r  {done}/{total} {layer} {level}".ljust(70)[:70], end="", file=stream,
                  flush=True)
        elif tenth != built["shown"]:
            built["shown"] = tenth
            print(f"  {done}/{total} layer levels", file=stream, flush=True)

    yield progress
    if built["count"]:
        end = "\n" if is_terminal(stream) else ""
        print(f"{end}level database: {built['count']} layer levels built in "
              f"{time.perf_counter() - start:.1f} s", file=stream, flush=True)


def fit_table(frame: pd.DataFrame, width: int | None, drop_order: Sequence[str] = (),
              float_format: Callable[[float], str] = "{:.4g}".format) -> tuple[str, list[str]]:
    """``frame`` as text no wider than ``width`` (None: no limit). The last column, when it is
    text (the per-layer summary), is cut with an ellipsis where at least 12 characters of it
    fit; else the columns of ``drop_order`` are left out, in that order, and the text column
    last. Returns the text and the names of the columns left out."""
    import pandas as pd

    def render(table: pd.DataFrame) -> str:
        with pd.option_context("display.max_colwidth", None, "display.width", None,
                               "display.max_columns", None):
            return table.to_string(index=False, float_format=float_format)

    def widest(text: str) -> int:
        return max((len(line) for line in text.splitlines()), default=0)

    text = render(frame)
    if width is None or widest(text) <= width or frame.empty:
        return text, []
    last = frame.columns[-1]
    cuttable = None if pd.api.types.is_numeric_dtype(frame[last]) else last
    table, left_out = frame, []
    queue = [c for c in drop_order if c in frame.columns and c != cuttable]
    while True:
        if cuttable in table.columns:
            room = width - widest(render(table.drop(columns=[cuttable]))) - 2
            if room >= max(12, len(str(cuttable))):
                cut = table.copy()
                cut[cuttable] = [_cut(str(v), room) for v in cut[cuttable]]
                return render(cut), left_out
        if queue:
            column = queue.pop(0)
        elif cuttable in table.columns:
            column = cuttable
        else:
            return render(table), left_out
        table = table.drop(columns=[column])
        left_out.append(str(column))
        text = render(table)
        if widest(text) <= width:
            return text, left_out


def _cut(text: str, room: int) -> str:
    return text if len(text) <= room else text[: room - 1] + "…"
