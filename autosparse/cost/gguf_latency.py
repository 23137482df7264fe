"""Direct measurement of one-shot candidates in the runtime their export targets: llama.cpp.

``hardware: measure`` with ``oneshot``: each candidate's GGUF (``write_candidate_gguf``: the
level database's stored bytes, exactly the file ``autosparse export`` writes) is written to a
private temporary folder, loaded in llama.cpp (llama-cpp-python) and timed *together with* the
dense model's F32 GGUF (written and loaded once), batch 1, one thread, in interleaved rounds so
that drift on a shared machine hits both alike. One round of one model, from an empty context::

    prefill   ``prompt_tokens`` random token ids in one batch: ms per prompt token
    decode    ``calls`` single-token evaluations that follow, each timed: their median is the
              round's ms per generated token

Each model first runs one untimed prefill and ``warmup`` untimed decodes. Medians over the
rounds (shuffled order per round, garbage collector paused) are the figures: ``latency_ms`` is
ms per generated token (what a user waits per token in a chat), ``prompt_ms`` ms per prompt
token. The candidate file is deleted after it is timed; a measurement is cached by the
candidate's key, so a repeated candidate is timed once per process.

llama.cpp has no sparse kernels: a pruned layer runs dense in its type, so the figures follow the
stored types (bits), not sparsity. llama-cpp-python is optional and built separately
(``bash scripts/llama_cpp.sh``): :func:`require_llama_cpp` refuses a config that needs it, in one
line, before any heavy work.
"""

from __future__ import annotations

import gc
import io
import random
import shutil
import statistics
import sys
import tempfile
import time
import weakref
from collections.abc import Mapping
from contextlib import ExitStack, redirect_stderr
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from autosparse.compress.oneshot.database import LevelDatabase
from autosparse.compress.oneshot.gguf_candidate import write_candidate_gguf
from autosparse.compress.oneshot.levels import Level
from autosparse.config.validation import ConfigError
from autosparse.cost.llama_cpp import _check_positions, _model

__all__ = ["GGUFTimer", "GGUFLatency", "require_llama_cpp", "DEFAULT_PROMPT_TOKENS",
           "INSTALL_HINT"]

DEFAULT_PROMPT_TOKENS = 32
MAX_BATCH = 512  # llama.cpp's batch for the prefill (longer prompts are evaluated in batches)
INSTALL_HINT = "run `bash scripts/llama_cpp.sh` to build llama-cpp-python into .venv"
THREADS = 1


