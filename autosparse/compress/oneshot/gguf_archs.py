"""What llama.cpp's ``convert_hf_to_gguf.py`` does per architecture, for the GGUF writer
(``gguf_file``): the tensor names, the row reorders, the hyperparameter keys and the variants a
file cannot express. Kept apart from the writer so a new family is one table entry here.

Families (transformers ``model_type`` -> llama.cpp ``general.architecture``):

* ``llama``, ``mistral`` -> ``llama``. Names ``model.layers.N.self_attn.q_proj`` -> ``blk.N.attn_q``
  and so on. HF rotates the two halves of each head (``rotate_half``), llama.cpp's ``llama``
  rope rotates adjacent pairs, so the converter reorders the output rows of q and k per head
  (``LlamaModel.permute``, k with the kv heads). Mistral's sliding window does not exist in
  llama.cpp's ``llama`` graph: the context length is written as ``min(max_position_embeddings,
  sliding_window)``, the span where both attend to the same tokens.
* ``qwen2`` -> ``qwen2``. Llama's names plus q/k/v biases; llama.cpp runs qwen2 with the NEOX
  (half-split) rope, HF's own layout, so nothing is reordered. Sliding layers: as Mistral.
* ``gpt2`` -> ``gpt2``. ``transformer.h.N.attn.c_attn`` (fused q|k|v) -> ``attn_qkv``, learned
  ``wpe`` -> ``position_embd``, LayerNorms with biases, GELU; the attention/MLP layers are
  transformers' ``Conv1D`` whose state-dict weight is ``[in, out]``: float weights are
  transposed (the converter does the same); packed weights are given ``[out, in]`` already.
* ``gpt_neox`` -> ``gptneox``. The fused ``query_key_value`` rows are per head ``[q|k|v]``
  (``n_head x 3 x head_dim``); llama.cpp splits ``attn_qkv`` as ``[all q | all k | all v]``,
  so the converter reorders the rows (weight and bias). Partial rotary (``rope.dimension_count
  = partial_rotary_factor * head_dim``, NEOX rope like HF), parallel residual as configured.
  llama.cpp's gptneox graph requires the attention biases and its own output head, so
  ``attention_bias=False`` and tied embeddings are refused (zeros or a copy would be bytes the
  search never scored).

GELU: llama.cpp computes the tanh form (via an fp16 table); HF's erf ``gelu`` is accepted as the
converter accepts it (logits differ by ~5e-4 of their range on the tests' models). Anything
else - another family, activation, scaled rope, GPT-2's layer-index attention scaling - is a
ValueError in one line that names it.

Every reorder here moves whole output ROWS and never mixes values within a row, and a ggml
quantized row is a whole number of blocks with their own scales, so it is applied to the rows of
a packed tensor's bytes as it is to floats: the bytes quantizing the reordered floats would
give, with no requantization and no change in size.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from gguf import GGUFWriter

__all__ = ["ARCHS", "ArchSpec", "arch_spec", "gguf_tensor_name", "neox_qkv_rows",
           "neox_qkv_unrows", "rope_permute_rows", "rope_unpermute_rows"]

GELUS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh")  # ggml_gelu: the tanh form


# --- row reorders ---------------------------------------------------------------------------

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


def neox_qkv_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """GPT-NeoX's fused qkv rows, per head ``[q|k|v]`` -> ``[all q | all k | all v]`` (what
    llama.cpp's gptneox graph splits), on the first axis."""
    n = rows.shape[0]
    if n % (3 * n_head):
        raise ValueError(f"{n} qkv rows do not split into {n_head} heads x (q, k, v)")
    return np.ascontiguousarray(
        rows.reshape(n_head, 3, n // n_head // 3, *rows.shape[1:]).swapaxes(0, 1)
        .reshape(rows.shape))


def neox_qkv_unrows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of :func:`neox_qkv_rows`."""
    n = rows.shape[0]
    return np.ascontiguousarray(
        rows.reshape(3, n_head, n // n_head // 3, *rows.shape[1:]).swapaxes(0, 1)
        .reshape(rows.shape))


# --- hyperparameters ------------------------------------------------------------------------

def _heads(config: Any) -> tuple[int, int, int]:
    """(heads, kv heads, head dim) of a config (kv heads = heads when it has no GQA)."""
    n_head = int(config.num_attention_heads)
    n_kv = int(getattr(config, "num_key_value_heads", None) or n_head)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // n_head)
    return n_head, n_kv, head_dim


def _rope(config: Any) -> dict[str, Any]:
    """The rope parameters (transformers 5 ``rope_parameters``, older ``rope_scaling``); only the
    plain rope is written: scaled variants need keys/tensors this writer does not emit."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ValueError(f"rope type {rope_type!r}: only the default rope is written")
    return dict(params)


def _rope_theta(config: Any) -> float:
    theta = _rope(config).get("rope_theta", getattr(config, "rope_theta", None))
    theta = theta if theta is not None else getattr(config, "rotary_emb_base", None)
    return float(theta if theta is not None else 10000.0)


def _context_length(config: Any) -> int:
    """Trained context, capped at the sliding window where the model has one: llama.cpp's
    llama/qwen2 graphs attend to the whole context, HF to the window only, so they agree up to
    the window (Mistral: ``sliding_window`` set; Qwen2: any ``sliding_attention`` layer)."""
    ctx = int(config.max_position_embeddings)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    sliding = window is not None and (
        "sliding_attention" in layer_types if layer_types is not None
        else config.model_type == "mistral")
    return min(ctx, int(window)) if sliding else ctx


def _check_act(config: Any, allowed: tuple[str, ...], what: str) -> None:
    act = getattr(config, "hidden_act", None) or getattr(config, "activation_function", None)
    if act not in allowed:
        raise ValueError(f"{config.model_type} with activation {act!r}: llama.cpp's "
                                  f"{what} graph computes {allowed[0]}")


def _llama_like(writer: GGUFWriter, config: Any) -> None:
    """Llama, Mistral, Qwen2: SiLU-gated MLP, RMSNorm, (grouped) attention with rope."""
    _check_act(config, ("silu",), "SwiGLU")
    n_head, n_kv, head_dim = _heads(config)
    writer.add_context_length(_context_length(config))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != int(config.hidden_size) // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(_rope_theta(config))


def _gpt2(writer: GGUFWriter, config: Any) -> None:
    """GPT-2: learned positions, LayerNorm, GELU MLP of ``n_inner`` (4 x width by default)."""
    _check_act(config, GELUS, "gpt2 GELU")
    if not getattr(config, "scale_attn_weights", True) \
            or getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("gpt2 with scale_attn_weights=False or "
                                  "scale_attn_by_inverse_layer_idx=True: llama.cpp scales the "
                                  "attention by 1/sqrt(head_dim) only")
    n_embd = int(config.hidden_size)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(n_embd)
    writer.add_feed_forward_length(int(getattr(config, "n_inner", None) or 4 * n_embd))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_layer_norm_eps(float(config.layer_norm_epsilon))


def _rotary_dims(config: Any) -> int:
    """GPT-NeoX's rotated dims per head: ``partial_rotary_factor`` (``rotary_pct`` before
    transformers 5) of the head dim."""
    factor = _rope(config).get("partial_rotary_factor", getattr(config, "rotary_pct", 1.0))
    return int(float(factor) * _heads(config)[2])


def _gptneox(writer: GGUFWriter, config: Any) -> None:
    """GPT-NeoX: fused qkv, partial NEOX rope, LayerNorm, GELU MLP, parallel residual or not.
    llama.cpp's gptneox graph loads the attention biases and its own output head as required
    tensors; writing zeros or a copy would add bytes the search never scored, so those
    variants are refused."""
    _check_act(config, GELUS, "gptneox GELU")
    if not getattr(config, "attention_bias", True):
        raise ValueError("gpt_neox with attention_bias=False: llama.cpp's gptneox graph needs "
                         "attn_qkv.bias and attn_output.bias")
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("gpt_neox with tie_word_embeddings=True: llama.cpp's gptneox graph "
                         "needs its own output.weight")
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_rope_dimension_count(_rotary_dims(config))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_parallel_residual(bool(getattr(config, "use_parallel_residual", True)))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))


