"""Each built-in architecture end to end: shipped config -> search -> export of a channel trial.

Per architecture (residual + trained batch norm, depthwise + inverted residuals, a transformer
encoder, a Conv1d net): the output layer is never offered channel; the exported shrunk model
(pt2, packed and ONNX) computes the fine-tuned compressed model's outputs (relative 1e-4 of the
largest output, float32 reassociation); its parameter count equals the prediction; every group
the candidate prunes is removed; residual producers keep one channel count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from autosparse.export.exporter import ExportRequest, run_export
from autosparse.search.runner import prepare, run_search
from autosparse.space.candidate import Candidate
from autosparse.space.structure import leaders

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURES = ["digits-resnet18", "digits-mobilenet", "digits-vit", "digits-conv1d"]


def tiny(name: str, directory: Path) -> Path:
    """The shipped config, with a short dense training and a 3-trial search over channel 50 %."""
    config = yaml.safe_load((ROOT / "search_spaces" / f"{name}.yaml").read_text())
    config.update(
        budget={"trials": 3}, strategy={"name": "random"},
        finetune={"steps": 6, "reeval_seeds": 0},
        space={"default": {"patterns": ["channel", "unstructured"], "sparsity": [0.5],
                           "bits": [8, 32]}},
        constraints=[],
    )
    config["model"]["train_epochs"] = 3
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_search_then_export_deploys_what_was_scored(name, tmp_path):
    torch.set_num_threads(1)
    config = tiny(name, tmp_path)
    outcome = run_search(config, runs_dir=tmp_path, printer=lambda line: None)
    assert (outcome.trials["state"] == "COMPLETE").all()

    context = prepare(config, tmp_path)
    output_layer = context.table.layers[-1].name
    offered = {n for d in context.space.decisions if "channel" in d.patterns for n in d.layers}
    assert offered and output_layer not in offered
    assert offered <= set(leaders(context.table))

    led = set(leaders(context.table))
    channel_trials = [int(row["trial"]) for _, row in outcome.trials.iterrows()
                      if any(c.pattern == "channel" and n in led
                             for n, c in Candidate.from_json(row["candidate"]).items())]
    assert channel_trials, "the random search should have tried channel on some leader"
    result = run_export(config, ExportRequest(trial=channel_trials[0], mlflow=False,
                                              timing_rounds=2, timing_calls=2),
                        runs_dir=tmp_path, printer=lambda line: None)
    report = result.report
    assert max(report["output_error"].values()) <= 1e-4, report["output_error"]
    assert min(report["agreement_percent"].values()) >= 99.5
    assert report["parameters"]["shrunk"] == report["parameters"]["predicted"]
    assert report["parameters"]["shrunk"] < report["parameters"]["dense"]
    groups = report["shrink"]["groups"]
    assert groups and all(g["channels_after"] < g["channels_before"] for g in groups)

    shrunk = torch.export.load(result.out_dir / "model.pt2").module()
    shapes = {n: tuple(p.shape) for n, p in shrunk.named_parameters()}
    for group in context.table.channel_groups:  # residual producers stay consistent
        if any(g["name"] == group.name for g in groups):
            rows = {shapes[f"{p}.weight"][0] for p in group.producers if f"{p}.weight" in shapes}
            assert len(rows) == 1, (group.name, rows)
