"""Per-layer sensitivity: measured deltas against compress+evaluate by hand, resume from the
study, the JSON table, the Fisher proxy, and ``autosparse sensitivity`` end to end."""

from __future__ import annotations

import math
from types import SimpleNamespace

import mlflow
import optuna
import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import TinyNet
from torch.utils.data import TensorDataset

from autosparse.cli import main
from autosparse.compress.apply import compress_model, taylor_scores
from autosparse.config.schema import SearchConfig
from autosparse.config.sections import SensitivityConfig
from autosparse.search.allocation.table import (
    ChoiceSensitivity,
    SensitivityTable,
    choice_id,
)
from autosparse.search.sensitivity import (
    dense_baseline,
    fisher_diagonal,
    measure_sensitivity,
    measured_choices,
    validation_subset,
)
from autosparse.search.sensitivity_study import ensure_sensitivity
from autosparse.search.study import (
    store_sensitivity_decision,
    store_sensitivity_header,
    stored_sensitivity,
)
from autosparse.space.candidate import DENSE, FLOAT_BITS
from autosparse.space.discovery import discover_layers
from autosparse.space.search_space import SearchSpace
from autosparse.workload.splits import DataSplits

SPACE = {
    "default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured", "channel", "2:4"],
                "bits": [4, 32]},
    # a tied group with Taylor scores: one decision compresses two layers at once
    "rules": [{"layers": ["conv2", "fc1"], "tie": True, "name": "middle",
               "criterion": ["magnitude", "taylor"], "bits": [8, 32]}],
}
CFG = SensitivityConfig(samples=30, batch_size=8)  # 30 of 40: the subset ends mid-batch


@pytest.fixture(scope="module")
def setup(one_thread):
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # confident logits, so compression moves the loss visibly
        for parameter in model.parameters():
            parameter.mul_(3.0)
    generator = torch.Generator().manual_seed(1)
    make = lambda n: TensorDataset(torch.randn(n, 1, 8, 8, generator=generator),  # noqa: E731
                                   torch.randint(0, 10, (n,), generator=generator))
    data = DataSplits(train=make(48), validation=make(40), test=make(8), input_shape=(1, 8, 8),
                      num_classes=10)
    config = SearchConfig(name="tiny", model={"builtin": "digits-cnn"}, space=SPACE,
                          sensitivity=CFG.model_dump())
    space = SearchSpace.build(config.space, discover_layers(model, data.input_shape))
    scores = taylor_scores(model, data.loader("train", 16), space.layer_names, 2)
    return SimpleNamespace(dense=model, data=data, space=space, config=config, scores=scores)


def by_hand(model, data, layers, choice, scores) -> tuple[float, float]:
    """Loss and accuracy of compress_model's copy on the first 30 validation samples."""
    x, y = data.validation.tensors[0][:30], data.validation.tensors[1][:30]
    compressed = compress_model(model, {name: choice for name in layers}, scores).eval()
    with torch.no_grad():
        logits = compressed(x)
    return float(F.cross_entropy(logits, y)), 100.0 * int((logits.argmax(1) == y).sum()) / 30


def test_zero_shot_deltas_match_compress_and_evaluate_by_hand(setup):
    before = {k: v.clone() for k, v in setup.dense.state_dict().items()}
    entries = measure_sensitivity(setup.dense, setup.data, setup.space, CFG, scores=setup.scores)
    dense_loss, dense_accuracy = by_hand(setup.dense, setup.data, [], None, None)
    assert dense_baseline(setup.dense, setup.data, CFG) == pytest.approx((dense_loss, dense_accuracy))

    expected = {}
    for decision in setup.space.decisions:
        for choice in decision.distinct_choices():
            if choice.pattern == DENSE and choice.bits == FLOAT_BITS:
                continue
            loss, accuracy = by_hand(setup.dense, setup.data, decision.layers, choice, setup.scores)
            expected[(decision.name, choice_id(choice))] = (loss - dense_loss, accuracy - dense_accuracy)
    assert {(e.decision, e.choice) for e in entries} == set(expected)
    assert len(entries) == len(expected)
    assert any(e.decision == "middle" and e.choice.endswith(":taylor") for e in entries)
    for e in entries:
        loss_delta, accuracy_delta = expected[(e.decision, e.choice)]
        assert e.loss_delta == pytest.approx(loss_delta, abs=1e-5), (e.decision, e.choice)
        assert e.accuracy_delta == pytest.approx(accuracy_delta, abs=1e-9), (e.decision, e.choice)
    assert max(e.loss_delta for e in entries) > 0.1  # the deltas are not all trivially zero
    assert any(e.accuracy_delta != 0 for e in entries)
    for key, value in setup.dense.state_dict().items():  # the dense model is left as it was
        assert torch.equal(value, before[key]), key


