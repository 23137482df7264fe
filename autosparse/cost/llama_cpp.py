"""Run an exported GGUF in llama.cpp (through llama-cpp-python): logits, perplexity, tokens/s.

Why: the GGUF export is only worth its scored size if the runtime that deploys it loads it and
computes what the search measured; these functions are how the tests and a caller check that, on
token ids directly (the project's LMs are byte level, so no text tokenization is involved).
``llama_cpp`` is imported inside each function: it is an optional, separately built dependency
(``scripts/llama_cpp.sh``), and the rest of the export stage must not need it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LlamaCppSpeed", "llama_cpp_logits", "llama_cpp_perplexity",
           "llama_cpp_tokens_per_second"]

GGML_TYPE_F32 = 0  # ggml_type of an F32 key/value cache
LEARNED_POSITIONS = ("gpt2",)  # architectures with a position_embd table of n_ctx_train rows


def _llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as error:  # the binding is built from source, so it may well be missing
        raise ImportError("llama_cpp (llama-cpp-python) is not installed; run "
                          "`bash scripts/llama_cpp.sh` to build it into .venv") from error
    return llama_cpp


@contextmanager
def _model(path: str | os.PathLike[str], n_ctx: int, *, logits_all: bool,
           n_threads: int | None, n_batch: int, exact_kv: bool) -> Iterator[Any]:
    """A loaded model, closed (its memory freed) on exit. ``exact_kv`` keeps the key/value cache
    in F32 instead of llama.cpp's default F16, so logits compare with a float32 reference."""
    llama_cpp = _llama_cpp()
    if not Path(path).is_file():
        raise FileNotFoundError(path)
    threads = n_threads or max(1, os.cpu_count() or 1)
    kwargs: dict[str, Any] = {}
    if exact_kv:
        kwargs.update(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32)
    llm = llama_cpp.Llama(model_path=os.fspath(path), n_ctx=n_ctx, n_batch=n_batch,
                          n_ubatch=n_batch, logits_all=logits_all, n_threads=threads,
                          n_threads_batch=threads, verbose=False, **kwargs)
    try:
        yield llm
    finally:
        llm.close()


def _check_ids(token_ids: Sequence[int], n_vocab: int) -> list[int]:
    ids = [int(t) for t in token_ids]
    if not ids:
        raise ValueError("no token ids to evaluate")
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token ids outside the vocabulary of {n_vocab}: {bad[:5]}")
    return ids


def _check_positions(llm: Any, n_tokens: int) -> None:
    """A model with learned positions (GPT-2's ``position_embd``) has no row for a position past
    its trained context: llama.cpp then aborts the whole process (``GGML_ASSERT`` in
    ``get_rows``), so such a request is refused first, in one line."""
    arch = llm.metadata.get("general.architecture")
    n_ctx_train = llm._model.n_ctx_train()
    if arch in LEARNED_POSITIONS and n_tokens > n_ctx_train:
        raise ValueError(f"{n_tokens} tokens in one context: this {arch} file has learned "
                         f"positions for {n_ctx_train} only")


def _sequence_logits(llm: Any, ids: list[int]) -> np.ndarray:
    _check_positions(llm, len(ids))
    llm.reset()  # n_tokens = 0: the next eval drops the whole key/value cache
    llm.eval(_check_ids(ids, llm.n_vocab()))
    return np.array(llm.scores[: len(ids)], dtype=np.float32, copy=True)


def llama_cpp_logits(path: str | os.PathLike[str], token_ids: Sequence[int], *,
                     n_threads: int | None = None) -> np.ndarray:
    """Logits ``[len(token_ids), n_vocab]`` of one sequence, every position (llama.cpp's
    ``logits_all``), evaluated from an empty context with an F32 key/value cache."""
    n = len(token_ids)
    with _model(path, n_ctx=max(n, 8), logits_all=True, n_threads=n_threads, n_batch=max(n, 8),
                exact_kv=True) as llm:
        return _sequence_logits(llm, list(token_ids))


