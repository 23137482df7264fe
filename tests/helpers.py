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
    return Candidate({"conv1": LayerChoice.make(*conv1),
                      "conv2": LayerChoice.make(*conv2)}).to_json()


def benchmark_module(filename: str) -> ModuleType:
    """A script of benchmarks/ as a module (benchmarks/ is not a package; its scripts import
    each other, so the folder is on sys.path while it loads). Loaded once per test session."""
    name = "autosparse_bench_" + Path(filename).stem
    if name not in sys.modules:
        folder = Path(__file__).resolve().parents[1] / "benchmarks"
        spec = importlib.util.spec_from_file_location(name, folder / filename)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # before running it: its dataclasses look themselves up
        sys.path.insert(0, str(folder))
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
        finally:
            sys.path.remove(str(folder))
    return sys.modules[name]


def llm_model() -> ModuleType:
    """benchmarks/llm_model.py (the benchmark LM's config and trainer) as a module."""
    return benchmark_module("llm_model.py")
