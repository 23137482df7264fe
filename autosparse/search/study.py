"""Opening the Optuna study: storage URL, resume checks, stale trials and budget accounting.

The study is the state of a search. Re-running the same command opens the same study; a trial
left RUNNING by a process that died on this host, or (database storages) whose worker stopped
sending Optuna heartbeats, is marked failed as ``interrupted``, does not count against the
budget, and is enqueued once to run again with the same params; no finished trial is lost or
re-run.
"""

from __future__ import annotations

import datetime
import json
import random
import socket
import time
import uuid
import warnings
from pathlib import Path
from typing import Callable

import optuna
import psutil
import sqlalchemy.exc
from optuna.storages._heartbeat import (
    is_heartbeat_enabled,  # not re-exported by Optuna 5
)
from optuna.trial import TrialState

from autosparse.config.objectives import OBJECTIVES
from autosparse.config.runtime import HeartbeatConfig
from autosparse.config.schema import ConfigError, SearchConfig
from autosparse.search.objective import FAIL_ATTR, INTERRUPTED, WORKER_ATTR
from autosparse.search.study_identity import (
    SIGNATURE_ATTR,
    differences,
    refusal,
    signature,
)

_UID_ATTR = "autosparse.uid"
_REQUEUED_ATTR = "autosparse.requeued"  # read only: how studies before RERUN_OF_ATTR recorded it
RERUN_OF_ATTR = "autosparse.rerun_of"  # on a re-run trial: the number of the trial it re-runs


def storage_url(config: SearchConfig, runs_dir: Path) -> str:
    """The config's storage, or a SQLite file under ``runs/<name>/`` by default."""
    if config.storage:
        return config.storage
    return f"sqlite:///{(runs_dir / config.name / 'study.db').resolve()}"


def require_study(config: SearchConfig, runs_dir: Path) -> None:
    """Refuse, before anything is built or written, a command that reads a study that was never
    searched (opening SQLite would create an empty one)."""
    url = storage_url(config, runs_dir)
    if _sqlite_missing(url):
        raise ConfigError(f"no study {config.name!r} yet ({url} does not exist): run "
                          "`autosparse search` first")


def make_storage(url: str, heartbeat: HeartbeatConfig | None = None) -> optuna.storages.BaseStorage:
    """RDB storage (SQLite, PostgreSQL, MySQL) with a heartbeat, or a journal file by path.

    Every running trial beats every ``heartbeat.interval`` s; one silent for ``grace`` s (its
    worker died, on any machine) is failed by the next worker that asks for a trial and handed
    to ``requeue_stale_trial``. Optuna's journal storage has no heartbeat: there only a dead
    worker on this host is noticed (by its pid, on the next start)."""
    heartbeat = heartbeat or HeartbeatConfig()
    if "://" not in url:
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        backend = optuna.storages.journal.JournalFileBackend(str(path))
        return optuna.storages.JournalStorage(backend)
    engine_kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs = {"connect_args": {"timeout": 60}}  # several workers share the file
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna 5, and needed
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=heartbeat.interval,
            grace_period=heartbeat.grace, heartbeat_stale_trial_callback=requeue_stale_trial,
        )


