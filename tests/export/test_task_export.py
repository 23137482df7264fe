"""Export, plots, front table, sensitivity headers and the dense cache for a task other than
classification: a regression model (mse) and a tiny language model (perplexity, int64 token ids).

The two exports run the real command on a tiny real search of the shipped example configs (the
settings of tests/cli/test_task_e2e.py) and check every file against an independent recomputation:
the ONNX model's outputs against the PyTorch student's on a batch, and the report's metric
against one computed here from the ONNX outputs. The rest is pure and fast.
"""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from autosparse.cli import main
from autosparse.config.sections import ModelConfig
from autosparse.config.task_metric import TaskConfig
from autosparse.export.checks import (
    INT8_MAX_WORSE,
    SEARCH_MARGIN_RELATIVE,
    int8_margin,
    rebuild_margin,
)
from autosparse.export.packed import load_packed
from autosparse.search import selection
from autosparse.search.allocation.table import ChoiceSensitivity, SensitivityTable
from autosparse.search.runner import prepare, run_search
from autosparse.search.sensitivity_study import format_sensitivity, sensitivity_csv
from autosparse.tracking.plots import front_table, pareto_figure, pareto_figure_html
from autosparse.workload import dense as dense_module
from autosparse.workload.models import build_model
from autosparse.workload.task import CLASSIFICATION, build_task

ROOT = Path(__file__).resolve().parents[2]
FILES = {"model.pt2", "model.packed", "model.onnx", "model.int8.onnx", "model.compact.onnx",
         "report.json", "report.md"}
FORMATS = ("pytorch", "pytorch_shrunk", "pt2", "packed", "onnx", "onnx_int8", "onnx_compact")


def tiny(name: str, directory: Path, **changes) -> Path:
    """The shipped example config, a short dense training and a 4-trial int8/int4 search (as in
    tests/cli/test_task_e2e.py), every layer at <= 8 bits so that model.int8.onnx is written."""
    config = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    config.update(name=f"{name}-export", budget={"trials": 4},
                  strategy={"name": "ga", "population_size": 4},
                  finetune={"steps": 8, "reeval_seeds": 1}, **changes)
    config["model"]["train_epochs"] = 4
    config["space"]["default"]["bits"] = [4, 8]
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def export(config: Path, runs_dir: Path, capsys, *extra: str) -> tuple[dict, Path, str]:
    torch.set_num_threads(1)
    run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    capsys.readouterr()
    assert main(["--runs-dir", str(runs_dir), "export", str(config), "--knee", *extra]) == 0
    printed = capsys.readouterr().out
    (out,) = (runs_dir / yaml.safe_load(config.read_text())["name"] / "export").iterdir()
    assert FILES <= {p.name for p in out.iterdir()}
    return json.loads((out / "report.json").read_text()), out, printed