def require_llama_cpp(why: str = "hardware: measure with oneshot times each candidate's GGUF "
                      "in llama.cpp") -> None:
    """Raise a one-line :class:`ConfigError` when llama-cpp-python cannot be imported."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as error:
        raise ConfigError(f"{why}, and llama-cpp-python is not installed ({error}): "
                          f"{INSTALL_HINT}, or set 'hardware' to a profile to predict "
                          "latency instead") from None


@dataclass(frozen=True)
class GGUFLatency:
    """One candidate's GGUF timed against the dense F32 GGUF in the same interleaved rounds.

    ``seconds`` is the wall time the call spent (write, load, time); a cached result has
    ``seconds == 0`` and ``cached`` set.
    """

    latency_ms: float  # median ms per generated token (single-token decode)
    prompt_ms: float  # median ms per prompt token (prefill of prompt_tokens in one batch)
    dense_ms: float  # the dense F32 GGUF, same rounds
    dense_prompt_ms: float
    seconds: float
    cached: bool = False

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.latency_ms

    def metrics(self) -> dict[str, float]:
        """What a trial stores (numbers only, as every trial metric)."""
        return {"latency_ms": self.latency_ms, "latency_dense_ms": self.dense_ms,
                "latency_prompt_ms": self.prompt_ms,
                "latency_prompt_dense_ms": self.dense_prompt_ms,
                "speedup_measured": self.speedup, "latency_measure_seconds": self.seconds,
                "latency_source.measured": 1.0, "latency_source.llama_cpp": 1.0}


class GGUFTimer:
    """Times one-shot candidates' GGUF files in llama.cpp beside the dense model's F32 GGUF.

    ``dense`` is the model the level database ``db`` was built from; ``measure(key,
    assignment)`` takes a candidate's key (the cache key) and its level of each searched layer
    (``OneShotScoring.assignment``). ``db`` may be None until the first :meth:`measure` (set
    the attribute): the dense model is timed without it, so a search learns that its model
    cannot be timed before it builds the database. Files go to a private folder made under ``parent`` (default:
    the system's temporary folder), removed by :meth:`close`, when the timer is collected, or at
    exit. ``rounds``, ``calls`` and ``warmup`` mean what ``hardware: measure``'s settings mean
    (see the module docstring); ``prompt_tokens`` is the prefill's length.
    """

    def __init__(self, dense: nn.Module, db: LevelDatabase | None, *, rounds: int = 21,
                 calls: int = 11, warmup: int = 10,
                 prompt_tokens: int = DEFAULT_PROMPT_TOKENS, parent: Path | None = None,
                 seed: int = 0):
        if rounds < 1 or calls < 1 or warmup < 0 or prompt_tokens < 1:
            raise ValueError(f"rounds ({rounds}), calls ({calls}) and prompt_tokens "
                             f"({prompt_tokens}) must be at least 1, warmup ({warmup}) not "
                             "negative")
        if parent is not None and Path(parent).exists() and not Path(parent).is_dir():
            raise ValueError(f"parent {parent} is not a folder")
        self.dense, self.db = dense, db
        self.rounds, self.calls, self.warmup = rounds, calls, warmup
        self.prompt_tokens, self.seed = prompt_tokens, seed
        self.parent = None if parent is None else Path(parent)
        self.n_ctx = prompt_tokens + max(calls, warmup, 1)
        self._cache: dict[str, GGUFLatency] = {}
        self._dense_alone: tuple[float, float] | None = None
        self._ids: list[int] | None = None
        self._count = 0
        self._stack: ExitStack | None = None
        self._dense_llm: Any = None
        self._cleanup: weakref.finalize | None = None

    # ----------------------------------------------------------------------------------------

    @property
    def folder(self) -> Path:
        """The private folder (made on first use, again after :meth:`close`)."""
        if self._cleanup is None or not self._cleanup.alive:
            if self.parent is not None:
                self.parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix="gguf-measure-", dir=self.parent))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
        return self._dir

    def _dense(self) -> Any:
        """The dense F32 GGUF, written and loaded once (kept loaded until :meth:`close`)."""
        if self._dense_llm is None:
            path = self.folder / "dense.gguf"
            write_candidate_gguf(self.dense, self.db, {}, path)  # no assignment: all F32
            self._stack = ExitStack()
            self._dense_llm = self._load(path, self._stack)
        return self._dense_llm

    def _load(self, path: Path, stack: ExitStack) -> Any:
        # llama-cpp-python prints llama.cpp's warnings at load even when not verbose (e.g. a
        # context longer than a tiny model's training context); shown only if loading fails
        stderr = sys.stderr
        with redirect_stderr(io.StringIO()) as log:
            try:
                llm = stack.enter_context(_model(path, n_ctx=self.n_ctx, logits_all=False,
                                                 n_threads=THREADS,
                                                 n_batch=min(self.prompt_tokens, MAX_BATCH),
                                                 exact_kv=False))
            except Exception:
                stderr.write(log.getvalue())
                raise
        _check_positions(llm, self.n_ctx)  # learned positions (GPT-2): past them llama.cpp aborts
        if self._ids is None:
            rng = np.random.default_rng(self.seed)
            self._ids = rng.integers(0, llm.n_vocab(), size=self.n_ctx).tolist()
        elif max(self._ids) >= llm.n_vocab():
            raise ValueError(f"{path.name} has a vocabulary of {llm.n_vocab()}, the dense "
                             "model's is larger")
        self._run(llm, self.warmup)  # first-call allocations, thread start, caches
        return llm

    def _run(self, llm: Any, decodes: int) -> tuple[float, float]:
        """One round from an empty context: (ms per prompt token, median ms per decode)."""
        ids = self._ids
        assert ids is not None
        prompt, rest = ids[: self.prompt_tokens], ids[self.prompt_tokens:]
        llm.reset()  # n_tokens = 0: the next eval drops the whole key/value cache
        start = time.perf_counter_ns()
        llm.eval(prompt)
        prompt_ns = (time.perf_counter_ns() - start) / len(prompt)
        samples = []
        for token in rest[:decodes]:
            start = time.perf_counter_ns()
            llm.eval([token])
            samples.append(time.perf_counter_ns() - start)
        return prompt_ns * 1e-6, (statistics.median(samples) * 1e-6 if samples else 0.0)

    def _time(self, models: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        """Per model: (median decode ms, median prompt ms per token) over interleaved rounds."""
        names = list(models)
        decode: dict[str, list[float]] = {n: [] for n in names}
        prompt: dict[str, list[float]] = {n: [] for n in names}
        shuffle = random.Random(self.seed)
        enabled = gc.isenabled()
        gc.collect()
        gc.disable()
        try:
            for _ in range(self.rounds):
                shuffle.shuffle(names)
                for name in names:
                    p, d = self._run(models[name], self.calls)
                    prompt[name].append(p)
                    decode[name].append(d)
        finally:
            if enabled:
                gc.enable()
        return {n: (statistics.median(decode[n]), statistics.median(prompt[n])) for n in models}

    # ----------------------------------------------------------------------------------------

    def dense_latency(self) -> tuple[float, float]:
        """The dense F32 GGUF alone (same rounds), measured once: (ms per generated token, ms
        per prompt token), the reference a search normalises measured latencies by."""
        if self._dense_alone is None:
            self._dense_alone = self._time({"dense": self._dense()})["dense"]
        return self._dense_alone

    def dense_ms(self) -> float:
        """ms per generated token of the dense F32 GGUF (see :meth:`dense_latency`)."""
        return self.dense_latency()[0]

    def dense_metrics(self) -> dict[str, float]:
        """The dense model's figures under the names a trial stores them."""
        decode, prompt = self.dense_latency()
        return {"latency_ms": decode, "latency_prompt_ms": prompt}

    def measure(self, key: str, assignment: Mapping[str, Level]) -> GGUFLatency:
        """The candidate's GGUF timed beside the dense one, cached by ``key``."""
        cached = self._cache.get(key)
        if cached is not None:
            return replace(cached, seconds=0.0, cached=True)
        if self.db is None:
            raise ValueError("measure: no level database yet (set the timer's db)")
        if not assignment:
            raise ValueError("measure: an empty assignment is the dense model; give each "
                             "searched layer's level")
        unknown = sorted(set(assignment) - set(self.db.layers))
        if unknown:
            raise ValueError(f"measure: layers {unknown[:3]} are not in the level database")
        start = time.perf_counter()
        dense = self._dense()
        self._count += 1
        path = self.folder / f"candidate-{self._count}.gguf"
        try:
            with ExitStack() as stack:
                write_candidate_gguf(self.dense, self.db, assignment, path)
                llm = self._load(path, stack)
                times = self._time({"dense": dense, "candidate": llm})
        finally:
            path.unlink(missing_ok=True)
        (latency, prompt), (dense_ms, dense_prompt) = times["candidate"], times["dense"]
        result = GGUFLatency(latency, prompt, dense_ms, dense_prompt,
                             time.perf_counter() - start)
        self._cache[key] = result
        return result

    def close(self) -> None:
        """Unload the dense model and remove the folder; the cache stays, and a later
        measurement opens a new folder."""
        if self._stack is not None:
            self._stack.close()
        self._stack, self._dense_llm = None, None
        if self._cleanup is not None:
            self._cleanup()
