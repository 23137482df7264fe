"""A one-shot search end to end: a local transformers Llama folder, text windows from local
files split by whole file, the level database built once and reused, candidates stitched from
it with no fine-tune, scored by perplexity on validation and KL on calibration, sized as GGUF
stores them, logged to MLflow like any search."""

from __future__ import annotations

import gguf
import pytest
import torch
import yaml
from transformers import LlamaConfig, LlamaForCausalLM

from autosparse.compress.oneshot.levels import Level
from autosparse.compress.oneshot.search_levels import level_of, levels_for
from autosparse.config.sections import OneShotConfig
from autosparse.config.validation import ConfigError
from autosparse.export.exporter import run_export
from autosparse.export.request import ExportRequest
from autosparse.search.preparation import prepare
from autosparse.search.runner import run_search
from autosparse.space.candidate import Candidate, LayerChoice
from search_helpers import load_study, mlflow_runs

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("one_thread")]
EXCLUDE = ["model.embed_tokens", "lm_head"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    torch.manual_seed(0)
    # 64 wide: block-32 types (Q5_0, Q8_0) only; K-quants (256 blocks) are tested on the database
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory):
    """Forty small 'files' of real text: the split puts whole files in one role each."""
    folder = tmp_path_factory.mktemp("text")
    source = (torch.__file__.rsplit("/", 1)[0] + "/nn/modules/module.py")
    lines = open(source, encoding="utf-8").read().splitlines()
    for i in range(40):
        (folder / f"part{i:02d}.txt").write_text("\n".join(lines[i * 60:(i + 1) * 60]) * 2)
    return folder


def write_config(directory, name, model_folder, text_folder, **changes):
    config = {
        "name": name,
        "model": {"pretrained": str(model_folder)},
        "data": {"source": "text", "path": str(text_folder),
                 "text": {"seq_len": 32, "calibration": 8, "validation": 4, "test": 4}},
        "task": {"kind": "language-model"},
        "oneshot": {"bits_method": "gptq"},
        "space": {"exclude": EXCLUDE,
                  "default": {"sparsity": [0.0], "patterns": ["unstructured"], "bits": [5, 8, 32]},
                  "rules": [{"layers": ["model.layers.0.mlp.*"], "sparsity": [0.0, 0.5],
                             "bits": [5, 8]}]},
        "strategy": {"name": "random"},
        "budget": {"trials": 4},
        "objectives": ["perplexity", "size"],
        **changes,
    }
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_levels_of_search_choices():
    cfg = OneShotConfig(sparsity_method="wanda", bits_method="rtn")
    assert level_of(LayerChoice.make("dense", 0.0, 32), cfg) == Level()
    assert level_of(LayerChoice.make("dense", 0.0, 4), cfg) == Level(bits=4, method="rtn")
    assert level_of(LayerChoice.make("2:4", 0.5, 8), cfg) == Level(0.5, "2:4", 8, "wanda+rtn")
    assert level_of(LayerChoice.make("unstructured", 0.5, 32), cfg) == Level(0.5, method="wanda")
    assert level_of(LayerChoice.make("dense", 0.0, 16), OneShotConfig()).method == "rtn"
    levels = levels_for({"fc": {LayerChoice.make("dense", 0.0, 4), LayerChoice.make("dense", 0.0, 32)}},
                        cfg)
    assert levels["fc"][0] == Level() and len(levels["fc"]) == 2


