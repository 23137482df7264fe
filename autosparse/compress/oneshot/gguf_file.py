"""A Llama-architecture GGUF from a transformers state dict, each tensor in the type a candidate
gave it, so llama.cpp (llama-cpp-python) loads and runs exactly what the search scored.

Why a writer of our own rather than llama.cpp's ``convert_hf_to_gguf.py``: the converter picks one
output type for the whole model and quantizes itself, while a candidate assigns a type per tensor
and the quantizers of this package already produced each tensor's bytes (ggml block layout). Here
those bytes are written as given, so the file's tensor data is byte for byte what was scored.

What llama.cpp's converter does for an HF Llama checkpoint, and this writer does as well:

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType, TokenType

if TYPE_CHECKING:
    from transformers import LlamaConfig

__all__ = ["GGUFFileInfo", "PackedTensor", "byte_level_tokens", "gguf_tensor_name",
           "rope_permute_rows", "rope_unpermute_rows", "write_llama_gguf"]

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

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
# what llama.cpp's Llama graph needs in every block (biases are optional there)
_REQUIRED_PER_LAYER = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm",
                       "ffn_gate", "ffn_up", "ffn_down")
_ORDER = {suffix: i for i, suffix in enumerate(_REQUIRED_PER_LAYER)}


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


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama state-dict name (ValueError for any other)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"blk.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{match.group(3)}"
    raise ValueError(f"no llama.cpp tensor for {hf_name!r} (not a Llama state-dict name)")


def rope_permute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary layout -> llama.cpp's interleaved one, on the first axis (output
    rows: float weights, biases or packed quantized rows alike); ``n_head`` is the number of heads
    the rows belong to (kv heads for k). Same reordering as ``LlamaModel.permute``."""
    n = rows.shape[0]
    if n % (2 * n_head):
        raise ValueError(f"{n} rows do not split into {n_head} heads of an even size")
    return np.ascontiguousarray(
        rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2)
        .reshape(rows.shape))


def rope_unpermute_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`rope_permute_rows` (llama.cpp layout -> HF layout)."""
    n = rows.shape[0]
    return np.ascontiguousarray(
        rows.reshape(n_head, n // n_head // 2, 2, *rows.shape[1:]).swapaxes(1, 2)
        .reshape(rows.shape))


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


def _rope_theta(config: LlamaConfig) -> float:
    """rope theta from ``rope_parameters`` (transformers 5) or ``rope_theta`` (older); only the
    plain rope is written: scaled variants need extra tensors/keys this writer does not emit."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(f"rope type {rope_type!r}: only the default rope is written")
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _as_float_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch here
        value = value.detach().to("cpu").float().numpy()
    return np.asarray(value, dtype=np.float32)


def _prepare(hf_name: str, value: Any, float_type: GGMLQuantizationType, n_head: int,
             n_head_kv: int) -> tuple[np.ndarray, tuple[int, ...], GGMLQuantizationType]:
    """One tensor as (bytes-or-float array for GGUFWriter.add_tensor, logical torch-order shape,
    ggml type), permuted for rope when it is q or k."""
    permute_heads = (n_head if ".q_proj." in hf_name else n_head_kv if ".k_proj." in hf_name
                     else 0)
    if isinstance(value, PackedTensor):
        qtype = GGMLQuantizationType(value.ggml_type)
        rows = value.rows()
        if permute_heads:
            rows = rope_permute_rows(rows, permute_heads)
        return rows, tuple(int(d) for d in value.shape), qtype
    array = _as_float_array(value)
    if permute_heads:
        array = rope_permute_rows(array, permute_heads)
    qtype = GGMLQuantizationType.F32 if array.ndim == 1 else float_type
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array), array.shape, qtype
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(array.astype(np.float16)), array.shape, qtype
    return gguf.quants.quantize(array, qtype), array.shape, qtype


def _n_elements(shape: tuple[int, ...]) -> int:
    """Number of elements of a shape (for picking general.file_type by parameter count)."""
    return int(np.prod(shape, dtype=np.int64))


