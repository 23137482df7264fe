"""GGUF export of the families besides Llama (Mistral, Qwen2, GPT-2, GPT-NeoX): a tiny random
model's candidate - some layers at packed levels from the level database (Q8_0 by RTN and GPTQ,
Q5_0, sparse Q4_0), the rest F32 - is written by ``write_candidate_gguf``, llama.cpp loads it
and computes the logits of the stitched model, and the file's tensor bytes are the scored size.

The references, and why the tolerances are what they are:

* F32 file against transformers: Mistral/Qwen2 agree to float32 rounding (measured over 3
  seeds: <= 1.9e-6 of the largest logit). GPT-2 and GPT-NeoX run GELU in llama.cpp as ggml's
  fp16 table of the tanh form (input rounded to fp16, output stored as fp16): against plain
  transformers <= 5.6e-4 of the largest logit (GPT-NeoX's erf GELU included), against a
  reference with that GELU (``GgmlGelu``) <= 1.3e-4, what is left being fp16 rounding-boundary
  flips of ~1e-7 float32 differences (as ``assert_same_but_for_rounding_flips`` describes for
  Q8_0 activations).
* packed layers: the stitched model with llama.cpp's Q8_0 rounding of those layers' inputs
  (and the GELU above), checked by ``assert_same_but_for_rounding_flips`` (measured: median
  error <= 1.7e-7 of the largest logit in every sequence, maximum <= 5.3e-3).

Skips, with the reason, when llama-cpp-python is not installed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from autosparse.compress.oneshot.database import LevelDatabase, build_level_database
from autosparse.compress.oneshot.gguf_archs import (
    arch_spec,
    gguf_tensor_name,
    neox_qkv_rows,
    neox_qkv_unrows,
)
from autosparse.compress.oneshot.gguf_candidate import write_candidate_gguf
from autosparse.compress.oneshot.gguf_file import PackedTensor, write_gguf
from autosparse.compress.oneshot.layer_weights import is_oneshot_layer, layer_weight
from autosparse.compress.oneshot.levels import Level
from autosparse.compress.oneshot.search_levels import stitched, stored_bytes
from autosparse.cost.llama_cpp import llama_cpp_logits
from test_gguf_export import (
    SEQUENCES,
    assert_same_but_for_rounding_flips,
    llama_cpp_or_skip,
    reference_logits,
    round_activations_like_llama_cpp,
)

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

Q8_RTN, Q8_GPTQ = Level(bits=8, method="rtn"), Level(bits=8, method="gptq")
Q5_RTN = Level(bits=5, method="rtn")
Q4_SPARSE = Level(sparsity=0.5, bits=4, method="magnitude+rtn")  # Q4_0: an exact zero
# module-name suffix -> level in block 0; block 1: attention by GPTQ at Q8_0, the MLP F32
BLOCK0 = {"q_proj": Q8_RTN, "k_proj": Q5_RTN, "v_proj": Q8_RTN, "o_proj": Q5_RTN,
          "gate_proj": Q4_SPARSE, "up_proj": Q8_RTN, "c_attn": Q8_RTN, "attn.c_proj": Q5_RTN,
          "c_fc": Q4_SPARSE, "query_key_value": Q5_RTN, "dense": Q8_RTN,
          "dense_h_to_4h": Q4_SPARSE}
BLOCK1 = ("q_proj", "k_proj", "v_proj", "o_proj", "c_attn", "attn.c_proj", "query_key_value",
          "dense")


def tiny(family: str, **changes):
    """A random-init causal LM of ``family``: width 64, 2 layers, 4 heads, vocab 256 bytes + 2
    specials, weights scaled up from HF's 0.02 init so logits are far from flat (as in
    ``test_gguf_export.tiny_llama``)."""
    torch.manual_seed({"mistral": 1, "qwen2": 2, "gpt2": 3, "gpt_neox": 4}[family])
    kwargs = dict(vocab_size=258, bos_token_id=256, eos_token_id=257, hidden_size=64,
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=256)
    if family == "mistral":  # sliding_window None: full attention, as llama.cpp's llama
        kwargs.update(intermediate_size=256, num_key_value_heads=2, head_dim=16,
                      sliding_window=None)
    elif family == "qwen2":  # tied: llama.cpp's qwen2 reuses token_embd as the output
        kwargs.update(intermediate_size=256, num_key_value_heads=2, tie_word_embeddings=True)
    elif family == "gpt_neox":  # 1/4 of each head rotated, parallel residual, erf GELU
        kwargs.update(intermediate_size=256)
    # gpt2: tied by default, GELU (tanh form), MLP 4 x 64
    config = transformers.AutoConfig.for_model(family, **{**kwargs, **changes})
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):  # norm gains
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.15)
    return config, model


class GgmlGelu(nn.Module):
    """ggml's CPU GELU: the tanh form, looked up in a table by the fp16 of the input, stored as
    fp16; identity from 10 up, 0 from -10 down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.half().float()
        y = 0.5 * h * (1 + torch.tanh(0.7978845608028654 * h * (1 + 0.044715 * h * h)))
        return torch.where(x <= -10, 0.0, torch.where(x >= 10, x, y.half().float()))


