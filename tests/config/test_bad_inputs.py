"""A corpus of malformed configs and command lines: every one is a clear one-line error.

Each case runs the real command line in-process and asserts: exit code 2, exactly one line on
stderr starting ``error:`` that names the field (or flag) and the bad value, no traceback, and
nothing written (the runs folder stays empty, the working folder unchanged). Config checks that
need the model's layers run on an untrained copy, so no dense model is trained or cached first.
"""

from __future__ import annotations

import copy
import subprocess
import sys
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
    ("split-ranges-overlap", "data.split", {"train": [0, 1000], "validation": [900, 1400],
                                            "test": [1400, 1797]}, ["split", "overlap"]),
    ("split-ranges-mixed", "data.split", {"train": [0, 1000], "validation": 0.2, "test": 0.2},
     ["split", "index ranges"]),
    ("split-range-past-end", "data.split", {"train": [0, 1000], "validation": [1000, 1400],
                                            "test": [1400, 2000]}, ["data.split.test", "1797"]),
    ("factory-no-module", "data", {"factory": "no_such_pkg.loaders:make"},
     ["data.factory", "no_such_pkg.loaders"]),
    ("factory-and-source", "data", {"factory": "pkg.mod:make", "source": "npz"},
     ["factory", "source"]),
    ("factory-kwargs-alone", "data", {"kwargs": {"batch_size": 8}}, ["kwargs", "factory"]),
    ("device-name", "device", "tpu", ["device", "tpu", "cuda:N"]),
    ("device-absent-gpu", "device", "cuda:99", ["cuda:99", "present: cpu"]),
    ("devices-absent-gpu", "devices", [99], ["devices", "no GPU 99", "present: cpu"]),
    ("sparsity-high", "space.default.sparsity", [0.0, 1.5], ["sparsity", "1.5"]),
    ("sparsity-negative", "space.default.sparsity", [-0.1], ["sparsity", "-0.1"]),
    ("sparsity-str", "space.default.sparsity", ["half"], ["sparsity[0]", "half"]),
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
    ("rule-bad-regex", "space.rules", [{"layers": ["conv[1"], "bits": [8]}],
     ["space.rules[0].layers", "conv[1"]),
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
    ("constraint-not-list", "constraints", "accuracy_drop <= 5", ["constraints", "list",
                                                                   "accuracy_drop <= 5"]),
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
    ("space-config-directory", ["space", "DIR"], ["is a directory"]),
    ("export-config-directory", ["export", "DIR"], ["is a directory"]),
    ("front-config-directory", ["front", "DIR"], ["is a directory"]),
    ("calibrate-architecture", ["calibrate", "--architectures", "digits-cnm"],
     ["--architectures", "digits-cnm", "digits-cnn"]),
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



def _torch_save(obj):
    def write(path: Path) -> None:
        import torch

        torch.save(obj() if callable(obj) else obj, path)
    return write


