"""Small models and builders shared by several test modules."""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from autosparse.space.candidate import Candidate, LayerChoice


class TinyNet(nn.Module):
    """1x8x8 -> 10 classes. conv1's row length is 9 (no 2:4), conv2's is 72 (8 input channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def two_conv_candidate(conv1: tuple, conv2: tuple) -> str:
    """JSON of a candidate for layers conv1 and conv2, each given as LayerChoice.make args."""
    return Candidate({"conv1": LayerChoice.make(*conv1), "conv2": LayerChoice.make(*conv2)}).to_json()


def llm_model() -> ModuleType:
    """benchmarks/llm_model.py (the benchmark LM's config and trainer) as a module: benchmarks/
    is not a package."""
    name = "autosparse_bench_llm_model"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "llm_model.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