def test_oneshot_search_scores_from_the_database_and_reuses_it(tmp_path, model_folder, text_folder,
                                                               capfd):
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "os", model_folder, text_folder)
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    assert "building the level database" in capfd.readouterr().err
    trials = outcome.trials
    assert (trials["state"] == "COMPLETE").sum() == 4
    assert (trials["finetune_steps"] == 0).all() and (trials["kl"] >= -1e-9).all()

    # every trial's size is the GGUF bytes of its levels, read back from the database
    context = prepare(config, runs)
    db = context.oneshot.db
    assert context.oneshot.info.built == 0, "a second prepare builds nothing"
    for _, row in trials.iterrows():
        candidate = Candidate.from_json(row["candidate"])
        assignment = context.oneshot.assignment(candidate)
        searched = sum(db.stored_bytes(layer, level) for layer, level in assignment.items())
        others = sum(p.numel() * 4 for n, p in context.dense.named_parameters()
                     if n.removesuffix(".weight") not in assignment)
        assert row["size_kb"] == pytest.approx((searched + others) / 1000)
        model = context.oneshot.model(context.dense, candidate)
        for layer, level in assignment.items():
            assert torch.equal(dict(model.named_modules())[layer].weight, db.weight(layer, level))

    # every front point has its held-out test perplexity (reported, never used to pick)
    from autosparse.workload.evaluate import evaluate
    assert outcome.front["test_perplexity"].notna().all()
    first = outcome.front.iloc[0]
    stitched_model = context.oneshot.model(context.dense, Candidate.from_json(
        trials[trials["trial"] == first["trial"]].iloc[0]["candidate"]))
    assert first["test_perplexity"] == pytest.approx(evaluate(
        stitched_model, context.data.loader("test", context.data.batch_size), context.task))
    assert (trials.loc[~trials["on_front"], "test_perplexity"].isna()).all()

    # the export: a GGUF holding exactly the scored bytes, the candidate rebuilt to the digit
    best = int(outcome.front["trial"].iloc[0])
    exported = run_export(config, ExportRequest(trial=best, mlflow=False), runs_dir=runs,
                          printer=lambda line: None)
    report = exported.report
    row = trials[trials["trial"] == best].iloc[0]
    assert (exported.out_dir / "model.gguf").is_file()
    assert report["size"]["tensor_bytes"] == round(row["size_kb"] * 1000)
    assert report["validation"]["rebuilt"] == pytest.approx(row["perplexity"], rel=1e-6)
    reader = gguf.GGUFReader(exported.out_dir / "model.gguf")
    assert sum(int(t.n_bytes) for t in reader.tensors) == report["size"]["tensor_bytes"]
    cpp = report["llama_cpp"]
    if cpp["measured"]:  # llama.cpp computes the file's perplexity as PyTorch scored it
        assert cpp["relative_to_pytorch"] <= 0.01 and cpp["gen_tokens_per_s"] > 0
    else:
        assert "llama-cpp-python" in cpp["why"]

    more = run_search(config, runs_dir=runs, extend=2, printer=lambda line: None)
    assert more.new_trials == 2 and "building the level database" not in capfd.readouterr().err
    _, parents, children = mlflow_runs(runs, "os")
    assert len(parents) == 1 and len(children) == 6
    assert "kl" in children[0].data.metrics
    assert len(load_study(runs, "os").trials) == 6


@pytest.mark.parametrize("changes, words", [
    ({"space": {"default": {"patterns": ["channel"], "sparsity": [0.5], "bits": [8]}}},
     "'channel' removes whole channels"),
    ({"space": {"default": {"patterns": ["unstructured"], "sparsity": [0.5], "bits": [2]}}},
     "bits 2 with sparsity"),
    ({"space": {"default": {"bits": [7]}}}, "bits [7]"),
    ({"finetune": {"steps": 10}}, "fine-tunes no candidate"),
    ({"oneshot": None, "objectives": ["perplexity", "bits"]}, "add a 'oneshot:' section"),
    ({"oneshot": None, "budget": {"tokens": 1000}}, "budget.tokens counts the tokens"),
    ({"fidelity": {"low_steps": 5}}, "use fidelity.low_windows"),
    ({"budget": {"tokens": 1000, "finetune_steps": 10}}, "not both"),
    ({"constraints": ["sparsity >= 1.5"]}, "pruned share of the searched weights"),
    ({"strategy": {"name": "knapsack"}, "hardware": "measure",
      "objectives": ["perplexity", "latency"]}, "another scale"),
    ({"task": {"kind": "classification"}, "objectives": ["accuracy", "size"]}, "language-model"),
])
def test_oneshot_config_errors_name_the_field(tmp_path, model_folder, text_folder, changes, words):
    config = write_config(tmp_path, "bad", model_folder, text_folder, **changes)
    with pytest.raises(ConfigError) as err:
        run_search(config, runs_dir=tmp_path / "runs", printer=lambda line: None)
    assert words in str(err.value)
    assert not (tmp_path / "runs" / "bad").exists()