def _create_or_load(config: SearchConfig, url: str, sampler: optuna.samplers.BaseSampler,
                    attempts: int = 5) -> optuna.Study:
    """Workers on several machines may create the same new database at once; PostgreSQL then
    fails one of them with an integrity error on its catalog, so retry with a short backoff."""
    for attempt in range(attempts):
        try:
            return optuna.create_study(
                study_name=config.name,
                storage=make_storage(url, config.storage_heartbeat),
                sampler=sampler,
                directions=config.objective_directions(),
                load_if_exists=True,
            )
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.OperationalError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(config: SearchConfig, url: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    """Create the study or resume it, refusing a resume whose objectives or space changed."""
    study = _create_or_load(config, url, sampler)
    mine = signature(config)
    stored = study.user_attrs.get(SIGNATURE_ATTR)
    if stored is None:  # a new study (or one another worker is creating at this moment)
        study.set_user_attr(SIGNATURE_ATTR, mine)
        if _UID_ATTR not in study.user_attrs:  # another worker may have just set it
            study.set_user_attr(_UID_ATTR, uuid.uuid4().hex)
        stored = mine
    if study.metric_names is None:  # optuna-dashboard then labels axes, not "Objective 0/1"
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2: noise for a user
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            shown = config.task.metric_spec()[0]  # the task metric by its own name (mse)
            study.set_metric_names([shown if name == "accuracy" else OBJECTIVES[name].metric
                                    for name in config.objectives])
    if stored != mine:
        diffs = differences(config, stored)
        if diffs:
            raise refusal(config, url, diffs)
        study.set_user_attr(SIGNATURE_ATTR, mine)  # a first-version signature, now complete
    return study


def _sqlite_missing(url: str) -> bool:
    return url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file()


def stored_signature(url: str, name: str) -> str | None:
    """The stored study's signature, or None when there is no such study (nothing is created:
    a missing SQLite file is not opened)."""
    if _sqlite_missing(url):
        return None
    storage = make_storage(url)
    try:
        study_id = storage.get_study_id_from_name(name)
    except KeyError:
        return None
    return storage.get_study_user_attrs(study_id).get(SIGNATURE_ATTR)


def check_matching_study(config: SearchConfig, url: str) -> None:
    """Refuse, before the dense model or anything else is built, a config whose study exists
    with another signature."""
    stored = stored_signature(url, config.name)
    if stored is not None:
        diffs = differences(config, stored)
        if diffs:
            raise refusal(config, url, diffs)


def _free_name(runs_dir: Path, url: str, name: str) -> str:
    """``<name>.previous-<k>`` with the least k that names neither a runs folder nor a study."""
    studies = set() if _sqlite_missing(url) else {
        study.study_name for study in make_storage(url).get_all_studies()}
    k = 1
    while (runs_dir / f"{name}.previous-{k}").exists() or f"{name}.previous-{k}" in studies:
        k += 1
    return f"{name}.previous-{k}"


def set_aside(config: SearchConfig, runs_dir: Path, url: str, default_url: bool) -> str | None:
    """``--fresh``: keep the earlier study (if any) as ``<name>.previous-<k>``, its runs folder
    moved beside, so that this name starts afresh. Returns the new name, or None when there
    was nothing to set aside."""
    folder = runs_dir / config.name
    exists = stored_signature(url, config.name) is not None or folder.exists()
    if not exists:
        return None
    if "://" not in url:
        raise ConfigError(f"--fresh renames the earlier study; {url} is a journal file, which "
                          "cannot rename one: move the file away, or give the search a new name")
    new = _free_name(runs_dir, url, config.name)
    if default_url:  # the study lives in runs/<name>/study.db: it moves with its folder
        folder.rename(runs_dir / new)
        url = url.replace(str(folder.resolve()), str((runs_dir / new).resolve()))
    elif folder.exists():
        folder.rename(runs_dir / new)
    if not _sqlite_missing(url):
        engine = sqlalchemy.create_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text(
                    "UPDATE studies SET study_name = :new WHERE study_name = :old"),
                    {"new": new, "old": config.name})
        finally:
            engine.dispose()
    return new


def study_uid(study: optuna.Study) -> str:
    """Tells this study from an earlier one of the same name (e.g. after its file was deleted)."""
    return str(study.user_attrs.get(_UID_ATTR, ""))


# A live worker tags its trial with host:pid within moments of creating it (only the sampler's
# relative sampling runs in between); a RUNNING trial still untagged after this long was left
# by a process killed in that gap.
UNTAGGED_GRACE_S = 10.0


def _interrupt(study: optuna.Study, trial: optuna.trial.FrozenTrial, why: str) -> None:
    optuna.Trial(study, trial._trial_id).set_user_attr(FAIL_ATTR, f"{INTERRUPTED}: {why}")
    study.tell(trial.number, state=TrialState.FAIL)