def test_taylor_choices_need_scores(setup):
    with pytest.raises(ValueError, match="taylor.*conv2"):
        measure_sensitivity(setup.dense, setup.data, setup.space, CFG)


def test_skip_measures_only_the_rest_and_equals_a_fresh_run(setup):
    fresh = measure_sensitivity(setup.dense, setup.data, setup.space, CFG, scores=setup.scores)
    calls = []
    first = setup.space.decisions[0].name
    rest = measure_sensitivity(setup.dense, setup.data, setup.space, CFG, scores=setup.scores,
                               skip={first}, on_decision=lambda name, got: calls.append((name, got)))
    assert [name for name, _ in calls] == [d.name for d in setup.space.decisions[1:]]
    assert [e for _, got in calls for e in got] == rest
    assert [e for e in fresh if e.decision == first] + rest == fresh


def test_subset_is_the_first_samples_and_shrinks_to_the_split(setup):
    batches = validation_subset(setup.data, CFG)
    assert [len(y) for _, y in batches] == [8, 8, 8, 6]
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(x, setup.data.validation.tensors[0][:30])
    large = validation_subset(setup.data, SensitivityConfig(samples=1000, batch_size=16))
    assert sum(len(y) for _, y in large) == 40


def test_fisher_is_finite_non_negative_and_matches_per_sample_gradients(setup):
    cfg = SensitivityConfig(method="fisher", samples=30, batch_size=8)
    entries = measure_sensitivity(setup.dense, setup.data, setup.space, cfg, scores=setup.scores)
    assert len(entries) == sum(len(measured_choices(d)) for d in setup.space.decisions)
    assert all(math.isfinite(e.loss_delta) and e.loss_delta >= 0 for e in entries)
    assert all(math.isnan(e.accuracy_delta) for e in entries)
    assert any(e.loss_delta > 0 for e in entries)

    # the Fisher diagonal equals the mean of per-sample squared gradients, one sample at a time
    model = setup.dense
    diagonal = fisher_diagonal(model, validation_subset(setup.data, cfg), ["conv1", "fc2"])
    x, y = setup.data.validation.tensors[0][:30], setup.data.validation.tensors[1][:30]
    weights = [model.conv1.weight, model.fc2.weight]
    expected = [torch.zeros_like(w) for w in weights]
    for i in range(30):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), weights)
        for acc, g in zip(expected, grads):
            acc += g.pow(2) / 30
    assert torch.allclose(diagonal["conv1"], expected[0], rtol=1e-4, atol=1e-9)
    assert torch.allclose(diagonal["fc2"], expected[1], rtol=1e-4, atol=1e-9)
    assert model.conv1.weight.grad is None


def test_table_json_round_trip(setup):
    table = ensure_sensitivity(setup, optuna.create_study(), lambda line: None)
    again = SensitivityTable.from_json(table.to_json())
    assert again == table and again.get("middle", table.entries[-1].choice) is not None
    fisher = SensitivityTable(entries=(ChoiceSensitivity("a", "dense:0:4:magnitude", 0.5, math.nan),),
                              dense_loss=1.0, dense_accuracy=50.0, samples=30, method="fisher")
    back = SensitivityTable.from_json(fisher.to_json())
    assert back.method == "fisher" and math.isnan(back.entries[0].accuracy_delta)


