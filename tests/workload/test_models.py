"""Model building: built-ins with fixed layer names, factories from the CWD, checkpoints."""

from __future__ import annotations

import re
import sys
import textwrap

import pytest
import torch
from torch import nn

from autosparse.config.schema import ConfigError
from autosparse.config.sections import ModelConfig
from autosparse.space.discovery import find_layers
from autosparse.workload.models import build_model, is_builtin, model_name


@pytest.fixture(autouse=True)
def _restore_sys_path(monkeypatch):
    """build_model puts the CWD on sys.path; keep that from leaking between tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))


def test_digits_cnn_architecture():
    model = build_model(ModelConfig(builtin="digits-cnn"), (1, 8, 8), 10)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert list(layers) == ["conv1", "conv2", "conv3", "fc1", "fc2"]
    assert (model.conv1.in_channels, model.conv1.out_channels) == (1, 16)
    assert (model.conv2.out_channels, model.conv3.out_channels) == (32, 32)
    for name in ("conv1", "conv2", "conv3"):
        assert layers[name].padding == (1, 1) and layers[name].kernel_size == (3, 3)
    assert (model.fc1.in_features, model.fc1.out_features) == (512, 64)
    assert (model.fc2.in_features, model.fc2.out_features) == (64, 10)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


def test_digits_cnn_other_input_sizes():
    model = build_model(ModelConfig(builtin="digits-cnn"), (3, 7, 10), 4)
    assert model.conv1.in_channels == 3 and model.fc1.in_features == 32 * 3 * 5
    assert model(torch.zeros(1, 3, 7, 10)).shape == (1, 4)
    with pytest.raises(ConfigError, match="digits-cnn needs image inputs"):
        build_model(ModelConfig(builtin="digits-cnn"), (64,), 10)


def test_digits_mlp_architecture():
    model = build_model(ModelConfig(builtin="digits-mlp"), (1, 8, 8), 10)
    assert (model.fc1.in_features, model.fc1.out_features) == (64, 128)
    assert (model.fc2.in_features, model.fc2.out_features) == (128, 64)
    assert (model.fc3.in_features, model.fc3.out_features) == (64, 10)
    assert model(torch.zeros(5, 1, 8, 8)).shape == (5, 10)
    assert model(torch.zeros(5, 64)).shape == (5, 10)
    assert is_builtin(ModelConfig(builtin="digits-mlp"))
    assert model_name(ModelConfig(builtin="digits-mlp")) == "digits-mlp"


def _build_digits(name: str) -> nn.Module:
    """A built-in for the digits sample shape, checked to give one logit row per sample."""
    model = build_model(ModelConfig(builtin=name), (1, 8, 8), 10).eval()
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
    return model


def _kinds(model: nn.Module) -> list[str]:
    return [type(m).__name__ for m in find_layers(model).values()]


def test_digits_resnet18_architecture():
    model = _build_digits("digits-resnet18")
    layers = find_layers(model)
    assert len(layers) == 21 and _kinds(model).count("Conv2d") == 20  # stem, 16, 3 shortcuts
    assert [n for n in layers if "shortcut" in n] == [
        f"blocks.{i}.shortcut.0" for i in (2, 4, 6)]
    assert [b.conv2.out_channels for b in model.blocks] == [16, 16, 32, 32, 64, 64, 128, 128]
    assert [b.conv1.stride for b in model.blocks][::2] == [(1, 1), (2, 2), (2, 2), (2, 2)]
    assert model.fc.in_features == 128
    with pytest.raises(ConfigError, match=r"digits-resnet18 needs .*>= 8.*\(1, 4, 4\)"):
        build_model(ModelConfig(builtin="digits-resnet18"), (1, 4, 4), 10)


def test_digits_mobilenet_architecture():
    model = _build_digits("digits-mobilenet")
    layers = find_layers(model)
    assert len(layers) == 23 and _kinds(model).count("Linear") == 1
    depthwise = {n: m for n, m in layers.items() if n.endswith("depthwise")}
    assert len(depthwise) == 7
    for name, conv in depthwise.items():
        assert conv.groups == conv.in_channels == conv.out_channels, name
    assert "blocks.0.expand" not in layers and "blocks.1.expand" in layers  # t=1 has no expand
    assert [b.residual for b in model.blocks] == [True, False, True, False, True, False, True]
    assert all(not m.bias for n, m in layers.items() if n != "fc")  # batch norm follows
    with pytest.raises(ConfigError, match=r"digits-mobilenet needs .*\(64,\)"):
        build_model(ModelConfig(builtin="digits-mobilenet"), (64,), 10)


def test_digits_vit_architecture():
    pytest.importorskip("transformers")
    model = _build_digits("digits-vit")
    kinds = _kinds(model)
    assert len(kinds) == 14 and kinds.count("Conv2d") == 1  # patch embedding, 2 x 6, classifier
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 5
    assert model(torch.zeros(2, 1, 8, 8)).dtype == torch.float32  # logits, not a ModelOutput
    for shape in [(1, 8, 6), (1, 7, 7), (64,)]:
        with pytest.raises(ConfigError, match=re.escape(str(shape))):
            build_model(ModelConfig(builtin="digits-vit"), shape, 10)


def test_digits_conv1d_architecture():
    model = _build_digits("digits-conv1d")
    assert _kinds(model) == ["Conv1d", "Conv1d", "Conv1d", "Linear"]
    assert model.conv1.in_channels == 8  # C*H rows as channels
    other = build_model(ModelConfig(builtin="digits-conv1d"), (3, 5, 7), 4)
    assert other.conv1.in_channels == 15 and other(torch.zeros(2, 3, 5, 7)).shape == (2, 4)
    sequence = build_model(ModelConfig(builtin="digits-conv1d"), (1, 40), 10)  # MNIST-1D
    assert sequence.conv1.in_channels == 1 and sequence(torch.zeros(2, 1, 40)).shape == (2, 10)
    for shape in [(64,), (3, 1), (1, 2, 3, 4)]:
        with pytest.raises(ConfigError, match=r"digits-conv1d needs .*" + re.escape(str(shape))):
            build_model(ModelConfig(builtin="digits-conv1d"), shape, 10)


def test_builtin_rejects_kwargs():
    with pytest.raises(ConfigError, match="takes no kwargs"):
        build_model(ModelConfig(builtin="digits-mlp", kwargs={"width": 3}), (64,), 10)


FACTORY = textwrap.dedent(
    """
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self, hidden):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), nn.Linear(4, hidden), nn.ReLU())
            self.head = nn.Linear(hidden, 3)

        def forward(self, x):
            return self.head(self.body(x))

    def make(hidden=5):
        return Net(hidden)

    def not_a_model():
        return 42

    class Zoo:
        @staticmethod
        def small():
            return Net(2)
    """
)


@pytest.fixture
def factory_dir(tmp_path, monkeypatch, request):
    """A model file in a fresh CWD, under a module name unique to the test."""
    module = "user_model_" + re.sub(r"\W", "_", request.node.name)
    (tmp_path / f"{module}.py").write_text(FACTORY)
    monkeypatch.chdir(tmp_path)
    yield module
    sys.modules.pop(module, None)


def test_factory_from_cwd_with_kwargs(factory_dir):
    model = build_model(ModelConfig(factory=f"{factory_dir}:make", kwargs={"hidden": 7}), (4,), 3)
    assert model.head.in_features == 7
    assert model_name(ModelConfig(factory=f"{factory_dir}:make")) == "make"
    nested = build_model(ModelConfig(factory=f"{factory_dir}:Zoo.small"), (4,), 3)
    assert nested.head.in_features == 2


def test_factory_errors(factory_dir):
    with pytest.raises(ConfigError, match="not a torch.nn.Module"):
        build_model(ModelConfig(factory=f"{factory_dir}:not_a_model"), (4,), 3)
    with pytest.raises(ConfigError, match="has no attribute 'missing'"):
        build_model(ModelConfig(factory=f"{factory_dir}:missing"), (4,), 3)
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        build_model(ModelConfig(factory="no_such_module_xyz:make"), (4,), 3)
    with pytest.raises(ConfigError, match="model.kwargs do not fit"):
        build_model(ModelConfig(factory=f"{factory_dir}:make", kwargs={"depth": 2}), (4,), 3)


def test_factory_with_missing_dependency_says_so(tmp_path, monkeypatch):
    (tmp_path / "needs_dep_mod.py").write_text("import not_installed_dep_abc\ndef make(): pass\n")
    monkeypatch.chdir(tmp_path)
    try:
        with pytest.raises(ConfigError, match="not_installed_dep_abc"):
            build_model(ModelConfig(factory="needs_dep_mod:make"), (4,), 3)
    finally:
        sys.modules.pop("needs_dep_mod", None)


def _reference_state(factory_dir) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return build_model(ModelConfig(factory=f"{factory_dir}:make"), (4,), 3).state_dict()


@pytest.mark.parametrize("wrapper", [None, "state_dict", "model_state_dict", "module."])
def test_checkpoint_loading(factory_dir, tmp_path, wrapper):
    state = _reference_state(factory_dir)
    if wrapper == "module.":
        saved = {f"module.{k}": v for k, v in state.items()}
    elif wrapper:
        saved = {wrapper: state, "epoch": 3}
    else:
        saved = state
    torch.save(saved, tmp_path / "ckpt.pt")
    torch.manual_seed(2)
    model = build_model(ModelConfig(factory=f"{factory_dir}:make", checkpoint="ckpt.pt"), (4,), 3)
    for key, value in state.items():
        assert torch.equal(model.state_dict()[key], value)


def test_checkpoint_wrong_keys_are_listed(factory_dir, tmp_path):
    state = _reference_state(factory_dir)
    state["classifier.weight"] = state.pop("head.weight")
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(ConfigError) as err:
        build_model(ModelConfig(factory=f"{factory_dir}:make", checkpoint="bad.pt"), (4,), 3)
    message = str(err.value)
    assert "missing keys: head.weight" in message
    assert "unexpected keys: classifier.weight" in message


def test_checkpoint_wrong_shape(factory_dir, tmp_path):
    torch.save(_reference_state(factory_dir), tmp_path / "ckpt.pt")
    cfg = ModelConfig(factory=f"{factory_dir}:make", kwargs={"hidden": 6}, checkpoint="ckpt.pt")
    with pytest.raises(ConfigError, match="size mismatch"):
        build_model(cfg, (4,), 3)


def test_checkpoint_missing_file_names_path(factory_dir, tmp_path):
    with pytest.raises(ConfigError, match="nowhere.pt"):
        build_model(ModelConfig(factory=f"{factory_dir}:make", checkpoint="nowhere.pt"), (4,), 3)


def test_checkpoint_of_a_whole_model_is_refused(factory_dir, tmp_path):
    torch.save(nn.Linear(2, 2), tmp_path / "whole.pt")
    with pytest.raises(ConfigError, match="state_dict"):
        build_model(ModelConfig(factory=f"{factory_dir}:make", checkpoint="whole.pt"), (4,), 3)


def test_checkpoint_for_builtin(tmp_path):
    torch.manual_seed(0)
    reference = build_model(ModelConfig(builtin="digits-mlp"), (1, 8, 8), 10)
    torch.save(reference.state_dict(), tmp_path / "mlp.pt")
    cfg = ModelConfig(builtin="digits-mlp", checkpoint=str(tmp_path / "mlp.pt"))
    model = build_model(cfg, (1, 8, 8), 10)
    assert torch.equal(model.fc3.weight, reference.fc3.weight)