def test_a_layer_the_database_cannot_store_is_named(tmp_path, model_folder, text_folder):
    config = write_config(tmp_path, "shape", model_folder, text_folder,
                          space={"exclude": ["model.embed_tokens"],
                                 "default": {"sparsity": [0.0], "patterns": ["unstructured"],
                                             "bits": [4, 32]}})  # Q4_K: rows of 256
    with pytest.raises(ConfigError) as err:
        run_search(config, runs_dir=tmp_path / "runs", printer=lambda line: None)
    assert "oneshot" in str(err.value) and "cannot be stored as Q4_K" in str(err.value)


def test_knapsack_plans_with_database_sensitivity_and_exact_stored_sizes(tmp_path, model_folder,
                                                                       text_folder):
    """knapsack on a one-shot search: each layer's sensitivity is measured with the database's
    stored levels, and the planner's bits and size of every allocation are the stored file's."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "ks", model_folder, text_folder,
                          strategy={"name": "knapsack"}, budget={"trials": 5},
                          objectives=["perplexity", "bits"], constraints=["size_kb <= 400"],
                          sensitivity={"samples": 4})
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    trials = outcome.trials
    assert (trials["state"] == "COMPLETE").sum() == 5
    assert len(set(trials["candidate"])) == 5, "the planner proposes each allocation once"

    context = prepare(config, runs)
    study = context.open_study()
    problem = context.planner.problem
    for _, row in trials.iterrows():
        allocation = problem.allocation_of(Candidate.from_json(row["candidate"]))
        assert problem.total("bits", allocation) == pytest.approx(row["bits_per_weight"])
        assert problem.total("size", allocation) == pytest.approx(row["size_kb"])
    assert study.trials, "the study reopened with the stored sensitivity"

    # one entry by hand: the task loss with that layer alone at its level, the rest dense
    from autosparse.search.sensitivity import _loss_and_accuracy, validation_subset
    decision = context.space.decisions[0]
    choice = sorted(c for c in decision.distinct_choices() if c.bits == 5)[0]
    entry = context.sensitivity.get(decision.name, choice)
    batches = validation_subset(context.data, context.config.sensitivity)
    dense_loss, _ = _loss_and_accuracy(context.dense, batches, context.task)
    alone = context.oneshot.model(context.dense, Candidate({n: choice for n in decision.layers}))
    loss, _ = _loss_and_accuracy(alone, batches, context.task)
    assert entry.loss_delta == pytest.approx(loss - dense_loss, rel=1e-5, abs=1e-7)


def test_kl_objective_goes_on_the_front_and_the_knee_trades_a_cost(tmp_path, model_folder,
                                                                  text_folder):
    """objectives [perplexity, kl, size] with the GA (seeded from the database sensitivity):
    kl is a front axis, and ``export --knee`` trades quality against size, never against kl."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "klf", model_folder, text_folder,
                          strategy={"name": "ga"}, budget={"trials": 4},
                          objectives=["perplexity", "kl", "size"], sensitivity={"samples": 4})
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    assert "kl" in outcome.front.columns and outcome.front["kl"].notna().all()
    study = load_study(runs, "klf")
    assert len(study.directions) == 3
    exported = run_export(config, ExportRequest(knee=True, mlflow=False), runs_dir=runs,
                          printer=lambda line: None)
    assert (exported.out_dir / "model.gguf").is_file()
    chosen = int(exported.out_dir.name.removeprefix("trial-"))
    assert chosen in set(outcome.front["trial"])


