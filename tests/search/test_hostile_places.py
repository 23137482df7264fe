"""Where results go (issue 21): a runs folder that is a file or read-only, a study or MLflow
database in /proc, a PostgreSQL URL without its driver or its server, an export into /proc or
onto a file, a disk that fills up mid-search, and two searches sharing one MLflow experiment.

Every refusal is exit 2 and one ``error:`` line naming the place, before any training, and the
earlier search (its study, MLflow store, exports, the dense-model cache: every file under the
runs folder) is byte-for-byte what it was, checked by hashing the folder before and after.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from autosparse.cli import main
from autosparse.config.validation import ConfigError
from autosparse.search.runner import run_search
from autosparse.tracking.writable import check_database, check_folder, storage_failure
from tests.config.test_bad_inputs import _check
from tests.search_helpers import fingerprint, mlflow_runs, write_config

pytestmark = pytest.mark.integration
AUTOSPARSE = [sys.executable, "-m", "autosparse.cli"]


@pytest.fixture(scope="module")
def earlier(tmp_path_factory) -> tuple[Path, Path]:
    """A finished earlier search (study, MLflow runs, dense cache) and its config."""
    root = tmp_path_factory.mktemp("places")
    runs = root / "runs"
    config = write_config(root, "earlier", budget={"trials": 2},
                          finetune={"steps": 4, "reeval_seeds": 0})
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    run_search(config, runs_dir=runs, printer=lambda line: None)
    return runs, config


def _variant(config: Path, folder: Path, name: str, **changes) -> Path:
    data = yaml.safe_load(config.read_text())
    data.update(name=name, **changes)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _refused(argv: list[str], runs: Path, capsys, words: list[str]) -> None:
    before = fingerprint(runs)
    code = main(argv)
    _check(code, capsys.readouterr().err, words)
    assert fingerprint(runs) == before, "the earlier search changed"


# (case id, config changes, words of the one line)
DATABASE_CASES = [
    ("storage-in-proc", {"storage": "sqlite:////proc/autosparse-x/study.db"},
     ["storage folder", "/proc/autosparse-x", "nothing can be written"]),
    ("tracking-in-proc", {"tracking": {"uri": "sqlite:////proc/autosparse-x/mlflow.db"}},
     ["tracking.uri folder", "/proc/autosparse-x"]),
    ("storage-driver-missing", {"storage": "postgresql+pg8000://u:secret@127.0.0.1:9/db"},
     ["storage", "postgresql", "driver is not installed", "pip install"]),
    ("storage-server-down", {"storage": "postgresql+psycopg://u:secret@127.0.0.1:9/db"},
     ["storage", "127.0.0.1:9", "cannot connect"]),
    ("tracking-server-down", {"tracking": {"uri": "postgresql+psycopg://u:secret@127.0.0.1:9/m"}},
     ["tracking.uri", "cannot connect"]),
]


@pytest.mark.parametrize("case,changes,words", DATABASE_CASES, ids=[c[0] for c in DATABASE_CASES])
def test_an_unreachable_database_is_refused_before_training(case, changes, words, earlier,
                                                            tmp_path, capsys):
    runs, config = earlier
    if "psycopg" in str(changes):
        pytest.importorskip("psycopg")
    if "pg8000" in str(changes) and _importable("pg8000"):
        pytest.skip("pg8000 is installed here: its absence cannot be shown")
    variant = _variant(config, tmp_path, f"db-{case}", **changes)
    _refused(["--runs-dir", str(runs), "search", str(variant)], runs, capsys, words)
    assert "secret" not in capsys.readouterr().err


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_bad_data_from_a_factory_leaves_no_study_folder(earlier, tmp_path, capsys, monkeypatch):
    """Data checked after the study's lock is taken: refused in one line, and the new study's
    folder (made for the lock) is gone again."""
    runs, config = earlier
    (tmp_path / "h21_column_targets.py").write_text(
        "import torch\n"
        "def make():\n"
        "    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16, 1)))] * 4\n"
        "    return {'train': batches, 'validation': batches, 'test': batches}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    variant = _variant(config, tmp_path, "column-targets",
                       data={"factory": "h21_column_targets:make"})
    _refused(["--runs-dir", str(runs), "search", str(variant)], runs, capsys,
             ["data", "shape (16, 1)", "one class index per sample"])
    assert not (runs / "column-targets").exists()


def test_a_runs_dir_that_is_a_file_is_refused(earlier, tmp_path, capsys):
    runs, config = earlier
    afile = tmp_path / "afile"
    afile.write_text("mine\n")
    _refused(["--runs-dir", str(afile), "search", str(config)], runs, capsys,
             ["--runs-dir", "afile", "is a file"])
    assert afile.read_text() == "mine\n"


@pytest.mark.parametrize("where", ["proc", "file"])
def test_export_into_proc_or_onto_a_file_is_refused_before_the_fine_tune(where, earlier,
                                                                        tmp_path, capsys):
    runs, config = earlier
    if where == "proc":
        out, words = Path("/proc/autosparse-x/out"), ["--out's folder", "/proc/autosparse-x"]
    else:
        out, words = tmp_path / "afile", ["--out", "is a file"]
        out.write_text("mine\n")
    _refused(["--runs-dir", str(runs), "export", str(config), "--trial", "0", "--no-mlflow",
              "--out", str(out)], runs, capsys, words)


def _read_only_runner(folder: Path) -> list[str] | None:
    """How to run a command for which ``folder`` is read-only: as root, permissions do not
    bind, so the folder gets an owner outside a user namespace (``unshare -r``) where they do."""
    folder.chmod(0o555)
    if os.geteuid() != 0:
        return []
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-r", "true"], capture_output=True).returncode != 0:
        return None
    os.chown(folder, 54321, 54321)  # a uid the namespace does not map: no override
    return ["unshare", "-r"]


def test_a_read_only_runs_folder_is_one_line_and_nothing_is_written(earlier, tmp_path):
    runs, config = earlier
    copy = tmp_path / "runs-ro"
    shutil.copytree(runs, copy)
    before = fingerprint(copy)
    prefix = _read_only_runner(copy)
    if prefix is None:
        pytest.skip("running as root without user namespaces: a read-only folder cannot be made")
    try:
        done = subprocess.run([*prefix, *AUTOSPARSE, "--runs-dir", str(copy), "search",
                               str(_variant(config, tmp_path, "ro"))],
                              capture_output=True, text=True, timeout=300)
    finally:
        copy.chmod(0o755)
    _check(done.returncode, done.stderr, ["--runs-dir", "nothing can be written",
                                             "permission denied"])
    assert fingerprint(copy) == before


def test_a_disk_that_fills_up_mid_search_is_one_line_and_closes_the_mlflow_run(earlier, tmp_path):
    """A file-size limit (RLIMIT_FSIZE) stands in for a full disk: every write past it fails
    with EFBIG, as the study's and MLflow's SQLite files grow during the search."""
    runs, config = earlier
    copy = tmp_path / "runs-full"
    shutil.copytree(runs, copy)
    earlier_study = fingerprint(copy / "earlier")
    client, parents, _ = mlflow_runs(copy, "earlier")
    earlier_runs = {r.info.run_id: (r.info.status, r.data.metrics) for r in
                    client.search_runs([parents[0].info.experiment_id])}
    limit = (copy / "mlflow.db").stat().st_size + 64 * 1024  # MLflow fills it within trials

    def full_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    variant = _variant(config, tmp_path, "full", budget={"trials": 40})
    done = subprocess.run([*AUTOSPARSE, "--runs-dir", str(copy), "search", str(variant)],
                          capture_output=True, text=True, timeout=600, preexec_fn=full_disk)
    _check(done.returncode, done.stderr, ["cannot write", "run the same command again"])
    assert fingerprint(copy / "earlier") == earlier_study
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{copy / 'mlflow.db'}")
    assert {r.info.run_id: (r.info.status, r.data.metrics) for r in
            client.search_runs([parents[0].info.experiment_id])} == earlier_runs
    experiment = client.get_experiment_by_name("full")
    if experiment is not None:  # it failed after the parent run started: that run is closed
        statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])
                    if r.data.tags.get("autosparse.role") == "search"}
        assert "RUNNING" not in statuses, statuses


def test_two_searches_sharing_an_experiment_keep_their_own_runs(earlier, tmp_path, capsys):
    """``tracking.experiment`` may gather several searches (to compare them in one table):
    said on the console, and each keeps its own parent run, children and front."""
    runs, config = earlier
    copy = tmp_path / "runs-shared"
    shutil.copytree(runs, copy)
    client, parents, children = mlflow_runs(copy, "earlier")
    before = {r.info.run_id: (r.info.status, r.data.metrics, r.data.params)
              for r in [*parents, *children]}
    study = fingerprint(copy / "earlier")
    joined = _variant(config, tmp_path, "joins", tracking={"experiment": "earlier"})
    assert main(["--runs-dir", str(copy), "search", str(joined)]) == 0
    out = capsys.readouterr().out
    assert "MLflow experiment 'earlier' also holds search 'earlier'" in out
    client, parents, children = mlflow_runs(copy, "earlier")
    by_study = {p.data.tags["autosparse.search.study"]: p for p in parents}
    assert sorted(by_study) == ["earlier", "joins"]
    assert {r.info.run_id: (r.info.status, r.data.metrics, r.data.params)
            for r in [*parents, *children] if r.info.run_id in before} == before
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"]
            == by_study["joins"].info.run_id]
    assert len(mine) == 2
    assert fingerprint(copy / "earlier") == study
    # the parent's row in the runs table shows the knee's figures, not "-"
    parent = by_study["joins"]
    knee = next(c for c in mine if c.data.tags["autosparse.trial"]
                == parent.data.tags["autosparse.summary_trial"])
    for key in ("accuracy", "size_kb", "compression", "accuracy_drop"):
        assert parent.data.metrics[key] == knee.data.metrics[key], key


def test_storage_failure_recognises_writes_that_cannot_land():
    assert storage_failure(OSError(28, "No space left on device", "/x/study.db")) == \
        "cannot write /x/study.db: No space left on device"
    wrapped = RuntimeError("commit failed")
    wrapped.__cause__ = Exception("(sqlite3.OperationalError) database or disk is full")
    assert storage_failure(wrapped) == ("cannot write the study or MLflow database: database "
                                        "or disk is full")
    assert storage_failure(PermissionError(13, "Permission denied", "/x/trials.csv")) == \
        "no permission for /x/trials.csv: Permission denied"
    assert storage_failure(ValueError("shape mismatch")) is None


def test_check_folder_and_database_make_nothing(tmp_path):
    check_folder(tmp_path / "new" / "runs", "--runs-dir")
    check_database(f"sqlite:///{tmp_path / 'db' / 'study.db'}", "storage")
    assert not any(tmp_path.iterdir())
    plain = tmp_path / "plain"
    plain.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_folder(plain, "--runs-dir")