def _sort_key(gguf_name: str) -> tuple[int, int, int, str]:
    """The converter's order: token_embd, the blocks in order, output_norm, output."""
    if gguf_name.startswith("blk."):
        _, index, suffix, kind = gguf_name.split(".")
        return (1, int(index), _ORDER.get(suffix, len(_ORDER)), kind)
    return ({"token_embd.weight": 0, "output_norm.weight": 2}.get(gguf_name, 3), 0, 0, gguf_name)


def write_llama_gguf(path: str | os.PathLike[str], config: LlamaConfig,
                     tensors: dict[str, Any], *, name: str = "autosparse",
                     float_type: GGMLQuantizationType | str = GGMLQuantizationType.F32,
                     ) -> GGUFFileInfo:
    """Write ``tensors`` (transformers Llama state-dict names -> float array/tensor, or
    :class:`PackedTensor` in ggml block layout) as a GGUF llama.cpp loads.

    Float arrays of 2 or more dimensions are written as ``float_type`` (F32, F16 or BF16); 1-D
    ones as F32. ``lm_head.weight`` is dropped when ``config.tie_word_embeddings``. Every tensor
    llama.cpp's Llama graph needs must be there (ValueError naming the missing ones).
    """
    float_type = GGMLQuantizationType[float_type.upper()] if isinstance(float_type, str) \
        else GGMLQuantizationType(float_type)
    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type must be one of {[t.name for t in FLOAT_TYPES]}")
    n_layer = int(config.num_hidden_layers)
    n_head = int(config.num_attention_heads)
    n_head_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    n_embd = int(config.hidden_size)
    head_dim = int(getattr(config, "head_dim", None) or n_embd // n_head)
    vocab_size = int(config.vocab_size)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    if getattr(config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {config.hidden_act!r}: llama.cpp's llama is SiLU")

    prepared: dict[str, tuple[np.ndarray, tuple[int, ...], GGMLQuantizationType]] = {}
    for hf_name, value in tensors.items():
        if tied and hf_name == "lm_head.weight":
            continue
        gguf_name = gguf_tensor_name(hf_name)
        prepared[gguf_name] = _prepare(hf_name, value, float_type, n_head, n_head_kv)
    required = ["token_embd.weight", "output_norm.weight"] + ([] if tied else ["output.weight"])
    required += [f"blk.{i}.{s}.weight" for i in range(n_layer) for s in _REQUIRED_PER_LAYER]
    missing = [t for t in required if t not in prepared]
    if missing:
        raise ValueError(f"tensors missing for a llama.cpp Llama: {', '.join(missing)}")
    embd_shape = prepared["token_embd.weight"][1]
    if tuple(embd_shape) != (vocab_size, n_embd):
        raise ValueError(f"token embedding shape {embd_shape} is not (vocab_size, hidden_size) "
                         f"= {(vocab_size, n_embd)}")

    writer = GGUFWriter(os.fspath(path), arch="llama")
    writer.add_name(name)
    writer.add_type("model")
    writer.add_vocab_size(vocab_size)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(n_embd)
    writer.add_block_count(n_layer)
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_head_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != n_embd // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))

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
    for gguf_name in sorted(prepared, key=_sort_key):
        data, _, qtype = prepared[gguf_name]
        if data.dtype == np.uint8:
            writer.add_tensor(gguf_name, data, raw_shape=data.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, data)
        tensor_types[gguf_name] = qtype.name
        tensor_nbytes[gguf_name] = int(data.nbytes)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()

    file_size = Path(path).stat().st_size
    tensor_bytes = sum(tensor_nbytes.values())
    padded = sum(GGUFWriter.ggml_pad(n, ALIGNMENT) for n in tensor_nbytes.values())
    return GGUFFileInfo(path=Path(path), file_size=file_size, metadata_bytes=file_size - padded,
                        tensor_bytes=tensor_bytes, padding_bytes=padded - tensor_bytes,
                        alignment=ALIGNMENT, tensor_types=tensor_types,
                        tensor_nbytes=tensor_nbytes)
