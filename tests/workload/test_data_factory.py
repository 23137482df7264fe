"""``data.factory`` (a user's own DataLoaders) end to end, its errors, and npz index splits."""

from __future__ import annotations

import json
import sys

import mlflow
import numpy as np
import optuna
import pytest
import torch
import yaml

from autosparse.cli import main
from autosparse.config.sections import DataConfig
from autosparse.config.validation import ConfigError
from autosparse.search.runner import run_search
from autosparse.workload.data import data_fingerprint, load_data

EXAMPLE = "autosparse.examples.custom_loader:make_loaders"
TINY = {"batch_size": 32, "limit": 300}  # 300 train, 300 validation (of 359), 300 test (of 360)


def test_factory_loaders_are_used_as_given():
    data = load_data(DataConfig(factory=EXAMPLE, kwargs=TINY))
    assert data.user_loaders and data.input_shape == (1, 8, 8) and data.num_classes == 10
    assert data.mean is None and data.std is None  # the loaders normalise (or not) themselves
    assert {name: data.samples(name) for name in ("train", "validation", "test")} == \
        {"train": 300, "validation": 300, "test": 300}
    # the user's loader itself, whatever batch size the caller asks for
    assert data.loader("validation", 999) is data.validation
    assert [len(y) for _, y in data.loader("validation", 999)][:2] == [32, 32]


def test_factory_fingerprint_follows_its_kwargs():
    one = data_fingerprint(DataConfig(factory=EXAMPLE, kwargs=TINY))
    assert one == data_fingerprint(DataConfig(factory=EXAMPLE, kwargs=dict(TINY)))
    assert one != data_fingerprint(DataConfig(factory=EXAMPLE, kwargs={**TINY, "seed": 1}))


BAD_FACTORIES = {
    "returns_int": ("def make():\n    return 3\n", ["returned int", "(train, validation, test)"]),
    "returns_two": ("def make():\n    return [1, 2]\n", ["list of 2"]),
    "dict_no_test": ("def make():\n    return {'train': [], 'validation': []}\n",
                     ["without 'test'"]),
    "dataset": ("import torch\nfrom torch.utils.data import TensorDataset\n"
                "def make():\n    d = TensorDataset(torch.zeros(4, 2), torch.zeros(4))\n"
                "    return d, d, d\n", ["TensorDataset", "DataLoader"]),
    "generator": ("def make():\n    return (iter([]), iter([]), iter([]))\n",
                  ["one-pass iterator"]),
    "not_pairs": ("import torch\ndef make():\n    b = [torch.zeros(4, 2)]\n    return b, b, b\n",
                  ["yields Tensor", "(x, y)"]),
    "empty": ("def make():\n    return [], [], []\n", ["'train' loader yields no batches"]),
    "raises": ("def make():\n    raise RuntimeError('no such bucket')\n",
               ["raised RuntimeError: no such bucket"]),
    "shapes": ("import torch\ndef make():\n    t = [(torch.zeros(4, 2), torch.zeros(4))]\n"
               "    v = [(torch.zeros(4, 3), torch.zeros(4))]\n    return t, v, v\n",
               ["shape (3,)", "(2,)"]),
}


@pytest.mark.parametrize("name", sorted(BAD_FACTORIES))
def test_a_wrong_factory_is_one_config_error_naming_data_factory(name, tmp_path, monkeypatch):
    source, words = BAD_FACTORIES[name]
    module = f"h5_bad_{name}"
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    with pytest.raises(ConfigError) as err:
        load_data(DataConfig(factory=f"{module}:make"))
    message = str(err.value)
    assert message.startswith("data.factory") and "\n" not in message
    for word in words:
        assert word in message, message


def test_factory_kwargs_that_do_not_fit_are_named():
    with pytest.raises(ConfigError, match="data.kwargs do not fit .*colour"):
        load_data(DataConfig(factory=EXAMPLE, kwargs={"colour": "red"}))


def test_npz_split_by_index_ranges_keeps_order(tmp_path):
    x = np.arange(100 * 4, dtype=np.float32).reshape(100, 1, 2, 2)
    y = np.arange(100) % 3
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y)
    split = {"train": [0, 60], "validation": [60, 75], "test": [80, 100]}
    data = load_data(DataConfig(source="npz", path=str(path), split=split,
                                mean=[0.0], std=[1.0]))
    for name, (start, end) in split.items():
        xs, ys = data.split(name).tensors
        assert torch.equal(xs, torch.from_numpy(x[start:end]))  # exactly those rows, in order
        assert torch.equal(ys, torch.from_numpy(y[start:end]))
    with pytest.raises(ConfigError, match=r"data.split.test: .*\[80, 120\).*100 samples"):
        load_data(DataConfig(source="npz", path=str(path),
                             split={**split, "test": [80, 120]}))
    np.savez(tmp_path / "fixed.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    with pytest.raises(ConfigError, match="fixed train/test split"):
        load_data(DataConfig(source="npz", path=str(tmp_path / "fixed.npz"), split=split))


@pytest.mark.integration
def test_search_and_export_with_a_custom_dataloader(tmp_path, monkeypatch):
    """A tiny search whose data is the example factory (a user Dataset with augmentation in a
    DataLoader): dense training, sensitivity, fine-tunes and evaluation all read the user's
    loaders; the trials record their device; export rebuilds the trial (same score) and
    calibrates int8 on the loader's batches."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {
        "name": "factory", "device": "cpu",
        "model": {"builtin": "digits-cnn", "train_epochs": 3},
        "data": {"factory": EXAMPLE, "kwargs": TINY},
        "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured", "channel"],
                              "bits": [8]}},
        "strategy": {"name": "knapsack"},
        "sensitivity": {"samples": 64},
        "budget": {"trials": 3},
        "finetune": {"steps": 6, "reeval_seeds": 0},
    }
    path = tmp_path / "factory.yaml"
    path.write_text(yaml.safe_dump(config))
    outcome = run_search(path, runs_dir=tmp_path, printer=lambda line: None)
    assert len(outcome.trials) == 3 and (outcome.trials["state"] == "COMPLETE").all()
    study = optuna.load_study(study_name="factory",
                              storage=f"sqlite:///{tmp_path / 'factory' / 'study.db'}")
    assert {t.user_attrs["device"] for t in study.trials} == {"cpu"}
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("factory")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("autosparse.role") == "search"]
    assert parents and parents[0].data.params["device"] == "cpu"

    code = main(["--runs-dir", str(tmp_path), "export", str(path), "--trial", "0",
                 "--no-mlflow"])
    assert code == 0
    report = json.loads((tmp_path / "factory" / "export" / "trial-0" / "report.json").read_text())
    assert report["input"]["shape"] == ["batch", 1, 8, 8]
    assert EXAMPLE in report["input"]["raw"] and report["input"]["mean"] == [0.0]
    assert (tmp_path / "factory" / "export" / "trial-0" / "model.int8.onnx").is_file()