def _llama_rows(hf_name: str, rows: np.ndarray, config: Any) -> np.ndarray:
    n_head, n_kv, _ = _heads(config)
    if ".self_attn.q_proj." in hf_name:
        return rope_permute_rows(rows, n_head)
    if ".self_attn.k_proj." in hf_name:
        return rope_permute_rows(rows, n_kv)
    return rows


def _neox_rows(hf_name: str, rows: np.ndarray, config: Any) -> np.ndarray:
    if ".attention.query_key_value." in hf_name:
        return neox_qkv_rows(rows, int(config.num_attention_heads))
    return rows


def _same_rows(hf_name: str, rows: np.ndarray, config: Any) -> np.ndarray:
    return rows


# --- the table --------------------------------------------------------------------------------

_LLAMA_LAYER = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
_LLAMA_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
                 "lm_head": "output"}


@dataclass(frozen=True)
class ArchSpec:
    """One llama.cpp architecture as this writer fills it.

    ``global_names``/``layer_names`` map HF module paths (without ``.weight``/``.bias``) to
    llama.cpp's names (block paths relative to ``blocks.N``), in the converter's order;
    ``required`` are the per-block tensors llama.cpp's graph cannot run without (ValueError
    naming the missing ones); ``transposed``: block paths whose state-dict weight is ``[in,
    out]`` (Conv1D); ``rows`` reorders a tensor's output rows; ``metadata`` writes the
    hyperparameter keys (and refuses config variants llama.cpp's graph does not compute)."""

    arch: str
    family: str
    blocks: str
    global_names: Mapping[str, str]
    layer_names: Mapping[str, str]
    required: tuple[str, ...]
    metadata: Callable[[GGUFWriter, Any], None]
    rows: Callable[[str, np.ndarray, Any], np.ndarray] = _same_rows
    transposed: frozenset[str] = frozenset()
    required_global: tuple[str, ...] = ("token_embd.weight", "output_norm.weight")
    _layer_re: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_layer_re",
                           re.compile(rf"^{re.escape(self.blocks)}\.(\d+)\.(.+)\.(weight|bias)$"))

    def tensor_name(self, hf_name: str) -> str:
        """llama.cpp's name of a state-dict tensor (ValueError for one it has no tensor for)."""
        base, _, kind = hf_name.rpartition(".")
        if kind in ("weight", "bias") and base in self.global_names:
            return f"{self.global_names[base]}.{kind}"
        match = self._layer_re.match(hf_name)
        if match and match.group(2) in self.layer_names:
            return f"blk.{match.group(1)}.{self.layer_names[match.group(2)]}.{match.group(3)}"
        raise ValueError(f"no llama.cpp tensor for {hf_name!r} (not a {self.family} "
                         "state-dict name)")

    def is_transposed(self, hf_name: str) -> bool:
        """Whether the state dict holds this weight as ``[in, out]`` (a Conv1D's)."""
        match = self._layer_re.match(hf_name)
        return bool(match) and match.group(3) == "weight" and match.group(2) in self.transposed

    def sort_key(self, gguf_name: str) -> tuple[int, int, int, str]:
        """The converter's order: embeddings, the blocks in order, output_norm, output."""
        if gguf_name.startswith("blk."):
            _, index, suffix, kind = gguf_name.split(".")
            order = list(self.layer_names.values())
            return (1, int(index), order.index(suffix) if suffix in order else len(order), kind)
        base = gguf_name.split(".")[0]
        rank = {"token_embd": 0, "position_embd": 0, "output_norm": 2}.get(base, 3)
        return (rank, 0, 0, gguf_name)


