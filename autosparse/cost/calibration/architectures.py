"""Small width-parametrised architectures whose real variants the calibration times.

Channel pruning must show up as a physically narrower model (fewer MACs, smaller tensors), not
as zeroed rows, so every architecture is built from a per-layer width map. The weights are
random (seeded): calibration measures speed, never accuracy.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from autosparse.workload.models import DigitsCNN, DigitsMLP

Builder = Callable[[Mapping[str, int]], nn.Module]


@dataclass(frozen=True, eq=False)
class Architecture:
    """A named model family: input shape, base widths and a builder for any width map.

    ``base_widths`` lists the output width of every prunable layer in forward order; the
    classifier (``classifier``, ``num_classes`` wide) is not in it because its width is fixed by
    the task.
    """

    name: str
    input_shape: tuple[int, ...]
    base_widths: Mapping[str, int]
    classifier: str
    num_classes: int
    builder: Builder
    # every weight layer in module order, where some follow others' widths (a depthwise conv
    # takes its input's, a layer after a residual add its partner's); default: widths + classifier
    weight_layers: tuple[str, ...] = ()
    # share of ``per_architecture`` variants drawn for it: a model that takes milliseconds a
    # call gets fewer, so calibrate's timing stays about as long as with small models only
    variant_share: float = 1.0
    # whether the fine channel-step anchors apply (see variants.CHANNEL_STEPS)
    fine_steps: bool = True

    @property
    def layers(self) -> list[str]:
        """Every weight layer in forward order, the classifier last."""
        return list(self.weight_layers) or [*self.base_widths, self.classifier]

    def resolve(self, widths: Mapping[str, int] | None = None) -> dict[str, int]:
        """Base widths overridden by ``widths``; unknown names and widths < 1 are errors."""
        widths = dict(widths or {})
        unknown = sorted(set(widths) - set(self.base_widths))
        if unknown:
            raise ValueError(
                f"{self.name}: no prunable layers {unknown} (has {', '.join(self.base_widths)})"
            )
        resolved = {**self.base_widths, **widths}
        bad = {k: v for k, v in resolved.items() if int(v) < 1}
        if bad:
            raise ValueError(f"{self.name}: widths must be at least 1, got {bad}")
        return {k: int(v) for k, v in resolved.items()}

    def build(self, widths: Mapping[str, int] | None = None, seed: int = 0) -> nn.Module:
        """The model at these widths with seeded random weights, in eval mode.

        The global torch RNG is left untouched (forked), so building never perturbs a caller.
        """
        resolved = self.resolve(widths)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = self.builder(resolved)
        return model.eval()


def _digits_cnn(widths: Mapping[str, int]) -> nn.Module:
    """The quickstart's DigitsCNN (autosparse.workload.models) on 1x8x8 inputs at the given widths."""
    return DigitsCNN(1, 8, 8, 10, widths)


def _digits_mlp(widths: Mapping[str, int]) -> nn.Module:
    return DigitsMLP(64, 10, widths)


