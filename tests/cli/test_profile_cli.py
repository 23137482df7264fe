"""``autosparse profile``: per-layer predicted cost of a candidate, and its error messages.

Every test prepares a real (briefly trained, cached) dense digits-cnn in one shared runs
directory, so the module is integration-marked; only the trial-N test runs a search.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from autosparse.cli import main
from autosparse.config.hardware import builtin_profiles
from autosparse.search.runner import run_search
from autosparse.space.candidate import Candidate, LayerChoice

pytestmark = pytest.mark.integration
LAYERS = ("conv1", "conv2", "conv3", "fc1", "fc2")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("profile-runs")


def write_config(directory: Path, name: str, **extra) -> Path:
    config = {"name": name, "model": {"builtin": "digits-cnn", "train_epochs": 1}, **extra}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def profile(runs_dir: Path, *args: str) -> int:
    return main(["--runs-dir", str(runs_dir), "profile", *args])


def rows(out: str) -> dict[str, str]:
    """Layer name -> its line of the printed table."""
    found = {}
    for line in out.splitlines():
        words = line.split()
        if words and words[0] in LAYERS:
            found[words[0]] = line
    return found


def test_dense_on_a_named_profile_prints_rows_and_totals(runs_dir, capsys):
    config = write_config(runs_dir, "plain")
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100") == 0
    out = capsys.readouterr().out
    assert out.startswith("hardware: gpu-h100\n") and "(measured)" not in out
    header = next(line for line in out.splitlines() if line.split()[:1] == ["layer"])
    for column in ("kind", "choice", "runs_on", "macs", "latency_us", "energy_uj", "bound",
                   "accelerated"):
        assert column in header.split()
    table = rows(out)
    assert set(table) == set(LAYERS)
    for line in table.values():
        assert "dense/fp32" in line and line.split()[-1] == "-"  # nothing to accelerate
    assert "fixed per inference" in out
    assert "total: latency" in out and "ms" in out and "µJ" in out and "stored size" in out


def test_config_hardware_is_the_default(runs_dir, capsys):
    config = write_config(runs_dir, "with-hw", hardware="edge-arm-a76")
    assert profile(runs_dir, str(config)) == 0
    assert capsys.readouterr().out.startswith("hardware: edge-arm-a76\n")
    # --hardware overrides the config's
    assert profile(runs_dir, str(config), "--hardware", "mcu-cortex-m7") == 0
    assert capsys.readouterr().out.startswith("hardware: mcu-cortex-m7\n")


def test_candidate_json_file(runs_dir, tmp_path, capsys):
    config = write_config(runs_dir, "json-cand")
    candidate = Candidate({"conv2": LayerChoice.make("2:4", 0.5, 8),
                           "fc1": LayerChoice.make("channel", 0.5, 32)})
    path = tmp_path / "candidate.json"
    path.write_text(candidate.to_json())
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate", str(path)) == 0
    table = rows(capsys.readouterr().out)
    assert "2:4/int8" in table["conv2"] and "int8" in table["conv2"].split()[3]
    assert "channel 50%/fp32" in table["fc1"]
    assert table["fc1"].split()[-1] == "yes"  # channel pruning always shrinks the dense layer
    assert "dense/fp32" in table["conv1"]


def test_bad_candidate_files_are_clear_errors(runs_dir, tmp_path, capsys):
    config = write_config(runs_dir, "bad-cand")
    unknown = tmp_path / "unknown.json"
    unknown.write_text(Candidate({"nope": LayerChoice.make("dense", 0, 8)}).to_json())
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate",
                   str(unknown)) == 2
    assert "does not have" in (err := capsys.readouterr().err) and "nope" in err
    broken = tmp_path / "broken.json"
    broken.write_text('{"conv1": {"pattern": "dense"}}')
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate",
                   str(broken)) == 2
    assert "not a valid candidate" in capsys.readouterr().err


def test_nonsense_candidate_is_exit_2(runs_dir, capsys):
    config = write_config(runs_dir, "nonsense")
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate",
                   "nonsense") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "'nonsense'" in err
    assert "dense" in err and "trial-N" in err and "JSON file" in err
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate",
                   "trial-x") == 2
    assert "trial-N with N a number" in capsys.readouterr().err


def test_trial_reference_without_a_study_says_to_search_first(runs_dir, capsys):
    config = write_config(runs_dir, "no-study")
    assert profile(runs_dir, str(config), "--hardware", "gpu-h100", "--candidate",
                   "trial-0") == 2
    assert "autosparse search" in capsys.readouterr().err


def test_missing_hardware_names_the_builtin_profiles(runs_dir, capsys):
    config = write_config(runs_dir, "no-hw")
    assert profile(runs_dir, str(config)) == 2
    err = capsys.readouterr().err
    assert "--hardware" in err
    for name in builtin_profiles():
        assert name in err


def test_unknown_hardware_is_exit_2(runs_dir, tmp_path, capsys):
    config = write_config(runs_dir, "unknown-hw")
    assert profile(runs_dir, str(config), "--hardware", str(tmp_path / "nope.yaml")) == 2
    err = capsys.readouterr().err
    assert "nope.yaml" in err and "gpu-h100" in err


def test_trial_candidates_after_a_tiny_search(runs_dir, capsys):
    config = write_config(runs_dir, "searched", hardware="gpu-h100",
                          strategy={"name": "random"}, budget={"trials": 2},
                          finetune={"steps": 3},
                          space={"default": {"sparsity": [0.5], "patterns": ["unstructured"],
                                             "bits": [8]}})
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    assert len(outcome.trials) == 2
    text = outcome.trials.set_index("trial").loc[1, "candidate"]
    candidate = Candidate.from_json(text)
    assert candidate, "the space has one choice per layer: every layer is listed"
    capsys.readouterr()
    assert profile(runs_dir, str(config), "--candidate", "trial-1") == 0
    table = rows(capsys.readouterr().out)
    for name, choice in candidate.items():
        assert choice.describe() in table[name], name
    assert profile(runs_dir, str(config), "--candidate", "trial-999") == 2
    err = capsys.readouterr().err
    assert "no trial 999" in err and "2 trials" in err
