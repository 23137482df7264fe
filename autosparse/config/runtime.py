"""Where a search keeps and reports its results and how it times candidates: the Optuna
storage URL check and its heartbeat, MLflow tracking, export defaults and ``hardware: measure``.

Split out of ``schema``: these sections configure the machinery around the search (databases,
MLflow, the timing machine), not what is searched.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator

from autosparse.config.hardware import load_profile
from autosparse.config.validation import Strict

STORAGE_SCHEMES = ("sqlite", "postgresql", "mysql")


def check_database_url(url: str, what: str) -> None:
    """An SQLAlchemy URL of a known database: ``sqlite//x.db`` (a missing colon) would
    otherwise create ``./sqlite/x.db`` silently; an unwritable SQLite folder fails later."""
    scheme, sep, rest = url.partition("://")
    base = scheme.split("+", 1)[0]
    if not sep or base not in STORAGE_SCHEMES:
        raise ValueError(f"{url!r} is not a database URL; allowed: "
                         + ", ".join(f"{s}://..." for s in STORAGE_SCHEMES)
                         + " (e.g. sqlite:///runs/my.db)")
    if base == "sqlite" and rest.startswith("/"):
        folder = Path(rest[1:]).expanduser().parent if rest != "/" else Path(".")
        existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("."))
        if not existing.is_dir():
            raise ValueError(f"{url!r}: {existing} is a file, not a folder")
        if not os.access(existing, os.W_OK):
            raise ValueError(f"{url!r}: cannot write SQLite file there ({existing} is not "
                             "writable)")


class TrackingConfig(Strict):
    uri: str | None = Field(None, description="MLflow tracking URI; default sqlite under runs/")

    @field_validator("uri")
    @classmethod
    def _check_uri(cls, value):
        if value is None or "://" not in value:
            return value  # a local folder (MLflow's file store) or the default
        scheme = value.split("://", 1)[0].split("+", 1)[0]
        if scheme in ("http", "https", "file", "databricks"):
            return value
        check_database_url(value, "tracking.uri")
        return value
    experiment: str | None = Field(None, description="defaults to the search name")


class ExportConfig(Strict):
    """Defaults for ``autosparse export`` (its command-line flags win)."""

    registered_name: str | None = Field(None, description="MLflow Model Registry name; default "
                                        "<search name>-trial-<N>")
    finetune_steps: int | None = Field(None, ge=0, description="fine-tune this many steps before "
                                       "export instead of the search's own")


DEPLOY_TARGETS = ("packed", "onnx", "onnx-int8", "gguf")
DEPLOY_FILES = {"packed": "model.packed", "onnx": "model.compact.onnx",
                "onnx-int8": "model.int8.onnx", "gguf": "model.gguf"}


MEASURE = "measure"  # ``hardware: measure``: latency timed (onnxruntime; llama.cpp with oneshot)
MEASURE_PROFILE = "x86-server-vnni"  # the analytic model that plans and screens by default


class MeasureConfig(Strict):
    """``hardware: measure``: each candidate's compressed model timed on this machine
    (onnxruntime, 1 thread, batch 1) in interleaved rounds with the dense model. With
    ``oneshot``: its GGUF in llama.cpp beside the dense F32 GGUF, latency_ms per generated
    token (``cost.gguf_latency``)."""

    rounds: int = Field(21, ge=1, description="interleaved rounds (median over rounds)")
    calls: int = Field(11, ge=1, description="individually timed calls per round (median); "
                       "oneshot: single-token decodes after the prompt")
    warmup: int = Field(10, ge=0, description="untimed calls per session first (oneshot: "
                        "untimed decodes after loading)")
    prompt_tokens: int = Field(32, ge=1, description="oneshot only: prompt tokens evaluated in "
                               "one batch at the start of each round (timed: "
                               "latency_prompt_ms per token) before the timed decodes")
    profile: str = Field(MEASURE_PROFILE, description="analytic profile (built-in name or YAML "
                         "path) that the sensitivity planner and screening predict with; "
                         "latency_ms itself is measured")

    @field_validator("profile")
    @classmethod
    def _check_profile(cls, value):
        load_profile(value)
        return value


class HeartbeatConfig(Strict):
    """Optuna's heartbeat on database storages: a trial whose worker stopped beating (a machine
    that died or lost the network) is marked interrupted after ``grace`` seconds and re-run."""

    interval: int = Field(30, ge=1, description="seconds between a running trial's heartbeats")
    grace: int = Field(120, ge=2, description="seconds without a heartbeat before a trial is "
                       "taken as cut short and re-run; more than 'interval'")

    @model_validator(mode="after")
    def _grace_above_interval(self) -> "HeartbeatConfig":
        if self.grace <= self.interval:
            raise ValueError(f"grace ({self.grace}) must be more than interval ({self.interval}):"
                             " otherwise a live trial is taken for a dead one between two beats")
        return self
