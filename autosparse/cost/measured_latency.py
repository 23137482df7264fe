"""Direct measurement: a candidate's latency timed on this machine, from its compressed model.

The cost model and the per-layer table *predict* latency; this module measures it, so a search
can optimise the real thing (``hardware: measure``) and a benchmark can check predictions
against it. For one candidate and its fine-tuned student:

    bake      a copy of the student: masks and quantization into plain weights
    shrink    the candidate's channel groups removed for real (export/shrink.py, the same
              Torch-Pruning path and checks as ``autosparse export``)
    export    ONNX fp32; plus int8 QDQ when every searched layer has <= 8 bits
    time      the deployable file (int8 when every searched layer has <= 8 bits, else fp32:
              exactly the ``model.int8.onnx`` / ``model.onnx`` export would ship) in
              onnxruntime, one thread, batch 1, in interleaved rounds *together with* the dense
              fp32 model's ONNX (exported once), so that drift on a shared machine hits both
              alike and ``speedup`` is a ratio from the same rounds

Which weights the student has does not change what runs (dense onnxruntime kernels; zeros are
not skipped), so a measurement is cached by ``candidate.key``: a short and a full fine-tune of
one candidate, or a re-evaluation with another seed, are timed once per process.

Layer rule: model side (torch, onnxruntime), never optuna or mlflow.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from autosparse.compress.apply import bake
from autosparse.compress.shrink import shrink_as_compressed
from autosparse.cost.onnx_files import export_onnx, quantize_onnx_int8, time_onnx_files
from autosparse.space.candidate import Candidate
from autosparse.space.graph import ChannelGraph
from autosparse.space.layers import LayerTable

__all__ = ["CandidateTimer", "LatencyMeasurement", "deployable_format", "DEFAULT_ROUNDS",
           "DEFAULT_CALLS", "DEFAULT_WARMUP", "INT8_MAX_BITS"]

DEFAULT_ROUNDS = 21
DEFAULT_CALLS = 11
DEFAULT_WARMUP = 10
INT8_MAX_BITS = 8  # every searched layer at <= 8 bits: export ships the int8 QDQ model
CALIBRATION_BATCHES = 4  # random batches for the int8 ranges when the caller gives none
CALIBRATION_BATCH_SIZE = 16
INT8, FP32 = "int8", "fp32"


def deployable_format(candidate: Candidate, table: LayerTable) -> str:
    """``int8`` when every searched layer has <= 8 bits (export writes ``model.int8.onnx``),
    else ``fp32``: the file a user would deploy, so the one measured."""
    return INT8 if all(candidate.get_choice(name).bits <= INT8_MAX_BITS
                       for name in table.names) else FP32


@dataclass(frozen=True)
class LatencyMeasurement:
    """One candidate timed against the dense model in the same interleaved rounds.

    ``seconds`` is the wall time this call spent (bake, shrink, export, quantize, time); a
    cached result has ``seconds == 0`` and ``cached`` set.
    """

    latency_ms: float  # median per batch-1 call of the deployable file
    dense_ms: float  # the dense fp32 model, same rounds
    format: str  # "int8", "fp32" or "compact": which file latency_ms is for
    seconds: float
    cached: bool = False

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.latency_ms

    def metrics(self) -> dict[str, float]:
        """What a trial stores. Numbers only (the study's metrics are floats): the source is
        ``latency_source.measured = 1``, as the table's is ``latency_source.table`` (a count)."""
        return {"latency_ms": self.latency_ms, "latency_dense_ms": self.dense_ms,
                "speedup_measured": self.speedup, "latency_measure_seconds": self.seconds,
                "latency_source.measured": 1.0, "latency_measured_int8": float(self.format == INT8)}


class CandidateTimer:
    """Times candidates' compressed models in onnxruntime beside the dense model's ONNX.

    ``dense`` is the uncompressed model the candidates were compressed from (its ONNX is
    written once, to a private temporary folder removed by :meth:`close` or at exit);
    ``calibration`` are input batches (N, *input_shape) for the int8 activation ranges (real
    data is best for accuracy; latency does not depend on them): by default a few random ones.
    """

    def __init__(self, dense: nn.Module, table: LayerTable, graph: ChannelGraph | None,
                 input_shape: Sequence[int], rounds: int = DEFAULT_ROUNDS,
                 calls: int = DEFAULT_CALLS, warmup: int = DEFAULT_WARMUP,
                 calibration: Sequence[np.ndarray] | None = None, seed: int = 0):
        if rounds < 1 or calls < 1 or warmup < 0:
            raise ValueError(f"rounds ({rounds}) and calls ({calls}) must be at least 1, "
                             f"warmup ({warmup}) not negative")
        self.dense, self.table, self.graph = dense, table, graph
        self.input_shape = tuple(int(d) for d in input_shape)
        self.rounds, self.calls, self.warmup, self.seed = rounds, calls, warmup, seed
        if calibration is None:
            rng = np.random.default_rng(seed)
            calibration = [rng.standard_normal((CALIBRATION_BATCH_SIZE, *self.input_shape))
                           .astype(np.float32) for _ in range(CALIBRATION_BATCHES)]
        self.calibration = [np.asarray(batch, dtype=np.float32) for batch in calibration]
        if not self.calibration:
            raise ValueError("calibration: give at least one input batch (or None for random)")
        self._open_folder()
        self._dense_onnx: Path | None = None
        self._dense_alone_ms: float | None = None
        self._cache: dict[str, LatencyMeasurement] = {}
        self._count = 0

    def _open_folder(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="autosparse-measure-"))
        # removed by close(), when the timer is garbage-collected, or at exit
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)

    # ----------------------------------------------------------------------------------------

    @property
    def dense_onnx(self) -> Path:
        """The dense fp32 model as ONNX (exported on first use, then kept)."""
        if not self._cleanup.alive:  # closed, then used again
            self._open_folder()
        if self._dense_onnx is None:
            self._dense_onnx = export_onnx(copy.deepcopy(self.dense).cpu(), self.input_shape,
                                           self._dir / "dense.onnx")
        return self._dense_onnx

    def dense_ms(self) -> float:
        """The dense model alone (same rounds and calls), measured once: the reference a search
        normalises measured latencies by (``dense = 1`` on the latency axis)."""
        if self._dense_alone_ms is None:
            times = time_onnx_files({"dense": self.dense_onnx}, self.input_shape, self.rounds,
                                    self.calls, self.warmup, self.seed)
            self._dense_alone_ms = times["dense"] * 1e3
        return self._dense_alone_ms

    def measure(self, candidate: Candidate, student: nn.Module,
                scores: Mapping[str, torch.Tensor] | None = None,
                built: tuple[str, Path] | None = None) -> LatencyMeasurement:
        """Latency of the candidate's deployable model, cached by ``candidate.key``.

        ``student`` is the candidate's compressed (parametrized) model, fine-tuned or not; it is
        not modified. ``scores`` are the criterion scores it was compressed with (only needed
        for Taylor channel choices: they decide which channels were kept). ``built`` is
        (format, path) of the deploy target's file when the search already wrote it
        (``deploy_file``): that file is timed instead of an ONNX export of the student.
        """
        cached = self._cache.get(candidate.key)
        if cached is not None:
            return replace(cached, seconds=0.0, cached=True)
        start = time.perf_counter()
        dense_onnx = self.dense_onnx  # (re)opens the folder after close()
        self._count += 1
        folder = self._dir / f"candidate-{self._count}"
        try:
            path = built[1] if built else self._export(candidate, student, scores, folder)
            times = time_onnx_files({"dense": dense_onnx, "candidate": path},
                                    self.input_shape, self.rounds, self.calls, self.warmup,
                                    self.seed)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        result = LatencyMeasurement(times["candidate"] * 1e3, times["dense"] * 1e3,
                                    built[0] if built else deployable_format(candidate,
                                                                             self.table),
                                    time.perf_counter() - start)
        self._cache[candidate.key] = result
        return result

    def latency_ms(self, candidate: Candidate, student: nn.Module,
                   scores: Mapping[str, torch.Tensor] | None = None) -> float:
        """Median batch-1 latency (ms) of the candidate's deployable model (see :meth:`measure`)."""
        return self.measure(candidate, student, scores).latency_ms

    def close(self) -> None:
        """Remove the temporary folder (the dense ONNX); the cache stays, and a later
        measurement opens a new folder."""
        self._cleanup()
        self._dense_onnx = None

    # ----------------------------------------------------------------------------------------

    def _export(self, candidate: Candidate, student: nn.Module,
                scores: Mapping[str, torch.Tensor] | None, folder: Path) -> Path:
        """The deployable ONNX file of the candidate (what ``autosparse export`` writes)."""
        baked = bake(copy.deepcopy(student).cpu())
        shrunk, _, _ = shrink_as_compressed(baked, self.dense, candidate, self.table, self.graph,
                                            scores)
        fp32 = export_onnx(shrunk, self.input_shape, folder / "model.onnx")
        if deployable_format(candidate, self.table) == FP32:
            return fp32
        return quantize_onnx_int8(fp32, folder / "model.int8.onnx", iter(self.calibration))
