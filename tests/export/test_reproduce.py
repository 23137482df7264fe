"""split.json and reproduce.py: an export's test figures recomputed from the raw data alone.

Two tiny real searches and exports (sklearn digits, a classifier; sklearn diabetes, regression)
run the written ``reproduce.py`` in a subprocess from the export folder: it must print, for every
model file, the report's figure within the stated tolerance and exit 0, and exit 1 when the
report's figure or the split's indices are changed. split.json's test indices, applied to the
raw data with its documented preprocessing, must give exactly the tensors of the search's test
split. The other sources (npz with fixed keys, image folder, text, synthetic tokens) are
checked without a search: the script's own loader, given the split record, rebuilds each split
bit for bit from the raw data.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from mlflow_store import template_db  # noqa: F401 (the session's migrated MLflow database)

from autosparse.config.sections import DataConfig
from autosparse.export import reproduce_script as script
from autosparse.export.exporter import run_export
from autosparse.export.reproduction import (
    FILE_KEYS,
    SCRIPT_FILE,
    SPLIT_FILE,
    split_record,
)
from autosparse.export.request import ExportRequest
from autosparse.search.runner import run_search
from autosparse.workload.data import load_data
from autosparse.workload.splits import SPLITS
from autosparse.workload.task_builtins import markov_tokens

SPACE = {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"], "bits": [8]}}
CONFIGS = {
    "digits": {"model": {"builtin": "digits-cnn", "train_epochs": 2}},
    "diabetes": {"model": {"builtin": "regression-mlp", "train_epochs": 20},
                 "data": {"source": "sklearn-diabetes", "batch_size": 64},
                 "task": {"kind": "regression", "metric": "mse"},
                 "constraints": ["metric_drop <= 10"]},
}


def _export(directory: Path, name: str) -> tuple[Path, Path]:
    """(config, export folder) of a one-trial int8 search of ``CONFIGS[name]``, exported."""
    config = {"name": name, "space": SPACE, "strategy": {"name": "random"},
              "budget": {"trials": 1}, "finetune": {"steps": 4, "reeval_seeds": 0},
              **CONFIGS[name]}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_search(path, runs_dir=directory, printer=lambda line: None)
    outcome = run_export(path, ExportRequest(trial=0, mlflow=False, timing_rounds=2,
                                             timing_calls=2), runs_dir=directory,
                         printer=lambda line: None)
    return path, outcome.out_dir


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request, tmp_path_factory, template_db):  # noqa: F811
    runs = tmp_path_factory.mktemp(f"reproduce-{request.param}")
    shutil.copy(template_db, runs / "mlflow.db")  # no MLflow migrations per search
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        config, out = _export(runs, request.param)
    return request.param, config, out


def reproduce(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT_FILE], cwd=folder, capture_output=True,
                          text=True, timeout=120, check=False)


def printed_figures(stdout: str) -> dict[str, tuple[float, float, str]]:
    """file -> (recomputed, report's, verdict) from reproduce.py's lines."""
    found = {}
    for line in stdout.splitlines():
        match = re.match(r"(\S+)\s+\w+ (\S+)\s+report (\S+)\s+(ok|DIFFERS)", line)
        if match:
            found[match[1]] = (float(match[2]), float(match[3]), match[4])
    return found


@pytest.mark.integration
def test_reproduce_py_recomputes_every_file_from_the_raw_data(exported):
    name, _, out = exported
    report = json.loads((out / "report.json").read_text())
    section = report["reproduce"]
    assert {SPLIT_FILE, SCRIPT_FILE} <= {p.name for p in out.iterdir()}
    assert section["files"] == {f: k for f, k in FILE_KEYS.items() if (out / f).is_file()}
    models = {p.name for p in out.iterdir() if p.name.startswith("model.")}
    assert set(section["files"]) == models, "every model file is re-scored"
    assert {"model.onnx", "model.int8.onnx", "model.pt2", "model.packed"} <= models
    assert report["files_bytes"][SPLIT_FILE] == (out / SPLIT_FILE).stat().st_size

    result = reproduce(out)
    assert result.returncode == 0, result.stdout + result.stderr
    figures = printed_figures(result.stdout)
    key = "test_accuracy" if name == "digits" else "test_mse"
    assert set(figures) == set(section["files"]), result.stdout
    for file, (value, reported, verdict) in figures.items():
        expected = report[key][section["files"][file]]
        assert verdict == "ok" and reported == pytest.approx(expected, rel=1e-5)
        if section["tolerance_unit"] == "points":
            assert abs(value - expected) <= section["tolerance"]
        else:
            assert abs(value - expected) <= section["tolerance"] * abs(expected)
    assert "inputs: bit-identical to the export's" in result.stdout
    assert section["tolerance_unit"] == ("points" if name == "digits" else "relative")

    markdown = (out / "report.md").read_text()
    assert "## Reproduce the test figures" in markdown and "`python reproduce.py`" in markdown
    assert "- split: " in markdown and "- preprocessing: " in markdown
    print(result.stdout)


@pytest.mark.integration
def test_split_json_indices_select_the_search_test_split(exported):
    name, config, out = exported
    record = json.loads((out / SPLIT_FILE).read_text())
    data = load_data(DataConfig(**yaml.safe_load(config.read_text()).get("data", {})))
    pre = record["preprocessing"]
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        raw_x = (digits.images.astype(np.float32) / 16.0)[:, None]
        raw_y = digits.target
        assert pre["normalise"] == "per-channel" and len(pre["mean"]) == 1
    else:
        from sklearn.datasets import load_diabetes

        raw_x, raw_y = (a.astype(np.float32) for a in load_diabetes(return_X_y=True))
        raw_y = (raw_y[:, None] - pre["target"]["mean"]) / pre["target"]["std"]
    mean = np.asarray(pre["mean"], np.float32).reshape(1, -1, *[1] * (raw_x.ndim - 2))
    std = np.asarray(pre["std"], np.float32).reshape(mean.shape)
    seen = []
    for split in SPLITS:
        index = np.asarray(record["splits"][split]["indices"])
        x, y = data.split(split).tensors
        assert record["splits"][split]["samples"] == len(index) == len(y)
        np.testing.assert_array_equal((raw_x[index] - mean) / std, x.numpy())  # bit for bit
        np.testing.assert_array_equal(raw_y[index], y.numpy())
        seen.append(index)
    assert len(np.unique(np.concatenate(seen))) == len(raw_x), "the splits cover the data once"


@pytest.mark.integration
def test_reproduce_py_fails_on_another_figure_or_another_split(exported, tmp_path, monkeypatch,
                                                               capsys):
    """The script's main in this process (the subprocess run above covers the command)."""
    name, _, out = exported
    changed = tmp_path / "changed"
    shutil.copytree(out, changed)
    monkeypatch.setattr(script, "HERE", changed)
    report = json.loads((changed / "report.json").read_text())
    key = "test_accuracy" if name == "digits" else "test_mse"
    report[key]["onnx"] += 1.0
    (changed / "report.json").write_text(json.dumps(report))
    assert script.main([]) == 1
    figures = printed_figures(capsys.readouterr().out)
    assert figures["model.onnx"][2] == "DIFFERS" and figures["model.pt2"][2] == "ok"

    record = json.loads((out / SPLIT_FILE).read_text())
    test, validation = record["splits"]["test"], record["splits"]["validation"]
    test["indices"][0] = validation["indices"][0]  # one sample of another split
    (changed / SPLIT_FILE).write_text(json.dumps(record))
    assert script.main([]) == 1
    assert "not the test samples the export scored" in capsys.readouterr().out


# ------------------------------------------------------------------ the other sources, no search


def rebuilt(cfg: DataConfig, data_path: str | None = None) -> None:
    """The script's loader, given split.json's record, gives every split bit for bit."""
    data = load_data(cfg)
    record = json.loads(json.dumps(split_record(cfg, data)))  # as read back from the file
    for split in SPLITS:
        x, y = script.load_split(record, split, data_path)
        want_x, want_y = data.split(split).tensors
        np.testing.assert_array_equal(x, want_x.numpy())
        np.testing.assert_array_equal(y, want_y.numpy())
    for split in ("validation", "test"):
        x, y = script.load_split(record, split, data_path)
        assert script.sha256([np.ascontiguousarray(y)]) == \
            record["checksums"][split]["targets_sha256"]


def test_npz_with_fixed_keys_and_carved_validation(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.integers(0, 256, (60, 5, 5, 3), dtype=np.uint8),
             y_train=rng.integers(0, 3, 60), x_test=rng.integers(0, 256, (20, 5, 5, 3),
                                                                 dtype=np.uint8),
             y_test=rng.integers(0, 3, 20))
    cfg = DataConfig(source="npz", path=str(path), layout="NHWC", split_seed=3)
    rebuilt(cfg)
    data = load_data(cfg)
    record = json.loads(json.dumps(split_record(cfg, data)))
    assert record["splits"]["test"]["indices"] == list(range(20))
    assert record["splits"]["validation"]["x"] == "x_train"
    moved = tmp_path / "moved.npz"  # the file moved since: reproduce.py --data PATH
    path.rename(moved)
    x, _ = script.load_split(record, "validation", str(moved))
    np.testing.assert_array_equal(x, data.validation.tensors[0].numpy())
    with pytest.raises(script.CannotRun, match="give --data PATH"):
        script.load_split(record, "test", None)


def test_npz_index_ranges(tmp_path):
    path = tmp_path / "series.npz"
    np.savez(path, x=np.arange(300, dtype=np.float32).reshape(100, 3), y=np.arange(100) % 2)
    cfg = DataConfig(source="npz", path=str(path), layout="flat",
                     split={"train": [0, 60], "validation": [60, 80], "test": [80, 100]})
    record = split_record(cfg, load_data(cfg))
    assert record["splits"]["test"]["indices"] == list(range(80, 100))
    rebuilt(cfg)


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(1)
    for label in ("cat", "dog"):
        (tmp_path / "img" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "img" / label / f"{i}.png")
    cfg = DataConfig(source="image-folder", path=str(tmp_path / "img"), image_size=[4, 4],
                     split={"train": 0.5, "validation": 0.25, "test": 0.25})
    rebuilt(cfg)


def test_text_windows_and_synthetic_tokens(tmp_path):
    for i in range(40):
        (tmp_path / "corpus" / f"f{i // 10}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "corpus" / f"f{i // 10}" / f"{i}.txt").write_text(f"line {i}\n" * 60)
    cfg = DataConfig(source="text", path=str(tmp_path / "corpus"),
                     text={"seq_len": 16, "calibration": 4, "validation": 3, "test": 3})
    rebuilt(cfg)
    record = split_record(cfg, load_data(cfg))
    assert len(record["splits"]["test"]["starts"]) == 3 and record["splits"]["test"]["files"]

    rebuilt(DataConfig(source="synthetic-tokens", split_seed=2))
    np.testing.assert_array_equal(script.markov_tokens(50, 9, 32, 3, 1234),
                                  markov_tokens(50, 9, 32, 1234))