class CifarCNN(nn.Module):
    """A plain VGG-like CNN for 3x32x32 (~29 M MACs dense), big enough that compute dominates."""

    def __init__(self, widths: Mapping[str, int], num_classes: int = 10):
        super().__init__()
        c = [widths[f"conv{i}"] for i in range(1, 6)]
        self.conv1 = nn.Conv2d(3, c[0], 3, padding=1)
        self.conv2 = nn.Conv2d(c[0], c[1], 3, padding=1)
        self.conv3 = nn.Conv2d(c[1], c[2], 3, padding=1)
        self.conv4 = nn.Conv2d(c[2], c[3], 3, padding=1)
        self.conv5 = nn.Conv2d(c[3], c[4], 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(c[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        x = self.pool(F.relu(self.conv4(x)))
        x = F.relu(self.conv5(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class DepthwiseNet(nn.Module):
    """A depthwise-separable CNN for 3x32x32 (MobileNet-v1 style, one residual add), so the
    calibration sees depthwise convs (groups == channels) and an add between layers."""

    def __init__(self, widths: Mapping[str, int], num_classes: int = 10):
        super().__init__()
        s, p1, p2 = widths["stem"], widths["pw1"], widths["pw2"]
        self.stem = nn.Conv2d(3, s, 3, stride=2, padding=1)
        self.dw1 = nn.Conv2d(s, s, 3, padding=1, groups=s)
        self.pw1 = nn.Conv2d(s, p1, 1)
        self.dw2 = nn.Conv2d(p1, p1, 3, padding=1, groups=p1)
        self.pw2 = nn.Conv2d(p1, p2, 1)
        self.dw3 = nn.Conv2d(p2, p2, 3, padding=1, groups=p2)
        self.pw3 = nn.Conv2d(p2, p2, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(p2, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = F.relu(self.pw1(F.relu(self.dw1(x))))
        x = self.pool(x)
        x = F.relu(self.pw2(F.relu(self.dw2(x))))
        x = F.relu(self.pw3(F.relu(self.dw3(x)))) + x
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class Conv1dNet(nn.Module):
    """Three Conv1d layers over a 16-channel sequence of 64 steps, max pooling, linear head."""

    def __init__(self, widths: Mapping[str, int], num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = widths["conv1"], widths["conv2"], widths["conv3"]
        self.conv1 = nn.Conv1d(16, c1, 5, padding=2)
        self.conv2 = nn.Conv1d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv1d(c2, c3, 3, padding=1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = self.pool(F.relu(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool1d(x, 1), 1))


class WideMLP(nn.Module):
    """1024 -> 2048 -> 2048 -> 10 (6.3 M weights, 25 MB at fp32): weights far beyond L2, so the
    fit sees where a model's weights stream from memory instead of cache."""

    def __init__(self, widths: Mapping[str, int], num_classes: int = 10):
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(1024, widths["fc1"])
        self.fc2 = nn.Linear(widths["fc1"], widths["fc2"])
        self.fc3 = nn.Linear(widths["fc2"], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(self.flatten(x)))
        return self.fc3(F.relu(self.fc2(x)))


ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            name="digits-cnn",
            input_shape=(1, 8, 8),
            base_widths=DigitsCNN.WIDTHS,
            classifier="fc2",
            num_classes=10,
            builder=_digits_cnn,
        ),
        Architecture(
            name="digits-mlp",
            input_shape=(1, 8, 8),
            base_widths=DigitsMLP.WIDTHS,
            classifier="fc3",
            num_classes=10,
            builder=_digits_mlp,
        ),
        Architecture(
            name="cifar-cnn",
            input_shape=(3, 32, 32),
            base_widths={"conv1": 32, "conv2": 32, "conv3": 64, "conv4": 64, "conv5": 128},
            classifier="fc",
            num_classes=10,
            builder=CifarCNN,
        ),
        Architecture(
            name="depthwise-cnn",
            input_shape=(3, 32, 32),
            base_widths={"stem": 32, "pw1": 64, "pw2": 128},
            classifier="fc",
            num_classes=10,
            builder=DepthwiseNet,
            weight_layers=("stem", "dw1", "pw1", "dw2", "pw2", "dw3", "pw3", "fc"),
        ),
        Architecture(
            name="conv1d-net",
            input_shape=(16, 64),
            base_widths={"conv1": 64, "conv2": 96, "conv3": 128},
            classifier="fc",
            num_classes=10,
            builder=Conv1dNet,
        ),
        Architecture(
            name="wide-mlp",
            input_shape=(1, 32, 32),
            base_widths={"fc1": 2048, "fc2": 2048},
            classifier="fc3",
            num_classes=10,
            builder=WideMLP,
            variant_share=0.4,
            fine_steps=False,
        ),
    )
}
DEFAULT_CALIBRATION = ("digits-cnn", "digits-mlp", "cifar-cnn", "depthwise-cnn", "conv1d-net",
                       "wide-mlp")
