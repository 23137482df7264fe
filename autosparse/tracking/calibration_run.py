"""A calibration as one MLflow run: its held-out and fit statistics, profile, table, report, plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autosparse.cost.calibrate import CalibrationOutcome
from autosparse.tracking.mlflow_tracker import Tracker


def log_calibration(outcome: CalibrationOutcome, out_dir: Path, tracking_uri: str,
                    runs_dir: Path, experiment: str = "autosparse-calibration") -> str | None:
    """One MLflow run with the held-out and fit statistics, the profile, table, report, plot."""
    tracker = Tracker(tracking_uri=tracking_uri, experiment=experiment, runs_dir=runs_dir)
    metrics = {f"held_out_{k}": v for k, v in outcome.held_out.items()}
    metrics.update({f"fit_{k}": v for k, v in outcome.fit.items()})
    if outcome.controls:
        metrics["unstructured_over_dense_median"] = float(np.median(list(outcome.controls.values())))
    params = {"profile": outcome.profile.name, **{k: v for k, v in outcome.profile.fitted.items()
                                                  if not isinstance(v, (dict, list))}}
    artifacts: dict[str, str | bytes] = {
        outcome.profile_path.name: outcome.profile_path.read_text(),
        "calibration.csv": (out_dir / "calibration.csv").read_text(),
        "calibration.md": (out_dir / "calibration.md").read_text(),
        "calibration.png": (out_dir / "calibration.png").read_bytes(),
    }
    return tracker.log_standalone_run(run_name=outcome.profile.name, params=params,
                                      metrics=metrics, artifacts=artifacts,
                                      tags={"autosparse.role": "calibration"})
