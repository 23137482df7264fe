"""Token sets for decoder language models, from local text only.

A decoder LM is searched by one-shot compression scored on calibration tokens (KL divergence to
the dense model) and reported by held-out perplexity on test tokens. Nothing can be downloaded,
so the text is local: by default the Python standard library's own source, which every machine
with Python has, and which is big enough (about 12 MB without its tests) for a small benchmark
model. A user's own files or globs work the same way.

The pipeline is: files -> :func:`split_files` (whole files, by a stable hash of their relative
path) -> :func:`read_tokens` per split -> :func:`token_windows` (non-overlapping windows at
seeded random offsets) -> :class:`TokenSets`. :func:`perplexity` and
:func:`next_token_logprobs` then score a ``transformers`` causal LM on those windows.

Layer rule: torch and transformers (the latter only inside :func:`load_tokenizer`), never optuna
or mlflow.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from autosparse.config.validation import ConfigError
from autosparse.workload.devices import device_of, eval_mode

__all__ = [
    "BYTE_TOKENIZER_FILE", "DEFAULT_FRACTIONS", "SEPARATOR", "ByteTokenizer", "TokenSets",
    "Tokenizer", "corpus_fingerprint", "load_tokenizer", "next_token_logprobs", "perplexity",
    "read_tokens", "resolve_sources", "split_files", "stdlib_root", "stdlib_source_files", "text_token_sets",
    "token_windows", "window_starts",
]

# train for the benchmark model's training; calibration scores candidates (KL); validation is
# for choices made while training or searching; test is touched only for the final report
DEFAULT_FRACTIONS: dict[str, float] = {
    "train": 0.80, "calibration": 0.05, "validation": 0.05, "test": 0.10,
}
SEPARATOR = "\n\n"  # between files: a blank line, as between top-level definitions
BYTE_TOKENIZER_FILE = "byte_tokenizer.json"  # marks a model folder whose tokenizer is bytes
# folder names whose files are the stdlib's own tests (see stdlib_source_files)
TEST_FOLDERS = frozenset({"test", "tests", "idle_test"})
_INSTALLED = frozenset({"site-packages", "dist-packages"})
_SPLIT_SALT = "autosparse-text-split-v1"  # versioned: changing it reshuffles every split


# ------------------------------------------------------------------------------- the files


def stdlib_root() -> Path:
    """The standard library's folder of the running Python (``sysconfig``'s ``stdlib``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(include_tests: bool = False, root: Path | None = None) -> list[Path]:
    """The standard library's ``.py`` files, sorted by relative path; installed packages excluded.

    ``site-packages``/``dist-packages`` hold whatever a machine happens to have installed, so
    they are never part of the corpus. The stdlib's own test folders (``test/``, ``*/tests/``,
    ``idlelib/idle_test/``) are left out by default: Debian, Ubuntu and Fedora ship them in a
    separate package (``libpython3.x-testsuite``, ``python3-test``) that most machines lack, so
    without them the corpus is the same on a pyenv, python.org, conda or distribution Python of
    the same version; they are also full of deliberately odd text (bad encodings, bad syntax,
    long encoded blobs). On 3.11 that keeps 734 of 1,790 files and 12 of 31 MB, still several
    times what the benchmark model reads in a 30-minute CPU training (a few million bytes).
    ``include_tests=True`` takes them all.

    The file set still differs between Python versions (and distributions may split off
    ``tkinter``, ``idlelib``, ``lib2to3``), which is why :func:`split_files` assigns each file
    by a hash of its own relative path: a file missing on one machine moves no other file, and
    :func:`corpus_fingerprint` tells two corpora apart.
    """
    root = stdlib_root() if root is None else Path(root)
    if not root.is_dir():
        raise ConfigError(f"the standard library folder {root} does not exist")
    found = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if _INSTALLED.intersection(parts):
            continue
        if not include_tests and TEST_FOLDERS.intersection(parts[:-1]):
            continue
        if path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _relative_key(path: Path, root: Path) -> str:
    """The path relative to ``root`` with forward slashes, the same on every OS."""
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        raise ConfigError(f"{path} is not inside the corpus root {root}") from None