def onnx_run(path: Path, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.mark.integration
def test_regression_export_checks_and_reports_mse(tmp_path, capsys):
    config = tiny("diabetes-regression", tmp_path)
    report, out, printed = export(config, tmp_path, capsys, "--no-mlflow")
    assert report["metric"] == {"name": "mse", "kind": "regression", "direction": "minimize",
                                "percent": False}
    assert "test_accuracy" not in report and "validation_accuracy" not in report
    test, validation = report["test_mse"], report["validation_mse"]
    assert set(FORMATS) <= set(test)
    # the rebuild repeats the trial: its validation mse within the stated relative margin
    assert abs(validation["rebuilt"] - validation["search_single"]) \
        <= SEARCH_MARGIN_RELATIVE * validation["search_single"]
    assert report["tolerances"]["int8_max_worse_relative"] == INT8_MAX_WORSE == 0.01
    assert report["tolerances"]["search_margin_relative"] == 0.01
    assert "same_predictions_percent" not in report["tolerances"]  # no classes to agree on
    assert test["onnx_int8"] - test["pytorch"] <= INT8_MAX_WORSE * test["pytorch"]
    assert report["agreement_percent"] == {}
    spec = report["input"]
    assert spec["dtype"] == "float32" and spec["shape"] == ["batch", 10]
    assert "classes" not in spec and "regression value" in spec["output"]

    # the ONNX model against the PyTorch student (the packed checkpoint in a fresh skeleton)
    context = prepare(config, tmp_path)
    skeleton = build_model(context.config.model, context.data.input_shape,
                           context.data.num_classes)
    student = load_packed(out / "model.packed", skeleton).eval()
    x, y = map(torch.cat, zip(*context.data.loader("test", 64)))
    with torch.no_grad():
        expected = student(x).numpy()
    onnx_out = onnx_run(out / "model.onnx", x.numpy())
    assert onnx_out.shape == expected.shape == (len(y), 1)
    np.testing.assert_allclose(onnx_out, expected, rtol=1e-4, atol=1e-5)
    # the report's test mse of each ONNX file, recomputed here from its outputs
    for name, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        mse = float(((onnx_run(out / file, x.numpy()) - y.numpy()) ** 2).mean())
        assert test[name] == pytest.approx(mse, rel=1e-5)

    markdown = (out / "report.md").read_text()
    assert "| format | test mse | output error (relative) |" in markdown
    assert "knee of the front (mse vs size_kb)" in markdown and "accuracy" not in markdown
    assert "within 1% of the trial's" in markdown and "at most 1% worse" in markdown
    assert f"test mse onnx: {test['onnx']:.4g}" in printed and "test accuracy" not in printed


@pytest.mark.integration
def test_language_model_export_takes_token_ids_and_reports_perplexity(tmp_path, capsys):
    config = tiny("tiny-lm", tmp_path)
    report, out, printed = export(config, tmp_path, capsys)  # registered in MLflow too
    assert report["metric"]["name"] == "perplexity" and report["metric"]["direction"] == "minimize"
    test = report["test_perplexity"]
    spec = report["input"]
    assert spec["dtype"] == "int64" and spec["shape"] == ["batch", 16] and spec["mean"] == []
    assert spec["vocabulary"] == 32 and "(batch, 16, 32)" in spec["output"]
    # float formats predict the same next token at every position
    assert set(report["agreement_percent"]) == {"pytorch_shrunk", "pt2", "packed", "onnx",
                                                "onnx_compact"}
    assert min(report["agreement_percent"].values()) >= 99.5
    assert test["onnx_int8"] <= test["pytorch"] * (1 + INT8_MAX_WORSE)

    context = prepare(config, tmp_path)
    x, y = map(torch.cat, zip(*context.data.loader("test", 64)))
    assert x.dtype == torch.int64
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].type == "tensor(int64)"
    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        expected = program(x).numpy()
    logits = onnx_run(out / "model.onnx", x.numpy())
    assert logits.shape == (len(x), 16, 32)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    for name, file in (("onnx", "model.onnx"), ("onnx_int8", "model.int8.onnx")):
        values = torch.from_numpy(onnx_run(out / file, x.numpy()))
        perplexity = math.exp(float(torch.nn.functional.cross_entropy(
            values.reshape(-1, 32), y.reshape(-1))))
        assert test[name] == pytest.approx(perplexity, rel=1e-5)

    markdown = (out / "report.md").read_text()
    assert "| format | test perplexity | same next token as PyTorch (%) |" in markdown
    assert "int64 token ids" in markdown and "argmax(axis=-1)" in markdown
    assert f"test perplexity onnx: {test['onnx']:.4g}" in printed

    # registered with an int64 example: the MLflow model serves token ids
    name = report["registered_model"]["name"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(
        mlflow.MlflowClient(tracking_uri=uri).get_model_version(name, "1").run_id)
    assert run.data.metrics["test_perplexity_onnx"] == pytest.approx(test["onnx"])
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with _use_tracking_uri(uri):
            loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
    np.testing.assert_allclose(np.asarray(loaded.predict(x[:8].numpy())), expected[:8],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_a_gpt2_factory_model_is_refused_in_one_line_before_the_rebuild(tmp_path, capsys):
    """transformers' GPT-2 uses an operator the ONNX exporter cannot express: one clear error
    line (exit 2) naming it and its layer, before any fine-tune."""
    torch.set_num_threads(1)
    config = {"name": "gpt2-export", "model": {"factory": "autosparse.workload.task_builtins:tiny_gpt2"},
              "data": {"source": "synthetic-tokens"}, "task": {"kind": "language-model"},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [8]}},
              "strategy": {"name": "random"}, "budget": {"trials": 1},
              "objectives": ["perplexity", "size"], "finetune": {"steps": 2, "reeval_seeds": 0}}
    path = tmp_path / "gpt2.yaml"
    path.write_text(yaml.safe_dump(config))
    run_search(path, runs_dir=tmp_path, printer=lambda line: None)
    capsys.readouterr()
    assert main(["--runs-dir", str(tmp_path), "export", str(path), "--trial", "0",
                 "--no-mlflow"]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert "cannot export GPT2LMHeadModel to ONNX" in errors[0] and "aten::diff" in errors[0]
    assert "rebuilding" not in captured.out  # refused before the fine-tune
    assert not (tmp_path / "gpt2-export" / "export").exists() or \
        not any((tmp_path / "gpt2-export" / "export").iterdir())


# ------------------------------------------------------------------ margins, pure


def test_margins_are_points_for_a_percentage_and_relative_otherwise():
    mse = build_task(TaskConfig(kind="regression"))
    assert rebuild_margin(CLASSIFICATION, 97.0) == 1.0 and int8_margin(CLASSIFICATION, 97.0) == 1.0
    assert rebuild_margin(mse, 0.5) == pytest.approx(0.005)
    assert int8_margin(mse, 0.5) == pytest.approx(0.005)
    assert mse.drop(0.5, 0.506) > int8_margin(mse, 0.5)  # 1.2 % worse: refused
    assert mse.drop(0.5, 0.45) < 0  # lower mse is better, never a loss


# ------------------------------------------------------------------ plots and the front table


def mse_trials() -> pd.DataFrame:
    """A minimised metric in the accuracy slot: trial 0 the best mse, 3 off the front."""
    rows = [(0, True, 0.40, 10.0), (1, True, 0.45, 4.0), (2, True, 0.60, 1.0),
            (3, False, 0.70, 6.0), (4, True, 0.38, 10.0)]
    frame = pd.DataFrame(rows, columns=["trial", "on_front", "accuracy", "size_kb"])
    frame["state"], frame["feasible"], frame["candidate"] = "COMPLETE", True, ""
    frame["accuracy_drop"] = frame["accuracy"] - 0.42
    return frame


def test_a_minimised_metric_is_plotted_on_an_inverted_axis_named_by_the_metric(tmp_path):
    trials = mse_trials()
    figure = pareto_figure(trials, ["accuracy", "size"], {"accuracy": 0.42, "size_kb": 12.0},
                           metric="mse", maximize=False)
    (ax,) = figure.axes
    assert ax.yaxis_inverted() and "mse" in ax.get_ylabel() and "inverted" in ax.get_ylabel()
    assert ax.get_title() == "mse vs size"
    # the front's staircase runs through the lowest mse at each size: 2 (1 kB), 1, 4 (10 kB)
    (line,) = [l for l in ax.get_lines() if len(l.get_xdata()) > 1]
    assert 0.38 in set(np.round(line.get_ydata(), 2)) and 0.40 not in set(line.get_ydata())
    accuracy = pareto_figure(trials.assign(accuracy=100 - trials["accuracy"]),
                             ["accuracy", "size"])
    assert not accuracy.axes[0].yaxis_inverted()
    assert accuracy.axes[0].get_ylabel() == "validation accuracy (%)"

    page = tmp_path / "pareto.html"
    pareto_figure_html(trials, ["accuracy", "size"], page, metric="mse", maximize=False)
    text = page.read_text()
    assert 'data-yaxis="inverted"' in text and "validation mse (axis inverted" in text
    assert "Pareto front: mse vs size" in text and "mse: 0.38" in text
    # the best mse (0.38) is drawn above the worst front point (0.60): up is better
    ys = {int(m[2]): float(m[1]) for m in re.finditer(
        r'<circle cx="[\d.]+" cy="([\d.]+)" r="5.5"[^>]*data-t="(\d+)"', text)}
    assert ys[4] < ys[2]  # tip index = trial row: trial 4 (0.38) above trial 2 (0.60)


def test_front_table_breaks_ties_best_first_in_the_metrics_direction():
    trials = mse_trials()
    table = front_table(trials, ["accuracy", "size"], maximize=False)
    assert list(table["trial"]) == [2, 1, 4, 0]  # at 10 kB: mse 0.38 before 0.40
    assert list(front_table(trials, ["accuracy", "size"])["trial"]) == [2, 1, 0, 4]


def test_selection_rules_take_the_lower_metric_as_better():
    trials = mse_trials()
    trials["fail_reason"] = ""
    trials.loc[trials["trial"] == 4, "size_kb"] = 4.0  # a tie with trial 1 at 4 kB
    assert selection.by_rule(trials, 1.0, "size", maximize=False).trial == 2
    assert selection.by_rule(trials[trials["trial"] != 2], 1.0, "size", maximize=False).trial == 4
    two = trials[trials["trial"].isin([0, 2])]
    chosen = selection.knee(two, "size", maximize=False, quality="mse")
    assert chosen.trial == 0 and chosen.reason.endswith("the best mse")  # the lowest mse
    assert "within 1 of the dense mse" in selection.by_rule(trials, 1.0, "size", False, "mse").reason


# ------------------------------------------------------------------ sensitivity headers


def test_sensitivity_table_and_csv_name_the_task_metric():
    entries = (ChoiceSensitivity("fc1", "dense:0:4:magnitude", 0.02, -0.03),
               ChoiceSensitivity("fc1", "unstructured:0.9:32:magnitude", 0.10, -0.12))
    table = SensitivityTable(entries, dense_loss=0.4, dense_accuracy=-0.42, samples=88)
    text = format_sensitivity(table, "mse", maximize=False)
    assert "worst Δmse" in text and "Δacc" not in text
    assert "+0.12" in text  # the real change of the mse: up 0.12 (worse)
    frame = pd.read_csv(io.StringIO(sensitivity_csv(table, "mse", False)))
    assert {"mse_delta", "dense_mse"} <= set(frame.columns) and "accuracy_delta" not in frame
    assert frame["dense_mse"].iloc[0] == pytest.approx(0.42)
    assert list(frame["mse_delta"]) == pytest.approx([0.03, 0.12])
    assert "worst Δacc" in format_sensitivity(table)  # a classifier's table as it was


# ------------------------------------------------------------------ the dense cache key


def test_dense_cache_key_includes_a_users_loss_and_keeps_the_default_key(tmp_path):
    from autosparse.config.sections import DataConfig
    from autosparse.workload.data import load_data

    data = load_data(DataConfig(source="sklearn-diabetes"))
    model = ModelConfig(builtin="regression-mlp", train_epochs=1)
    default = dense_module.cache_key(model, data, 0)
    assert dense_module.cache_key(model, data, 0, CLASSIFICATION) == default
    assert dense_module.cache_key(model, data, 0, build_task(TaskConfig(kind="regression"))) \
        == default  # the built-in loss: caches written before stay valid
    l1 = build_task(TaskConfig(kind="regression", loss="torch.nn.functional:l1_loss"))
    summed = build_task(TaskConfig(kind="regression", loss="torch.nn.functional:l1_loss",
                                   loss_kwargs={"reduction": "sum"}))
    keys = {default, dense_module.cache_key(model, data, 0, l1),
            dense_module.cache_key(model, data, 0, summed)}
    assert len(keys) == 3
    # a model trained with the user's loss lands in a file of its own
    dense_module.prepare_dense(model, data, tmp_path, 0, task=l1)
    assert [p.name for p in tmp_path.iterdir()] == \
        [dense_module.cache_path(model, data, tmp_path, 0, l1).name]
