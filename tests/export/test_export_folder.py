"""The export folder as a unit: reused when complete and matching, replaced whole otherwise,
and a folder that is not an export left alone (real files, no export run: milliseconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autosparse.config.schema import ConfigError
from autosparse.export.folder import (
    DIGEST_KEY,
    export_digest,
    folder_state,
    publish,
    staging_folder,
    update_report,
)


def _export(folder: Path, digest: str, registered: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"o" * 10)
    (folder / "model.packed").write_bytes(b"p" * 3)
    report = {"search": "s", "trial": 2, "files_bytes": {"model.onnx": 10, "model.packed": 3},
              DIGEST_KEY: digest}
    if registered:
        report["registered_model"] = {"name": "s-trial-2", "version": "1"}
    (folder / "report.json").write_text(json.dumps(report))
    (folder / "report.md").write_text("# Export\n")


def test_the_digest_names_every_setting():
    base = {"trial": 2, "candidate": "{}", "finetune_steps": None}
    assert export_digest(base) == export_digest(dict(reversed(base.items())))
    assert export_digest(base) != export_digest({**base, "finetune_steps": 100})


def test_states(tmp_path):
    folder = tmp_path / "trial-2"
    assert folder_state(folder, "abc") == "missing"
    _export(folder, "abc")
    assert folder_state(folder, "abc", registration=True) == "complete"
    assert folder_state(folder, "other") == "stale"
    (folder / "model.packed").write_bytes(b"p" * 4)  # changed by hand
    assert folder_state(folder, "abc") == "stale"

    unregistered = tmp_path / "unregistered"
    _export(unregistered, "abc", registered=False)
    assert folder_state(unregistered, "abc") == "complete"  # --no-mlflow: enough
    assert folder_state(unregistered, "abc", registration=True) == "stale"

    empty = tmp_path / "empty"
    empty.mkdir()
    assert folder_state(empty, "abc") == "stale"


def test_another_trials_export_is_replaced_only_with_force(tmp_path):
    folder = tmp_path / "trial-2"
    _export(folder, "abc")
    assert folder_state(folder, "abc", owner=("s", 2)) == "complete"
    assert folder_state(folder, "new", owner=("s", 2)) == "stale"  # the same trial, redone
    for other in (("s", 7), ("t", 2)):
        with pytest.raises(ConfigError, match="holds the export of search 's' trial 2"):
            folder_state(folder, "new", owner=other)
        assert folder_state(folder, "new", owner=other, force=True) == "stale"
    assert (folder / "model.onnx").read_bytes() == b"o" * 10  # nothing touched


def test_a_folder_that_is_not_an_export_is_refused(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ConfigError, match="not an autosparse export"):
        folder_state(mine, "abc")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        folder_state(tmp_path / "file", "abc")


def test_publish_replaces_the_old_folder_whole(tmp_path):
    final = tmp_path / "out" / "trial-2"
    _export(final, "old")
    (final / "stray.txt").write_text("from the old export")
    tmp = staging_folder(final)
    (tmp / "report.json").write_text(json.dumps({"search": "s", DIGEST_KEY: "new"}))
    assert publish(tmp, final) is True
    assert json.loads((final / "report.json").read_text())[DIGEST_KEY] == "new"
    assert not (final / "stray.txt").exists()
    assert [p.name for p in final.parent.iterdir()] == ["trial-2"]  # nothing hidden left
    update_report(final, registered_model={"name": "n", "version": "2"})
    assert json.loads((final / "report.json").read_text())["registered_model"]["version"] == "2"
    assert publish(staging_folder(tmp_path / "fresh"), tmp_path / "fresh") is False