def llama_cpp_perplexity(path: str | os.PathLike[str], sequences: Sequence[Sequence[int]], *,
                         n_threads: int | None = None) -> float:
    """Perplexity over ``sequences`` (each evaluated from an empty context): exp of the mean
    negative log-likelihood of every token after the first given the ones before it, the same
    next-token objective the search's language-model metric uses."""
    seqs = [list(s) for s in sequences]
    if not seqs or any(len(s) < 2 for s in seqs):
        raise ValueError("perplexity needs sequences of at least 2 tokens")
    longest = max(len(s) for s in seqs)
    nll, count = 0.0, 0
    with _model(path, n_ctx=longest, logits_all=True, n_threads=n_threads, n_batch=longest,
                exact_kv=True) as llm:
        for ids in seqs:
            logits = _sequence_logits(llm, ids)[:-1].astype(np.float64)
            shifted = logits - logits.max(axis=1, keepdims=True)
            log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
            nll -= float(log_probs[np.arange(len(ids) - 1), ids[1:]].sum())
            count += len(ids) - 1
    return float(np.exp(nll / count))


@dataclass(frozen=True)
class LlamaCppSpeed:
    """llama-bench's two numbers: prompt processing (``pp``: the prompt in batches) and text
    generation (``tg``: one token per decode call), as tokens per second, median of repeats."""

    prompt_tokens_per_s: float
    gen_tokens_per_s: float
    n_prompt: int
    n_gen: int
    n_threads: int
    repeats: int


def llama_cpp_tokens_per_second(path: str | os.PathLike[str], n_prompt: int = 128,
                                n_gen: int = 32, *, n_threads: int | None = None,
                                repeats: int = 3, seed: int = 0) -> LlamaCppSpeed:
    """Measured throughput, the way llama-bench measures it: random token ids (speed does not
    depend on which), one warm-up decode, then per repeat from an empty context: the wall time
    (``time.perf_counter``) of evaluating ``n_prompt`` ids (batches of up to 512), then of
    ``n_gen`` single-token decodes that follow it (no sampling: the decode is what is timed).
    tokens/s = tokens / seconds; the median over ``repeats`` is reported. The key/value cache
    has llama.cpp's default type (F16), as a deployment would run it.
    ``n_threads`` defaults to every core; on a machine other processes keep busy, pass fewer:
    ggml's threads spin at each barrier and collapse when descheduled (measured on 2 cores at
    load 6, 25M-parameter F32 model: 0.9 generated tokens/s with 2 threads, 68 with 1).
    A model with learned positions (GPT-2) cannot run past its trained context: ValueError when
    ``n_prompt + n_gen`` exceeds it."""
    if n_prompt < 1 or n_gen < 1 or repeats < 1:
        raise ValueError("n_prompt, n_gen and repeats must be at least 1")
    threads = n_threads or max(1, os.cpu_count() or 1)
    with _model(path, n_ctx=n_prompt + n_gen, logits_all=False, n_threads=threads,
                n_batch=min(n_prompt, 512), exact_kv=False) as llm:
        _check_positions(llm, n_prompt + n_gen)
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, llm.n_vocab(), size=n_prompt + n_gen).tolist()
        llm.reset()
        llm.eval(ids[: min(n_prompt, 8)])  # warm-up: first-call allocations and thread start
        prompt_rates, gen_rates = [], []
        for _ in range(repeats):
            llm.reset()
            start = time.perf_counter()
            llm.eval(ids[:n_prompt])
            prompt_rates.append(n_prompt / (time.perf_counter() - start))
            start = time.perf_counter()
            for token in ids[n_prompt:]:
                llm.eval([token])
            gen_rates.append(n_gen / (time.perf_counter() - start))
    return LlamaCppSpeed(prompt_tokens_per_s=statistics.median(prompt_rates),
                         gen_tokens_per_s=statistics.median(gen_rates), n_prompt=n_prompt,
                         n_gen=n_gen, n_threads=threads, repeats=repeats)