def _unit_hash(key: str) -> float:
    """A number in [0, 1) from sha256 of ``key``: the same on every machine and every run
    (Python's ``hash`` of a string is salted per process, so it would not be)."""
    digest = hashlib.sha256(f"{_SPLIT_SALT}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_files(
    files: Iterable[Path | str], root: Path | str,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
) -> dict[str, list[Path]]:
    """Assign whole files to named splits by a stable hash of their path relative to ``root``.

    Each file's hash (sha256 of its relative path) is a number in [0, 1); the fractions, taken
    in the mapping's order, cut [0, 1) into consecutive intervals and the file goes to the split
    whose interval holds its number. So a file's split depends on its own relative path and the
    fractions only, never on the order of ``files`` or on which other files exist: every split
    is disjoint from the others, together they cover ``files``, and the result is the same on
    every machine. Whole files, not byte ranges, keep any file's text out of two splits (a
    held-out set that shares files with train would flatter the model). Split sizes follow the
    fractions in expectation (file counts and bytes vary with the files' sizes); each list is
    sorted by relative path.
    """
    root = Path(root)
    names = list(fractions)
    values = [float(fractions[name]) for name in names]
    if not names or any(not math.isfinite(v) or v < 0 for v in values):
        raise ConfigError(f"split fractions must be non-negative numbers, got {dict(fractions)}")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {dict(fractions)} "
                          f"(sum {sum(values):g})")
    bounds = np.cumsum(values)
    bounds[-1] = 1.0  # no file falls past the last split through rounding
    out: dict[str, list[Path]] = {name: [] for name in names}
    keyed = sorted({_relative_key(Path(p), root): Path(p) for p in files}.items())
    for key, path in keyed:
        index = int(np.searchsorted(bounds, _unit_hash(key), side="right"))
        out[names[min(index, len(names) - 1)]].append(path)
    return out


def corpus_fingerprint(files: Iterable[Path | str], root: Path | str) -> str:
    """A short hash of the files' relative paths and sizes: two machines whose fingerprints
    match read the same corpus (a changed Python version or distribution shows up here)."""
    root = Path(root)
    h = hashlib.sha256()
    for key, path in sorted((_relative_key(Path(p), root), Path(p)) for p in files):
        h.update(f"{key}\0{path.stat().st_size}\n".encode())
    return h.hexdigest()[:12]


# -------------------------------------------------------------------------------- tokenizers


