"""A one-shot search from a config on the families besides Llama, end to end: GPT-2 (Conv1D
layers, the fused c_attn, tied output) planned by knapsack, Qwen2 (q/k/v biases, untied output)
sampled at random and GPT-NeoX (fused query_key_value, parallel residual) by the GA. Each
model is a tiny random transformers folder; the space is the layers discovery finds; a front
trial is exported to model.gguf, whose tensor bytes are the trial's size, whose rebuilt
candidate scores what the trial recorded, and whose perplexity in llama.cpp is PyTorch's.
GPT-2's learned positions stop at its trained context (64 here): the export's llama.cpp speed
run fits inside it, and a longer run is a ValueError, not llama.cpp aborting the process."""

from __future__ import annotations

import gguf
import pytest
import torch
import yaml

from autosparse.cost.llama_cpp import llama_cpp_tokens_per_second
from autosparse.export.exporter import run_export
from autosparse.export.request import ExportRequest
from autosparse.search.preparation import prepare
from autosparse.search.runner import run_search

transformers = pytest.importorskip("transformers")
pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]

# family -> (config changes, layers left out of the space, the layers discovery must find,
#            search settings); widths are multiples of 32, so Q5_0 and Q8_0 store every layer
FAMILIES = {
    "gpt2": (
        dict(n_embd=64, n_layer=1, n_head=4, n_positions=64),  # tied, MLP 4 x 64
        ["transformer.wte", "transformer.wpe", "lm_head"],  # Conv1D shapes: (in, out) as stored
        {"transformer.h.0.attn.c_attn": (64, 192), "transformer.h.0.attn.c_proj": (64, 64),
         "transformer.h.0.mlp.c_fc": (64, 256), "transformer.h.0.mlp.c_proj": (256, 64)},
        dict(strategy={"name": "knapsack"}, budget={"trials": 3}, sensitivity={"samples": 4},
             objectives=["perplexity", "bits"]),
    ),
    "qwen2": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False),
        ["model.embed_tokens", "lm_head"],
        {f"model.layers.0.self_attn.{p}": s for p, s in
         [("q_proj", (64, 64)), ("k_proj", (32, 64)), ("v_proj", (32, 64)),
          ("o_proj", (64, 64))]}
        | {f"model.layers.0.mlp.{p}": s for p, s in
           [("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128))]},
        dict(strategy={"name": "random"}, budget={"trials": 3}),
    ),
    "gpt_neox": (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             max_position_embeddings=64),  # rotary on 1/4 of each head, untied lm_head
        ["gpt_neox.embed_in", "lm_head"],
        {"gpt_neox.layers.0.attention.query_key_value": (192, 64),
         "gpt_neox.layers.0.attention.dense": (64, 64),
         "gpt_neox.layers.0.mlp.dense_h_to_4h": (128, 64),
         "gpt_neox.layers.0.mlp.dense_4h_to_h": (64, 128)},
        dict(strategy={"name": "ga"}, budget={"trials": 3}),
    ),
}


SCALE = 0.15


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """Twenty small 'files' of real text, whole files to one split each."""
    folder = tmp_path_factory.mktemp("text")
    source = torch.__file__.rsplit("/", 1)[0] + "/nn/modules/module.py"
    lines = open(source, encoding="utf-8").read().splitlines()
    for i in range(20):
        (folder / f"part{i:02d}.txt").write_text("\n".join(lines[i * 60:(i + 1) * 60]) * 2)
    return folder


def model_folder(directory, family: str):
    """A random-init causal LM of ``family`` over byte tokens (ids 0-255, specials inside)."""
    torch.manual_seed(0)
    changes = FAMILIES[family][0]
    config = transformers.AutoConfig.for_model(family, vocab_size=256, bos_token_id=1,
                                               eos_token_id=2, **changes)
    folder = directory / family
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # weights scaled up from HF's 0.02 init: logits far from flat
        for name, param in model.named_parameters():
            if param.ndim == 1 and name.endswith("weight"):  # norm gains
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, SCALE)
    model.save_pretrained(folder)
    return folder


def write_config(directory, family: str, text_folder):
    _, exclude, layers, search = FAMILIES[family]
    mlp = sorted(n for n in layers if ".mlp." in n)
    config = {
        "name": family,
        "model": {"pretrained": str(model_folder(directory, family))},
        "data": {"source": "text", "path": str(text_folder),
                 "text": {"seq_len": 32, "calibration": 8, "validation": 4, "test": 4}},
        "task": {"kind": "language-model"},
        "oneshot": {"bits_method": "gptq"},
        "space": {"exclude": exclude,
                  "default": {"sparsity": [0.0], "patterns": ["unstructured"], "bits": [5, 8, 32]},
                  "rules": [{"layers": mlp, "sparsity": [0.0, 0.5], "bits": [5, 8]}]},
        "objectives": ["perplexity", "size"],
        **search,
    }
    path = directory / f"{family}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module", params=list(FAMILIES))
def searched(request, tmp_path_factory, text_folder):
    family = request.param
    directory = tmp_path_factory.mktemp(family)
    config = write_config(directory, family, text_folder)
    runs = directory / "runs"
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    return family, config, runs, outcome


def test_discovery_finds_the_family_layers(searched):
    family, config, runs, _ = searched
    context = prepare(config, runs)
    _, exclude, layers, _ = FAMILIES[family]
    table = {info.name: info for info in context.table.layers}
    space = {name for decision in context.space.decisions for name in decision.layers}
    assert space == set(layers), "the space is every discovered layer but the excluded ones"
    assert set(table) == set(layers) | set(exclude)
    for name, shape in layers.items():
        assert table[name].kind == ("Conv1D" if family == "gpt2" else "Linear")
        assert table[name].weight_shape == shape and table[name].macs > 0


def test_search_and_export(searched):
    family, config, runs, outcome = searched
    trials = outcome.trials
    assert len(trials) == FAMILIES[family][3]["budget"]["trials"]
    assert (trials["state"] == "COMPLETE").all()
    best = int(outcome.front["trial"].iloc[0])
    exported = run_export(config, ExportRequest(trial=best, mlflow=False), runs_dir=runs,
                          printer=lambda line: None)
    report = exported.report
    row = trials[trials["trial"] == best].iloc[0]
    assert report["size"]["tensor_bytes"] == round(row["size_kb"] * 1000)
    reader = gguf.GGUFReader(exported.out_dir / "model.gguf")
    assert sum(int(t.n_bytes) for t in reader.tensors) == report["size"]["tensor_bytes"]
    assert report["validation"]["rebuilt"] == pytest.approx(row["perplexity"], rel=1e-6)
    mlp = {report["tensor_types"][n] for n in FAMILIES[family][2] if ".mlp." in n}
    assert mlp <= {"Q5_0", "Q8_0"}, "the MLP layers are searched at 5 or 8 bits only"
    cpp = report["llama_cpp"]
    if not cpp["measured"]:
        assert "llama-cpp-python" in cpp["why"]
        return
    # measured (scale 0.15, perplexity ~370-580): gpt2 0.04 %, qwen2 0.008 %, gpt_neox 0.08 %
    assert cpp["relative_to_pytorch"] <= 0.01 and cpp["gen_tokens_per_s"] > 0
    if family == "gpt2":  # learned positions: the speed run stays inside the 64 of them
        assert (cpp["prompt_tokens"], cpp["gen_tokens"]) == (52, 12)
        with pytest.raises(ValueError, match="learned positions for 64 only"):
            llama_cpp_tokens_per_second(exported.out_dir / "model.gguf", 64, 1, n_threads=1)