def with_ggml_gelu(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "act") and isinstance(module.act, nn.Module):
            module.act = GgmlGelu()
    return model


def assignment_of(model: nn.Module) -> dict[str, Level]:
    """Every one-shot layer of the blocks (the output head stays F32) -> its level."""
    out = {}
    for name, module in model.named_modules():
        if not is_oneshot_layer(module) or name in ("lm_head", "embed_out"):
            continue
        block = int(name.split(".")[2])
        suffix = next((s for s in BLOCK0 if name.endswith(s)), None)
        if block == 0 and suffix:
            out[name] = BLOCK0[suffix]
        elif block == 1 and suffix in BLOCK1:
            out[name] = Q8_GPTQ
        else:
            out[name] = Level()
    return out


def windows(count: int = 4, length: int = 32) -> torch.Tensor:
    return torch.randint(0, 256, (count, length), generator=torch.Generator().manual_seed(0))


FAMILIES = ["mistral", "qwen2", "gpt2", "gpt_neox"]
GELU_FAMILIES = {"gpt2", "gpt_neox"}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_runs_each_family(tmp_path: Path, family: str):
    """F32: logits equal transformers' (tolerances in the module doc). A candidate from the
    level database: llama.cpp computes the stitched model's logits, the file's tensor bytes are
    the scored size (``stored_bytes``) and gguf reads back the types the levels store."""
    llama_cpp_or_skip()
    config, model = tiny(family)
    spec = arch_spec(config)
    f32 = write_gguf(tmp_path / "f32.gguf", config, model.state_dict())
    gelu = family in GELU_FAMILIES
    ggml_model = with_ggml_gelu(copy.deepcopy(model)) if gelu else model
    for ids in SEQUENCES:
        got = llama_cpp_logits(tmp_path / "f32.gguf", ids)
        plain, ref = reference_logits(model, ids), reference_logits(ggml_model, ids)
        scale = np.abs(ref).max()
        assert np.abs(got - ref).max() < (3e-4 if gelu else 2e-5) * scale
        assert np.abs(got - plain).max() < (2e-3 if gelu else 2e-5) * scale
        assert (got.argmax(axis=1) == ref.argmax(axis=1)).mean() >= 0.95

    assignment = assignment_of(model)
    root = tmp_path / "levels"
    build_level_database(model, list(assignment), {k: [v] for k, v in assignment.items()},
                         windows(), root)
    db = LevelDatabase(root, model=model)
    path = tmp_path / "candidate.gguf"
    info = write_candidate_gguf(model, db, assignment, path)
    assert info.tensor_bytes == stored_bytes(model, db, assignment) < f32.tensor_bytes
    reader = gguf.GGUFReader(path)
    assert sum(int(t.n_bytes) for t in reader.tensors) == info.tensor_bytes
    field = reader.fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == spec.arch
    types = {t.name: t.tensor_type for t in reader.tensors}
    expected = {T.Q8_0, T.Q5_0, T.Q4_0, T.F32}
    assert {types[gguf_tensor_name(f"{n}.weight", config)] for n in assignment} == expected
    assert ("output.weight" in types) is not bool(config.tie_word_embeddings)

    candidate = stitched(model, db, assignment)
    packed = {n: T.Q8_0 for n, level in assignment.items() if level != Level()}
    round_activations_like_llama_cpp(candidate, packed)
    if gelu:
        with_ggml_gelu(candidate)
    assert_same_but_for_rounding_flips(
        [(llama_cpp_logits(path, ids), reference_logits(candidate, ids)) for ids in SEQUENCES])


def test_neox_sequential_residual_and_half_rotary(tmp_path: Path):
    """GPT-NeoX's other residual form and another rotary share reach llama.cpp's graph."""
    llama_cpp_or_skip()
    config, model = tiny("gpt_neox", use_parallel_residual=False, rotary_pct=0.5)
    write_gguf(tmp_path / "m.gguf", config, model.state_dict())
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert int(reader.fields["gptneox.rope.dimension_count"].parts[-1][0]) == 8
    assert not bool(reader.fields["gptneox.use_parallel_residual"].parts[-1][0])
    ref_model = with_ggml_gelu(copy.deepcopy(model))
    for ids in SEQUENCES:
        ref = reference_logits(ref_model, ids)
        got = llama_cpp_logits(tmp_path / "m.gguf", ids)
        assert np.abs(got - ref).max() < 3e-4 * np.abs(ref).max()


# --- the writer on its own: names, reorders, metadata, refusals -------------------------------

