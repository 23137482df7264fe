"""The checks an export must pass: the documented tolerances, running each exported format on a
split, and the margins between a format's score and the reference (points for a percentage
metric, relative for any other task metric).

Split out of ``exporter`` so that the pass/fail rules and their figures live in one place, apart
from the steps that produce the files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from autosparse.config.objectives import shown_metric
from autosparse.cost.onnx_files import input_array, onnx_outputs, onnx_session
from autosparse.search.context import SearchContext
from autosparse.workload.task import Task, model_outputs

# Documented tolerances (README, "Export"). A percentage metric (accuracy, topK) is checked in
# points; any other task metric (mse, perplexity, yours) relative to the reference value.
SAME_PREDICTIONS = 99.5  # % of test images on which every float format predicts the same class
INT8_MAX_DROP = 1.0  # points the QDQ int8 model (activations quantized too) may lose vs PyTorch
INT8_MAX_WORSE = 0.01  # non-percentage metric: int8 at most 1 % worse than PyTorch
SEARCH_MARGIN = 1.0  # points the rebuilt model's validation accuracy may differ from the trial's
SEARCH_MARGIN_RELATIVE = 0.01  # non-percentage metric: rebuilt within 1 % of the trial's value
OUTPUT_TOLERANCE = 1e-4  # largest output difference of a float format, relative to the largest output
# must compute the compressed model (onnx_compact: model.compact.onnx, the same weights)
FLOAT_FORMATS = ("pytorch_shrunk", "pt2", "packed", "onnx", "onnx_compact")


class ExportCheckFailed(RuntimeError):
    """The exported formats disagree, or do not reproduce the search's figure."""


def _batches(context: SearchContext, split: str) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Inputs as the ONNX files take them (float32, or int64 token ids) and targets."""
    for x, y in context.data.loader(split, context.data.batch_size):
        yield input_array(x.numpy()), np.asarray(y)


def _logits(model: torch.nn.Module, context: SearchContext) -> np.ndarray:
    """The model's outputs on the whole test split (eval mode)."""
    out = []
    with torch.no_grad():
        if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
            model.eval()  # a loaded torch.export program is already in eval form
        for x, _ in context.data.loader("test", context.data.batch_size):
            out.append(model_outputs(model(x)).numpy())  # a tensor, or transformers' .logits
    return np.concatenate(out)


def _onnx_logits(path: Path, context: SearchContext) -> np.ndarray:
    session = onnx_session(path)
    return np.concatenate([onnx_outputs(session, x) for x, _ in _batches(context, "test")])


def _output_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Largest output difference relative to the reference's largest output."""
    return float(np.abs(logits - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Percent of positions where two label vectors agree (accuracy when ``b`` is the truth)."""
    return float((a == b).mean() * 100)


def metric_key(task: Task, key: str) -> str:
    """A report key under the task's metric name (``test_accuracy`` -> ``test_mse``); a
    classifier's report keeps its historic ``accuracy`` keys whatever its metric."""
    return key if task.kind == "classification" else shown_metric(key, task.name)


def shown_value(task: Task, value: float) -> str:
    """``97.22 %`` for a percentage, ``mse 0.4312`` for another metric."""
    return f"{value:.2f} %" if task.percent else f"{task.name} {value:.4g}"


def rebuild_margin(task: Task, recorded: float) -> float:
    """How far the rebuilt model's validation metric may be from the trial's recorded one."""
    return SEARCH_MARGIN if task.percent else SEARCH_MARGIN_RELATIVE * abs(recorded)


def int8_margin(task: Task, reference: float) -> float:
    """How much worse than the PyTorch model the int8 ONNX model may score on test."""
    return INT8_MAX_DROP if task.percent else INT8_MAX_WORSE * abs(reference)


def _tolerances(task: Task) -> dict[str, float]:
    """The checks' margins as report.json states them (points, or relative for a metric that is
    not a percentage; class agreement only where there are class or token predictions)."""
    out: dict[str, float] = {}
    if task.kind in ("classification", "language-model"):
        out["same_predictions_percent"] = SAME_PREDICTIONS
    out["output_error_relative"] = OUTPUT_TOLERANCE
    if task.percent:
        return {**out, "int8_max_drop_points": INT8_MAX_DROP,
                "search_margin_points": SEARCH_MARGIN}
    return {**out, "int8_max_worse_relative": INT8_MAX_WORSE,
            "search_margin_relative": SEARCH_MARGIN_RELATIVE}