def test_quality_only_objectives_export_by_trial_and_refuse_a_knee(tmp_path, model_folder,
                                                                    text_folder):
    """objectives [perplexity, kl] hold no cost: ``export --knee`` says so in one ConfigError
    (it used to stop on a bare StopIteration); ``--trial`` still exports."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "qonly", model_folder, text_folder, budget={"trials": 2},
                          objectives=["perplexity", "kl"])
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    with pytest.raises(ConfigError, match=r"no cost to trade against: pick with --trial N"):
        run_export(config, ExportRequest(knee=True, mlflow=False), runs_dir=runs,
                   printer=lambda line: None)
    trial = int(outcome.front["trial"].iloc[0])
    exported = run_export(config, ExportRequest(trial=trial, mlflow=False), runs_dir=runs,
                          printer=lambda line: None)
    assert exported.out_dir.name == f"trial-{trial}"


def test_a_token_budget_screens_candidates_on_a_few_windows_first(tmp_path, model_folder,
                                                                  text_folder):
    """budget.tokens with fidelity.low_windows: each new candidate is scored on 1 validation
    window and a quarter of the calibration windows first; only those that could reach the
    front are scored in full. Every trial records the tokens it scored; the sum stays within
    the budget plus the one score that crossed it."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "sh", model_folder, text_folder, strategy={"name": "random"},
                          budget={"tokens": 2000},
                          fidelity={"low_windows": 1, "tolerance": 0.0})
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    study = load_study(runs, "sh")
    context = prepare(config, runs)
    evaluator = context.objective().evaluator
    full = evaluator.finetune_steps()
    low = evaluator.oneshot_low_tokens(1)
    per_window = context.oneshot.reference.tokens_per_window
    assert (full, low) == ((4 + 8) * per_window, (1 + 2) * per_window)
    spent = [int(t.user_attrs["finetune_steps_used"]) for t in study.trials]
    states = [t.state.name for t in study.trials]
    assert "PRUNED" in states, "some candidate was screened out on its short score"
    for trial, used in zip(study.trials, spent):
        assert "low_fidelity" in trial.user_attrs
        assert used == (low + full if trial.state.name == "COMPLETE" else low)
    assert 2000 <= sum(spent) < 2000 + low + full
    complete = outcome.trials[outcome.trials["state"] == "COMPLETE"]
    assert (complete["tokens_scored"] == full).all()
    # the short score reads the first windows: a repeat of the full score on them agrees
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    with evaluator.staged(Candidate.from_json(trial.user_attrs["candidate"])) as run:
        again = run.score(low)
    assert again["accuracy"] == pytest.approx(trial.user_attrs["low_fidelity"]["accuracy"])


def test_two_workers_share_one_database_and_one_study(tmp_path, model_folder, text_folder, capfd):
    """--workers 2: the database is built once (by the first process, before the workers
    start), each worker opens it on its own device and works on the one study (the second
    worker may start after tiny trials are all taken: which worker ran what is not asserted)."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "two", model_folder, text_folder, budget={"trials": 4})
    outcome = run_search(config, runs_dir=runs, workers=2, threads=2, printer=lambda line: None)
    err = capfd.readouterr().err
    assert err.count("building the level database") == 1
    assert (outcome.trials["state"] == "COMPLETE").sum() == 4
    assert len(load_study(runs, "two").trials) == 4


def test_an_average_sparsity_constraint_is_planned_by_the_knapsack(tmp_path, model_folder,
                                                                  text_folder):
    """'sparsity >= 0.2' (the pruned share of the searched weights, EvoPress's budget): the
    knapsack plans under it, so every proposal meets it; the metric is the weighted share."""
    runs = tmp_path / "runs"
    config = write_config(tmp_path, "sp", model_folder, text_folder,
                          strategy={"name": "knapsack"}, budget={"trials": 4},
                          objectives=["perplexity", "size"], constraints=["sparsity >= 0.2"],
                          sensitivity={"samples": 4})
    outcome = run_search(config, runs_dir=runs, printer=lambda line: None)
    trials = outcome.trials
    assert (trials["state"] == "COMPLETE").sum() == 4
    assert (trials["sparsity"] >= 0.2).all() and trials["feasible"].all()
    context = prepare(config, runs)
    numel = context.oneshot.weight_numel()
    row = trials.iloc[0]
    assignment = context.oneshot.assignment(Candidate.from_json(row["candidate"]))
    by_hand = sum(level.sparsity * numel[layer] for layer, level in assignment.items())
    assert row["sparsity"] == pytest.approx(by_hand / sum(numel.values()))
