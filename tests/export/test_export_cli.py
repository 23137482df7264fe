"""``autosparse export``: which trial (selection rules, table-tested), and the whole command on a
tiny real search: every file written, loadable and agreeing, registered in MLflow and linked to
the search; bad input is exit 2, and a failure mid-export leaves nothing behind.

The selection tests are pure and fast. The rest share one module-scoped search (6 random trials
of an int8-only space, so the int8 ONNX path runs) and one export with MLflow; they are
integration-marked.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from autosparse.cli import main
from autosparse.config.validation import ConfigError
from autosparse.export.checks import SAME_PREDICTIONS
from autosparse.export.packed import load_packed
from autosparse.search import selection
from autosparse.search.runner import prepare, run_search
from autosparse.space.candidate import Candidate
from autosparse.workload.models import build_model

FILES = {"model.pt2", "model.packed", "model.onnx", "model.int8.onnx", "model.compact.onnx",
         "report.json", "report.md",
         "split.json", "reproduce.py"}
FORMATS = ("pytorch", "pytorch_shrunk", "packed", "onnx", "onnx_int8", "onnx_compact")


# ---------------------------------------------------------------- selection on hand-made tables


def table(*rows: tuple) -> pd.DataFrame:
    """rows: (trial, state, feasible, on_front, accuracy, accuracy_drop, size_kb, latency_ms)."""
    records = []
    for trial, state, feasible, on_front, acc, drop, size, latency in rows:
        complete = state == "COMPLETE"
        records.append({"trial": trial, "state": state, "candidate": "{}",
                        "fail_reason": "" if complete else "CandidateDiverged: loss is nan",
                        "feasible": feasible, "on_front": on_front,
                        "accuracy": acc if complete else math.nan,
                        "accuracy_drop": drop if complete else math.nan,
                        "size_kb": size if complete else math.nan,
                        "latency_ms": latency if complete else math.nan})
    return pd.DataFrame(records)


NAN = math.nan
TRIALS = table(
    (0, "COMPLETE", True, True, 95.0, 1.0, 100.0, 0.9),
    (1, "COMPLETE", True, True, 93.0, 3.0, 40.0, 0.5),
    (2, "COMPLETE", True, False, 92.0, 4.0, 40.0, 0.6),  # same size as 1, less accurate
    (3, "COMPLETE", True, True, 80.0, 16.0, 10.0, 0.2),
    (4, "FAIL", False, False, NAN, NAN, NAN, NAN),
    (5, "COMPLETE", False, False, 94.0, 2.0, 5.0, 0.1),  # smallest, but infeasible
    (7, "COMPLETE", True, False, 90.0, 6.0, 30.0, 0.4),
)


def test_by_number_returns_a_front_trial_without_warnings():
    chosen = selection.by_number(TRIALS, 1)
    assert chosen.trial == 1 and chosen.warnings == () and "number" in chosen.reason


def test_by_number_missing_trial_lists_the_range():
    with pytest.raises(ConfigError, match=r"no finished trial 6 \(finished trials: 0 to 7\)"):
        selection.by_number(TRIALS, 6)
    with pytest.raises(ConfigError, match="finished trials: none"):
        selection.by_number(TRIALS.iloc[:0], 0)


def test_by_number_refuses_a_failed_trial_with_its_reason():
    with pytest.raises(ConfigError, match="trial 4 failed") as err:
        selection.by_number(TRIALS, 4)
    assert "CandidateDiverged: loss is nan" in str(err.value)


def test_by_number_off_front_or_infeasible_is_a_warning_only():
    chosen = selection.by_number(TRIALS, 2)
    assert chosen.trial == 2
    assert len(chosen.warnings) == 1 and "not on the Pareto front" in chosen.warnings[0]
    infeasible = selection.by_number(TRIALS, 5)
    assert any("violates" in w for w in infeasible.warnings)
    assert any("not on the Pareto front" in w for w in infeasible.warnings)


def test_by_rule_smallest_metric_within_drop_ties_to_more_accurate():
    # within 5 points: 0 (100 kB), 1 and 2 (40 kB); 5 is smaller but infeasible, 4 failed
    chosen = selection.by_rule(TRIALS, 5, "size")
    assert chosen.trial == 1 and "size_kb" in chosen.reason
    assert selection.by_rule(TRIALS, 6, "size").trial == 7  # 30 kB at drop 6
    assert selection.by_rule(TRIALS, 100, "size_kb").trial == 3  # metric names work too
    assert selection.by_rule(TRIALS, 5, "latency").trial == 1
    assert selection.by_rule(TRIALS, 1, "size").trial == 0  # the bound is inclusive
    swapped = TRIALS.copy()
    swapped.loc[swapped["trial"] == 2, "accuracy"] = 99.0  # now 2 is the more accurate tie
    assert selection.by_rule(swapped, 5, "size").trial == 2


def test_by_rule_nothing_within_drop_names_the_smallest_drop():
    with pytest.raises(ConfigError, match=r"within 0.5 points.*smallest drop is 1\b.*--max-drop"):
        selection.by_rule(TRIALS, 0.5, "size")


def test_by_rule_unknown_metric_lists_the_available():
    with pytest.raises(ConfigError, match="'energy'") as err:
        selection.by_rule(TRIALS, 5, "energy")
    message = str(err.value)
    assert "available:" in message and "size_kb" in message and "latency_ms" in message
    with pytest.raises(ConfigError, match="'speed'.*available:.*size_kb"):
        selection.by_rule(TRIALS, 5, "speed")


def test_by_rule_and_knee_on_a_study_where_every_trial_failed():
    # what trials_frame gives when nothing completed: no per-trial metrics, objectives as NaN
    failed = pd.DataFrame({"trial": [0, 1], "state": ["FAIL", "FAIL"], "candidate": ["{}", "{}"],
                           "fail_reason": ["boom", "boom"], "cached": [False, False],
                           "feasible": [False, False], "accuracy": [NAN, NAN],
                           "size_kb": [NAN, NAN], "on_front": [False, False]})
    with pytest.raises(ConfigError, match="no trial of the study completed"):
        selection.by_rule(failed, 5, "size")
    with pytest.raises(ConfigError, match="front is empty"):
        selection.knee(failed, "size")


FRONT = table(  # accuracy vs size; normalised distance to the ends' line: 0, .556, .667, .4, 0
    (10, "COMPLETE", True, True, 50.0, 45.0, 10.0, 0.1),
    (11, "COMPLETE", True, True, 80.0, 15.0, 20.0, 0.2),
    (12, "COMPLETE", True, True, 90.0, 5.0, 30.0, 0.3),
    (13, "COMPLETE", True, True, 93.0, 2.0, 60.0, 0.6),
    (14, "COMPLETE", True, True, 95.0, 0.0, 100.0, 1.0),
    (15, "COMPLETE", True, False, 20.0, 75.0, 500.0, 5.0),  # off the front: ignored
    (16, "FAIL", False, False, NAN, NAN, NAN, NAN),
)


def test_knee_picks_the_hand_computed_knee():
    chosen = selection.knee(FRONT, "size")
    assert chosen.trial == 12 and "knee" in chosen.reason and "size_kb" in chosen.reason
    # order of rows does not matter
    assert selection.knee(FRONT.iloc[::-1].reset_index(drop=True), "size").trial == 12


def test_knee_of_fewer_than_three_points_is_the_most_accurate():
    two = FRONT[FRONT["trial"].isin([10, 13, 15])]
    chosen = selection.knee(two, "size")
    assert chosen.trial == 13 and "fewer than 3" in chosen.reason


def test_knee_unknown_cost_is_a_clear_error():
    with pytest.raises(ConfigError, match="'energy'.*available:"):
        selection.knee(FRONT, "energy")


# ---------------------------------------------------------------- the command on a real search

SPACE = {"default": {"sparsity": [0.0, 0.3, 0.6], "patterns": ["unstructured", "channel"],
                     "bits": [8]}}


def write_config(directory: Path, name: str, **extra) -> Path:
    config = {"name": name, "model": {"builtin": "digits-cnn", "train_epochs": 6},
              "space": SPACE, "strategy": {"name": "random"}, "budget": {"trials": 6},
              "constraints": ["accuracy_drop <= 30"], "finetune": {"steps": 8}, **extra}
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def export(runs_dir: Path, config: Path, *args: str) -> int:
    return main(["--runs-dir", str(runs_dir), "export", str(config), *args])


def mlflow_client(runs_dir: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs_dir / 'mlflow.db'}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """(runs dir, config, trials frame) of one tiny search; MLflow goes to runs/mlflow.db."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        runs_dir = tmp_path_factory.mktemp("export-runs")
        config = write_config(runs_dir, "exp")
        outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
        assert (outcome.trials["state"] == "COMPLETE").all()
        yield runs_dir, config, outcome.trials