LLAMA = ArchSpec(
    arch="llama", family="Llama/Mistral", blocks="model.layers", global_names=_LLAMA_GLOBAL,
    layer_names=_LLAMA_LAYER, required=tuple(f"{s}.weight" for s in _LLAMA_LAYER.values()),
    metadata=_llama_like, rows=_llama_rows)
QWEN2 = ArchSpec(
    arch="qwen2", family="Qwen2", blocks="model.layers", global_names=_LLAMA_GLOBAL,
    layer_names=_LLAMA_LAYER,
    required=tuple(f"{s}.weight" for s in _LLAMA_LAYER.values())
    + ("attn_q.bias", "attn_k.bias", "attn_v.bias"),
    metadata=_llama_like)
_GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
               "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
GPT2 = ArchSpec(
    arch="gpt2", family="GPT-2", blocks="transformer.h",
    global_names={"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
                  "transformer.ln_f": "output_norm", "lm_head": "output"},
    layer_names=_GPT2_LAYER,
    required=tuple(f"{s}.{k}" for s in _GPT2_LAYER.values() for k in ("weight", "bias")),
    required_global=("token_embd.weight", "position_embd.weight", "output_norm.weight",
                     "output_norm.bias"),
    metadata=_gpt2, transposed=frozenset({"attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                          "mlp.c_proj"}))
_NEOX_LAYER = {"input_layernorm": "attn_norm", "attention.query_key_value": "attn_qkv",
               "attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
GPTNEOX = ArchSpec(
    arch="gptneox", family="GPT-NeoX", blocks="gpt_neox.layers",
    global_names={"gpt_neox.embed_in": "token_embd", "gpt_neox.final_layer_norm": "output_norm",
                  "embed_out": "output", "lm_head": "output"},
    layer_names=_NEOX_LAYER,
    required=tuple(f"{s}.{k}" for s in _NEOX_LAYER.values() for k in ("weight", "bias")),
    required_global=("token_embd.weight", "output_norm.weight", "output_norm.bias"),
    metadata=_gptneox, rows=_neox_rows)

# transformers model_type -> how llama.cpp runs it
ARCHS: dict[str, ArchSpec] = {"llama": LLAMA, "mistral": LLAMA, "qwen2": QWEN2, "gpt2": GPT2,
                              "gpt_neox": GPTNEOX}


def arch_spec(config: Any) -> ArchSpec:
    """The architecture a transformers config is written as (ValueError, in one line naming the
    model type and the supported ones, for any other)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHS:
        raise ValueError(f"GGUF export of model_type {model_type!r} is not supported; supported: "
                         f"{', '.join(sorted(ARCHS))} (LlamaForCausalLM, MistralForCausalLM, "
                         "Qwen2ForCausalLM, GPT2LMHeadModel, GPTNeoXForCausalLM)")
    return ARCHS[model_type]


def gguf_tensor_name(hf_name: str, config: Any = None) -> str:
    """llama.cpp's name for a state-dict name of ``config``'s family (Llama without a config)."""
    return (LLAMA if config is None else arch_spec(config)).tensor_name(hf_name)
