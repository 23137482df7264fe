"""Data no model could learn from, and a model too narrow for its labels, are refused when
loaded: exit 2, one line naming the split or the model, nothing written (no dense model
trained and cached), through the real command line."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from tests.config.test_bad_inputs import _check, _run

N = 90


def _labels(classes: int = 3) -> np.ndarray:
    return np.arange(N) % classes


def _features() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(N, 6)).astype(np.float32)


def _with_nan() -> np.ndarray:
    x = _features()
    x[5, 2] = np.nan
    x[70, 1] = np.inf
    return x


CASES = [
    ("nan-inputs", {"x": _with_nan(), "y": _labels()}, {}, ["train split", "nan or infinite"]),
    ("one-class", {"x": _features(), "y": np.zeros(N, dtype=np.int64)}, {},
     ["one class only", "at least two"]),
    ("fractional-targets", {"x": _features(), "y": _labels() + 0.5}, {},
     ["integer class indices"]),
]


@pytest.mark.parametrize("case,arrays,extra,words", CASES, ids=[c[0] for c in CASES])
def test_data_no_model_could_learn_from_is_refused_before_training(
        case, arrays, extra, words, tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.npz"
    np.savez(data, **arrays)
    config = {"name": "bad", "model": {"builtin": "digits-mlp", "train_epochs": 1},
              "data": {"source": "npz", "path": str(data), "layout": "flat"}, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    code, err = _run(["search", str(path)], tmp_path, capsys, monkeypatch)
    _check(code, err, words)


def test_a_model_with_fewer_outputs_than_classes_is_refused(tmp_path, capsys, monkeypatch):
    (tmp_path / "narrow_model.py").write_text(
        "import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Flatten(), "
        "torch.nn.Linear(64, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "narrow",
                                    "model": {"factory": "narrow_model:make"}}))
    code, err = _run(["search", str(path)], tmp_path, capsys, monkeypatch)
    _check(code, err, ["model: it gives 3 outputs", "labels go up to 9", "needs 10"])


FACTORY = """import torch
from torch.utils.data import DataLoader, TensorDataset

def make(kind):
    x = torch.randn(60, 1, 8, 8)
    y = torch.arange(60) % 10
    if kind == "column":
        y = y[:, None]
    if kind == "scalar":
        x = torch.randn(60)
    if kind == "nan":
        x[3, 0, 0, 0] = float("nan")
    loader = DataLoader(TensorDataset(x, y), batch_size=20)
    return loader, loader, loader
"""


@pytest.mark.parametrize("kind,words", [
    ("column", ["train split's targets have shape (20, 1)", "shape (n,)"]),
    ("scalar", ["samples are scalars"]),
    ("nan", ["train split has 1 input values that are nan"]),
], ids=["column-targets", "scalar-samples", "nan-inputs"])
def test_a_factory_whose_batches_no_model_could_learn_from_is_refused(
        kind, words, tmp_path, capsys, monkeypatch):
    (tmp_path / "bad_batches.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "fac", "model": {"builtin": "digits-cnn"},
                                    "data": {"factory": "bad_batches:make",
                                             "kwargs": {"kind": kind}}}))
    code, err = _run(["search", str(path)], tmp_path, capsys, monkeypatch)
    _check(code, err, words)
