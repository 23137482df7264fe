"""How a search is spelled in MLflow: tag keys, run statuses, MLflow's size limits, valid keys,
param values, child-run names, and the conversions of the trials frame's cells.

Pure functions and constants, no mlflow: every other tracking module builds its runs from
these, so the spelling of a search in the store is decided in one place.
"""

from __future__ import annotations

import csv
import io
import json
import math
import posixpath
import re
from typing import Any, Iterable, TypeVar

from autosparse.space.candidate import Candidate
from autosparse.space.layers import LayerTable

TAG_STUDY = "autosparse.search.study"
TAG_STUDY_UID = "autosparse.study_uid"
TAG_ROLE = "autosparse.role"
TAG_STRATEGY = "autosparse.strategy"
TAG_STORAGE = "autosparse.compress.storage"
TAG_TRIAL = "autosparse.trial"
TAG_STATE = "autosparse.state"
TAG_ON_FRONT = "autosparse.on_front"
TAG_SUMMARY = "autosparse.summary_trial"  # the front point a parent run's metrics are from
TAG_CACHED = "autosparse.cached"
TAG_CANDIDATE_KEY = "autosparse.candidate_key"
TAG_LAYERS = "autosparse.space.layers"
TAG_FAIL_REASON = "autosparse.fail_reason"
TAG_PARENT = "mlflow.parentRunId"
ROLE_SEARCH = "search"
ROLE_TRIAL = "trial"

_STATE_TO_STATUS = {"COMPLETE": "FINISHED", "FAIL": "FAILED", "PRUNED": "KILLED",
                    "INTERRUPTED": "KILLED"}
_TERMINAL = {"FINISHED", "FAILED", "KILLED"}
_RUN_STATUSES = {"RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"}

# MLflow limits (mlflow.utils.validation), kept below so a change upstream cannot bite.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 5000
_MAX_KEY = 250
_MAX_PARAMS_TAGS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000
_FAIL_REASON_CHARS = 1000

T = TypeVar("T")


_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def sanitize_key(key: str) -> str:
    """A valid MLflow param/metric/tag key: alphanumerics, ``_ - . space /``; no path tricks."""
    text = _BAD_KEY_CHARS.sub("_", str(key)).strip()
    if text != posixpath.normpath(text) or text.startswith(("/", "..")) or text in ("", "."):
        text = text.replace("/", "_").strip(". ") or "_"
    return text[:_MAX_KEY]


def _truncate(text: str, limit: int) -> str:
    """Keep head and tail (a traceback's last line is the useful one)."""
    text = str(text)
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head - 5
    return f"{text[:head]} ... {text[-tail:]}"


def _param_value(value: Any) -> str:
    if isinstance(value, str):
        text = value
    elif value is None or isinstance(value, (bool, int, float)):
        text = str(value)
    else:
        try:
            text = json.dumps(value, sort_keys=True, default=str)
        except (TypeError, ValueError):
            text = str(value)
    return _truncate(text, _MAX_PARAM_VALUE)


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _text(value: Any) -> str:
    """A string cell of the trials frame; NaN/None (pandas' missing) become ""."""
    return value if isinstance(value, str) else ""


def _flag(value: Any) -> bool:
    """A boolean cell of the trials frame; NaN/None (missing) is False."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return bool(value)


def _own_metrics(row: dict[str, Any], metric_cols: list[str]) -> dict[str, Any]:
    """A trial row's metrics as the trial scored them: its own accuracy, not the seeds' mean."""
    metrics = {c: row.get(c) for c in metric_cols}
    if _finite(row.get("accuracy_single")) is not None:
        metrics["accuracy"] = row["accuracy_single"]
    return metrics


def name_figures(row: dict[str, Any], own: dict[str, Any],
                 metric_name: str) -> tuple[dict[str, Any], int | None]:
    """The figures a child run's name shows and the seeds behind its metric: the mean over the
    seeds for a re-evaluated front point (what decided its ★), else the trial's own."""
    seeds = _finite(row.get("accuracy_seeds"))
    mean = _finite(row.get("accuracy"))
    if seeds is None or seeds < 2 or mean is None:
        return own, None
    return {**own, metric_name: mean}, int(seeds)


