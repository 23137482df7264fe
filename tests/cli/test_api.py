"""The Python API end to end: a dict config searched, read back, exported and loaded, on the
same storage and MLflow store the CLI uses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import autosparse
from autosparse.api import API_CONFIGS, config_file
from autosparse.config.validation import ConfigError

ROOT = Path(__file__).resolve().parents[2]

CONFIG = {
    "name": "api-tiny",
    "seed": 0,
    "model": {"builtin": "digits-cnn", "train_epochs": 4},
    "data": {"source": "sklearn-digits"},
    "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured", "channel"],
                          "bits": [4, 8, 32]}},
    "strategy": {"name": "ga", "population_size": 4},
    "budget": {"trials": 3},
    "constraints": ["accuracy_drop <= 30"],
    "finetune": {"steps": 5},
}


def test_importing_autosparse_is_light():
    code = "import sys, autosparse; print(sorted({'torch', 'optuna', 'mlflow'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_bad_dict_config_names_the_field_and_writes_nothing(tmp_path):
    bad = {**CONFIG, "budget": {"trials": "many"}}
    with pytest.raises(ConfigError, match="budget.trials"):
        autosparse.run_search(bad, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ConfigError, match="not found"):
        autosparse.run_search(tmp_path / "missing.yaml", runs_dir=tmp_path / "runs")


def test_a_dict_config_is_written_once_by_content(tmp_path):
    first = config_file(CONFIG, tmp_path)
    assert first.parent == tmp_path / API_CONFIGS
    assert yaml.safe_load(first.read_text()) == CONFIG
    assert config_file(dict(CONFIG), tmp_path) == first
    other = config_file({**CONFIG, "seed": 1}, tmp_path)
    assert other != first and first.is_file() and other.is_file()


def test_load_refuses_what_is_not_an_exported_model(tmp_path):
    with pytest.raises(FileNotFoundError):
        autosparse.load(tmp_path)  # a folder without model.pt2
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not an exported model"):
        autosparse.load(tmp_path / "notes.txt")
    (tmp_path / "model.packed").write_bytes(b"")
    with pytest.raises(ValueError, match="not an autosparse packed checkpoint"):
        autosparse.load(tmp_path / "model.packed")


@pytest.mark.integration
def test_a_dict_config_searched_and_read_back_through_the_api_and_the_cli(tmp_path, monkeypatch):
    """run_search on a dict, then open_search and ``autosparse front`` on the same storage.
    Export and load are run by docs/python-api.md's notebook (tests/test_docs.py)."""
    monkeypatch.chdir(tmp_path)
    lines: list[str] = []
    result = autosparse.run_search(CONFIG, runs_dir="runs", printer=lines.append)
    assert result.new_trials == 3 and len(result.study.trials) == 3
    assert not result.front.empty and set(result.front["trial"]) <= set(result.trials["trial"])
    assert any("dense model" in line for line in lines)
    assert (tmp_path / "runs" / "api-tiny" / "study.db").is_file()

    cli = subprocess.run([sys.executable, "-m", "autosparse.cli", "front", str(result.config_path)],
                         capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 0, cli.stderr
    shown = {line.split()[0] for line in cli.stdout.splitlines() if line.strip()}
    assert {str(int(n)) for n in result.front["trial"]} <= shown

    again = autosparse.open_search(CONFIG, runs_dir="runs")
    assert again.new_trials == 0 and again.config_path == result.config_path
    assert list(again.front["trial"]) == list(result.front["trial"])
    with pytest.raises(ConfigError, match="give one of"):
        result.export(trial=0, knee=True)
