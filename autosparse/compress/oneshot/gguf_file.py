"""A GGUF from a transformers state dict, each tensor in the type a candidate gave it, so
llama.cpp (llama-cpp-python) loads and runs exactly what the search scored. The architectures
(Llama, Mistral, Qwen2, GPT-2, GPT-NeoX: names, row reorders, hyperparameters) are described in
``gguf_archs``; this module writes the file any of them becomes.

Why a writer of our own rather than llama.cpp's ``convert_hf_to_gguf.py``: the converter picks one
output type for the whole model and quantizes itself, while a candidate assigns a type per tensor
and the quantizers of this package already produced each tensor's bytes (ggml block layout). Here
those bytes are written as given, so the file's tensor data is byte for byte what was scored.

What llama.cpp's converter does for an HF Llama checkpoint, and this writer does as well (the
other families differ as ``gguf_archs`` says):

* names: ``model.embed_tokens`` -> ``token_embd``, ``model.layers.N.self_attn.q_proj`` ->
  ``blk.N.attn_q`` (``attn_k``, ``attn_v``, ``attn_output``), ``mlp.gate_proj`` -> ``ffn_gate``
  (``ffn_up``, ``ffn_down``), ``input_layernorm`` -> ``attn_norm``, ``post_attention_layernorm``
  -> ``ffn_norm``, ``model.norm`` -> ``output_norm``, ``lm_head`` -> ``output`` (left out when the
  embeddings are tied: llama.cpp then reuses ``token_embd``).
* the rotary permutation of q and k (``LlamaModel.permute``): HF rotates the two halves of each
  head (``rotate_half``), llama.cpp's ``ggml_rope`` rotates adjacent pairs; the converter reorders
  each head's output rows from ``[x0..x(d/2-1), y0..y(d/2-1)]`` to ``[x0, y0, x1, y1, ...]``. k uses
  the number of kv heads. The reorder moves whole output ROWS and never mixes values within a row,
  and a ggml quantized row is a whole number of blocks (``in_features / block_size``), each block
  with its own scales. So for a packed q/k tensor the same permutation is applied to the rows of
  the packed bytes, which gives exactly the bytes that quantizing the permuted float weight would
  give: no requantization, no change in size. (Biases of q and k, when present, are permuted too.)
* 1-D float tensors (norms, biases) are always F32, as ggml's element-wise ops expect.

The tokenizer: the project's LMs are byte level (token id = byte value; ids from 256 up, when the
vocabulary has more, are special). That is written as a GPT-2 style BPE vocabulary
(``tokenizer.ggml.model = "gpt2"``): token i < 256 is GPT-2's byte-to-unicode character of byte
i, so llama.cpp's byte-level BPE turns text into exactly one token per byte with id = byte, and
detokenizes back to the bytes. llama.cpp requires a merges array and gguf refuses an empty one, so
ONE merge is written that can never fire: the characters of bytes 0xC0 and 0xC1, which no UTF-8
text contains (llama.cpp re-encodes its pre-tokenized words as valid UTF-8 before merging).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

from autosparse.compress.oneshot.gguf_archs import (
    ArchSpec,
    arch_spec,
    gguf_tensor_name,
    rope_permute_rows,
    rope_unpermute_rows,
)

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["GGUFFileInfo", "PackedTensor", "byte_level_tokens", "gguf_tensor_name",
           "rope_permute_rows", "rope_unpermute_rows", "write_gguf", "write_llama_gguf"]

# one file-level alignment: gguf's default (32 bytes), which llama.cpp also assumes by default
ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT
# types a plain float array may be written as
FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# general.file_type from the type holding most of the 2-D weights (informational for llama.cpp:
# it only prints it; K types name their "medium" mix, as llama-quantize would)
_FILE_TYPE = {
    GGMLQuantizationType.F32: LlamaFileType.ALL_F32,
    GGMLQuantizationType.F16: LlamaFileType.MOSTLY_F16,
    GGMLQuantizationType.BF16: LlamaFileType.MOSTLY_BF16,
    GGMLQuantizationType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    GGMLQuantizationType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    GGMLQuantizationType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    GGMLQuantizationType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    GGMLQuantizationType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    GGMLQuantizationType.Q2_K: LlamaFileType.MOSTLY_Q2_K,
    GGMLQuantizationType.Q3_K: LlamaFileType.MOSTLY_Q3_K_M,
    GGMLQuantizationType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    GGMLQuantizationType.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    GGMLQuantizationType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
    GGMLQuantizationType.IQ4_NL: LlamaFileType.MOSTLY_IQ4_NL,
    GGMLQuantizationType.IQ4_XS: LlamaFileType.MOSTLY_IQ4_XS,
    GGMLQuantizationType.TQ1_0: LlamaFileType.MOSTLY_TQ1_0,
    GGMLQuantizationType.TQ2_0: LlamaFileType.MOSTLY_TQ2_0,
}

@dataclass(frozen=True)
class PackedTensor:
    """One tensor already in ggml's block layout: ``data`` holds the rows of ``shape`` (torch
    order, ``(out_features, in_features)`` for a linear weight) one after the other, each row
    ``in_features / block_size`` blocks of ``ggml_type``. The writer copies these bytes."""

    data: bytes | np.ndarray
    ggml_type: GGMLQuantizationType
    shape: tuple[int, ...]

    def rows(self) -> np.ndarray:
        """The bytes as a ``(*shape[:-1], bytes_per_row)`` uint8 array, checked against the shape, so a
        mis-sized buffer fails here with the tensor's numbers instead of inside llama.cpp."""
        qtype = GGMLQuantizationType(self.ggml_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        shape = tuple(int(d) for d in self.shape)
        if not shape or shape[-1] % block:
            raise ValueError(f"{qtype.name} tensor of shape {shape}: the last dimension must be a "
                             f"multiple of the block size {block}")
        row_bytes = shape[-1] // block * type_size
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        raw = np.frombuffer(self.data, dtype=np.uint8) if isinstance(self.data, (bytes, bytearray,
                                                                              memoryview)) \
            else np.ascontiguousarray(self.data).view(np.uint8).reshape(-1)
        if raw.size != n_rows * row_bytes:
            raise ValueError(f"{qtype.name} tensor of shape {shape} needs {n_rows * row_bytes} "
                             f"bytes, got {raw.size}")
        return raw.reshape(*shape[:-1], row_bytes)


@dataclass(frozen=True)
class GGUFFileInfo:
    """What was written, so a caller can hold the file against the size the search scored:
    ``file_size == metadata_bytes + tensor_bytes + padding_bytes``, where ``tensor_bytes`` is the
    sum of the tensors' own bytes (what a size formula counts), ``padding_bytes`` the zeros that
    align each tensor to ``alignment`` and ``metadata_bytes`` the header, key/values, tensor
    infos and the padding before the data (``data_offset``)."""

    path: Path
    file_size: int
    metadata_bytes: int
    tensor_bytes: int
    padding_bytes: int
    alignment: int
    tensor_types: dict[str, str] = field(default_factory=dict)   # gguf name -> ggml type name
    tensor_nbytes: dict[str, int] = field(default_factory=dict)  # gguf name -> bytes (unpadded)

    @property
    def data_offset(self) -> int:
        return self.metadata_bytes


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (bytes that print as themselves keep
    their character, the rest are moved to code points from 256 up), which llama.cpp's byte-level
    BPE applies to text before looking tokens up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_level_tokens(vocab_size: int) -> tuple[list[str], list[int]]:
    """The token strings and llama.cpp token types of a byte-level vocabulary: 256 byte tokens
    (NORMAL), then ``<|special_N|>`` CONTROL tokens up to ``vocab_size``."""
    if vocab_size < 256:
        raise ValueError(f"a byte-level vocabulary needs at least 256 ids, the config has "
                         f"{vocab_size}")
    chars = bytes_to_unicode()
    tokens = [chars[b] for b in range(256)] + [f"<|special_{i}|>" for i in range(256, vocab_size)]
    types = [int(TokenType.NORMAL)] * 256 + [int(TokenType.CONTROL)] * (vocab_size - 256)
    return tokens, types


def _special_id(value: Any, vocab_size: int, fallback: int) -> int:
    """A config's bos/eos id when it is one id inside the vocabulary, else ``fallback``."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, int) and 0 <= value < vocab_size:
        return value
    return fallback


def _as_float_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def _prepare(hf_name: str, value: Any, float_type: GGMLQuantizationType, spec: ArchSpec,
             config: Any) -> tuple[np.ndarray, tuple[int, ...], GGMLQuantizationType]:
    """One tensor as (bytes-or-float array for GGUFWriter.add_tensor, logical ``[out, in]``
    shape, ggml type): a Conv1D's float weight transposed, rows reordered as the arch needs."""
    if isinstance(value, PackedTensor):  # rows of blocks: already [out, in]
        qtype = GGMLQuantizationType(value.ggml_type)
        return spec.rows(hf_name, value.rows(), config), tuple(int(d) for d in value.shape), qtype
    array = _as_float_array(value)
    if spec.is_transposed(hf_name):
        array = array.T
    array = spec.rows(hf_name, array, config)
    qtype = GGMLQuantizationType.F32 if array.ndim == 1 else float_type
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array), array.shape, qtype
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(array.astype(np.float16)), array.shape, qtype
    return gguf.quants.quantize(np.ascontiguousarray(array), qtype), array.shape, qtype