def pick_channel_trial(trials: pd.DataFrame) -> int:
    """A completed trial with a channel-pruned layer (so the shrink path runs), else trial 0."""
    for row in trials.itertuples():
        choices = Candidate.from_json(row.candidate).values()
        if row.state == "COMPLETE" and any(c.pattern == "channel" and c.sparsity > 0
                                           for c in choices):
            return int(row.trial)
    return 0


@pytest.fixture(scope="module")
def exported(searched):
    """The trial exported once with ``--trial N`` (MLflow on): (number, output folder, report)."""
    runs_dir, config, trials = searched
    number = pick_channel_trial(trials)
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert export(runs_dir, config, "--trial", str(number)) == 0
    out = runs_dir / "exp" / "export" / f"trial-{number}"
    return number, out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def digits_test(searched):
    runs_dir, config, _ = searched
    context = prepare(config, runs_dir)
    xs, ys = zip(*context.data.loader("test", 512))
    return context, torch.cat(xs), torch.cat(ys)


@pytest.mark.integration
def test_export_by_number_writes_checked_artifacts(searched, exported):
    runs_dir, _, trials = searched
    number, out, report = exported
    assert {p.name for p in out.iterdir()} == FILES, "exactly the documented files, no leftovers"
    assert [p.name for p in out.parent.iterdir()] == [out.name], "no hidden temporary folder"
    assert out.stat().st_mode & 0o055 == 0o055 & ~_umask(), "the folder honours the umask"

    assert report["search"] == "exp" and report["trial"] == number
    assert report["finetune_steps"] == 8
    row = trials.set_index("trial").loc[number]
    candidate = Candidate.from_json(row["candidate"])
    assert {layer["layer"] for layer in report["layers"]} == set(candidate)
    for layer in report["layers"]:
        choice = candidate.get_choice(layer["layer"])
        assert (layer["pattern"], layer["sparsity"], layer["bits"]) == \
            (choice.pattern, choice.sparsity, choice.bits) and choice.bits == 8
    assert (not bool(row["on_front"])) == any("Pareto front" in w for w in report["warnings"])

    accuracy = report["test_accuracy"]
    for name in FORMATS:
        assert 0 < accuracy[name] <= 100, name
    for name, agree in report["agreement_percent"].items():
        assert agree >= SAME_PREDICTIONS, name
    assert set(report["agreement_percent"]) == {"pytorch_shrunk", "pt2", "packed", "onnx",
                                                "onnx_compact"}
    # every float format computes the fine-tuned compressed model's outputs (relative to the
    # largest output; float32 reassociation only)
    assert set(report["output_error"]) == set(report["agreement_percent"])
    assert max(report["output_error"].values()) <= 1e-4
    int8_drop = accuracy["pytorch"] - accuracy["onnx_int8"]
    assert int8_drop <= report["tolerances"]["int8_max_drop_points"]

    validation = report["validation_accuracy"]
    assert validation["search"] == pytest.approx(row["accuracy"])
    # the rebuild repeats the trial's own seed: compare with its own score, not the seeds' mean
    own = validation["search_single"] if validation["search_single"] is not None \
        else validation["search"]
    assert abs(validation["rebuilt"] - own) <= 1.0

    params = report["parameters"]  # the shrunk model is what the footprint counted
    assert params["shrunk"] == params["predicted"] == report["shrink"]["parameters_after"]
    assert params["shrunk"] < params["dense"] or not report["shrink"]["groups"]

    size = report["size_kb"]
    expected = size["predicted"] + size["packed_header"] + size["packed_graph"]
    assert size["packed_graph"] > 0  # the program travels with the weights (counted apart)
    assert abs(size["packed_payload"] - size["predicted"]) <= 0.03 * size["predicted"]
    assert size["packed_file"] == (out / "model.packed").stat().st_size / 1000
    assert abs(size["packed_file"] - expected) <= 0.03 * expected
    assert size["predicted"] == pytest.approx(row["size_kb"])
    assert report["files_bytes"]["model.int8.onnx"] < report["files_bytes"]["model.onnx"]
    assert {"dense_fp32", "onnx", "onnx_int8", "onnx_compact"} == \
        set(report["latency_ms_measured"])
    # model.compact.onnx: the searched weights take exactly the scored bits (int8 here)
    compact = report["compact_onnx"]
    assert compact["file_bytes"] == report["files_bytes"]["model.compact.onnx"]
    assert compact["scored_bytes"] == pytest.approx(row["size_kb"] * 1000)
    assert all(layer["stored_bits"] == layer["scored_bits"] and layer["max_weight_error"] == 0
               for layer in compact["layers"])
    assert compact["file_bytes"] < report["files_bytes"]["model.int8.onnx"]
    assert compact["ratio_to_scored"] <= 1.25

    markdown = (out / "report.md").read_text()
    assert markdown.startswith(f"# Export of exp trial {number}")
    for name in FORMATS:
        assert f"| {name} | {accuracy[name]:.2f} |" in markdown


