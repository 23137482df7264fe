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

from ..models import DigitsCNN, DigitsMLP

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

    @property
    def layers(self) -> list[str]:
        """Every weight layer in forward order, the classifier last."""
        return [*self.base_widths, self.classifier]

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
    """The quickstart's DigitsCNN (autosparse.models) on 1x8x8 inputs at the given widths."""
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
    )
}
