"""A corpus of malformed configs and command lines: every one is a clear one-line error.

Each case runs the real command line in-process and asserts: exit code 2, exactly one line on
stderr starting ``error:`` that names the field (or flag) and the bad value, no traceback, and
nothing written (the runs folder stays empty, the working folder unchanged). Config checks that
need the model's layers run on an untrained copy, so no dense model is trained or cached first.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import yaml

from autosparse.cli import main

BASE = {
    "name": "bad",
    "model": {"builtin": "digits-cnn", "train_epochs": 1},
    "data": {"source": "sklearn-digits", "split": {"train": 0.6, "validation": 0.2, "test": 0.2}},
    "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured", "channel"],
                          "bits": [8, 32]}},
    "strategy": {"name": "ga", "population_size": 4},
    "budget": {"trials": 4},
    "objectives": ["accuracy", "size"],
    "constraints": ["accuracy_drop <= 5"],
    "finetune": {"steps": 5},
}


def _set(config: dict, dotted: str, value) -> dict:
    """A copy of ``config`` with ``a.b.c`` set (``value is DELETE`` removes it)."""
    out = copy.deepcopy(config)
    *path, last = dotted.split(".")
    node = out
    for key in path:
        node = node.setdefault(key, {})
    if value is DELETE:
        node.pop(last, None)
    else:
        node[last] = value
    return out


DELETE = object()

# (case id, dotted field, bad value, words the one-line message must contain)
FIELD_CASES = [
    ("top-typo", "budjet", {"trials": 3}, ["budjet"]),
    ("name-empty", "name", "", ["name"]),
    ("name-slash", "name", "a/b", ["name", "a/b"]),
    ("seed-str", "seed", "zero", ["seed", "zero"]),
    ("model-missing", "model", DELETE, ["model"]),
    ("builtin-unknown", "model.builtin", "resnet50", ["model.builtin", "resnet50", "digits-cnn"]),
    ("builtin-typo", "model.builtin", "digits-cnm", ["digits-cnm", "digits-cnn"]),
    ("builtin-and-factory", "model.factory", "pkg.mod:make", ["model", "factory"]),
    ("epochs-zero", "model.train_epochs", 0, ["train_epochs", "0"]),
    ("epochs-negative", "model.train_epochs", -3, ["train_epochs", "-3"]),
    ("epochs-str", "model.train_epochs", "many", ["train_epochs", "many"]),
    ("model-typo", "model.buitin", "digits-cnn", ["buitin"]),
    ("checkpoint-missing", "model.checkpoint", "/nonexistent/w.pt", ["/nonexistent/w.pt"]),
    ("builtin-kwargs", "model.kwargs", {"width": 3}, ["kwargs"]),
    ("data-source", "data.source", "imagenet", ["data.source", "imagenet"]),
    ("data-typo", "data.sorce", "sklearn-digits", ["sorce"]),
    ("split-sum", "data.split", {"train": 0.6, "validation": 0.6, "test": 0.2}, ["split"]),
    ("split-negative", "data.split", {"train": 1.2, "validation": -0.4, "test": 0.2}, ["split"]),
    ("split-missing-test", "data.split", {"train": 0.8, "validation": 0.2}, ["split"]),
    ("npz-missing", "data", {"source": "npz", "path": "/nonexistent/d.npz"},
     ["/nonexistent/d.npz"]),
    ("sparsity-high", "space.default.sparsity", [0.0, 1.5], ["sparsity", "1.5"]),
    ("sparsity-negative", "space.default.sparsity", [-0.1], ["sparsity", "-0.1"]),
    ("sparsity-str", "space.default.sparsity", ["half"], ["sparsity", "half"]),
    ("sparsity-empty", "space.default.sparsity", [], ["sparsity"]),
    ("pattern-unknown", "space.default.patterns", ["blocky"], ["patterns", "blocky"]),
    ("pattern-nm-bad", "space.default.patterns", ["4:2"], ["patterns", "4:2"]),
    ("pattern-nm-zero", "space.default.patterns", ["0:4"], ["patterns", "0:4"]),
    ("pattern-typo", "space.default.patterns", ["unstructred"], ["unstructred", "unstructured"]),
    ("patterns-empty", "space.default.patterns", [], ["patterns"]),
    ("bits-one", "space.default.bits", [1], ["bits", "1"]),
    ("bits-64", "space.default.bits", [64], ["bits", "64"]),
    ("bits-20", "space.default.bits", [8, 20], ["bits", "20"]),
    ("bits-str", "space.default.bits", ["int8"], ["bits", "int8"]),
    ("criterion", "space.default.criterion", ["random"], ["criterion", "random"]),
    ("space-typo", "space.defualt", {}, ["defualt"]),
    ("rule-no-match", "space.rules", [{"layers": ["convv1"], "bits": [8]}],
     ["space.rules[0].layers", "convv1", "conv1"]),
    ("rule-bad-regex", "space.rules", [{"layers": ["conv[1"], "bits": [8]}], ["conv[1"]),
    ("rule-no-layers", "space.rules", [{"bits": [8]}], ["layers"]),
    ("exclude-no-match", "space.exclude", ["fc9"], ["space.exclude", "fc9"]),
    ("include-no-match", "space.include", ["head"], ["space.include", "head"]),
    ("exclude-all", "space.exclude", [".*"], ["no layer left"]),
    ("strategy-name", "strategy.name", "annealing", ["strategy.name", "annealing", "ga"]),
    ("strategy-typo", "strategy.name", "bayes", ["bayes"]),
    ("population-small", "strategy.population_size", 2, ["population_size", "2"]),
    ("crossover-high", "strategy.crossover_prob", 1.5, ["crossover_prob", "1.5"]),
    ("mutation-negative", "strategy.mutation_prob", -0.1, ["mutation_prob", "-0.1"]),
    ("bo-kind", "strategy.bo_kind", "forest", ["bo_kind", "forest"]),
    ("startup-zero", "strategy.startup_trials", 0, ["startup_trials", "0"]),
    ("strategy-field", "strategy.populaton_size", 8, ["populaton_size"]),
    ("trials-zero", "budget.trials", 0, ["trials", "0"]),
    ("trials-negative", "budget.trials", -5, ["trials", "-5"]),
    ("trials-str", "budget.trials", "lots", ["trials", "lots"]),
    ("minutes-negative", "budget.minutes", -1, ["minutes", "-1"]),
    ("steps-budget-zero", "budget.finetune_steps", 0, ["finetune_steps", "0"]),
    ("budget-typo", "budget.trails", 5, ["trails"]),
    ("objective-unknown", "objectives", ["accuracy", "speed"], ["objectives", "speed"]),
    ("objective-typo", "objectives", ["accuracy", "sise"], ["sise", "size"]),
    ("objective-one", "objectives", ["accuracy"], ["objectives"]),
    ("objective-dup", "objectives", ["accuracy", "size", "size"], ["size"]),
    ("objective-latency-no-hw", "objectives", ["accuracy", "latency"], ["latency_ms",
                                                                        "hardware"]),
    ("objective-energy-no-hw", "objectives", ["accuracy", "energy"], ["energy_uj", "hardware"]),
    ("objective-unit", "objectives", ["accuracy", "latency_ms"], ["latency_ms", "latency"]),
    ("constraint-syntax", "constraints", ["accuracy_drop < < 5"], ["accuracy_drop < < 5"]),
    ("constraint-metric", "constraints", ["speed <= 5"], ["speed"]),
    ("constraint-value", "constraints", ["accuracy_drop <= lots"], ["lots"]),
    ("constraint-impossible-drop", "constraints", ["accuracy_drop <= -150"], ["accuracy_drop",
                                                                             "-150"]),
    ("constraint-impossible-acc", "constraints", ["accuracy >= 150"], ["accuracy", "150"]),
    ("constraint-impossible-size", "constraints", ["size_kb <= 0"], ["size_kb", "0"]),
    ("constraint-latency-no-hw", "constraints", ["latency_ms <= 1"], ["latency_ms", "hardware"]),
    ("constraint-not-list", "constraints", "accuracy_drop <= 5", ["constraints"]),
    ("finetune-steps-str", "finetune.steps", "few", ["steps", "few"]),
    ("finetune-steps-negative", "finetune.steps", -5, ["steps", "-5"]),
    ("finetune-lr-negative", "finetune.lr", -0.1, ["lr", "-0.1"]),
    ("finetune-lr-str", "finetune.lr", "fast", ["lr", "fast"]),
    ("finetune-batch-zero", "finetune.batch_size", 0, ["batch_size", "0"]),
    ("finetune-distill-high", "finetune.distill_weight", 1.5, ["distill_weight", "1.5"]),
    ("finetune-temperature-zero", "finetune.temperature", 0, ["temperature", "0"]),
    ("finetune-reeval-negative", "finetune.reeval_seeds", -1, ["reeval_seeds", "-1"]),
    ("finetune-typo", "finetune.stpes", 5, ["stpes"]),
    ("hardware-unknown", "hardware", "tpu-v9", ["tpu-v9"]),
    ("hardware-typo", "hardware", "edge-arm-a67", ["edge-arm-a67", "edge-arm-a76"]),
    ("storage-typo", "storage", "sqlite//runs/x.db", ["storage", "sqlite//runs/x.db"]),
    ("storage-scheme", "storage", "mongodb://host/db", ["storage", "mongodb"]),
    ("storage-unwritable", "storage", "sqlite:////etc/hostname/x.db", ["storage", "/etc/hostname"]),
    ("tracking-typo", "tracking.url", "sqlite:///x.db", ["url"]),
    ("tracking-scheme", "tracking.uri", "ftp://host/x", ["tracking.uri", "ftp"]),
    ("export-steps-negative", "export.finetune_steps", -5, ["finetune_steps", "-5"]),
    ("export-typo", "export.finetune_step", 5, ["finetune_step"]),
]

# (case id, argv after `autosparse --runs-dir RUNS`, words); CONFIG is the valid base config
CLI_CASES = [
    ("workers-zero", ["search", "CONFIG", "--workers", "0"], ["--workers", "0"]),
    ("workers-negative", ["search", "CONFIG", "--workers", "-2"], ["--workers", "-2"]),
    ("threads-zero", ["search", "CONFIG", "--threads", "0"], ["--threads", "0"]),
    ("extend-negative", ["search", "CONFIG", "--extend", "-5"], ["--extend", "-5"]),
    ("config-missing", ["search", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml"]),
    ("config-directory", ["search", "DIR"], ["is a directory"]),
    ("space-missing", ["space", "/nonexistent/c.yaml"], ["/nonexistent/c.yaml"]),
    ("front-never-searched", ["front", "CONFIG"], ["no study", "autosparse search"]),
    ("export-no-study", ["export", "CONFIG", "--knee"], ["no study", "autosparse search"]),
    ("export-steps-negative", ["export", "CONFIG", "--trial", "0", "--finetune-steps", "-5"],
     ["--finetune-steps", "-5"]),
    ("export-two-rules", ["export", "CONFIG", "--trial", "0", "--knee"], ["one of --trial"]),
    ("ui-port-high", ["ui", "--port", "99999"], ["--port", "99999"]),
    ("ui-port-zero", ["ui", "--port", "0"], ["--port", "0"]),
    ("profile-no-hardware", ["profile", "CONFIG"], ["hardware"]),
    ("calibrate-share", ["calibrate", "--fit-share", "1.5"], ["--fit-share", "1.5"]),
]

FILE_CASES = [
    ("yaml-syntax", "name: [unclosed\n", ["YAML"]),
    ("yaml-list", "- a\n- b\n", ["mapping"]),
    ("yaml-empty", "", ["empty"]),
    ("yaml-scalar", "just a string\n", ["mapping"]),
    ("binary", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", ["UTF-8"]),
]


def _snapshot(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


def _run(argv: list[str], tmp_path: Path, capsys, monkeypatch) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = _snapshot(tmp_path)
    runs = tmp_path / "runs"
    code = main(["--runs-dir", str(runs), *argv])
    err = capsys.readouterr().err
    after = _snapshot(tmp_path)
    assert after == before, f"files written: {sorted(after - before)}"
    return code, err


def _check(code: int, err: str, words: list[str]) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])


@pytest.mark.parametrize("case,field,value,words", FIELD_CASES, ids=[c[0] for c in FIELD_CASES])
def test_bad_config_field(case, field, value, words, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_set(BASE, field, value)))
    code, err = _run(["search", str(config)], tmp_path, capsys, monkeypatch)
    _check(code, err, words)


@pytest.mark.parametrize("case,argv,words", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_command_line(case, argv, words, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(BASE))
    (tmp_path / "d").mkdir()
    argv = [str(config) if a == "CONFIG" else str(tmp_path / "d") if a == "DIR" else a
            for a in argv]
    code, err = _run(argv, tmp_path, capsys, monkeypatch)
    _check(code, err, words)


@pytest.mark.parametrize("case,content,words", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_config_file(case, content, words, tmp_path, capsys, monkeypatch):
    config = tmp_path / "c.yaml"
    if isinstance(content, bytes):
        config.write_bytes(content)
    else:
        config.write_text(content)
    code, err = _run(["search", str(config)], tmp_path, capsys, monkeypatch)
    _check(code, err, words)


def test_the_corpus_is_large():
    assert len(FIELD_CASES) + len(CLI_CASES) + len(FILE_CASES) >= 100