@pytest.mark.integration
def test_exported_files_load_and_predict_alike(searched, exported, digits_test):
    import onnxruntime as ort

    runs_dir, config, _ = searched
    number, out, report = exported
    context, x, y = digits_test

    program = torch.export.load(str(out / "model.pt2")).module()
    with torch.no_grad():
        logits = program(x)
        assert program(x[:1]).shape == (1, 10) and program(x[:7]).shape == (7, 10), \
            "model.pt2 serves any batch size"
    reference = logits.argmax(1).numpy()
    accuracy = float((reference == y.numpy()).mean() * 100)
    assert abs(accuracy - report["test_accuracy"]["pytorch_shrunk"]) < 1e-6

    skeleton = build_model(context.config.model, context.data.input_shape,
                           context.data.num_classes)
    restored = load_packed(out / "model.packed", skeleton).eval()
    with torch.no_grad():
        packed = restored(x).argmax(1).numpy()
    assert (packed == reference).mean() * 100 >= SAME_PREDICTIONS
    assert abs(float((packed == y.numpy()).mean() * 100) - report["test_accuracy"]["packed"]) < 1e-6

    batch = x.numpy().astype(np.float32)
    for name, key in (("model.onnx", "onnx"), ("model.int8.onnx", "onnx_int8"),
                      ("model.compact.onnx", "onnx_compact")):
        session = ort.InferenceSession(str(out / name), providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: batch})
        assert output.shape == (len(batch), 10)
        onnx_accuracy = float((output.argmax(1) == y.numpy()).mean() * 100)
        assert abs(onnx_accuracy - report["test_accuracy"][key]) < 1e-6, name
        if key in ("onnx", "onnx_compact"):
            assert (output.argmax(1) == reference).mean() * 100 >= SAME_PREDICTIONS
            np.testing.assert_allclose(output, logits.numpy(), rtol=1e-3, atol=1e-3)


