"""One-shot fitness of a language-model candidate: KL divergence of its next-token distributions
to the dense model's, on calibration tokens, with no training and no compression work.

Why KL and not perplexity: the candidate should behave like the dense model, not merely fit the
calibration text; KL to the dense distributions uses every vocabulary entry of every position
(a far denser signal per token than the one target's likelihood), is 0 exactly for the dense
model, and is what EvoPress scores with. Perplexity on held-out text is for the final front.

Pieces:

* ``DenseReference``: the dense model's log-probabilities on the calibration windows, once.
  Full float32 ``[windows, seq_len - 1, vocab]``: for the benchmark's byte vocabulary (256) that
  is 1 KiB a token - 64k tokens are 64 MiB. A 128k vocabulary would need 512 KiB a token
  (32 GiB for 64k tokens), so ``top_k`` keeps the k most likely tokens and the rest mass
  (``8k + 4`` bytes a token); the KL is then the one between the (k + 1)-bin distributions
  (top-k tokens, "any other"), a lower bound of the full KL (data processing inequality), equal
  to it when the candidate moves little mass between the other tokens.
* ``kl_fitness``: mean per-token KL(dense || candidate) over the positions that predict tokens
  ``1 .. seq_len - 1`` of the first ``n_windows`` windows (the windows come in seeded random
  order, so a prefix is a fair sample; it is batched like the reference, so the dense model
  scores exactly 0 when ``n_windows`` is a multiple of the batch size).
* ``CandidateScorer``: assemble a candidate from the level database and score it; counts model
  evaluations and tokens (methods are compared at equal evaluations) and caches scores.
* ``successive_halving``: many candidates on few tokens, the best few on more (EvoPress).
* ``layer_sensitivity``: each layer alone at each level, the rest dense; resumable.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from autosparse.compress.oneshot.database import LevelDatabase, assemble
from autosparse.compress.oneshot.level_files import (
    as_level,
    tokens_fingerprint,
    write_atomic,
)
from autosparse.compress.oneshot.levels import Level
from autosparse.workload.devices import device_of, eval_mode

__all__ = ["CandidateScorer", "DenseReference", "kl_fitness", "layer_sensitivity", "model_logits",
           "successive_halving", "token_stages"]

Assignment = Mapping[str, Level | str]
LogitsFn = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def model_logits(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Logits ``[batch, seq, vocab]`` of a causal LM: transformers' ``.logits`` (called with
    ``use_cache=False``: no key/value cache to build) or a plain module's tensor."""
    config = getattr(model, "config", None)
    out = model(batch, use_cache=False) if hasattr(config, "use_cache") else model(batch)
    return out.logits if hasattr(out, "logits") else out


def _logprobs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the positions that predict a token of the window (all but the last)."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _rest(logprobs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the mass outside ``index`` (logsumexp of the others: no 1 - sum cancellation)."""
    return torch.logsumexp(logprobs.scatter(-1, index, float("-inf")), dim=-1)


def _plogp(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """``p (log p - log q)`` with ``0 log 0 = 0``."""
    p = logp.exp()
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p))