def test_study_storage_resume_and_method_change(setup):
    lines: list[str] = []
    study = optuna.create_study()
    full = ensure_sensitivity(setup, study, lines.append)
    names = [d.name for d in setup.space.decisions]
    assert full.meta["measured"] == names and full.decisions() == names
    header, stored = stored_sensitivity(study)
    assert header["complete"] and header["method"] == "zero-shot" and header["samples"] == 30
    assert header["seconds"] == pytest.approx(full.seconds) and full.seconds > 0
    assert [e for name in names for e in stored[name]] == list(full.entries)
    assert lines[-1].startswith(f"sensitivity: {len(names)} decisions")

    # a kill after two decisions: header (incomplete) + those two are in the study
    killed = optuna.create_study()
    store_sensitivity_header(killed, dense_loss=full.dense_loss, dense_accuracy=full.dense_accuracy,
                             samples=30, samples_used=30, method="zero-shot", seconds=5.0,
                             complete=False, decisions=names[:2])
    for name in names[:3]:  # the third was stored, but the kill came before its header update
        store_sensitivity_decision(killed, name, stored[name])
    resumed = ensure_sensitivity(setup, killed, lines.append)
    assert resumed.meta["measured"] == names[2:] and resumed.meta["reused"] == sorted(names[:2])
    assert resumed.entries == full.entries and resumed.seconds > 5.0
    assert stored_sensitivity(killed)[0]["complete"]
    assert "measured now" in lines[-1]

    # nothing left: nothing measured, time unchanged
    again = ensure_sensitivity(setup, killed, lines.append)
    assert again.meta["measured"] == [] and again.seconds == resumed.seconds
    assert lines[-1].endswith("all reused from the study")

    # another method in the config: measured afresh, and said so
    fisher = SimpleNamespace(**{**vars(setup), "config": setup.config.model_copy(
        update={"sensitivity": SensitivityConfig(method="fisher", samples=30, batch_size=8)})})
    refreshed = ensure_sensitivity(fisher, killed, lines.append)
    assert any("measuring it again" in line for line in lines)
    assert refreshed.method == "fisher" and refreshed.meta["measured"] == names
    assert stored_sensitivity(killed)[0]["method"] == "fisher"

    # back to zero-shot, killed right after the new header: the fisher attrs still in the study
    # are not taken for zero-shot ones
    store_sensitivity_header(killed, dense_loss=full.dense_loss, dense_accuracy=full.dense_accuracy,
                             samples=30, samples_used=30, method="zero-shot", seconds=0.0,
                             complete=False, decisions=[])
    back = ensure_sensitivity(setup, killed, lines.append)
    assert back.meta["measured"] == names and back.entries == full.entries


@pytest.mark.integration
def test_cli_measures_once_stores_and_logs_to_mlflow(tmp_path, capsys):
    config = {"name": "sens", "model": {"builtin": "digits-cnn", "train_epochs": 1},
              "space": {"default": {"sparsity": [0.0, 0.5], "patterns": ["unstructured"],
                                    "bits": [4, 32]}},
              "sensitivity": {"samples": 64, "batch_size": 32}}
    path = tmp_path / "sens.yaml"
    path.write_text(yaml.safe_dump(config))
    runs = tmp_path / "runs"
    assert main(["--runs-dir", str(runs), "sensitivity", str(path)]) == 0
    out = capsys.readouterr().out
    assert "sensitivity: 5 decisions x 3 choices in" in out and "(zero-shot, 64 validation" in out
    for layer in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert any(line.split()[:1] == [layer] for line in out.splitlines()), layer
    csv = (runs / "sens" / "sensitivity.csv").read_text()
    assert csv.startswith("decision,choice,") and len(csv.splitlines()) == 1 + 15
    assert (runs / "sens" / "sensitivity.png").read_bytes()[:4] == b"\x89PNG"

    study = optuna.load_study(study_name="sens", storage=f"sqlite:///{runs / 'sens' / 'study.db'}")
    header, stored = stored_sensitivity(study)
    assert header["complete"] and sorted(stored) == ["conv1", "conv2", "conv3", "fc1", "fc2"]

    assert main(["--runs-dir", str(runs), "sensitivity", str(path)]) == 0
    assert "all reused from the study" in capsys.readouterr().out
    assert stored_sensitivity(study)[0]["seconds"] == header["seconds"]  # nothing measured

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("sens")
    parents = [r for r in client.search_runs([experiment.experiment_id])
               if r.data.tags.get("autosparse.role") == "search"]
    assert len(parents) == 1
    parent = parents[0]
    assert {"sensitivity.csv", "sensitivity.png"} <= {a.path for a in
                                                       client.list_artifacts(parent.info.run_id)}
    assert parent.data.params["sensitivity_method"] == "zero-shot"
    assert parent.data.metrics["sensitivity_seconds"] == pytest.approx(header["seconds"])
