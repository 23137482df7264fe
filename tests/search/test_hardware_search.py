"""A tiny real search against a hardware profile: latency and energy as objectives and a
constraint, per-layer costs on every trial, the profile logged with the search, and a changed
profile refused on resume."""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

from autosparse.config.schema import ConfigError
from autosparse.search.runner import run_search

pytestmark = pytest.mark.integration
LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


def test_search_on_a_hardware_profile(tmp_path):
    runs_dir = tmp_path / "runs"
    profile_path = tmp_path / "my-a76.yaml"
    shutil.copy(str(resources.files("autosparse.config.profiles") / "edge-arm-a76.yaml"), profile_path)
    config = {
        "name": "hw-search",
        "model": {"builtin": "digits-cnn", "train_epochs": 1},
        "hardware": str(profile_path),
        "space": {"default": {"sparsity": [0.0, 0.5, 0.8],
                              "patterns": ["unstructured", "channel"], "bits": [8, 32]}},
        "strategy": {"name": "ga", "population_size": 4},
        "budget": {"trials": 4},
        "objectives": ["accuracy", "latency", "energy"],
        "constraints": ["latency_ms <= 50"],  # loose: a digits-cnn takes well under 1 ms here
        "finetune": {"steps": 4},
    }
    config_path = tmp_path / "hw-search.yaml"
    config_path.write_text(yaml.safe_dump(config))

    outcome = run_search(config_path, runs_dir=runs_dir, printer=lambda line: None)

    trials = outcome.trials
    assert len(trials) == 4 and (trials["state"] == "COMPLETE").all()
    assert trials["feasible"].all()
    for column in ("latency_ms", "energy_uj"):
        assert (trials[column] > 0).all(), column
    for layer in LAYERS:
        assert (trials[f"layer_latency_us.{layer}"] > 0).all(), layer
        assert (trials[f"layer_energy_uj.{layer}"] > 0).all(), layer
    # per-layer figures add up to the total with the fixed per-inference part on top
    layer_sum_ms = trials[[f"layer_latency_us.{layer}" for layer in LAYERS]].sum(axis=1) / 1e3
    assert (layer_sum_ms < trials["latency_ms"]).all()
    assert (trials["latency_ms"] - layer_sum_ms < 0.1).all()

    pareto = pd.read_csv(runs_dir / "hw-search" / "pareto.csv")
    assert {"latency_ms", "energy_uj"} <= set(pareto.columns) and len(pareto) >= 1
    saved = pd.read_csv(runs_dir / "hw-search" / "trials.csv")
    assert "layer_latency_us.conv2" in saved.columns

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("hw-search")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("autosparse.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 4
    parent = parents[0]
    assert parent.data.params["hardware"] == str(profile_path)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"hardware_profile.yaml", "dense_cost.csv"} <= artifacts
    logged = Path(client.download_artifacts(parent.info.run_id, "hardware_profile.yaml",
                                            str(tmp_path / "dl")))
    assert yaml.safe_load(logged.read_text())["name"] == "edge-arm-a76"
    dense_cost = pd.read_csv(client.download_artifacts(parent.info.run_id, "dense_cost.csv",
                                                       str(tmp_path / "dl")))
    assert dense_cost["layer"].tolist() == list(LAYERS)
    assert {"latency_us", "energy_uj", "bound", "accelerated"} <= set(dense_cost.columns)
    child_metrics = children[0].data.metrics
    assert "latency_ms" in child_metrics and "energy_uj" in child_metrics
    assert any(key.startswith("layer_latency_us") for key in child_metrics)

    # The same profile resumes (nothing left to run); an edited one makes every stored latency
    # stale, so resuming is refused.
    again = run_search(config_path, runs_dir=runs_dir, printer=lambda line: None)
    assert again.new_trials == 0 and len(again.trials) == 4
    text = profile_path.read_text()
    assert "model_overhead_us: 10.0" in text
    profile_path.write_text(text.replace("model_overhead_us: 10.0", "model_overhead_us: 12.0"))
    stat = profile_path.stat()
    os.utime(profile_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # beat the cache
    with pytest.raises(ConfigError, match="hardware profile"):
        run_search(config_path, runs_dir=runs_dir, printer=lambda line: None)