class DenseReference:
    """The dense model's next-token log-probabilities on ``windows`` ``[count, seq_len]``.

    Computed in batches of ``batch_size`` (``kl_fitness`` batches the same way), kept on the
    CPU: ``logprobs`` float32 ``[count, seq_len - 1, vocab]``, or with ``top_k``
    ``top_logprobs`` float32 and ``top_index`` int32 ``[count, seq_len - 1, k]`` and
    ``rest_logprob`` ``[count, seq_len - 1]``. ``nbytes`` says what it holds.
    """

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 8, *,
                 top_k: int | None = None, logits: LogitsFn = model_logits) -> None:
        windows = torch.as_tensor(windows, dtype=torch.long).cpu()
        if windows.ndim != 2 or windows.shape[1] < 2 or len(windows) == 0:
            raise ValueError(f"windows must be [count >= 1, seq_len >= 2], got {tuple(windows.shape)}")
        if batch_size < 1 or (top_k is not None and top_k < 1):
            raise ValueError(f"batch_size and top_k must be >= 1, got {batch_size}, {top_k}")
        self.windows, self.batch_size, self.top_k, self.logits = windows, batch_size, top_k, logits
        started = time.perf_counter()
        parts: list[tuple[torch.Tensor, ...]] = []
        device = device_of(model)
        with torch.no_grad(), eval_mode(model):
            for start in range(0, len(windows), batch_size):
                lp = _logprobs(logits(model, windows[start:start + batch_size].to(device)))
                if top_k is None:
                    parts.append((lp.cpu(),))
                    continue
                values, index = lp.topk(min(top_k, lp.shape[-1]), dim=-1)
                parts.append((values.cpu(), index.int().cpu(), _rest(lp, index).cpu()))
        self.vocab = int(lp.shape[-1])
        stacked = [torch.cat(p) for p in zip(*parts, strict=True)]
        if top_k is None:
            (self.logprobs,) = stacked
        else:
            self.top_logprobs, self.top_index, self.rest_logprob = stacked
        self.seconds = time.perf_counter() - started
        self.fingerprint = f"{tokens_fingerprint(windows)}-{top_k or 'full'}"

    @property
    def n_windows(self) -> int:
        return len(self.windows)

    @property
    def tokens_per_window(self) -> int:
        """Predicted tokens a window scores: ``seq_len - 1``."""
        return int(self.windows.shape[1]) - 1

    @property
    def nbytes(self) -> int:
        held = (self.logprobs,) if self.top_k is None else (
            self.top_logprobs, self.top_index, self.rest_logprob)
        return sum(t.numel() * t.element_size() for t in held)

    def kl(self, start: int, stop: int, logq: torch.Tensor) -> torch.Tensor:
        """Per-token KL(dense || candidate) ``[stop - start, seq_len - 1]`` of windows
        ``start:stop``, from the candidate's log-probabilities ``logq`` (on any device)."""
        if self.top_k is None:
            return _plogp(self.logprobs[start:stop].to(logq.device), logq).sum(-1)
        logp = self.top_logprobs[start:stop].to(logq.device)
        index = self.top_index[start:stop].to(logq.device).long()
        rest_p = self.rest_logprob[start:stop].to(logq.device)
        top = _plogp(logp, logq.gather(-1, index)).sum(-1)
        return top + _plogp(rest_p, _rest(logq, index))


def _check_windows(reference: DenseReference, n_windows: int | None) -> int:
    n = reference.n_windows if n_windows is None else n_windows
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= reference.n_windows:
        raise ValueError(f"n_windows must be an integer 1..{reference.n_windows} (the reference's "
                         f"windows), got {n_windows!r}")
    return n


def kl_fitness(model: nn.Module, reference: DenseReference, n_windows: int | None = None) -> float:
    """Mean KL(dense || model) per predicted token on the reference's first ``n_windows``
    windows (all by default); float64 sum. Float rounding can leave a candidate equal to the
    dense model a hair from 0 (either sign) when the batching differs from the reference's."""
    n = _check_windows(reference, n_windows)
    device = device_of(model)
    total = 0.0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, n, reference.batch_size):
            stop = min(start + reference.batch_size, n)
            logq = _logprobs(reference.logits(model, reference.windows[start:stop].to(device)))
            total += float(reference.kl(start, stop, logq).double().sum())
    return total / (n * reference.tokens_per_window)


def _key(assignment: Assignment) -> tuple[tuple[str, str], ...]:
    """A candidate's identity: its non-dense (layer, level key) pairs, sorted."""
    pairs = ((layer, as_level(level)) for layer, level in assignment.items())
    return tuple(sorted((layer, level.key) for layer, level in pairs if not level.is_dense))


class CandidateScorer:
    """``score(assignment, n_windows)`` = ``assemble`` + ``kl_fitness``, cached by
    (non-dense assignment, n_windows). ``evaluations`` and ``tokens`` count model evaluations
    actually run (cache hits are counted apart, in ``cache_hits``); ``seconds`` their time."""

    def __init__(self, model: nn.Module, db: LevelDatabase, reference: DenseReference) -> None:
        self.model, self.db, self.reference = model, db, reference
        self.evaluations = 0
        self.tokens = 0
        self.cache_hits = 0
        self.seconds = 0.0
        self._cache: dict[tuple[Any, int], float] = {}

    def score(self, assignment: Assignment, n_windows: int | None = None) -> float:
        n = _check_windows(self.reference, n_windows)
        key = (_key(assignment), n)
        if key in self._cache:
            self.cache_hits += 1
            return self._cache[key]
        started = time.perf_counter()
        with assemble(self.model, self.db, assignment):
            kl = kl_fitness(self.model, self.reference, n)
        self.seconds += time.perf_counter() - started
        self.evaluations += 1
        self.tokens += n * self.reference.tokens_per_window
        self._cache[key] = kl
        return kl


