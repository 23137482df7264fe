"""The deploy target's file, built for every candidate a search scores (``deploy:``).

The size formula (``compress.footprint``) is ``model.packed``'s payload to the bit, so a
search deploying the packed file needs nothing more. A model that will run from another file
is scored on that file instead, built from each candidate's fine-tuned student exactly as
``autosparse export`` builds it:

    onnx        bake, shrink (channel groups removed), write ``model.compact.onnx`` (every
                searched weight at its searched bits and sparsity, decoded by onnxruntime at
                load): ``size_kb`` = the file's bytes, graph and decode functions included
    onnx-int8   bake, shrink, ONNX fp32, onnxruntime's static int8 QDQ calibrated on the whole
                train split in order (as export does): ``size_kb`` = ``model.int8.onnx``'s
                bytes, and the task metric is the file's own (its uint8 activations and 7-bit
                weights move it away from the student's; the student's is kept beside as
                ``accuracy_pytorch``)

With ``hardware: measure`` the same file is the one timed (``measured_latency``). The packed
formula's size stays in every trial as ``size_kb_packed`` (and its ratio as
``compression_packed``); ``compression`` becomes the dense fp32 ONNX file's bytes over the
deploy file's.

Layer rule: model side (torch, onnx, onnxruntime), never optuna or mlflow.
"""

from __future__ import annotations

import copy
import functools
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autosparse.compress.apply import bake
from autosparse.compress.shrink import shrink_as_compressed
from autosparse.config.runtime import DEPLOY_FILES
from autosparse.cost.compact_onnx import write_compact_onnx
from autosparse.cost.measured_latency import INT8
from autosparse.cost.onnx_files import export_onnx, onnx_module, quantize_onnx_int8
from autosparse.space.candidate import Candidate
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable

__all__ = ["FILE_TARGETS", "BuiltFile", "DeployFileBuilder"]

FILE_TARGETS = ("onnx", "onnx-int8")  # targets whose file is built per candidate


@dataclass(frozen=True)
class BuiltFile:
    """One candidate's deploy file, in a temporary folder that lives while it is in use."""

    target: str
    path: Path
    bytes: int
    seconds: float  # bake, shrink, write (and quantize)

    @property
    def timed_format(self) -> str:
        """How a latency measurement names this file (``LatencyMeasurement.format``)."""
        return INT8 if self.target == "onnx-int8" else "compact"

    def module(self) -> nn.Module:
        """The file run by onnxruntime as a module a task's metric can score."""
        return onnx_module(self.path)


class DeployFileBuilder:
    """Builds the deploy file of ``target`` (one of :data:`FILE_TARGETS`) for candidates of
    ``dense``. ``calibration`` gives the int8 quantizer's input batches (export's: the train
    split in order, float32 or int64 token ids); ``tokens`` quantizes only weighted operators,
    as export does for a language model."""

    def __init__(self, target: str, dense: nn.Module, table: LayerTable,
                 graph: ChannelGraph | None, input_shape: Sequence[int],
                 calibration: Callable[[], Iterable[np.ndarray]], tokens: bool = False):
        if target not in FILE_TARGETS:
            raise ValueError(f"deploy target {target!r} builds no file per candidate; "
                             f"allowed: {', '.join(FILE_TARGETS)}")
        self.target, self.dense, self.table, self.graph = target, dense, table, graph
        self.input_shape = tuple(int(d) for d in input_shape)
        self.calibration, self.tokens = calibration, tokens

    @functools.cached_property
    def dense_bytes(self) -> int:
        """Bytes of the dense model's fp32 ONNX file (``model.onnx`` of the uncompressed model):
        the reference of the size axis and of ``compression`` for a deploy file."""
        with tempfile.TemporaryDirectory(prefix="autosparse-dense-") as folder:
            return export_onnx(copy.deepcopy(self.dense).cpu(), self.input_shape,
                               Path(folder) / "dense.onnx").stat().st_size

    @property
    def file_name(self) -> str:
        return DEPLOY_FILES[self.target]

    @property
    def scores_metric(self) -> bool:
        """Whether the file computes other outputs than the student (int8 activations), so
        the task metric must be the file's own."""
        return self.target == "onnx-int8"

    def shrunk(self, candidate: Candidate, student: nn.Module,
               scores: Mapping[str, torch.Tensor] | None) -> nn.Module:
        """The student baked and with its channel groups removed (CPU), as export has it."""
        baked = bake(copy.deepcopy(student).cpu())
        shrunk, _, _ = shrink_as_compressed(baked, self.dense, candidate, self.table,
                                            self.graph, scores)
        return shrunk

    @contextmanager
    def build(self, candidate: Candidate, student: nn.Module,
              scores: Mapping[str, torch.Tensor] | None = None) -> Iterator[BuiltFile]:
        """The candidate's file, removed when the ``with`` block ends. ``student`` (fine-tuned,
        parametrized) is not modified; ``scores`` are its criterion scores (Taylor channels)."""
        start = time.perf_counter()
        folder = Path(tempfile.mkdtemp(prefix="autosparse-deploy-"))
        try:
            path = self.write(candidate, self.shrunk(candidate, student, scores), folder)
            yield BuiltFile(self.target, path, path.stat().st_size,
                            time.perf_counter() - start)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def write(self, candidate: Candidate, shrunk: nn.Module, folder: Path) -> Path:
        """Write the target file of the shrunk model into ``folder``; returns its path."""
        path = folder / self.file_name
        if self.target == "onnx":
            write_compact_onnx(shrunk, self.table, candidate, self.input_shape, path)
            return path
        fp32 = export_onnx(shrunk, self.input_shape, folder / "model.onnx")
        quantize_onnx_int8(fp32, path, iter(self.calibration()), weighted_only=self.tokens)
        return path
