"""The calibration's picture: predicted against measured latency, the ±10 % band marked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd


def calibration_figure_png(frame: pd.DataFrame, path: Path, title: str) -> None:
    """Predicted vs measured latency (log-log), one colour per architecture, fit vs held-out
    marked, with the ±10 % band around the diagonal that the acceptance target is stated in.

    ``frame`` needs columns ``architecture``, ``split`` (fit/held-out), ``measured_ms`` and
    ``predicted_ms``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 5.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    low = float(min(frame["measured_ms"].min(), frame["predicted_ms"].min())) * 0.8
    high = float(max(frame["measured_ms"].max(), frame["predicted_ms"].max())) * 1.25
    line = np.geomspace(low, high, 50)
    ax.plot(line, line, color="black", lw=1, label="predicted = measured")
    ax.fill_between(line, line * 0.9, line * 1.1, color="0.85", label="±10 %")
    markers = {"fit": "o", "held-out": "^"}
    for arch_index, (arch, group) in enumerate(frame.groupby("architecture")):
        for split, part in group.groupby("split"):
            ax.scatter(part["measured_ms"], part["predicted_ms"], s=26,
                       marker=markers.get(str(split), "o"), color=f"C{arch_index}",
                       facecolors="none" if split == "fit" else f"C{arch_index}",
                       label=f"{arch} ({split})")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(low, high)
    ax.set_ylim(low, high)
    ax.set_xlabel("measured latency (ms, median)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120)
