"""Names, directions and units of everything a search can optimise or constrain.

One table, so adding an objective (the hardware model adds latency and energy) is one entry
here plus the function that computes its metric; nothing else changes shape.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Objective:
    name: str
    metric: str  # key in a candidate's metrics dict
    direction: str  # "maximize" | "minimize"
    label: str


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("accuracy", "accuracy", "maximize", "validation accuracy (%)"),
        Objective("size", "size_kb", "minimize", "stored size (kB)"),
        Objective("macs", "macs", "minimize", "MACs per sample"),
        Objective("bops", "bops", "minimize", "bit operations per sample"),
        Objective("latency", "latency_ms", "minimize", "predicted latency (ms)"),
        Objective("energy", "energy_uj", "minimize", "predicted energy (µJ)"),
    )
}

# Metrics a constraint may bound (units: accuracy in %, drop in points, size in kB = 1000 bytes, latency
# in ms and energy in µJ per inference at batch 1).
CONSTRAINT_METRICS: tuple[str, ...] = (
    "accuracy",
    "accuracy_drop",
    "size_kb",
    "compression",
    "macs",
    "bops",
    "latency_ms",
    "energy_uj",
)

# What needs a hardware profile (``hardware:`` in the config) to be computed.
HARDWARE_METRICS: tuple[str, ...] = ("latency_ms", "energy_uj")


def metric_of(objective_name: str) -> str:
    return OBJECTIVES[objective_name].metric