def _n_elements(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (for picking general.file_type by parameter count)."""
    return int(np.prod(shape, dtype=np.int64))


def write_gguf(path: str | os.PathLike[str], config: PretrainedConfig,
               tensors: dict[str, Any], *, name: str = "autosparse",
               float_type: GGMLQuantizationType | str = GGMLQuantizationType.F32,
               ) -> GGUFFileInfo:
    """Write ``tensors`` (state-dict names of ``config``'s family -> float array/tensor as in
    the state dict, or :class:`PackedTensor` in ggml block layout, ``[out, in]`` also for a
    Conv1D) as a GGUF llama.cpp loads, as ``gguf_archs.arch_spec(config)`` says.

    Float arrays of 2 or more dimensions are written as ``float_type`` (F32, F16 or BF16); 1-D
    ones as F32. The output head is dropped when ``config.tie_word_embeddings`` (llama.cpp then
    reuses ``token_embd``). Every tensor llama.cpp's graph needs must be there (ValueError naming
    the missing ones); an unsupported family, or a variant of a supported one that llama.cpp's
    graph does not compute (activation, rope scaling), is a ValueError too.
    """
    float_type = GGMLQuantizationType[float_type.upper()] if isinstance(float_type, str) \
        else GGMLQuantizationType(float_type)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {[t.name for t in FLOAT_TYPES]}")
    spec = arch_spec(config)
    n_layer = int(config.num_hidden_layers)
    n_embd = int(config.hidden_size)
    vocab_size = int(config.vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))

    writer = GGUFWriter(os.fspath(path), arch=spec.arch)
    try:
        spec.metadata(writer, config)  # first: refuses unsupported variants before any work
        prepared: dict[str, tuple[np.ndarray, tuple[int, ...], GGMLQuantizationType]] = {}
        for hf_name, value in tensors.items():
            gguf_name = spec.tensor_name(hf_name)
            if tied and gguf_name == "output.weight":
                continue
            prepared[gguf_name] = _prepare(hf_name, value, float_type, spec, config)
        required = list(spec.required_global) + ([] if tied else ["output.weight"])
        required += [f"blk.{i}.{s}" for i in range(n_layer) for s in spec.required]
        missing = [t for t in required if t not in prepared]
        if missing:
            raise ValueError(f"tensors missing for a llama.cpp {spec.family}: "
                             f"{', '.join(missing)}")
        embd_shape = prepared["token_embd.weight"][1]
        if tuple(embd_shape) != (vocab_size, n_embd):
            raise ValueError(f"token embedding shape {embd_shape} is not (vocab_size, "
                             f"hidden_size) = {(vocab_size, n_embd)}")
        writer.add_name(name)
        writer.add_type("model")
        writer.add_vocab_size(vocab_size)
        writer.add_block_count(n_layer)
        return _write(writer, Path(path), config, prepared, spec)
    finally:
        writer.close()


def write_llama_gguf(path: str | os.PathLike[str], config: PretrainedConfig,
                     tensors: dict[str, Any], *, name: str = "autosparse",
                     float_type: GGMLQuantizationType | str = GGMLQuantizationType.F32,
                     ) -> GGUFFileInfo:
    """:func:`write_gguf`, under the name the first (Llama-only) callers know; any supported
    family's config works."""
    return write_gguf(path, config, tensors, name=name, float_type=float_type)


