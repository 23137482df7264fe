"""Config validation: every error names the field, the bad value and what is allowed."""

from pathlib import Path

import pytest

from autosparse.config.schema import ConfigError, load_config, parse_config

BASE = {"name": "t", "model": {"builtin": "digits-cnn"}}


def _error(**changes) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, **changes})
    return str(info.value)


def test_defaults_are_valid():
    cfg = parse_config(BASE)
    assert cfg.strategy.name == "hybrid" and cfg.objectives == ["accuracy", "size"]
    assert cfg.objective_directions() == ["maximize", "minimize"]


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"strategy": {"use_sensitivity": False}}, ["strategy", "use_sensitivity false", "'hybrid' (the default)", "set name: ga"]),
        ({"strategy": {"name": "gaa"}}, ["strategy.name", "'ga', 'bo', 'knapsack', 'hybrid', 'random', 'grid-uniform' or 'grid-global'", "gaa"]),
        ({"objectives": ["accuracy", "speed"]}, ["objectives", "speed", "allowed: accuracy, size, macs, bops, latency, energy"]),
        ({"objectives": ["accuracy", "latency"]}, ["latency_ms needs a target device", "hardware", "x86-server-vnni"]),
        ({"constraints": ["energy_uj <= 2"]}, ["energy_uj needs a target device"]),
        ({"hardware": "tpu-v9"}, ["hardware", "tpu-v9", "neither a built-in profile", "gpu-h100"]),
        ({"objectives": ["size", "macs"]}, ["must include 'accuracy'"]),
        ({"model": {"builtin": "resnet"}}, ["model.builtin", "digits-cnn", "resnet"]),
        ({"model": {"factory": "no colon"}}, ["package.module:function"]),
        ({"model": {}}, ["exactly one of 'builtin'"]),
        ({"space": {"default": {"bits": [1, 8]}}}, ["space.default.bits", "[1]", "2 to 16, or 32"]),
        ({"space": {"default": {"patterns": ["3:3"]}}}, ["space.default.patterns", "N:M"]),
        ({"space": {"default": {"sparsity": [0.5, 1.2]}}}, ["sparsity", "1.2", "[0, 1)"]),
        ({"space": {"rules": [{"layers": ["conv[1"]}]}}, ["space.rules[0].layers", "not a valid regex"]),
        ({"constraints": ["latency <= 2"]}, ["constraint metric 'latency'", "accuracy_drop"]),
        ({"constraints": ["accuracy drop < 1"]}, ["metric <= number"]),
        ({"data": {"source": "npz"}}, ["data", "needs 'path'"]),
        ({"data": {"split": {"train": 0.5, "validation": 0.2, "test": 0.2}}}, ["sum to 1"]),
        ({"budget": {"trials": None, "minutes": None}}, ["'trials', 'minutes'"]),
        ({"finetune": {"steps": -1}}, ["finetune.steps", "-1"]),
        ({"strategy": {"population": 8}}, ["strategy.population", "unknown field"]),
    ],
)
def test_bad_config_names_field_value_and_allowed(changes, expected):
    message = _error(**changes)
    for piece in expected:
        assert piece in message, message


def test_constraints_parse_to_optuna_convention():
    cfg = parse_config({**BASE, "constraints": ["accuracy_drop <= 1.0", "accuracy >= 90"]})
    drop, acc = cfg.constraints
    assert drop.violation(0.5) < 0 < drop.violation(1.5)
    assert acc.violation(95) < 0 < acc.violation(80)
    assert str(drop) == "accuracy_drop <= 1"


def test_sparsity_range_expands():
    cfg = parse_config({**BASE, "space": {"default": {"sparsity": {"low": 0.0, "high": 0.9, "step": 0.3}}}})
    assert cfg.space.default.sparsity_values() == [0.0, 0.3, 0.6, 0.9]


def test_missing_file_and_bad_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("just a string")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_every_shipped_config_validates():
    configs = sorted(Path(__file__).parents[2].joinpath("search_spaces").glob("*.yaml"))
    assert configs, "search_spaces/ ships example configs"
    for path in configs:
        load_config(path)