def _spread_metrics(row: dict[str, Any]) -> dict[str, float]:
    """accuracy_mean/std and test_accuracy of a re-evaluated trial row; {} for the others."""
    seeds = _finite(row.get("accuracy_seeds"))
    if seeds is None or seeds < 2:
        return {}
    return _finite_metrics({"accuracy_mean": row.get("accuracy"), "accuracy_std": row.get(
        "accuracy_std"), "accuracy_seeds": seeds, "test_accuracy": row.get("test_accuracy")})


def _finite_metrics(metrics: dict[str, Any] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in (metrics or {}).items():
        number = _finite(value)
        if number is not None:
            out[sanitize_key(key)] = number
    return out


def layer_params(candidate_json: str) -> dict[str, str]:
    """``{"<layer>.pattern": ..., "<layer>.sparsity": ..., "<layer>.bits": ..., ...}``."""
    if not candidate_json:
        return {}
    candidate = Candidate.from_json(candidate_json)
    params: dict[str, str] = {}
    for name, choice in candidate.items():
        base = sanitize_key(name)[: _MAX_KEY - len(".criterion")]
        params[f"{base}.pattern"] = choice.pattern
        params[f"{base}.sparsity"] = f"{choice.sparsity:g}"
        params[f"{base}.bits"] = str(choice.bits)
        params[f"{base}.criterion"] = choice.criterion
    return params


FRONT_MARK = "★"
# The figures a child run's name carries, in order: metric, format (MLflow's runs table shows
# the name in every view, while metric columns must be picked by hand).
_NAME_FIGURES = (("compression", "{:.3g}x"), ("latency_ms", "{:.3g}ms"),
                 ("energy_uj", "{:.3g}uJ"))


def run_name(trial: int, state: str, metrics: dict[str, Any] | None,
             *, on_front: bool = False, metric_name: str = "accuracy",
             seeds: int | None = None) -> str:
    """A child run's name: ``t12 97.2% 24.7x 0.81ms`` (the figures it has; ``t12 mse 0.031
    24.7x`` for a task metric of another name), ``t3 failed``; ``★ `` in front of a front
    member, so the runs table marks the front at a glance. ``seeds``: the metric is the mean
    over that many fine-tune seeds (a re-evaluated front point), the figure the ★ was decided
    on: ``★ t35 98.1% (3 seeds) 28.3x``."""
    parts = [f"t{int(trial)}"]
    state = str(state).upper()
    metrics = metrics or {}
    if state in ("FAIL", "INTERRUPTED"):
        parts.append("failed" if state == "FAIL" else "interrupted")
    else:
        if state == "PRUNED":
            parts.append("screened")
        task = _finite(metrics.get(metric_name))
        if task is not None:
            parts.append(f"{task:.1f}%" if metric_name == "accuracy"
                         else f"{metric_name} {task:.4g}")
            if seeds is not None and seeds > 1:
                parts.append(f"({seeds} seeds)")
        for key, form in _NAME_FIGURES:
            value = _finite(metrics.get(key))
            if value is not None:
                parts.append(form.format(value))
    name = " ".join(parts)
    return f"{FRONT_MARK} {name}" if on_front else name


def _epoch_ms(value: Any) -> int | None:
    number = _finite(value)
    return None if number is None or number <= 0 else int(number)


def _iso_ms(value: Any) -> int | None:
    """Epoch ms of an ISO timestamp (the trials frame's ``datetime_start``); None if absent.
    Optuna stores naive local times: read them as local, as Optuna wrote them."""
    if not isinstance(value, str) or not value.strip():
        return None
    from datetime import datetime

    try:
        return int(datetime.fromisoformat(value.strip()).timestamp() * 1000)
    except ValueError:
        return None


def layer_table_csv(table: LayerTable) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "kind", "weight_shape", "params", "macs"])
    for layer in table.layers:
        writer.writerow(
            [
                layer.name,
                layer.kind,
                "x".join(str(d) for d in layer.weight_shape),
                layer.weight_count + layer.bias_count,
                layer.macs,
            ]
        )
    return buffer.getvalue()


def _quote(value: str) -> str:
    """A filter-string literal (MLflow has no escapes: pick the quote the value lacks)."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"value {value!r} holds both quote characters")


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
