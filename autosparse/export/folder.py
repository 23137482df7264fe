"""The export folder as a unit: reused when it already holds the same export, replaced as a
whole otherwise, never half-written.

The README shows two export commands that may pick the same trial; the second used to fail on
the existing folder after seconds of work. Now a folder whose ``report.json`` carries the same
digest (trial, candidate, settings) and whose files are all there at their recorded sizes is
reused; one from other settings, or incomplete, is replaced by renaming the new folder into
place. A folder that is not an autosparse export is never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Literal

from autosparse.config.validation import ConfigError

DIGEST_KEY = "export_digest"
State = Literal["missing", "complete", "stale"]


def export_digest(fields: dict[str, Any]) -> str:
    """A short hash of everything that decides the folder's content."""
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_report(folder: Path) -> dict | None:
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def folder_state(folder: Path, digest: str, registration: bool = False,
                 owner: tuple[str, int] | None = None, force: bool = False) -> State:
    """``missing``; ``complete`` (same digest, every file there at its size, registered in
    MLflow when ``registration`` asks for it); ``stale`` (an earlier autosparse export of the
    same ``owner`` (search, trial): other settings, a file missing or changed). Anything else in
    the way is a ConfigError, an export of another search or trial too unless ``force``."""
    if not folder.exists():
        return "missing"
    if not folder.is_dir():
        raise ConfigError(f"--out {folder}: exists and is a file, not a folder")
    report = read_report(folder)
    if report is None or "search" not in report or "files_bytes" not in report:
        if not any(folder.iterdir()):
            return "stale"  # an empty folder: nothing to lose
        raise ConfigError(f"{folder} exists and is not an autosparse export (no report.json): "
                          "remove it or give another --out")
    theirs = (report.get("search"), report.get("trial"))
    if owner is not None and theirs != owner and not force:
        raise ConfigError(f"{folder} holds the export of search {theirs[0]!r} trial {theirs[1]}, "
                          f"not of {owner[0]!r} trial {owner[1]}: give another --out, or "
                          "--force to replace it")
    if report.get(DIGEST_KEY) != digest or not (folder / "report.md").is_file():
        return "stale"
    for name, size in report["files_bytes"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != size:
            return "stale"
    if registration and not report.get("registered_model"):
        return "stale"
    return "complete"


def staging_folder(final: Path) -> Path:
    """A new hidden folder beside ``final`` (same file system, so the rename is atomic).
    Not tempfile.mkdtemp: its folder is private (0700) and would stay so once renamed."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> bool:
    """Rename ``tmp`` into place, replacing an earlier export as a whole. True if it replaced."""
    if not final.exists():
        tmp.rename(final)
        return False
    old = final.parent / f".{final.name}-old-{uuid.uuid4().hex[:12]}"
    final.rename(old)
    try:
        tmp.rename(final)
    except BaseException:
        old.rename(final)  # put the earlier export back
        raise
    shutil.rmtree(old, ignore_errors=True)
    return True


def update_report(folder: Path, **fields: Any) -> None:
    """Add fields to ``report.json`` in place (written beside it, then renamed over it)."""
    report = read_report(folder) or {}
    report.update(fields)
    tmp = folder / f".report.json.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(report, indent=2, default=float))
    os.replace(tmp, folder / "report.json")
