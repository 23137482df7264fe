"""Direct latency measurement (autosparse.cost.measured_latency, ``hardware: measure``).

Unit: CandidateTimer on a DigitsCNN with few rounds, asserting structure only (which file is
timed, what is cached, the ratio's definition), never speed. Config: the errors name the field.
Integration: a tiny real search with ``hardware: measure`` stores measured latencies on every
trial and reuses the measurement of a repeated candidate.
"""

from __future__ import annotations

import math

import optuna
import pytest
import torch
from search_helpers import load_study, write_config

from autosparse.compress.apply import compress_model, taylor_scores
from autosparse.config.runtime import MEASURE
from autosparse.config.schema import parse_config
from autosparse.config.validation import ConfigError
from autosparse.cost.measured_latency import (
    FP32,
    INT8,
    CandidateTimer,
    deployable_format,
)
from autosparse.search.objective import KEY_ATTR, METRICS_ATTR
from autosparse.search.runner import run_search
from autosparse.space.candidate import Candidate, LayerChoice
from autosparse.space.discovery import discover
from autosparse.workload.models import DigitsCNN

pytestmark = pytest.mark.usefixtures("one_thread")
SHAPE = (1, 8, 8)


@pytest.fixture(scope="module")
def cnn():
    torch.manual_seed(0)
    model = DigitsCNN(1, 8, 8, 10).eval()
    table, graph = discover(model, SHAPE)
    return model, table, graph


def _timer(cnn, **kwargs) -> CandidateTimer:
    model, table, graph = cnn
    return CandidateTimer(model, table, graph, SHAPE, rounds=2, calls=3, warmup=1, **kwargs)


def test_timer_measures_the_deployable_file_beside_the_dense_model(cnn):
    model, table, _ = cnn
    timer = _timer(cnn)
    int8 = Candidate({name: LayerChoice.make("channel" if name == "conv2" else "dense",
                                             0.5 if name == "conv2" else 0.0, 8)
                      for name in table.names})
    mixed = Candidate({"conv2": LayerChoice.make("channel", 0.5, 8)})  # others stay fp32
    assert deployable_format(int8, table) == INT8 and deployable_format(mixed, table) == FP32

    first = timer.measure(int8, compress_model(model, int8, None, cnn[2]))
    assert first.format == INT8 and not first.cached
    assert first.latency_ms > 0 and first.dense_ms > 0 and first.seconds > 0
    assert math.isclose(first.speedup, first.dense_ms / first.latency_ms)
    metrics = first.metrics()
    assert metrics["latency_ms"] == first.latency_ms and metrics["latency_source.measured"] == 1.0
    assert metrics["latency_measured_int8"] == 1.0 and metrics["speedup_measured"] == first.speedup

    again = timer.measure(int8, compress_model(model, int8, None, cnn[2]))  # same key: cached
    assert again.cached and again.seconds == 0.0 and again.latency_ms == first.latency_ms

    other = timer.measure(mixed, compress_model(model, mixed, None, cnn[2]))
    assert other.format == FP32 and not other.cached and other.latency_ms > 0
    assert timer.dense_ms() > 0 and timer.dense_onnx.is_file()
    folder = timer.dense_onnx.parent
    timer.close()
    assert not folder.exists()  # the temporary ONNX files are gone
    timer.close()  # closing twice is harmless


def test_timer_leaves_the_student_untouched(cnn):
    model, table, graph = cnn
    candidate = Candidate({"conv1": LayerChoice.make("channel", 0.5, 32)})
    student = compress_model(model, candidate, None, graph)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    _timer(cnn).measure(candidate, student)
    after = student.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.nn.utils.parametrize.is_parametrized(student.conv1)  # not baked in place


def test_timer_shrinks_taylor_channel_choices_with_their_scores(cnn):
    """Which channels a Taylor choice keeps depends on the scores: the timer must remove those
    (shrinking checks the removed ones are zero, so the wrong ones would fail loudly)."""
    model, table, graph = cnn
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, *SHAPE, generator=generator), torch.randint(0, 10, (8,)))]
    scores = taylor_scores(model, batches, table.names, 1)
    candidate = Candidate({"conv2": LayerChoice.make("channel", 0.5, 32, "taylor")})
    student = compress_model(model, candidate, scores, graph)
    assert _timer(cnn).measure(candidate, student, scores).latency_ms > 0


def test_timer_rejects_bad_settings(cnn):
    with pytest.raises(ValueError, match="rounds"):
        CandidateTimer(*cnn, SHAPE, rounds=0)