def fail_interrupted_trials(study: optuna.Study, grace_s: float = UNTAGGED_GRACE_S) -> int:
    """Mark RUNNING trials whose worker process on this host is gone as failed (interrupted),
    and trials never tagged with a worker once they are older than ``grace_s`` (waiting for
    that, only when such a trial exists); with a heartbeat, also those of any host whose
    heartbeat is stale (re-queued at once by ``requeue_stale_trial``)."""
    host = socket.gethostname()
    count = fail_stale_trials(study)
    untagged = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get(WORKER_ATTR, "")
        if not worker:
            untagged.append(trial.number)
            continue
        worker_host, _, pid = worker.rpartition(":")
        if worker_host == host and pid.isdigit() and not psutil.pid_exists(int(pid)):
            _interrupt(study, trial, f"worker {worker} ended mid-trial")
            count += 1
    for number in untagged:
        trial = study.trials[number]
        age = (datetime.datetime.now() - trial.datetime_start).total_seconds() \
            if trial.datetime_start else grace_s
        if age < grace_s:
            time.sleep(grace_s - age)
            trial = study.trials[number]
        if trial.state == TrialState.RUNNING and not trial.user_attrs.get(WORKER_ATTR):
            _interrupt(study, trial, "its worker ended before it started")
            count += 1
    return count


def fail_stale_trials(study: optuna.Study) -> int:
    """Optuna's heartbeat check (what ``study.optimize`` runs before each trial), callable where
    no trial is asked for: at start, and while waiting for other machines' last trials. Returns
    how many trials it failed; each went through ``requeue_stale_trial``."""
    if not is_heartbeat_enabled(study._storage):
        return 0
    before = sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)))
    with warnings.catch_warnings():  # "experimental" in Optuna 5, and what optimize runs itself
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))) - before


def await_other_hosts(study: optuna.Study, exhausted: Callable[[optuna.Study], bool],
                      heartbeat: HeartbeatConfig, poll_s: float = 5.0) -> bool:
    """When the budget looks used up while trials still run on other machines, wait: each one
    finishes, or its worker died and its heartbeat goes stale, which re-queues it (True: there
    is work again). At most one grace period plus one interval; a trial still running then is
    left to its machine. Without a heartbeat (journal storage) nothing can be learned: False."""
    if not is_heartbeat_enabled(study._storage):
        return False
    host = socket.gethostname()
    until = time.time() + heartbeat.grace + heartbeat.interval
    while time.time() < until:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not any(str(t.user_attrs.get(WORKER_ATTR, "")).rpartition(":")[0] != host
                   for t in running):
            return False
        time.sleep(min(poll_s, heartbeat.interval))
        fail_stale_trials(study)
        if not exhausted(study):
            return True
    return False