def _write(writer: GGUFWriter, path: Path, config: Any,
           prepared: dict[str, tuple[np.ndarray, tuple[int, ...], GGMLQuantizationType]],
           spec: ArchSpec) -> GGUFFileInfo:
    """File type, tokenizer and tensors, then the file; its figures."""
    vocab_size = int(config.vocab_size)
    per_type: dict[GGMLQuantizationType, int] = {}  # parameters of the 2-D weights by type
    for _, shape, qtype in prepared.values():
        if len(shape) >= 2:
            per_type[qtype] = per_type.get(qtype, 0) + _n_elements(shape)
    main_type = max(per_type, key=per_type.__getitem__)
    writer.add_file_type(int(_FILE_TYPE.get(main_type, LlamaFileType.GUESSED)))
    if any(q not in FLOAT_TYPES for _, _, q in prepared.values()):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, token_types = byte_level_tokens(vocab_size)
    extra = vocab_size > 256
    bos = _special_id(getattr(config, "bos_token_id", None), vocab_size, 256 if extra else 0)
    eos = _special_id(getattr(config, "eos_token_id", None), vocab_size,
                      (257 if vocab_size > 257 else 256) if extra else 0)
    chars = bytes_to_unicode()
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges([f"{chars[0xC0]} {chars[0xC1]}"])  # never fires: see module doc
    writer.add_bos_token_id(bos)
    writer.add_eos_token_id(eos)
    writer.add_add_bos_token(False)  # the LM was trained on raw bytes: nothing is prepended
    writer.add_add_eos_token(False)

    tensor_types: dict[str, str] = {}
    tensor_nbytes: dict[str, int] = {}
    for gguf_name in sorted(prepared, key=spec.sort_key):
        data, _, qtype = prepared[gguf_name]
        if data.dtype == np.uint8:
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
        tensor_types[gguf_name] = qtype.name
        tensor_nbytes[gguf_name] = int(data.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    file_size = Path(path).stat().st_size
    tensor_bytes = sum(tensor_nbytes.values())
    padded = sum(GGUFWriter.ggml_pad(n, ALIGNMENT) for n in tensor_nbytes.values())
    return GGUFFileInfo(path=Path(path), file_size=file_size, metadata_bytes=file_size - padded,
                        tensor_bytes=tensor_bytes, padding_bytes=padded - tensor_bytes,
                        alignment=ALIGNMENT, tensor_types=tensor_types,
                        tensor_nbytes=tensor_nbytes)
