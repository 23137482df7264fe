"""A one-shot candidate as GGUF tensors: each searched layer's stored level bytes from the level
database (never re-quantized), every other tensor as floats, written by ``gguf_file``.

Why in compress: the search measures a candidate's file in its runtime (``cost.llama_cpp``) and
the export writes the same file; both assemble it here.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gguf import GGMLQuantizationType
from torch import nn

from autosparse.compress.oneshot.database import LevelDatabase
from autosparse.compress.oneshot.gguf_file import GGUFFileInfo, PackedTensor, write_gguf
from autosparse.compress.oneshot.levels import Level


def candidate_tensors(dense: nn.Module, db: LevelDatabase | None,
                      assignment: Mapping[str, Level]) -> dict[str, object]:
    """State-dict name -> the searched layers' stored bytes, every other tensor as floats (as
    the state dict holds them: a Conv1D's ``[in, out]``, which the writer transposes; its
    stored bytes are rows of ``[out, in]``, the database's shape)."""
    tensors: dict[str, object] = {}
    for name, value in dense.state_dict().items():
        layer = name.removesuffix(".weight")
        level = assignment.get(layer) if name.endswith(".weight") else None
        if level is not None and level != Level():
            assert db is not None
            data, qtype = db.packed(layer, level)
            tensors[name] = PackedTensor(data, qtype, db.shape(layer))
        else:
            tensors[name] = value.detach().float().cpu().numpy()
    return tensors


def write_candidate_gguf(dense: nn.Module, db: LevelDatabase, assignment: Mapping[str, Level],
                         path: Path) -> GGUFFileInfo:
    """The candidate as a GGUF of its architecture (``gguf_archs``: Llama, Mistral, Qwen2,
    GPT-2, GPT-NeoX); any other ``config.model_type`` is a ValueError naming it."""
    config = getattr(dense, "config", None)
    if config is None:
        raise ValueError(f"GGUF export needs a transformers model with a config; "
                         f"{type(dense).__name__} has none")
    return write_gguf(path, config, candidate_tensors(dense, db, assignment),
                      float_type=GGMLQuantizationType.F32)
