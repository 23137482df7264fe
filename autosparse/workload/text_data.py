"""``data.source: text``: next-token windows from local text as the three splits of a search.

The split is by whole files (``text_corpus.split_files``), so the test text is never seen in
calibration or validation. The search's ``train`` split holds the calibration windows (a one-shot
search's level database and KL fitness read them; nothing is trained on them), ``validation``
scores candidates and ``test`` is for the final report. A window of ``seq_len`` tokens becomes
``x = window[:-1]``, ``y = window[1:]``, the pairs the language-model task scores.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from torch.utils.data import TensorDataset

from autosparse.config.sections import DataConfig
from autosparse.config.validation import ConfigError
from autosparse.workload.splits import DataSplits
from autosparse.workload.text_corpus import (
    SEPARATOR,
    ByteTokenizer,
    load_tokenizer,
    text_token_sets,
)

# the token-set roles of text_corpus under the search's split names
ROLES = {"train": "calibration", "validation": "validation", "test": "test"}
# share of the files per role (the rest, "train" of text_corpus, stays unused here)
FRACTIONS = {"train": 0.70, "calibration": 0.10, "validation": 0.10, "test": 0.10}


def text_source(path: str) -> str | list[str]:
    """``stdlib``, a file or glob as given, or a folder as every file below it."""
    if path == "stdlib":
        return path
    folder = Path(path)
    if folder.is_dir():
        return str(folder / "**" / "*")
    return path


def load_text_splits(cfg: DataConfig, seed: int = 0) -> DataSplits:
    """Calibration / validation / test windows of ``cfg.path`` as ``DataSplits``."""
    text = cfg.text
    tokenizer = load_tokenizer(None if text.tokenizer == "bytes" else text.tokenizer)
    counts = {"calibration": text.calibration, "validation": text.validation, "test": text.test}
    try:
        sets = text_token_sets(text_source(str(cfg.path)), tokenizer, text.seq_len, counts,
                               seed=seed, fractions=FRACTIONS)
    except ConfigError as err:
        raise ConfigError(f"data.path {cfg.path!r}: {err}") from None
    windows = {"calibration": sets.calibration, "validation": sets.validation, "test": sets.test}
    datasets = {split: TensorDataset(windows[role][:, :-1].contiguous(),
                                     windows[role][:, 1:].contiguous())
                for split, role in ROLES.items()}
    splits = DataSplits(datasets["train"], datasets["validation"], datasets["test"],
                        input_shape=(text.seq_len - 1,), num_classes=sets.vocab_size,
                        batch_size=cfg.batch_size,
                        sample_counts={s: len(d) for s, d in datasets.items()})
    splits.origin = {
        "raw": {"root": sets.root, "separator": SEPARATOR,
                "tokenizer": "bytes" if isinstance(tokenizer, ByteTokenizer)
                else str(Path(text.tokenizer).resolve()),  # a transformers tokenizer's folder
                "seq_len": text.seq_len, "corpus_fingerprint": sets.fingerprint,
                "x": "window[:-1] of each window of seq_len token ids", "y": "window[1:]"},
        "method": (f"whole files by a stable hash of their path (text_corpus.split_files, "
                   f"fractions {FRACTIONS}); windows of each split's files joined by "
                   f"{SEPARATOR!r} at seeded offsets (text_corpus.token_windows, seed "
                   f"split_seed + 0/1/2 for train/validation/test)"),
        "splits": {split: {"files": sets.split_files[role], "starts": sets.starts[role]}
                   for split, role in ROLES.items()},
    }
    splits.fingerprint = hashlib.sha256(
        f"{sets.fingerprint}:{text.model_dump_json()}:{seed}".encode()).hexdigest()[:16]
    return splits
