"""A tiny real search's config and what it leaves behind (study, MLflow runs), shared by the
integration tests of several stages."""

from __future__ import annotations

import hashlib
from pathlib import Path

import mlflow
import optuna
import yaml

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "model": {"builtin": "digits-cnn", "train_epochs": 4},
    "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured", "channel", "2:4"],
                          "bits": [4, 8, 32]}},
    "strategy": {"name": "ga", "population_size": 4},
    "budget": {"trials": 6},
    "constraints": ["accuracy_drop <= 30"],
    "finetune": {"steps": 8},
}


def write_config(directory: Path, name: str, **changes) -> Path:
    config = {"name": name, **BASE}
    for key, value in changes.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def load_study(runs_dir: Path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{runs_dir / name / 'study.db'}")


def mlflow_runs(runs_dir: Path, experiment: str):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("autosparse.role") == "search"]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (a study, the MLflow store, the dense cache,
    exports) and the folders themselves. SQLite's ``-shm`` files are left out: a shared-memory
    index that any reader rewrites (the data, ``-wal`` included, is hashed)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder"
            for p in sorted(folder.rglob("*")) if not p.name.endswith("-shm")}
