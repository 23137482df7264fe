"""The dense reference: trained once per (model, data, seed), cached atomically, evaluated."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from autosparse.config.sections import DataConfig, ModelConfig
from autosparse.workload import dense
from autosparse.workload.data import load_data
from autosparse.workload.devices import eval_mode
from autosparse.workload.evaluate import evaluate
from autosparse.workload.splits import DataSplits


@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return load_data(DataConfig())


def _forbid_training(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("train_dense must not run")

    monkeypatch.setattr(dense, "train_dense", fail)


def test_builtin_is_trained_once_then_loaded_from_cache(digits, tmp_path, monkeypatch):
    cfg = ModelConfig(builtin="digits-mlp", train_epochs=3)
    model, metrics = dense.prepare_dense(cfg, digits, tmp_path, seed=0)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 1 and files[0].startswith("digits-mlp-") and files[0].endswith(".pt")
    assert not model.training
    assert set(metrics) == {"accuracy", "test_accuracy"}
    assert metrics["accuracy"] > 50 and 0 <= metrics["test_accuracy"] <= 100

    _forbid_training(monkeypatch)
    again, metrics_again = dense.prepare_dense(cfg, digits, tmp_path, seed=0)
    assert metrics_again == metrics and not again.training
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)


def test_cache_key_depends_on_seed_model_and_data(digits, tmp_path):
    cfg = ModelConfig(builtin="digits-mlp", train_epochs=3)
    base = dense.cache_path(cfg, digits, tmp_path, 0)
    assert base == dense.cache_path(cfg, digits, tmp_path, 0)
    assert base != dense.cache_path(cfg, digits, tmp_path, 1)
    assert base != dense.cache_path(cfg.model_copy(update={"train_epochs": 4}), digits, tmp_path, 0)
    other_data = DataSplits(
        digits.train, digits.validation, digits.test, digits.input_shape, digits.num_classes,
        fingerprint="something-else",
    )
    assert base != dense.cache_path(cfg, other_data, tmp_path, 0)


def test_training_is_repeatable_and_leaves_caller_rng_alone(digits, tmp_path):
    cfg = ModelConfig(builtin="digits-mlp", train_epochs=2)
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    first, _ = dense.prepare_dense(cfg, digits, tmp_path / "a", seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    second, _ = dense.prepare_dense(cfg, digits, tmp_path / "b", seed=5)
    for key, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[key], value)
    threads = torch.get_num_threads()
    dense.prepare_dense(cfg, digits, tmp_path / "c", seed=6)
    assert torch.get_num_threads() == threads


def test_corrupt_cache_is_retrained(digits, tmp_path):
    cfg = ModelConfig(builtin="digits-mlp", train_epochs=1)
    path = dense.cache_path(cfg, digits, tmp_path, 0)
    tmp_path.mkdir(exist_ok=True)
    path.write_bytes(b"half a file")
    model, _ = dense.prepare_dense(cfg, digits, tmp_path, seed=0)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["fc1.weight"], model.fc1.weight)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left over


def test_hand_made_splits_get_a_content_fingerprint(tmp_path):
    x = torch.randn(30, 4)
    y = torch.arange(30) % 3
    small = TensorDataset(x[:6], y[:6])
    splits = DataSplits(TensorDataset(x, y), small, small, (4,), 3)
    changed = DataSplits(TensorDataset(x + 1, y), splits.validation, splits.test, (4,), 3)
    cfg = ModelConfig(builtin="digits-mlp", train_epochs=1)
    assert dense.cache_key(cfg, splits, 0) != dense.cache_key(cfg, changed, 0)


def test_factory_model_is_evaluated_not_trained(digits, tmp_path, monkeypatch):
    (tmp_path / "dense_factory_mod.py").write_text(
        textwrap.dedent(
            """
            import torch.nn as nn

            def make():
                return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    _forbid_training(monkeypatch)
    try:
        cfg = ModelConfig(factory="dense_factory_mod:make")
        model, metrics = dense.prepare_dense(cfg, digits, tmp_path / "cache", seed=0)
    finally:
        sys.modules.pop("dense_factory_mod", None)
    assert not model.training
    assert 0 <= metrics["accuracy"] <= 100 and 0 <= metrics["test_accuracy"] <= 100
    assert not (tmp_path / "cache").exists()


def test_digits_cnn_learns_quickly(digits, tmp_path):
    model, metrics = dense.prepare_dense(
        ModelConfig(builtin="digits-cnn", train_epochs=4), digits, tmp_path, seed=0
    )
    assert metrics["accuracy"] > 85


# ---------------------------------------------------------------------------- evaluate


class Constant(nn.Module):
    """Always predicts class 0; holds a frozen batch norm to check mode restoring."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm1d(2)
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        assert not self.training and not self.bn.training
        logits = torch.zeros(x.shape[0], 3)
        logits[:, 0] = self.scale
        return logits


def test_evaluate_accuracy_percent_and_restores_modes():
    y = torch.tensor([0, 0, 0, 1, 2, 1, 0, 2])
    loader = DataLoader(TensorDataset(torch.zeros(8, 2), y), batch_size=3)
    model = Constant()
    model.train()
    model.bn.eval()
    assert evaluate(model, loader) == pytest.approx(50.0)
    assert model.training and not model.bn.training
    assert model.scale.grad is None


def test_evaluate_empty_loader():
    with pytest.raises(ValueError, match="no samples"):
        empty = TensorDataset(torch.zeros(0, 2), torch.zeros(0))
        evaluate(Constant(), DataLoader(empty, batch_size=2))


def test_eval_mode_restores_on_error():
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    with pytest.raises(RuntimeError):
        with eval_mode(model):
            raise RuntimeError("boom")
    assert all(m.training for m in model.modules())
