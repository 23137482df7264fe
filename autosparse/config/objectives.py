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
        Objective("latency", "latency_ms", "minimize", "latency (ms; measured with hardware: measure)"),
        Objective("energy", "energy_uj", "minimize", "predicted energy (µJ)"),
        # oneshot only: read from the level database's stored types and the dense reference
        Objective("bits", "bits_per_weight", "minimize", "stored bits per searched weight"),
        Objective("kl", "kl", "minimize", "KL divergence to dense (nats/token, calibration)"),
    )
}

# Objectives that measure quality rather than a cost: the task metric's slot and the one-shot KL.
# A planner spends budgets on the costs only; ``export --knee`` trades quality against a cost.
QUALITY_OBJECTIVES: tuple[str, ...] = ("accuracy", "kl")


def first_cost(objectives: list[str]) -> str | None:
    """The first objective that is a cost (what ``export --knee`` trades quality against and the
    parent run's row shows the knee of); None when every objective measures quality."""
    return next((o for o in objectives if o not in QUALITY_OBJECTIVES), None)

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
    "bits_per_weight",
    "kl",
    "sparsity",
)

# What only a one-shot search (``oneshot:`` in the config) computes: the level database knows each
# layer's stored type, the dense reference the KL; ``sparsity`` is the share of the searched
# weights that are pruned (0 to 1), as EvoPress's average-sparsity budgets count it.
ONESHOT_METRICS: tuple[str, ...] = ("bits_per_weight", "kl", "sparsity")

# What needs a hardware profile (``hardware:`` in the config) to be computed.
HARDWARE_METRICS: tuple[str, ...] = ("latency_ms", "energy_uj")


def metric_of(objective_name: str) -> str:
    return OBJECTIVES[objective_name].metric


def shown_metric(key: str, metric_name: str = "accuracy") -> str:
    """The user-facing name of an internal metric key under a task whose metric is called
    ``metric_name``: ``accuracy`` -> ``mse``, ``accuracy_drop`` -> ``metric_drop``,
    ``accuracy_std`` -> ``mse_std``, ``test_accuracy`` -> ``test_mse``, ``dense_accuracy`` ->
    ``dense_mse``. Inside, the task metric keeps the slot name ``accuracy`` whatever the task;
    for plain classification (``metric_name`` accuracy) every key stays as it is."""
    if metric_name == "accuracy":
        return key
    if key == "accuracy_drop":
        return "metric_drop"
    if key == "accuracy" or key.startswith("accuracy_"):
        return metric_name + key[len("accuracy"):]
    if key.endswith("_accuracy"):
        return key[: -len("accuracy")] + metric_name
    return key


def shown_metrics(metrics: dict, metric_name: str = "accuracy") -> dict:
    """``metrics`` with every key as :func:`shown_metric` names it."""
    if metric_name == "accuracy":
        return dict(metrics)
    return {shown_metric(str(k), metric_name): v for k, v in metrics.items()}