# --------------------------------------------------------------------------------------------
# config


def _config(**changes):
    data = {"name": "m", "model": {"builtin": "digits-cnn"}, "hardware": MEASURE,
            "objectives": ["accuracy", "latency"], **changes}
    return parse_config(data)


def test_measure_config_validates_latency_and_defaults():
    config = _config()
    assert config.hardware == MEASURE and config.measure.rounds >= 1
    assert config.cost_profile() == config.measure.profile  # planning uses the analytic profile
    assert _config(hardware="x86-server-vnni").cost_profile() == "x86-server-vnni"
    assert _config(constraints=["latency_ms <= 1"]).constraints[0].metric == "latency_ms"


def test_energy_with_measure_is_an_error_that_says_why():
    with pytest.raises(ConfigError, match="energy") as err:
        _config(objectives=["accuracy", "energy"])
    assert "measure" in str(err.value) and "cannot be measured" in str(err.value)
    with pytest.raises(ConfigError, match="energy_uj"):
        _config(constraints=["energy_uj <= 5"])


@pytest.mark.parametrize("field, value", [("rounds", 0), ("calls", -1), ("profile", "nope")])
def test_bad_measure_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=field):
        _config(measure={field: value})


def test_measure_settings_without_hardware_measure_are_refused():
    with pytest.raises(ConfigError, match="measure"):
        _config(hardware="x86-server-vnni", measure={"rounds": 3})


# --------------------------------------------------------------------------------------------
# a real search


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One runs directory: the dense model is trained once for both searches."""
    return tmp_path_factory.mktemp("runs")


@pytest.mark.integration
def test_search_with_measured_latency(runs):
    tmp_path = runs
    name = "measured"
    config = write_config(
        tmp_path, name, hardware=MEASURE, measure={"rounds": 3, "calls": 5},
        objectives=["accuracy", "latency"], strategy={"name": "random"},
        budget={"trials": 3}, finetune={"steps": 5, "reeval_seeds": 0},
        space={"default": {"sparsity": [0.0, 0.5], "patterns": ["channel", "unstructured"],
                           "bits": [8]}},
        constraints=[])
    outcome = run_search(config, runs_dir=tmp_path, printer=lambda line: None)
    assert (outcome.trials["state"] == "COMPLETE").all() and len(outcome.trials) == 3
    for column in ("latency_ms", "latency_dense_ms", "speedup_measured"):
        values = outcome.trials[column]
        assert values.map(math.isfinite).all() and (values > 0).all(), column
    assert (outcome.trials["latency_source.measured"] == 1.0).all()
    assert (outcome.trials["latency_measured_int8"] == 1.0).all()  # all layers int8: the int8 file
    assert "latency_ms_predicted" in outcome.trials  # the analytic figure it replaced

    study = load_study(tmp_path, name)
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    measured = [t for t in trials if not t.user_attrs["cached"]]
    assert all(t.user_attrs[METRICS_ATTR]["latency_measure_seconds"] > 0 for t in measured)


@pytest.mark.integration
def test_repeated_candidate_reuses_the_measurement(runs):
    """A one-candidate space: every trial after the first is a repeat of it."""
    tmp_path = runs
    name = "measured-repeat"
    config = write_config(
        tmp_path, name, hardware=MEASURE, measure={"rounds": 2, "calls": 3},
        objectives=["accuracy", "latency"], strategy={"name": "random"},
        budget={"trials": 3}, finetune={"steps": 5, "reeval_seeds": 0}, constraints=[],
        space={"default": {"sparsity": [0.5], "patterns": ["unstructured"], "bits": [32]}})
    run_search(config, runs_dir=tmp_path, printer=lambda line: None)
    trials = [t for t in load_study(tmp_path, name).trials
              if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 3 and len({t.user_attrs[KEY_ATTR] for t in trials}) == 1
    first, *repeats = trials
    assert not first.user_attrs["cached"] and all(t.user_attrs["cached"] for t in repeats)
    latency = first.user_attrs[METRICS_ATTR]["latency_ms"]
    assert first.user_attrs[METRICS_ATTR]["latency_measure_seconds"] > 0
    for trial in repeats:
        metrics = trial.user_attrs[METRICS_ATTR]
        assert metrics["latency_ms"] == latency  # the stored measurement, not a new one
        assert metrics["latency_measure_seconds"] == 0.0  # and no time spent measuring again