def _truncated_checkpoint(path: Path) -> None:
    import torch

    from autosparse.config.sections import ModelConfig
    from autosparse.workload.models import build_model

    torch.save(build_model(ModelConfig(builtin="digits-cnn"), (1, 8, 8), 10).state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _object_npz(path: Path) -> None:
    import numpy as np

    with path.open("wb") as handle:
        np.savez(handle, x=np.array([[1.0], [2.0, 3.0]], dtype=object), y=np.array([0, 1]))


# Inputs that point at a file: (case id, file name, content (bytes, text or a writer), dotted
# field -> value with FILE for the file's path, words the line must hold, words it must not)
NOT_ADVICE = ["weights_only", "allow_pickle", "pickle.load"]  # never tell a user to lower safety
INPUT_FILE_CASES = [
    ("checkpoint-corrupt", "w.pt", b"this is not a checkpoint\n",
     {"model.checkpoint": "FILE"}, ["model.checkpoint", "w.pt", "not a readable", "state_dict"],
     NOT_ADVICE),
    ("checkpoint-truncated", "w.pt", _truncated_checkpoint, {"model.checkpoint": "FILE"},
     ["model.checkpoint", "w.pt", "not a readable"], NOT_ADVICE),
    ("checkpoint-random-bytes", "w.pt", bytes(range(256)) * 4, {"model.checkpoint": "FILE"},
     ["model.checkpoint", "not a readable"], NOT_ADVICE),
    ("checkpoint-pickled-model", "w.pt", _torch_save(lambda: __import__("torch").nn.Linear(2, 2)),
     {"model.checkpoint": "FILE"}, ["model.checkpoint", "Linear", "state_dict"], NOT_ADVICE),
    ("npz-text-file", "d.npz", "x,y\n1,2\n", {"data": {"source": "npz", "path": "FILE"}},
     ["data.path", "d.npz", "not an npz"], ["pickle"]),
    ("npz-object-array", "d.npz", _object_npz, {"data": {"source": "npz", "path": "FILE"}},
     ["d.npz", "object array"], ["pickle"]),
    ("factory-raises", "h4_raising_factory.py",
     "def make():\n    raise RuntimeError('no weights for this width')\n",
     {"model": {"factory": "h4_raising_factory:make"}},
     ["model.factory", "h4_raising_factory:make", "RuntimeError", "no weights for this width"],
     []),
    ("factory-raises-kwargs", "h4_raising_factory2.py",
     "def make(width=4):\n    return {}[width]\n",
     {"model": {"factory": "h4_raising_factory2:make", "kwargs": {"width": 3}}},
     ["model.factory", "h4_raising_factory2:make", "KeyError", "3"], []),
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


# pydantic's own words for types and union branches: never shown to a user
INTERNALS = ["list[", "dict[", "literal[", "function-", "union[", "json-or-python",
             "pydantic", "validation error for"]


def _check(code: int, err: str, words: list[str]) -> None:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for internal in INTERNALS:
        assert internal not in lines[0].lower(), (internal, lines[0])
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


@pytest.mark.parametrize("case,name,content,fields,words,forbidden", INPUT_FILE_CASES,
                         ids=[c[0] for c in INPUT_FILE_CASES])
def test_bad_input_file(case, name, content, fields, words, forbidden, tmp_path, capsys,
                        monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # a factory module: no __pycache__
    target = tmp_path / name
    if callable(content):
        content(target)
    elif isinstance(content, bytes):
        target.write_bytes(content)
    else:
        target.write_text(content)
    config = BASE
    for field, value in fields.items():
        if isinstance(value, dict):
            value = {k: str(target) if v == "FILE" else v for k, v in value.items()}
        config = _set(config, field, str(target) if value == "FILE" else value)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    code, err = _run(["search", str(tmp_path / "c.yaml")], tmp_path, capsys, monkeypatch)
    _check(code, err, words)
    for word in forbidden:
        assert word.lower() not in err.lower(), (word, err)


# Config checks that need only the file run before torch, optuna, mlflow or pandas is imported
# (they take seconds to import; a typo should cost a fraction of one). A fresh interpreter each.
HEAVY = ("torch", "optuna", "mlflow", "pandas", "onnx")
LIGHT_COMMANDS = [["search", "CONFIG"], ["space", "CONFIG"], ["front", "CONFIG"],
                  ["export", "CONFIG"], ["sensitivity", "CONFIG"], ["profile", "CONFIG"],
                  ["calibrate", "--config", "CONFIG"]]


@pytest.mark.parametrize("argv", LIGHT_COMMANDS, ids=[a[0] for a in LIGHT_COMMANDS])
def test_config_errors_come_before_heavy_imports(argv, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(_set(BASE, "model.builtin", "digits-cnm")))
    args = [str(config) if a == "CONFIG" else a for a in argv]
    probe = ("import sys\nfrom autosparse.cli import main\n"
             f"code = main(['--runs-dir', {str(tmp_path / 'runs')!r}, *{args!r}])\n"
             f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert done.stdout.split("\n")[0] == "2 []", (done.stdout, done.stderr)
    assert "digits-cnm" in done.stderr and "did you mean 'digits-cnn'" in done.stderr


def test_the_corpus_is_large():
    assert len(FIELD_CASES) + len(CLI_CASES) + len(FILE_CASES) + len(INPUT_FILE_CASES) >= 120


@pytest.mark.integration
def test_a_first_generation_all_infeasible_stops_early(tmp_path, capsys, monkeypatch):
    """Not a config error a file alone shows: 8 trials run (and stay in the study), then the
    search stops with exit 2, naming the constraint and the best value seen, not after 40."""
    config = {**BASE, "name": "hopeless", "model": {"builtin": "digits-mlp", "train_epochs": 1},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [8]}},
              "strategy": {"name": "random"}, "budget": {"trials": 40},
              "constraints": ["accuracy_drop <= 90", "size_kb <= 5"],
              "finetune": {"steps": 1, "reeval_seeds": 0}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(["--runs-dir", str(tmp_path / "runs"), "search", str(path)])
    captured = capsys.readouterr()
    progress = [line for line in captured.out.splitlines() if line.startswith("[")]
    assert len(progress) == 8 and progress[-1].startswith("[8/40]"), captured.out
    _check(code, "\n".join(line for line in captured.err.splitlines()
                           if not line.startswith(("training the dense", "dense model"))),
           ["first 8 trials", "size_kb <= 5", "best size_kb seen", "fewer bits"])
