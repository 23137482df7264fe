"""``deploy:``: the search scores the file the model will run from.

Config rules (defaults, the int8 space, refusals) are unit tests; two tiny real searches (one
per file target) are exported, and the exported file must be the size the trial scored to the
byte, with the int8 file's own validation metric as the trial's, and latency timed on it.
"""

from __future__ import annotations

import json

import pytest

from autosparse.cli import main
from autosparse.config.schema import ConfigError, parse_config
from autosparse.config.space_rules import DEFAULT_CHOICES
from autosparse.cost.onnx_files import onnx_module
from autosparse.search.runner import run_search
from autosparse.search.trial_attrs import METRICS_ATTR
from autosparse.workload.data import load_data
from autosparse.workload.evaluate import evaluate
from tests.search_helpers import load_study, write_config

MODEL = {"model": {"builtin": "digits-cnn", "train_epochs": 4}}
ONESHOT = {"name": "lm", "model": {"builtin": "tiny-lm"}, "task": {"kind": "language-model"},
           "data": {"source": "synthetic-tokens"}, "oneshot": {},
           "space": {"default": {"sparsity": [0.0], "patterns": ["dense"], "bits": [4, 8]}}}


def config(**fields):
    return parse_config({"name": "d", **MODEL, **fields})


def test_the_default_target_is_the_packed_file_and_the_space_is_unchanged():
    plain = config()
    assert plain.deploy == "packed"
    assert plain.space.default == DEFAULT_CHOICES
    assert config(deploy="onnx").space.default == DEFAULT_CHOICES  # onnx stores every width


def test_oneshot_deploys_gguf():
    assert parse_config(ONESHOT).deploy == "gguf"


def test_int8_narrows_the_space_to_int8_weights_and_channel_removal():
    int8 = config(deploy="onnx-int8")
    assert int8.space.default.bits == [8]
    assert int8.space.default.patterns == ["channel", "dense"]
    assert int8.space.default.sparsity == DEFAULT_CHOICES.sparsity
    own = config(deploy="onnx-int8", space={"default": {"sparsity": [0, 0.5],
                                                        "patterns": ["unstructured"]}})
    assert own.space.default.patterns == ["unstructured"]  # given: kept (zeros stored as int8)
    assert own.space.default.bits == [8]


@pytest.mark.parametrize("fields, words", [
    ({"deploy": "tflite"}, ["deploy", "'tflite'", "packed, onnx, onnx-int8, gguf"]),
    ({"deploy": "gguf"}, ["deploy 'gguf'", "oneshot"]),
    ({"deploy": "onnx-int8", "space": {"default": {"bits": [4, 8]}}},
     ["space.default.bits [4, 8]", "onnx-int8", "[8]"]),
    ({"deploy": "onnx-int8", "space": {"rules": [{"layers": ["fc1"], "bits": [32]}]}},
     ["space.rules[0].bits [32]", "[8]"]),
], ids=["unknown", "gguf-without-oneshot", "int8-other-bits", "int8-rule-bits"])
def test_a_target_that_cannot_hold_the_config_is_refused_naming_it(fields, words):
    with pytest.raises(ConfigError) as err:
        config(**fields)
    for word in words:
        assert word in str(err.value)


def test_oneshot_refuses_another_file():
    with pytest.raises(ConfigError, match="deploy 'onnx': a oneshot search exports model.gguf"):
        parse_config({**ONESHOT, "deploy": "onnx"})


# ------------------------------------------------------------------------------------------
# tiny real searches


def _search(tmp_path_factory, target: str):
    runs_dir = tmp_path_factory.mktemp(f"deploy-{target}")
    path = write_config(runs_dir, "dep", deploy=target, budget={"trials": 3},
                        hardware="measure", measure={"rounds": 1, "calls": 2, "warmup": 0},
                        objectives=["accuracy", "size", "latency"],
                        space={"default": {"sparsity": [0.0, 0.5], "patterns":
                                           ["channel", "unstructured"], "bits": [8]}})
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        outcome = run_search(path, runs_dir=runs_dir, printer=lambda line: None)
    assert (outcome.trials["state"] == "COMPLETE").all()
    return runs_dir, path


