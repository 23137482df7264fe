"""``autosparse calibrate`` end to end (tiny on purpose), then its profile used by ``profile``.

The timing is real (onnxruntime, few rounds and calls); the block grid of the fit is cut to two
choices and one start, because the full 16-pair grid is what makes a real calibration take
minutes: the code path (split, fit, predict, write, log) is the shipped one.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from autosparse.cli import main
from autosparse.config.hardware import load_profile
from autosparse.cost import calibrate as calibrate_module
from autosparse.cost.calibration.fit import FREE_CONSTANTS, fit_with_blocks

pytestmark = pytest.mark.integration

ARGS = ["--rounds", "3", "--calls", "3", "--architectures", "digits-mlp", "digits-cnn",
        "--fit-share", "0.5"]


@pytest.fixture(scope="module")
def quick_fit():
    """fit_with_blocks over blocks (1, 16) with one start instead of 16 pairs x 3 starts."""
    patch = pytest.MonkeyPatch()
    patch.setattr(calibrate_module, "fit_with_blocks",
                  functools.partial(fit_with_blocks, choices=(1, 16), starts=1))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, quick_fit):
    """One calibration: 10 variants of each architecture, half of each fitted on (10 >= 9)."""
    runs = tmp_path_factory.mktemp("calibrate-runs")
    code = main(["--runs-dir", str(runs), "calibrate", "--per-architecture", "10", *ARGS,
                 "--name", "test-box"])
    assert code == 0
    return runs


def test_calibrate_writes_a_loadable_measured_profile(calibrated):
    out = calibrated / "calibration"
    profile = load_profile(out / "test-box.yaml")
    assert profile.name == "test-box" and profile.measured and profile.sparsity == []
    fitted = profile.fitted
    assert fitted["base_profile"] == "x86-server-vnni"
    assert fitted["architectures"] == ["digits-mlp", "digits-cnn"] and fitted["variants"] == 20
    assert set(FREE_CONSTANTS) <= set(fitted["constants"])
    assert {"fp32_channel_block", "int8_channel_block"} <= set(fitted["constants"])
    assert fitted["held_out"]["count"] == 10
    assert -1 <= fitted["held_out"]["spearman"] <= 1
    assert any("measured" in source for source in profile.sources)


def test_calibrate_writes_table_report_and_plot(calibrated):
    out = calibrated / "calibration"
    frame = pd.read_csv(out / "calibration.csv")
    assert len(frame) >= 12
    assert set(frame["split"]) == {"fit", "held-out"}
    for arch, group in frame.groupby("architecture"):
        assert (group["split"] == "fit").sum() == 5, arch
    assert (frame["measured_ms"] > 0).all() and (frame["predicted_ms"] > 0).all()
    assert {"variant", "architecture", "error_percent", "macs", "twin"} <= set(frame.columns)
    report = (out / "calibration.md").read_text()
    assert "# Cost-model calibration: test-box" in report and "held-out" in report
    assert "Negative control" in report and "calibration.png" in report
    png = (out / "calibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_calibrate_logs_an_mlflow_run(calibrated):
    client = MlflowClient(tracking_uri=f"sqlite:///{calibrated / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("autosparse-calibration")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "test-box"
    assert run.data.tags["autosparse.role"] == "calibration"
    assert run.data.params["profile"] == "test-box"
    assert run.data.metrics["held_out_count"] == 10
    for key in ("held_out_spearman", "held_out_kendall", "held_out_mape_percent",
                "held_out_within_10_percent", "fit_mape_percent"):
        assert key in run.data.metrics, key
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"test-box.yaml", "calibration.csv", "calibration.md", "calibration.png"} <= artifacts
    local = Path(client.download_artifacts(run.info.run_id, "calibration.png",
                                           str(calibrated / "download")))
    assert local.read_bytes()[:4] == b"\x89PNG"


def test_measured_profile_drives_the_profile_command(calibrated, tmp_path, capsys):
    path = calibrated / "calibration" / "test-box.yaml"
    config = tmp_path / "measured.yaml"
    config.write_text(yaml.safe_dump({"name": "measured-profile",
                                      "model": {"builtin": "digits-cnn", "train_epochs": 1},
                                      "hardware": str(path)}))
    capsys.readouterr()
    assert main(["--runs-dir", str(calibrated), "profile", str(config)]) == 0
    out = capsys.readouterr().out
    assert "hardware: test-box (measured)" in out
    for layer in ("conv1", "conv2", "conv3", "fc1", "fc2"):
        assert f"{layer} " in out, layer
    assert "total: latency" in out and "energy" in out and "stored size" in out


def test_too_few_variants_to_fit_is_a_clear_error(tmp_path, capsys, quick_fit):
    # 6 per architecture x 2 architectures x 0.5 = 6 variants to fit 9 constants
    code = main(["--runs-dir", str(tmp_path), "calibrate", "--per-architecture", "6", *ARGS,
                 "--no-mlflow"])
    assert code == 2
    assert "at least 9" in capsys.readouterr().err


def test_fit_share_without_a_held_out_set_is_refused(tmp_path, capsys):
    code = main(["--runs-dir", str(tmp_path), "calibrate", "--fit-share", "1.0", "--no-mlflow"])
    assert code == 2
    assert "--fit-share 1 must be in (0, 1)" in capsys.readouterr().err