def test_names_layouts_and_metadata(tmp_path: Path):
    gpt2, _ = tiny("gpt2")
    neox, _ = tiny("gpt_neox")
    qwen, _ = tiny("qwen2")
    assert gguf_tensor_name("transformer.h.1.attn.c_attn.weight", gpt2) == "blk.1.attn_qkv.weight"
    assert gguf_tensor_name("transformer.wpe.weight", gpt2) == "position_embd.weight"
    assert gguf_tensor_name("transformer.ln_f.bias", gpt2) == "output_norm.bias"
    assert gguf_tensor_name("gpt_neox.layers.0.mlp.dense_4h_to_h.bias", neox) \
        == "blk.0.ffn_down.bias"
    assert gguf_tensor_name("model.layers.0.self_attn.k_proj.bias", qwen) == "blk.0.attn_k.bias"
    with pytest.raises(ValueError, match="not a GPT-2 state-dict name"):
        gguf_tensor_name("model.layers.0.self_attn.q_proj.weight", gpt2)
    # GPT-NeoX's per-head [q|k|v] rows -> [all q | all k | all v], as the converter's reshape
    rows = np.arange(4 * 3 * 16 * 2, dtype=np.float32).reshape(4 * 3 * 16, 2)
    moved = neox_qkv_rows(rows, 4)
    per_head = rows.reshape(4, 3, 16, 2)
    assert np.array_equal(moved[:64], per_head[:, 0].reshape(64, 2))  # q of heads 0..3
    assert np.array_equal(moved[128:], per_head[:, 2].reshape(64, 2))  # v
    assert np.array_equal(neox_qkv_unrows(moved, 4), rows)
    x = np.random.default_rng(0).normal(size=(192, 64)).astype(np.float32)
    assert np.array_equal(neox_qkv_rows(gguf.quants.quantize(x, T.Q8_0), 4),
                          gguf.quants.quantize(neox_qkv_rows(x, 4), T.Q8_0))

    # Mistral's sliding window: the context llama.cpp's full attention agrees on
    mistral, model = tiny("mistral", sliding_window=32)
    write_gguf(tmp_path / "m.gguf", mistral, model.state_dict())
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert int(reader.fields["llama.context_length"].parts[-1][0]) == 32
    assert "llama.attention.layer_norm_rms_epsilon" in reader.fields
    config, model = tiny("gpt2")
    write_gguf(tmp_path / "g.gguf", config, model.state_dict())
    reader = gguf.GGUFReader(tmp_path / "g.gguf")
    assert "gpt2.attention.layer_norm_epsilon" in reader.fields
    assert int(reader.fields["gpt2.context_length"].parts[-1][0]) == 256
    assert int(reader.fields["gpt2.feed_forward_length"].parts[-1][0]) == 256


@pytest.mark.parametrize(("build", "words"), [
    (lambda: tiny("gpt_neox", attention_bias=False), "attention_bias=False"),
    (lambda: tiny("gpt_neox", tie_word_embeddings=True), "tie_word_embeddings=True"),
    (lambda: tiny("gpt2", activation_function="relu"), "activation 'relu'"),
    (lambda: tiny("qwen2", hidden_act="gelu"), "activation 'gelu'"),
])
def test_variants_llama_cpp_cannot_run_are_refused(tmp_path: Path, build, words):
    config, model = build()
    with pytest.raises(ValueError, match=words):
        write_gguf(tmp_path / "m.gguf", config, model.state_dict())
    assert not (tmp_path / "m.gguf").exists()


def test_other_families_are_refused_in_one_line(tmp_path: Path):
    config = transformers.PhiConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                    num_hidden_layers=1, num_attention_heads=4)
    model = transformers.PhiForCausalLM(config)
    with pytest.raises(ValueError, match=r"model_type 'phi' is not supported; supported: "
                                         r"gpt2, gpt_neox, llama, mistral, qwen2") as err:
        write_candidate_gguf(model, None, {}, tmp_path / "m.gguf")
    assert "\n" not in str(err.value)


def test_conv1d_float_weights_are_transposed_and_packed_ones_are_not(tmp_path: Path):
    """A GPT-2 Conv1D weight is [in, out] in the state dict: the writer transposes floats;
    packed bytes are rows of [out, in], written as given."""
    config, model = tiny("gpt2")
    module = dict(model.named_modules())["transformer.h.0.mlp.c_fc"]
    weight = layer_weight(module).detach().numpy()  # [256 out, 64 in]
    state = dict(model.state_dict())
    packed = gguf.quants.quantize(weight, T.Q8_0)
    state["transformer.h.0.mlp.c_fc.weight"] = PackedTensor(packed.tobytes(), T.Q8_0, (256, 64))
    write_gguf(tmp_path / "g.gguf", config, state)
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "g.gguf").tensors}
    assert np.asarray(tensors["blk.0.ffn_up.weight"].data).tobytes() == packed.tobytes()
    down = np.asarray(tensors["blk.0.ffn_down.weight"].data).reshape(64, 256)
    assert np.array_equal(down, model.state_dict()["transformer.h.0.mlp.c_proj.weight"].numpy().T)
