"""Streaming a model through a device block by block (compress/oneshot/streaming.py).

On a machine without an accelerator the hooks are installed anyway (``always``): the streamed
forward must compute exactly the plain one, every unit must be visited and every tensor left
home. With CUDA present, the same on the GPU, with the weights staying on the CPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from autosparse.compress.oneshot.calibration import collect_layer_stats
from autosparse.compress.oneshot.database import lm_forward
from autosparse.compress.oneshot.streaming import stream_units, streamed


def llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=True)).eval()


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=64)).eval()


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_units_cover_every_tensor_once(build):
    model = build()
    units = stream_units(model)
    travelling = [id(t) for _, tensors in units for t in tensors]
    assert len(travelling) == len(set(travelling)), "a tensor travels with one unit only"
    everything = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert set(travelling) == everything
    blocks = [m for m, _ in units if type(m).__name__.endswith(("DecoderLayer", "Block"))]
    assert len(blocks) == model.config.num_hidden_layers


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_a_streamed_forward_and_its_statistics_equal_the_plain_ones(build):
    model = build()
    ids = torch.randint(0, 256, (2, 16))
    layers = [n for n, m in model.named_modules()
              if type(m).__name__ in ("Linear", "Conv1D") and "head" not in n][:3]
    with torch.no_grad():
        plain = lm_forward(model, ids).logits
    stats = collect_layer_stats(model, layers, [ids])
    visits = []
    for module, _ in stream_units(model):
        module.register_forward_pre_hook(lambda m, a: visits.append(m))
    with torch.no_grad(), streamed(model, "cpu", always=True):
        streamed_logits = lm_forward(model, ids).logits
        streamed_stats = collect_layer_stats(model, layers, [ids])
    assert torch.equal(plain, streamed_logits)
    for name in layers:
        assert torch.equal(stats[name].hessian, streamed_stats[name].hessian)
    assert len({id(m) for m in visits}) == len(stream_units(model))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_on_a_gpu_the_weights_stay_home_and_the_output_comes_back():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(  # 6 blocks of ~12.6 M weights: ~300 MB in float32
        vocab_size=256, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)).eval()
    ids = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        plain = lm_forward(model, ids).logits
        torch.cuda.reset_peak_memory_stats()
        with streamed(model, "cuda"):
            out = lm_forward(model, ids).logits
            assert all(p.device.type == "cpu" for p in model.parameters())
    assert out.device.type == "cpu"
    assert torch.allclose(plain, out, atol=1e-4, rtol=1e-4)
    weights = sum(p.numel() * 4 for p in model.parameters())
    assert torch.cuda.max_memory_allocated() < weights / 2  # about one block at a time