@pytest.mark.integration
def test_export_is_registered_and_linked_to_the_search(searched, exported, digits_test):
    runs_dir, _, _ = searched
    number, out, _ = exported
    _, x, _ = digits_test
    client = mlflow_client(runs_dir)
    name = f"exp-trial-{number}"
    assert client.get_registered_model(name).name == name
    version = client.get_model_version(name, "1")
    assert version.status == "READY"

    experiment = client.get_experiment_by_name("exp")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    (parent,) = [r for r in runs if r.data.tags.get("autosparse.role") == "search"]
    (child,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
                and r.data.tags.get("autosparse.trial") == str(number)]
    run = client.get_run(version.run_id)
    tags = run.data.tags
    assert tags["autosparse.role"] == "export"
    assert tags["autosparse.parent_run_id"] == parent.info.run_id
    assert tags["autosparse.trial_run_id"] == child.info.run_id
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert run.data.params["trial"] == str(number)
    assert run.data.metrics["test_accuracy_onnx_int8"] == pytest.approx(
        json.loads((out / "report.json").read_text())["test_accuracy"]["onnx_int8"])
    assert FILES <= {a.path for a in client.list_artifacts(run.info.run_id)}

    program = torch.export.load(str(out / "model.pt2")).module()
    batch = x[:64]
    with torch.no_grad():
        expected = program(batch).numpy()
    # models:/ resolves through the global URI. Not mlflow.set_tracking_uri(before) afterwards:
    # that also exports $MLFLOW_TRACKING_URI (the relative default), which every later search in
    # this process would then log to; this restores the unset state and the environment.
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        with _use_tracking_uri(f"sqlite:///{runs_dir / 'mlflow.db'}"):
            loaded = mlflow.pyfunc.load_model(f"models:/{name}/1")
    predicted = np.asarray(loaded.predict(batch.numpy().astype(np.float32)))
    np.testing.assert_allclose(predicted, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.integration
def test_rule_and_knee_pick_a_trial_and_export(searched, tmp_path):
    runs_dir, config, trials = searched
    versions_before = len(mlflow_client(runs_dir).search_model_versions())
    by_rule = tmp_path / "rule"
    assert export(runs_dir, config, "--max-drop", "5", "--minimize", "size", "--no-mlflow",
                  "--out", str(by_rule)) == 0
    report = json.loads((by_rule / "report.json").read_text())
    ok = trials[(trials["state"] == "COMPLETE") & trials["feasible"]
                & (trials["accuracy_drop"] <= 5)]
    assert report["trial"] == int(ok.sort_values(["size_kb", "accuracy"],
                                                 ascending=[True, False]).iloc[0]["trial"])
    assert report["selection"].startswith("smallest size_kb")
    assert FILES <= {p.name for p in by_rule.iterdir()}

    at_knee = tmp_path / "knee"
    assert export(runs_dir, config, "--knee", "--no-mlflow", "--out", str(at_knee)) == 0
    report = json.loads((at_knee / "report.json").read_text())
    assert report["trial"] == selection.knee(trials, "size").trial
    assert bool(trials.set_index("trial").loc[report["trial"], "on_front"])
    assert report["warnings"] == []
    assert FILES <= {p.name for p in at_knee.iterdir()}
    # --no-mlflow: nothing registered
    assert len(mlflow_client(runs_dir).search_model_versions()) == versions_before


@pytest.mark.integration
def test_bad_requests_are_exit_2(searched, exported, tmp_path, capsys):
    runs_dir, config, trials = searched
    number, out, _ = exported
    capsys.readouterr()

    assert export(runs_dir, config, "--trial", "999") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "999" in err and f"0 to {len(trials) - 1}" in err

    before = (out / "report.json").read_text()
    assert export(runs_dir, config, "--trial", str(number)) == 0  # the same export: reused
    printed = capsys.readouterr().out
    assert "reused" in printed and "rebuilding" not in printed
    assert (out / "report.json").read_text() == before

    foreign = tmp_path / "mine"  # a folder that is not an export is never replaced
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert export(runs_dir, config, "--trial", str(number), "--out", str(foreign)) == 2
    assert "not an autosparse export" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "keep me"

    assert export(runs_dir, config, "--trial", "0", "--knee") == 2
    assert "one of --trial, --max-drop" in capsys.readouterr().err
    assert export(runs_dir, config, "--trial", "0", "--max-drop", "5") == 2
    capsys.readouterr()

    assert export(runs_dir, config, "--max-drop", "5", "--minimize", "speed") == 2
    assert "available:" in capsys.readouterr().err

    missing = write_config(tmp_path, "never-searched")
    assert export(runs_dir, missing, "--trial", "0") == 2
    assert "run `autosparse search` first" in capsys.readouterr().err
    assert not (runs_dir / "never-searched" / "export").exists()


@pytest.mark.integration
def test_an_incomplete_export_folder_is_replaced_whole(searched, exported, tmp_path, capsys):
    runs_dir, config, _ = searched
    number, out, report = exported
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "model.onnx").unlink()  # e.g. deleted by hand: the folder no longer matches
    (copy / "stray.txt").write_text("from the old folder")
    capsys.readouterr()
    assert export(runs_dir, config, "--trial", str(number), "--out", str(copy),
                  "--no-mlflow") == 0
    assert "replaced the earlier export" in capsys.readouterr().out
    assert (copy / "model.onnx").is_file() and not (copy / "stray.txt").exists()
    again = json.loads((copy / "report.json").read_text())
    assert again["export_digest"] == report["export_digest"]
    assert [p.name for p in tmp_path.iterdir()] == ["copy"], "no hidden folder left"