class _Scorer(Protocol):
    """What ``successive_halving`` and ``layer_sensitivity`` need (``CandidateScorer``)."""

    def score(self, assignment: Assignment, n_windows: int | None = None) -> float: ...


def token_stages(seq_len: int, n_windows: int, tokens: Sequence[int] = (2048, 16384, 65536),
                 survivors: Sequence[int] = (16, 4, 1)) -> tuple[tuple[int, int], ...]:
    """EvoPress's stages in windows: ``ceil(tokens / (seq_len - 1))`` per stage, at most the
    ``n_windows`` the reference holds."""
    if len(tokens) != len(survivors) or seq_len < 2:
        raise ValueError("tokens and survivors must pair up, and seq_len must be >= 2")
    return tuple((min(n_windows, max(1, math.ceil(t / (seq_len - 1)))), s)
                 for t, s in zip(tokens, survivors, strict=True))


def successive_halving(
    scorer: _Scorer, candidates: Sequence[Assignment], stages: Sequence[tuple[int, int]],
) -> list[tuple[Assignment, float]]:
    """Keep the best candidates while the token count grows (EvoPress's selection)::

        pool = candidates
        for n_windows, survivors in stages:
            scored = [(c, scorer.score(c, n_windows)) for c in pool]
            pool = the `survivors` of lowest KL in scored (ties: the earlier candidate)
        return pool with its last-stage KL, best first

    Cheap, noisy scores on few tokens discard the clearly bad; only the few left pay for many
    tokens. ``stages`` e.g. ``token_stages(seq_len, n)`` = 2k/16k/64k tokens, 16/4/1 survivors.
    """
    if not candidates:
        raise ValueError("candidates is empty")
    if not stages or any(len(s) != 2 or int(s[0]) < 1 or int(s[1]) < 1 for s in stages):
        raise ValueError(f"stages must be non-empty (n_windows >= 1, survivors >= 1) pairs, "
                         f"got {stages!r}")
    pool = list(candidates)
    scored: list[tuple[Assignment, float]] = []
    for n_windows, survivors in stages:
        scored = [(c, scorer.score(c, int(n_windows))) for c in pool]
        order = sorted(range(len(scored)), key=lambda i: (scored[i][1], i))
        scored = [scored[i] for i in order[:int(survivors)]]
        pool = [c for c, _ in scored]
    return scored


def layer_sensitivity(
    scorer: CandidateScorer, layers: Sequence[str],
    levels: Sequence[Level | str] | Mapping[str, Sequence[Level | str]] | None,
    n_windows: int | None = None, *, path: Path | str | None = None,
) -> dict[tuple[str, str], float]:
    """KL of each layer alone at each level, every other layer dense: ``{(layer, level.key): kl}``
    - the input of the knapsack and of the GA's seeds. ``levels``: one list for all layers, a
    dict per layer, or ``None`` for each layer's levels in the database. The dense level
    scores 0 without a run. With ``path``, the results are written there (JSON, atomically)
    after every score and read back first, so an interrupted run resumes; a file made for
    another database, reference or ``n_windows`` is refused."""
    n = _check_windows(scorer.reference, n_windows)
    stamp = {"database": scorer.db.fingerprint, "reference": scorer.reference.fingerprint,
             "n_windows": n}
    results: dict[tuple[str, str], float] = {}
    if path is not None and Path(path).is_file():
        saved = json.loads(Path(path).read_text())
        if {k: saved.get(k) for k in stamp} != stamp:
            raise ValueError(f"{path} holds sensitivities for another database, reference or "
                             f"n_windows ({ {k: saved.get(k) for k in stamp} } vs {stamp}); "
                             "use another path or delete it")
        results = {(layer, key): float(kl) for layer, key, kl in saved["kl"]}
    for layer in layers:
        if levels is None:
            wanted = scorer.db.levels(layer)
        else:
            wanted = levels[layer] if isinstance(levels, Mapping) else levels
        for level in map(as_level, wanted):
            if (layer, level.key) in results:
                continue
            kl = 0.0 if level.is_dense else scorer.score({layer: level}, n)
            results[(layer, level.key)] = kl
            if path is not None:
                rows = [[lay, key, value] for (lay, key), value in results.items()]
                write_atomic(Path(path), (json.dumps({**stamp, "kl": rows}, indent=1) + "\n").encode())
    return results
