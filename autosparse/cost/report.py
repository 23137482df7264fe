"""The per-layer cost table a user reads to understand where a candidate's time and energy go.

Shared by ``autosparse profile`` (terminal) and the search's MLflow artifacts (CSV).
"""

from __future__ import annotations

import pandas as pd

from autosparse.compress.footprint import model_footprint
from autosparse.config.hardware import HardwareProfile
from autosparse.cost.estimate import ModelCost, estimate_cost
from autosparse.cost.latency_table import (
    ANALYTIC,
    INT8,
    LatencyTable,
    TableLatency,
    table_latency,
)
from autosparse.space.candidate import Candidate
from autosparse.space.layers import LayerTable


def _accelerated_text(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "no")


def cost_table(table: LayerTable, candidate: Candidate, cost: ModelCost,
               measured: TableLatency | None = None) -> pd.DataFrame:
    """One row per layer: choice, MACs run, stored bits, predicted latency/energy, bound, notes;
    ``source`` says whether the latency is the measured table's or the analytic model's."""
    footprint = {layer.name: layer for layer in model_footprint(table, candidate).layers}
    rows = []
    for layer, info in zip(cost.layers, table.layers):
        rows.append({
            "layer": layer.name,
            "kind": info.kind,
            "choice": candidate.get_choice(layer.name).describe(),
            "runs_on": layer.precision + ("" if layer.native else " (emulated)"),
            "macs": layer.macs,
            "stored_bits": footprint[layer.name].total_bits,
            "latency_us": (measured.layer_us[layer.name] if measured is not None
                           else layer.latency_s * 1e6),
            "source": measured.source[layer.name] if measured is not None else ANALYTIC,
            "compute_us": layer.compute_s * 1e6,
            "memory_us": layer.memory_s * 1e6,
            "overhead_us": layer.overhead_s * 1e6,
            "energy_uj": layer.energy_j * 1e6,
            "bound": layer.bound,
            "accelerated": _accelerated_text(layer.accelerated),
            "note": layer.note,
        })
    return pd.DataFrame(rows)


def format_cost_report(table: LayerTable, candidate: Candidate, profile: HardwareProfile,
                       latency_table: LatencyTable | None = None) -> str:
    """The terminal report: per-layer table plus totals (latency, energy, stored size)."""
    cost = estimate_cost(table, candidate, profile)
    measured = (table_latency(latency_table, table, candidate, profile)
                if latency_table is not None else None)
    frame = cost_table(table, candidate, cost, measured)
    shown = frame.drop(columns=["compute_us", "memory_us", "overhead_us"]).copy()
    shown["macs"] = shown["macs"].map(lambda v: f"{v:,.0f}")
    shown["stored_bits"] = shown["stored_bits"].map(lambda v: f"{v:,}")
    for column in ("latency_us", "energy_uj"):
        shown[column] = shown[column].map(lambda v: f"{v:.3g}")
    size_kb = model_footprint(table, candidate).size_kb
    lines = [
        f"hardware: {profile.name}" + (" (measured)" if profile.measured else ""),
        shown.to_string(index=False),
        "",
        f"fixed per inference (model overhead, conversions): {cost.fixed_s * 1e6:.3g} µs",
        f"total: latency {measured.total_ms if measured else cost.latency_ms:.4g} ms, "
        f"energy {cost.energy_uj:.4g} µJ, stored size {size_kb:.4g} kB (batch 1)",
    ]
    if measured is not None:
        counts = measured.counts()
        lines.append(f"latency source: measured table for {counts['table']} layers, analytic "
                     f"{profile.name} for {counts['analytic']} (dense measured "
                     f"{latency_table.dense_us:.4g} µs on {latency_table.machine}); the "
                     "latency of " + ("model.int8.onnx (every layer <= 8 bits)"
                                      if measured.format == INT8 else
                                      "model.onnx (fp32: export ships int8 only when every "
                                      "layer has <= 8 bits)"))
    return "\n".join(lines)