@pytest.mark.integration
def test_failure_mid_export_leaves_nothing_behind(searched, exported, monkeypatch):
    runs_dir, config, trials = searched
    number = next(int(t) for t in trials["trial"] if t != exported[0])  # not exported yet
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("autosparse.export.exporter.export_onnx", broken)
    versions_before = len(mlflow_client(runs_dir).search_model_versions())
    target = runs_dir / "broken" / f"trial-{number}"
    with pytest.raises(RuntimeError, match="disk full"):
        export(runs_dir, config, "--trial", str(number), "--out", str(target))
    assert not target.exists()
    assert list(target.parent.iterdir()) == [], "no hidden temporary folder left"
    # the default location too: nothing under runs/exp/export but the earlier export
    before = sorted(p.name for p in (runs_dir / "exp" / "export").iterdir())
    with pytest.raises(RuntimeError, match="disk full"):
        export(runs_dir, config, "--trial", str(number))
    assert sorted(p.name for p in (runs_dir / "exp" / "export").iterdir()) == before
    assert len(mlflow_client(runs_dir).search_model_versions()) == versions_before


@pytest.mark.integration
def test_failed_trials_are_refused(searched, capsys, monkeypatch):
    runs_dir, _, _ = searched
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = write_config(runs_dir, "diverged", budget={"trials": 2},
                          finetune={"steps": 5, "lr": 1.0e6})
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    assert (outcome.trials["state"] == "FAIL").all()
    capsys.readouterr()

    assert export(runs_dir, config, "--trial", "0") == 2
    err = capsys.readouterr().err
    assert "trial 0 failed" in err and "CandidateDiverged" in err and "nothing to export" in err
    assert export(runs_dir, config, "--max-drop", "5") == 2
    assert "no trial of the study completed" in capsys.readouterr().err
    assert export(runs_dir, config, "--knee") == 2
    assert "front is empty" in capsys.readouterr().err
    assert not (runs_dir / "diverged" / "export").exists()