def requeue_stale_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna's ``heartbeat_stale_trial_callback``: the trial is failed already (Optuna did it, in
    the one process that won the race) and carries ``CUT_SHORT_REASON`` from ``start_trial``, so
    it is INTERRUPTED like a trial killed on this host; enqueue it again through the same path.

    Not Optuna's ``RetryHeartbeatStaleTrialCallback``: its copy inherits the dead worker's
    user attrs (host:pid, reason) and would be enqueued a second time by ``requeue_interrupted``."""
    if is_interrupted(trial) and _params_of(trial):
        _enqueue_rerun(study, trial)


def _enqueue_rerun(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    study.enqueue_trial(_params_of(trial), user_attrs={RERUN_OF_ATTR: trial.number},
                        skip_if_exists=False)


def requeue_interrupted(study: optuna.Study) -> int:
    """Enqueue the candidate of every interrupted trial once, so a resumed search re-runs what
    was cut short (the sampler might never propose it again). The re-run carries the number of
    the trial it re-runs, so a second resume (or another worker) does not enqueue it twice."""
    trials = study.get_trials(deepcopy=False)
    done = set(study.user_attrs.get(_REQUEUED_ATTR, []))
    done |= {t.user_attrs[RERUN_OF_ATTR] for t in trials if RERUN_OF_ATTR in t.user_attrs}
    todo = [t for t in trials if is_interrupted(t) and t.number not in done and _params_of(t)]
    for trial in todo:
        _enqueue_rerun(study, trial)
    return len(todo)


def _params_of(trial: optuna.trial.FrozenTrial) -> dict:
    """The params a trial ran, or was enqueued to run: a kill before the first suggest leaves
    ``params`` empty but the enqueued ``fixed_params`` (a warm-start seed) are still there."""
    return dict(trial.params) or dict(trial.system_attrs.get("fixed_params") or {})


def is_interrupted(trial: optuna.trial.FrozenTrial) -> bool:
    return trial.state == TrialState.FAIL and str(trial.user_attrs.get(FAIL_ATTR, "")).startswith(
        INTERRUPTED
    )


class CutShort(Exception):
    """Raised in a trial that must not run; the trial is INTERRUPTED, not a failure."""


def cut_short(trial: optuna.Trial, why: str) -> CutShort:
    trial.set_user_attr(FAIL_ATTR, f"{INTERRUPTED}: {why}")
    return CutShort(why)


def trials_ahead(study: optuna.Study, number: int) -> int:
    """Counted trials numbered before ``number``. Workers check the budget, then ask: two may
    both take the last trial, and the one with the higher number is then the extra one."""
    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states)
               if t.number < number and not is_interrupted(t))


def counted_trials(study: optuna.Study) -> int:
    """Trials that use up the budget: finished (complete or genuinely failed) plus in flight."""
    states = (TrialState.COMPLETE, TrialState.FAIL, TrialState.RUNNING)
    return sum(1 for t in study.get_trials(deepcopy=False, states=states) if not is_interrupted(t))


# --------------------------------------------------------------------------------------------
# per-layer sensitivity, stored with the study (every worker and every resume reads the same)

SENSITIVITY_ATTR = "autosparse.search.sensitivity"  # header: how it was measured, complete or not
SENSITIVITY_PREFIX = SENSITIVITY_ATTR + "."  # + decision name: JSON [[choice, loss, acc], ...]


def stored_sensitivity(study: optuna.Study) -> tuple[dict | None, dict[str, list]]:
    """(header or None, ``{decision: [ChoiceSensitivity, ...]}``) as stored in the study."""
    from autosparse.search.allocation.table import ChoiceSensitivity

    attrs = study.user_attrs
    header = attrs.get(SENSITIVITY_ATTR)
    header = json.loads(header) if isinstance(header, str) else header
    entries = {}
    for key, value in attrs.items():
        if key.startswith(SENSITIVITY_PREFIX):
            name = key.removeprefix(SENSITIVITY_PREFIX)
            rows = json.loads(value) if isinstance(value, str) else value
            entries[name] = [ChoiceSensitivity(name, str(c), float(l), float(a)) for c, l, a in rows]
    return header, entries


def store_sensitivity_decision(study: optuna.Study, name: str, entries) -> None:
    """Store one decision's entries (``ChoiceSensitivity``), replacing what was stored for it."""
    rows = [[e.choice, e.loss_delta, e.accuracy_delta] for e in entries]
    study.set_user_attr(SENSITIVITY_PREFIX + name, json.dumps(rows))  # NaN stays NaN


def store_sensitivity_header(study: optuna.Study, *, dense_loss: float, dense_accuracy: float,
                             samples: int, samples_used: int, method: str, seconds: float,
                             complete: bool, decisions: list[str]) -> None:
    """``samples`` is what the config asked for (compared on resume), ``samples_used`` what the
    validation split held; ``seconds`` sums every part of a measurement that was resumed.
    ``decisions`` lists the decision attrs measured under this header: after a change of method
    the older attrs stay in the study until overwritten, and must not be read as new ones."""
    study.set_user_attr(SENSITIVITY_ATTR, json.dumps({
        "dense_loss": dense_loss, "dense_accuracy": dense_accuracy, "samples": samples,
        "samples_used": samples_used, "method": method, "seconds": seconds,
        "complete": complete, "decisions": list(decisions)}))