@pytest.fixture(scope="module", params=["onnx", "onnx-int8"])
def searched(request, tmp_path_factory):
    return request.param, *_search(tmp_path_factory, request.param)


@pytest.mark.integration
def test_the_exported_deploy_file_is_the_size_and_metric_the_trial_scored(searched):
    target, runs_dir, path = searched
    study = load_study(runs_dir, "dep")
    trial = max(study.trials, key=lambda t: t.user_attrs[METRICS_ATTR]["size_kb_packed"]
                - t.user_attrs[METRICS_ATTR]["size_kb"])  # any trial: the first of the largest gap
    metrics = trial.user_attrs[METRICS_ATTR]
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["--runs-dir", str(runs_dir), "export", str(path),
                     "--trial", str(trial.number), "--no-mlflow"]) == 0
    out = runs_dir / "dep" / "export" / f"trial-{trial.number}"
    report = json.loads((out / "report.json").read_text())
    name = {"onnx": "model.compact.onnx", "onnx-int8": "model.int8.onnx"}[target]
    assert report["deploy"] == {"target": target, "file": name,
                                "file_kb": (out / name).stat().st_size / 1000,
                                "scored_kb": metrics["size_kb"]}
    assert (out / name).stat().st_size == round(metrics["size_kb"] * 1000)  # to the byte
    assert f"Deploy target: {target}: `{name}`" in (out / "report.md").read_text()
    assert metrics["size_kb_packed"] != metrics["size_kb"]  # the formula kept beside
    assert metrics["latency_source.measured"] == 1.0  # timed: the file itself
    assert metrics["latency_measured_int8"] == float(target == "onnx-int8")
    if target == "onnx-int8":  # the trial's metric is the file's own, the student's beside
        data = load_data(parse_config({"name": "x", **MODEL}).data)
        own = evaluate(onnx_module(out / name), data.loader("validation", data.batch_size))
        assert own == pytest.approx(metrics["accuracy"], abs=1e-9)
        assert "accuracy_pytorch" in metrics
    else:
        assert "accuracy_pytorch" not in metrics


@pytest.mark.integration
def test_resuming_with_another_deploy_target_is_refused(searched):
    _, runs_dir, _ = searched
    (runs_dir / "other").mkdir(exist_ok=True)
    other = write_config(runs_dir / "other", "dep", deploy="packed", budget={"trials": 4},
                         hardware="measure", measure={"rounds": 1, "calls": 2, "warmup": 0},
                         objectives=["accuracy", "size", "latency"],
                         space={"default": {"sparsity": [0.0, 0.5], "patterns":
                                            ["channel", "unstructured"], "bits": [8]}})
    with pytest.raises(ConfigError, match=r'deploy: "onnx(-int8)?" -> "packed"'):
        run_search(other, runs_dir=runs_dir, printer=lambda line: None)


def test_the_report_line_says_which_part_of_the_file_was_scored():
    from autosparse.export.report import deploy_line

    size = {"packed_payload": 6.73, "packed_header": 1.35, "packed_graph": 2.38}
    packed = {"deploy": {"target": "packed", "file": "model.packed", "file_kb": 10.46,
                         "scored_kb": 6.73}, "size_kb": size}
    assert deploy_line(packed) == (
        "Deploy target: packed: `model.packed` is 10.46 kB; its payload, 6.73 kB, is what the "
        "search scored (6.73 kB); the header (1.35 kB), the graph (2.38 kB) and batch-norm "
        "statistics come on top (deploy: onnx scores a whole file).")
    onnx = {"deploy": {"target": "onnx", "file": "model.compact.onnx", "file_kb": 6.556,
                       "scored_kb": 6.556}, "size_kb": size}
    assert deploy_line(onnx) == ("Deploy target: onnx: `model.compact.onnx` is 6.56 kB, the "
                                 "search scored 6.56 kB (1.000x).")
    assert deploy_line({}) == ""