@pytest.mark.integration
def test_export_folder_alone_is_enough_to_predict(exported):
    """Only the folder and its documented input spec: raw digits, normalised as report.json
    says, fed to model.onnx, predict as well as the export measured (the whole data set
    includes train images, so at least the test accuracy less a margin)."""
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    _, out, report = exported
    spec = report["input"]
    assert spec["shape"] == ["batch", 1, 8, 8] and spec["dtype"] == "float32"
    assert spec["classes"] == list(range(10)) and "load_digits" in spec["raw"]
    digits = load_digits()
    raw = (digits.images / 16.0)[:, None].astype(np.float32)
    mean = np.array(spec["mean"], np.float32).reshape(1, -1, 1, 1)
    std = np.array(spec["std"], np.float32).reshape(1, -1, 1, 1)
    session = ort.InferenceSession(str(out / "model.onnx"))
    logits = session.run(None, {session.get_inputs()[0].name: (raw - mean) / std})[0]
    accuracy = float((logits.argmax(axis=1) == digits.target).mean() * 100)
    assert accuracy >= report["test_accuracy"]["onnx"] - 5
    markdown = (out / "report.md").read_text()
    assert "## Input: what to feed the model" in markdown and "ort.InferenceSession" in markdown
    assert "`model.packed` stores exactly what the size objective counted" in markdown
