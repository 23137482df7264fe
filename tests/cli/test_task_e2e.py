"""A regression model and a tiny language model searched end to end: their metric (mse,
perplexity) and its direction in the study, the front, the files and MLflow."""

from __future__ import annotations

from pathlib import Path

import mlflow
import optuna
import pytest
import torch
import yaml

from autosparse.config.schema import load_config
from autosparse.search.runner import run_search

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def tiny(name: str, directory: Path, **changes) -> Path:
    """The shipped example config with a short dense training and a 4-trial search."""
    config = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    config.update(name=f"{name}-e2e", budget={"trials": 4},
                  strategy={"name": "ga", "population_size": 4},
                  finetune={"steps": 8, "reeval_seeds": 1}, **changes)
    config["model"]["train_epochs"] = 4
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def mlflow_runs(runs_dir: Path, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("autosparse.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def check_search(runs_dir: Path, config_path: Path, metric: str):
    torch.set_num_threads(1)
    outcome = run_search(config_path, runs_dir=runs_dir, printer=lambda line: None)
    name = load_config(config_path).name
    assert len(outcome.trials) == 4 and (outcome.trials["state"] == "COMPLETE").all()
    for frame in (outcome.trials, outcome.front):
        assert metric in frame and "metric_drop" in frame and "accuracy" not in frame
    assert not outcome.front.empty

    study = optuna.load_study(study_name=name,
                              storage=f"sqlite:///{runs_dir / name / 'study.db'}")
    assert study.directions == [optuna.study.StudyDirection.MINIMIZE] * 2
    assert study.metric_names == [metric, "size_kb"]
    header = (runs_dir / name / "pareto.csv").read_text().splitlines()[0].split(",")
    assert metric in header and "metric_drop" in header

    parents, children = mlflow_runs(runs_dir, name)
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert f"dense_{metric}" in parent.data.metrics and "dense_accuracy" not in parent.data.metrics
    assert parent.data.params["metric"] == metric
    assert parent.data.params["metric_direction"] == "minimize"
    for child in children:
        assert metric in child.data.metrics and "metric_drop" in child.data.metrics
        assert "accuracy" not in child.data.metrics
    artifacts = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    files = {f.path for f in artifacts.list_artifacts(parent.info.run_id)}
    assert {"pareto.csv", "trials.csv"} <= files
    return outcome


def test_regression_search_minimises_mse_end_to_end(tmp_path):
    config = tiny("diabetes-regression", tmp_path)
    outcome = check_search(tmp_path, config, "mse")
    front = outcome.front
    # the front trades mse against size: along increasing size, mse never gets worse
    ordered = front.sort_values("size_kb")
    assert (ordered["mse"].diff().dropna() <= 1e-12).all()
    # re-evaluated front points show their spread and test score under the task's names
    assert {"mse_std", "test_mse"} <= set(front.columns)
    # a minimised metric: the drop is candidate minus dense
    dense = outcome.trials["mse"] - outcome.trials["metric_drop"]
    assert dense.nunique() == 1 and 0 < dense.iloc[0] < 1.0  # better than predicting the mean
    # export of these tasks: tests/export/test_task_export.py


def test_tiny_language_model_search_minimises_perplexity_end_to_end(tmp_path):
    config = tiny("tiny-lm", tmp_path)
    outcome = check_search(tmp_path, config, "perplexity")
    dense = float((outcome.trials["perplexity"] - outcome.trials["metric_drop"]).iloc[0])
    assert 1.0 < dense < 32.0  # learned something of the chain (uniform guessing: 32)


def test_a_transformers_gpt2_returning_logits_objects_is_searched(tmp_path):
    """transformers' causal LM returns an output object (``.logits``) and stores its weights
    as ``Conv1D``: the search scores its perplexity all the same."""
    torch.set_num_threads(1)
    config = {"name": "gpt2-e2e", "model": {"factory": "autosparse.workload.task_builtins:tiny_gpt2"},
              "data": {"source": "synthetic-tokens"}, "task": {"kind": "language-model"},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [8, 32]}},
              "strategy": {"name": "random"}, "budget": {"trials": 3},
              "objectives": ["perplexity", "size"], "finetune": {"steps": 20, "reeval_seeds": 0}}
    path = tmp_path / "gpt2.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_search(path, runs_dir=tmp_path, printer=lambda line: None)
    assert (outcome.trials["state"] == "COMPLETE").all()
    dense = outcome.trials["perplexity"] - outcome.trials["metric_drop"]
    assert dense.iloc[0] == pytest.approx(32.0, rel=0.05)  # random init: about uniform
    assert (outcome.trials["perplexity"] < dense).all()  # 20 steps already learn some chain
