"""Models: the built-in demo networks, or the user's own model through a factory.

A user's model comes in as ``factory: "package.module:function"`` (plus kwargs) and an optional
state-dict checkpoint, so no pickled model object is ever loaded (``weights_only=True``).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from autosparse.config.schema import ConfigError
from autosparse.config.sections import BUILTIN_MODELS, ModelConfig
from autosparse.workload.factory import call_factory, import_factory

_STATE_DICT_ENTRIES = ("state_dict", "model_state_dict")
_SHOWN = 5  # how many missing/unexpected keys an error lists


class DigitsCNN(nn.Module):
    """Small CNN for 8x8 digits; layer names are relied on by examples and tests.

    ``widths`` overrides the output channels of conv1..conv3 and fc1 (calibration builds
    physically narrower variants with it).
    """

    WIDTHS = {"conv1": 16, "conv2": 32, "conv3": 32, "fc1": 64}

    def __init__(self, in_channels: int, height: int, width: int, num_classes: int,
                 widths: Mapping[str, int] | None = None):
        super().__init__()
        w = {**self.WIDTHS, **(widths or {})}
        self.conv1 = nn.Conv2d(in_channels, w["conv1"], 3, padding=1)
        self.conv2 = nn.Conv2d(w["conv1"], w["conv2"], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(w["conv2"], w["conv3"], 3, padding=1)
        self.fc1 = nn.Linear(w["conv3"] * (height // 2) * (width // 2), w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = F.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class DigitsMLP(nn.Module):
    """Three-layer MLP over the flattened input; ``widths`` overrides fc1 and fc2."""

    WIDTHS = {"fc1": 128, "fc2": 64}

    def __init__(self, in_features: int, num_classes: int,
                 widths: Mapping[str, int] | None = None):
        super().__init__()
        w = {**self.WIDTHS, **(widths or {})}
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(in_features, w["fc1"])
        self.fc2 = nn.Linear(w["fc1"], w["fc2"])
        self.fc3 = nn.Linear(w["fc2"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.flatten(x)))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


class _BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn + shortcut (1x1 conv + bn when the shape changes), then relu."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class DigitsResNet(nn.Module):
    """ResNet-style CNN: stem, three stages of two basic blocks (16/32/64 channels), linear head.

    16 searchable layers of very different size and role (3x3 convs from 2k to 37k weights, 1x1
    shortcuts, the head), so per-layer allocation matters: the deeper built-in for benchmarks.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for stage, cout in enumerate(widths):
            for index in range(2):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(_BasicBlock(cin, cout, stride))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsResNet18(DigitsResNet):
    """ResNet-18 layout: stem, four stages of two basic blocks (16/32/64/128 channels), head.

    21 searchable layers (stem, 16 block convs, three 1x1 shortcuts, the head): the classic
    residual layout, where the adds tie channels across blocks for structured pruning.
    """

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__(in_channels, num_classes, widths=(16, 32, 64, 128))


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (when t > 1), 3x3 depthwise, linear 1x1 project (+ input).

    The residual add only when the stride is 1 and the channels match, as in MobileNetV2.
    """

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = cin * expansion
        self.expand: nn.Conv2d | None = None
        if expansion != 1:
            self.expand = nn.Conv2d(cin, hidden, 1, bias=False)
            self.expand_bn = nn.BatchNorm2d(hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden,
                                   bias=False)
        self.depthwise_bn = nn.BatchNorm2d(hidden)
        self.project = nn.Conv2d(hidden, cout, 1, bias=False)
        self.project_bn = nn.BatchNorm2d(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.expand is not None:
            out = F.relu6(self.expand_bn(self.expand(out)))
        out = F.relu6(self.depthwise_bn(self.depthwise(out)))
        out = self.project_bn(self.project(out))
        return out + x if self.residual else out


class DigitsMobileNet(nn.Module):
    """MobileNetV2-style CNN: stem, seven inverted residual blocks, 1x1 conv to 128, linear head.

    23 searchable layers including seven depthwise convs (groups == channels), whose pruning
    must follow the 1x1 convs around them, and residual adds without a ReLU after them.
    """

    # (expansion t, output channels c, repeats n, first stride s): the MobileNetV2 table, scaled
    # down for 8x8 inputs (two stride-2 stages instead of five)
    SETTINGS = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 2, 1))

    def __init__(self, in_channels: int, num_classes: int, stem: int = 16, last: int = 128):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem)
        blocks, cin = [], stem
        for expansion, cout, repeats, first_stride in self.SETTINGS:
            for index in range(repeats):
                blocks.append(_InvertedResidual(cin, cout, first_stride if index == 0 else 1,
                                                expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(cin, last, 1, bias=False)
        self.head_bn = nn.BatchNorm2d(last)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu6(self.stem_bn(self.stem(x))))
        x = F.relu6(self.head_bn(self.head(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DigitsViT(nn.Module):
    """A two-layer Vision Transformer from ``transformers`` (random init), returning logits.

    14 searchable layers: the patch-embedding conv, per encoder layer query/key/value, the
    attention output and the two MLP Linears, and the classifier; LayerNorms stay dense.
    ``forward`` returns the logits tensor (not a ModelOutput) so it looks like any classifier.
    """

    def __init__(self, in_channels: int, image_size: int, num_classes: int):
        super().__init__()
        try:
            from transformers import ViTConfig, ViTForImageClassification
        except ImportError as err:
            raise ConfigError(
                f"model digits-vit needs the transformers package ({err}); "
                "install it with `pip install transformers`"
            ) from None
        config = ViTConfig(
            image_size=image_size, patch_size=2, num_channels=in_channels, hidden_size=48,
            num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            # eager: attention as plain matmul + softmax ops, the same graph in training, the
            # cost probe and export (sdpa also passed torch.export and ONNX; nothing depends on it)
            num_labels=num_classes, attn_implementation="eager",
        )
        self.hf = ViTForImageClassification(config)  # layers: hf.vit.layers.N.attention.q_proj, ...

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=x).logits


class DigitsConv1d(nn.Module):
    """Conv1d net over the image read as a sequence: rows (C*H) as channels, columns as time;
    a sequence input (C, L) is taken as it is (MNIST-1D: one channel, 40 steps).

    Four searchable layers (three Conv1d and the head), so the 1-D conv paths get exercised.
    """

    def __init__(self, in_channels: int, length: int, num_classes: int):
        super().__init__()
        del length  # the adaptive pool makes the head independent of it
        self.conv1 = nn.Conv1d(in_channels, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(32)
        self.conv2 = nn.Conv1d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(64)
        self.pool = nn.MaxPool1d(2)
        self.conv3 = nn.Conv1d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm1d(64)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1, -2)  # (batch, C, H, W) -> (batch, C*H, W); (batch, C, L) stays
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.pool(F.relu(self.bn2(self.conv2(x))))
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(x, 1), 1))


def is_builtin(cfg: ModelConfig) -> bool:
    return cfg.builtin is not None


def model_name(cfg: ModelConfig) -> str:
    """Short name for files and logs: the built-in name or the factory's function name."""
    if cfg.builtin is not None:
        return cfg.builtin
    if cfg.pretrained is not None:
        return Path(cfg.pretrained).resolve().name
    return str(cfg.factory).rsplit(":", 1)[1].rsplit(".", 1)[-1]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the configured model on CPU and load its checkpoint if one is given."""
    if cfg.builtin is not None:
        model = _build_builtin(cfg.builtin, tuple(input_shape), num_classes, cfg.kwargs)
    elif cfg.pretrained is not None:
        model = load_pretrained(cfg.pretrained)
    else:
        model = _build_from_factory(str(cfg.factory), cfg.kwargs)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model


def _build_builtin(
    name: str, input_shape: tuple[int, ...], num_classes: int, kwargs: Mapping[str, Any]
) -> nn.Module:
    if kwargs:
        raise ConfigError(
            f"model.kwargs: built-in model {name!r} takes no kwargs, got {dict(kwargs)}"
        )
    if name in ("regression-mlp", "tiny-lm"):  # the regression and language-model tasks
        from autosparse.workload.task_builtins import build_task_builtin

        return build_task_builtin(name, input_shape, num_classes)
    if name == "digits-cnn":
        if len(input_shape) != 3 or min(input_shape[1:]) < 2:
            raise ConfigError(
                f"model digits-cnn needs image inputs (channels, height, width) with height and "
                f"width >= 2; the data gives samples of shape {input_shape}"
            )
        return DigitsCNN(input_shape[0], input_shape[1], input_shape[2], num_classes)
    if name == "digits-mlp":
        return DigitsMLP(math.prod(input_shape), num_classes)
    if name == "digits-resnet":
        if len(input_shape) != 3 or min(input_shape[1:]) < 4:
            raise ConfigError(
                f"model digits-resnet needs image inputs (channels, height, width) with height "
                f"and width >= 4; the data gives samples of shape {input_shape}"
            )
        return DigitsResNet(input_shape[0], num_classes)
    if name == "digits-resnet18":
        _need_image(name, input_shape, 8)
        return DigitsResNet18(input_shape[0], num_classes)
    if name == "digits-mobilenet":
        _need_image(name, input_shape, 4)
        return DigitsMobileNet(input_shape[0], num_classes)
    if name == "digits-vit":
        if len(input_shape) != 3 or input_shape[1] != input_shape[2] or input_shape[1] % 2:
            raise ConfigError(
                f"model digits-vit needs square image inputs (channels, size, size) with an even "
                f"size (patches are 2x2); the data gives samples of shape {input_shape}"
            )
        return DigitsViT(input_shape[0], input_shape[1], num_classes)
    if name == "digits-conv1d":
        if len(input_shape) not in (2, 3) or input_shape[-1] < 2:
            raise ConfigError(
                f"model {name} needs sequences (channels, length) or images (channels, height, "
                f"width) with length or width >= 2; the data gives samples of shape "
                f"{input_shape}")
        return DigitsConv1d(math.prod(input_shape[:-1]), input_shape[-1], num_classes)
    raise ConfigError(f"model.builtin {name!r} is not one of {', '.join(BUILTIN_MODELS)}")


def _need_image(name: str, input_shape: tuple[int, ...], least: int) -> None:
    """Raise unless ``input_shape`` is (channels, height, width) with both sides >= ``least``."""
    if len(input_shape) != 3 or min(input_shape[1:]) < least:
        raise ConfigError(
            f"model {name} needs image inputs (channels, height, width) with height and width "
            f">= {least}; the data gives samples of shape {input_shape}"
        )


def load_pretrained(folder: str) -> nn.Module:
    """A causal language model saved by ``save_pretrained``, from the local folder only."""
    if not Path(folder, "config.json").is_file():
        raise ConfigError(f"model.pretrained: {folder} holds no config.json; give a folder "
                          "written by transformers' save_pretrained")
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model.pretrained: {folder} could not be loaded as a causal "
                          f"language model: {first}") from None
    model.config.use_cache = False  # scoring whole windows: no key/value cache to keep
    return model


def _build_from_factory(spec: str, kwargs: Mapping[str, Any]) -> nn.Module:
    model = call_factory(import_factory(spec), spec, kwargs, "model", spec)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"model.factory: {spec} returned {type(model).__name__}, not a torch.nn.Module"
        )
    return model


def _extract_state_dict(obj: Any, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for entry in _STATE_DICT_ENTRIES:
            if isinstance(obj.get(entry), Mapping):
                obj = obj[entry]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(
            f"model.checkpoint {path}: expected a state_dict (name -> tensor) or a dict with a "
            f"'state_dict' / 'model_state_dict' entry, got {type(obj).__name__}"
        )
    return dict(obj)


def _list(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", ... ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def _unreadable_checkpoint(path: str, err: Exception) -> str:
    """Why torch.load refused the file, in our words: torch's own message advises lowering
    ``weights_only``, which would run whatever code the file holds; never pass that on."""
    expected = "expected a file written by torch.save(model.state_dict(), path)"
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if "Weights only load failed" in str(err) and found:
        return (f"model.checkpoint {path}: holds a pickled Python object ({found.group(1)}), "
                f"not only tensors; {expected}")
    return (f"model.checkpoint {path}: not a readable PyTorch checkpoint (truncated, corrupt "
            f"or another format); {expected}")


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state-dict checkpoint into ``model`` strictly, with errors that list bad keys."""
    path = str(path)
    if not Path(path).is_file():
        raise ConfigError(f"model.checkpoint: file not found: {path}")
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as err:  # unpickling refusals and corrupt files come as various types
        raise ConfigError(_unreadable_checkpoint(path, err)) from None
    state = _extract_state_dict(obj, path)
    own = set(model.state_dict())
    if own and not own & set(state) and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DataParallel
    missing = sorted(own - set(state))
    unexpected = sorted(set(state) - own)
    if missing or unexpected:
        problems = []
        if missing:
            problems.append(f"missing keys: {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys: {_list(unexpected)}")
        raise ConfigError(
            f"model.checkpoint {path} does not match the model ({'; '.join(problems)})"
        )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # shape mismatches
        raise ConfigError(f"model.checkpoint {path} does not match the model: {err}") from None
