"""The Python API: the same searches, fronts and exports as the command line, from a notebook.

    import autosparse
    result = autosparse.run_search("search_spaces/quickstart.yaml")   # = autosparse search
    result.front                                                       # pandas DataFrame
    folder = result.export(knee=True)                                  # = autosparse export --knee
    model = autosparse.load(folder)                                    # a runnable torch module

The entry point is ``run_search``, not ``search``: ``autosparse.search`` is the search stage's
package, and Python rebinds that name to the package the first time any of it is imported.

Every call goes through the code the CLI runs (``search.runner``, ``export.exporter``): the same
Optuna storage under ``runs/``, the same MLflow runs, the same resume. A config given as a dict
is validated first, then kept as a YAML file under ``runs/python-api-configs/`` named by its
content, because every worker process and every later command rebuilds the search from a file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from autosparse.config.schema import SearchConfig, load_config, parse_config
from autosparse.config.validation import ConfigError

if TYPE_CHECKING:
    import optuna
    import pandas as pd
    import torch

    from autosparse.export.exporter import ExportOutcome

__all__ = ["SearchResult", "load", "open_search", "run_search"]

API_CONFIGS = "python-api-configs"  # folder under runs/ holding configs given as dicts
ConfigLike = str | os.PathLike | Mapping[str, Any]


def config_file(config: ConfigLike, runs_dir: str | os.PathLike = "runs") -> Path:
    """The YAML file a search is run from: ``config`` itself when it is a path, else the dict,
    validated (a ConfigError names the bad field before anything is written), then written once
    under ``runs/python-api-configs/<hash>.yaml`` (the same dict gives the same file)."""
    if isinstance(config, (str, os.PathLike)):
        load_config(config)  # file-only checks: a wrong path or field fails here, not mid-search
        return Path(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config: expected a YAML path or a dict, got {type(config).__name__}")
    parse_config(dict(config), "the config dict")
    text = yaml.safe_dump(dict(config), sort_keys=False)
    path = Path(runs_dir) / API_CONFIGS / f"{hashlib.sha256(text.encode()).hexdigest()[:16]}.yaml"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, path)  # never a half-written config for another process to read
    return path


@dataclass
class SearchResult:
    """A search's results, read from its storage: ``trials`` and ``front`` as DataFrames (the
    columns of ``runs/<name>/trials.csv`` and ``pareto.csv``), ``hypervolume`` as reported,
    ``study`` the Optuna study itself, :meth:`export` a point of the front as deployable files."""

    config_path: Path
    config: SearchConfig
    runs_dir: Path
    trials: pd.DataFrame
    front: pd.DataFrame
    hypervolume: dict[str, float]
    storage_url: str
    mlflow_run_id: str | None = None
    new_trials: int = 0
    _study: optuna.Study | None = field(default=None, repr=False)

    @property
    def study(self) -> optuna.Study:
        """The Optuna study (loaded from storage on first use)."""
        if self._study is None:
            import optuna

            self._study = optuna.load_study(study_name=self.config.name,
                                            storage=self.storage_url)
        return self._study

    def export(self, trial: int | None = None, *, knee: bool = False,
               max_drop: float | None = None, minimize: str | None = None,
               out: str | os.PathLike | None = None, hardware: str | None = None,
               mlflow: bool = True, force: bool = False,
               printer: Callable[[str], None] = print) -> Path:
        """Export one trial (``trial``), the knee of the front (``knee=True``) or the trial
        with the least ``minimize`` within ``max_drop`` points of dense, exactly as
        ``autosparse export`` does; returns the export folder (its ``report.md`` says what
        each file holds). Like the CLI, give at most one rule; none picks the front's knee."""
        outcome = self.export_outcome(trial, knee=knee, max_drop=max_drop, minimize=minimize,
                                      out=out, hardware=hardware, mlflow=mlflow, force=force,
                                      printer=printer)
        return outcome.out_dir

    def export_outcome(self, trial: int | None = None, *, knee: bool = False,
                       max_drop: float | None = None, minimize: str | None = None,
                       out: str | os.PathLike | None = None, hardware: str | None = None,
                       mlflow: bool = True, force: bool = False,
                       printer: Callable[[str], None] = print) -> ExportOutcome:
        """:meth:`export` with the whole outcome: the folder, the report as a dict, warnings."""
        from autosparse.export.exporter import ExportRequest, run_export

        chosen = sum(x is not None and x is not False for x in (trial, max_drop, knee or None))
        if chosen > 1:
            raise ConfigError("export: give one of trial, max_drop (with minimize) or knee")
        request = ExportRequest(trial=trial, max_drop=max_drop, minimize=minimize, knee=knee,
                                out=None if out is None else Path(out), mlflow=mlflow,
                                hardware=hardware, force=force)
        return run_export(self.config_path, request, runs_dir=self.runs_dir, printer=printer)


def _result(config_path: Path, runs_dir: Path, outcome: Any) -> SearchResult:
    return SearchResult(config_path=config_path, config=load_config(config_path),
                        runs_dir=runs_dir, trials=outcome.trials, front=outcome.front,
                        hypervolume=dict(outcome.hypervolume), storage_url=outcome.storage_url,
                        mlflow_run_id=outcome.parent_run_id, new_trials=outcome.new_trials)


def run_search(config: ConfigLike, *, runs_dir: str | os.PathLike = "runs", workers: int = 1,
           extend: int = 0, threads: int | None = None,
           printer: Callable[[str], None] = print) -> SearchResult:
    """Run (or resume) the search a config describes until its budget is used, as
    ``autosparse search CONFIG`` does, and return its results. ``config``: a YAML path or a
    dict with the same fields. ``printer=lambda line: None`` keeps a notebook quiet."""
    from autosparse.search import runner

    path = config_file(config, runs_dir)
    outcome = runner.run_search(path, runs_dir=Path(runs_dir), workers=workers, extend=extend,
                         printer=printer, threads=threads)
    return _result(path, Path(runs_dir), outcome)


def open_search(config: ConfigLike, *, runs_dir: str | os.PathLike = "runs") -> SearchResult:
    """An earlier search's results from its storage, nothing run (``autosparse front``)."""
    from autosparse.search.runner import report_front
    from autosparse.search.study import require_study

    path = config_file(config, runs_dir)
    require_study(load_config(path), Path(runs_dir))
    return _result(path, Path(runs_dir), report_front(path, runs_dir=Path(runs_dir)))


def load(path: str | os.PathLike, *, skeleton: torch.nn.Module | None = None) -> Any:
    """An exported model, ready to run.

    - an export folder or ``model.pt2``: the compressed model as a ``torch.nn.Module``
      (``torch.export``; no model code needed);
    - ``*.onnx``: an ``onnxruntime.InferenceSession`` on the CPU;
    - ``model.packed``: the smallest file, its weights exactly as scored and the model's graph
      beside them: a ``torch.nn.Module`` with no model code needed (``load_packed``); a file
      without a graph (packed format 2) needs ``skeleton``, an untrained instance of the model.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.pt2"
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path}")
    if path.suffix == ".pt2":
        import torch

        return torch.export.load(str(path)).module()
    if path.suffix == ".onnx":
        import onnxruntime

        return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    if path.suffix == ".packed":
        from autosparse.export.packed import PackedFormatError, load_packed

        try:
            return load_packed(path, skeleton)
        except PackedFormatError as err:
            raise ValueError(str(err)) from None
    raise ValueError(f"{path}: not an exported model (expected an export folder, .pt2, .onnx "
                     "or .packed)")