class Tokenizer(Protocol):
    """What the readers need of a tokenizer: text to ids and back, and the vocabulary size."""

    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """Token id = byte value (vocabulary 256, no special tokens).

    The benchmark's own model uses it: it needs no trained vocabulary (nothing to download or
    fit), every file is representable, and a 256-row embedding keeps the model's linear layers
    the dominant cost, as in a real LM. Text is encoded as utf-8; decoding replaces invalid
    byte sequences rather than failing (a window may cut a character in half).
    """

    vocab_size = 256

    def encode(self, text: str | bytes, add_special_tokens: bool = False) -> list[int]:
        """The utf-8 bytes of ``text`` (bytes are taken as they are)."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        return list(data)

    def decode(self, ids: Sequence[int] | torch.Tensor, skip_special_tokens: bool = False) -> str:
        """The text of byte ids; bytes that are not valid utf-8 become U+FFFD."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        return bytes(values).decode("utf-8", errors="replace")

    def __len__(self) -> int:
        return self.vocab_size

    def save_pretrained(self, folder: str | Path) -> None:
        """Mark ``folder`` as byte-tokenized, so :func:`load_tokenizer` finds it later."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / BYTE_TOKENIZER_FILE).write_text(
            json.dumps({"tokenizer": "bytes", "vocab_size": self.vocab_size}) + "\n")


def load_tokenizer(model_folder: str | Path | None) -> Any:
    """The tokenizer saved in a local model folder, or :class:`ByteTokenizer` for ``None``.

    A folder with :data:`BYTE_TOKENIZER_FILE` (written by :meth:`ByteTokenizer.save_pretrained`,
    e.g. the benchmark model's) gets the byte tokenizer; anything else is loaded by
    ``transformers.AutoTokenizer`` from local files only (nothing may be downloaded). A folder
    with neither is an error that names the folder, not transformers' hub lookup message.
    """
    if model_folder is None:
        return ByteTokenizer()
    folder = Path(model_folder)
    if not folder.is_dir():
        raise ConfigError(f"tokenizer: the model folder {folder} does not exist")
    if (folder / BYTE_TOKENIZER_FILE).is_file():
        return ByteTokenizer()
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... by case
        raise ConfigError(
            f"tokenizer: the model folder {folder} holds no tokenizer transformers can load "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); save one "
            f"there with tokenizer.save_pretrained(folder), or pass no folder for byte tokens"
        ) from exc
    if tokenizer is None:
        raise ConfigError(f"tokenizer: the model folder {folder} holds no tokenizer")
    return tokenizer


# ------------------------------------------------------------------------------ the tokens


def read_tokens(
    files: Iterable[Path | str], tokenizer: Any, separator: str = SEPARATOR
) -> torch.Tensor:
    """All ``files`` as one 1-D LongTensor of token ids, joined by ``separator``.

    The byte tokenizer reads raw bytes (a file in another encoding stays byte-exact); any other
    tokenizer gets each file decoded as utf-8 with invalid bytes replaced, encoded file by file
    without special tokens (one huge string would trip tokenizers' length warnings and their
    memory), the separator's tokens between files. Files are read in the order given.
    """
    paths = [Path(p) for p in files]
    if isinstance(tokenizer, ByteTokenizer):
        data = separator.encode("utf-8").join(p.read_bytes() for p in paths)
        return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.long) \
            if data else torch.zeros(0, dtype=torch.long)
    sep = list(tokenizer.encode(separator, add_special_tokens=False))
    ids: list[int] = []
    for i, path in enumerate(paths):
        if i:
            ids.extend(sep)
        text = path.read_text(encoding="utf-8", errors="replace")
        ids.extend(tokenizer.encode(text, add_special_tokens=False))
    return torch.tensor(ids, dtype=torch.long)


def token_windows(tokens: torch.Tensor, seq_len: int, count: int, seed: int) -> torch.Tensor:
    """``count`` non-overlapping windows of ``seq_len`` tokens at random offsets: [count, seq_len].

    The spare tokens (length minus ``count * seq_len``) are spread over the gaps at random
    (``count`` sorted draws in [0, spare]; window ``i`` starts at ``i * seq_len`` plus the
    ``i``-th draw), so the windows are disjoint and land anywhere in the text, and the windows
    are returned in a seeded random order, so any prefix of them is a spread-out sample too.
    The same tokens and seed always give the same windows.
    """
    tokens = torch.as_tensor(tokens).reshape(-1)
    starts = window_starts(int(tokens.numel()), seq_len, count, seed)
    index = torch.from_numpy(starts)[:, None] + torch.arange(seq_len)[None, :]
    return tokens[index].to(torch.long)


def window_starts(n: int, seq_len: int, count: int, seed: int) -> np.ndarray:
    """The offsets (int64, in the windows' order) of :func:`token_windows` in ``n`` tokens."""
    if seq_len < 1 or count < 1:
        raise ConfigError(f"token windows need seq_len >= 1 and count >= 1, "
                          f"got seq_len={seq_len}, count={count}")
    need = seq_len * count
    if n < need:
        raise ConfigError(
            f"the text has {n:,} tokens, too short for {count} non-overlapping windows of "
            f"{seq_len} tokens ({need:,} needed): use fewer or shorter windows, or more text")
    rng = np.random.default_rng(seed)
    gaps = np.sort(rng.integers(0, n - need, size=count, endpoint=True))
    starts = np.arange(count, dtype=np.int64) * seq_len + gaps
    return starts[rng.permutation(count)]


@dataclass
class TokenSets:
    """Windows of the calibration, validation and test splits, [count, seq_len] each.

    ``files``/``bytes`` count every split's files and their bytes (train included, though no
    train windows are drawn here: training samples its own); ``tokens`` counts the tokens of
    the three window splits;
    ``fingerprint`` is :func:`corpus_fingerprint` of all files, for caches keyed on the data.
    """

    calibration: torch.Tensor
    validation: torch.Tensor
    test: torch.Tensor
    seq_len: int
    vocab_size: int
    fingerprint: str = ""
    files: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    # where the windows are: the corpus root, each window split's files (paths relative to the
    # root, in reading order) and its windows' offsets into those files' joined tokens
    root: str = ""
    split_files: dict[str, list[str]] = field(default_factory=dict)
    starts: dict[str, np.ndarray] = field(default_factory=dict)


WINDOW_SPLITS = ("calibration", "validation", "test")


def resolve_sources(source: str | Sequence[str | Path]) -> tuple[list[Path], Path]:
    """Files and their root: ``"stdlib"`` (:func:`stdlib_source_files`), or files and globs.

    Globs are expanded (``**`` recursive) and sorted; the root is the files' deepest common
    folder, so the split of a user's corpus is the same wherever its folder is moved.
    """
    if isinstance(source, str) and source == "stdlib":
        return stdlib_source_files(), stdlib_root()
    items = [source] if isinstance(source, (str, Path)) else list(source)
    files: set[Path] = set()
    for item in items:
        text = str(item)
        if glob.has_magic(text):
            matched = [Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p)]
            if not matched:
                raise ConfigError(f"text files: the pattern {text!r} matches no file")
            files.update(p.resolve() for p in matched)
        elif os.path.isfile(text):
            files.add(Path(text).resolve())
        else:
            raise ConfigError(f"text files: {text} is not a file (nor a glob pattern)")
    if not files:
        raise ConfigError("text files: no files given")
    ordered = sorted(files)
    root = Path(os.path.commonpath([str(p.parent) for p in ordered]))
    return ordered, root


def text_token_sets(
    source: str | Sequence[str | Path], tokenizer: Any, seq_len: int,
    counts: Mapping[str, int], seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
) -> TokenSets:
    """Calibration, validation and test windows from local text, split by whole files.

    ``source`` is ``"stdlib"`` or files/globs (:func:`resolve_sources`); ``counts`` gives the
    windows per split (``calibration``, ``validation``, ``test``); ``fractions`` must name those
    three (plus ``train``, whose text stays out of all three). Each split's windows are drawn
    with their own seed (``seed`` plus the split's position in ``WINDOW_SPLITS``), so changing
    one count leaves the others' windows as they were.
    """
    missing = [name for name in WINDOW_SPLITS if name not in fractions or name not in counts]
    if missing:
        raise ConfigError(f"text token sets: fractions and counts must name "
                          f"{', '.join(WINDOW_SPLITS)}; missing {', '.join(missing)}")
    files, root = resolve_sources(source)
    splits = split_files(files, root, fractions)
    out: dict[str, torch.Tensor] = {}
    token_counts: dict[str, int] = {}
    starts: dict[str, np.ndarray] = {}
    for i, name in enumerate(WINDOW_SPLITS):
        tokens = read_tokens(splits[name], tokenizer)
        token_counts[name] = int(tokens.numel())
        try:
            starts[name] = window_starts(token_counts[name], seq_len, int(counts[name]), seed + i)
        except ConfigError as exc:
            raise ConfigError(f"the {name} split ({len(splits[name])} files): {exc}") from None
        index = torch.from_numpy(starts[name])[:, None] + torch.arange(seq_len)[None, :]
        out[name] = tokens[index].to(torch.long)  # token_windows, with the offsets kept
    return TokenSets(
        **out, seq_len=seq_len, vocab_size=_vocab_size(tokenizer),
        fingerprint=corpus_fingerprint(files, root),
        files={k: len(v) for k, v in splits.items()},
        bytes={k: sum(p.stat().st_size for p in v) for k, v in splits.items()},
        tokens=token_counts, root=str(root), starts=starts,
        split_files={name: [_relative_key(p, root) for p in splits[name]]
                     for name in WINDOW_SPLITS},
    )


def _vocab_size(tokenizer: Any) -> int:
    """Ids the tokenizer can produce (transformers' ``len`` counts added tokens too)."""
    try:
        return len(tokenizer)
    except TypeError:
        return int(tokenizer.vocab_size)


# ---------------------------------------------------------------------------------- scoring


def _logits(model: Any, batch: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits [batch, seq, vocab]: transformers' output, or a bare tensor from a
    plain module (both take the ids as their first argument)."""
    out = model(batch)
    return out.logits if hasattr(out, "logits") else out


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean negative log-likelihood over every predicted token of ``windows``.

    Position ``t`` of a window predicts token ``t + 1``, so a window of ``seq_len`` tokens
    scores ``seq_len - 1`` of them; the mean is over all of those in all windows (every window
    weighs the same, as all are the same length). Runs without gradients, in eval mode (each
    submodule's mode restored after), on the model's device. A model that knows nothing
    (uniform logits) scores exactly the vocabulary size.
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ConfigError(f"perplexity needs windows [count, seq_len >= 2], "
                          f"got shape {tuple(windows.shape)}")
    device = device_of(model)
    total = 0.0
    predicted = 0
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = _logits(model, batch)[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
            total += float(nll)
            predicted += batch[:, 1:].numel()
    return math.exp(total / predicted)


def next_token_logprobs(
    model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 8
) -> torch.Tensor:
    """Log-probabilities of the next token at every position: float32 [count, seq_len, vocab].

    Entry ``[i, t]`` is ``log p(x_{t+1} | x_{<=t})`` of window ``i``, so ``[:, :-1]`` lines up
    with ``windows[:, 1:]``; the last position (the token after the window) is kept, as KL
    divergence between two models needs no target. Returned on the CPU, so mind the size on a
    large vocabulary (count x seq_len x vocab x 4 bytes). No gradients, eval mode, the model's
    device, as in :func:`perplexity`.
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    device = device_of(model)
    parts = []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = _logits(model, batch).float()
            parts.append(torch.log_softmax(logits, dim=-1).cpu())
    return torch.cat(parts)
