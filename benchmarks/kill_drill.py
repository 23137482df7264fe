"""Kill drill: SIGKILL `autosparse search` at random (seeded) moments, restart it, check it all.

For each worker count, a tiny quickstart search (few trials, short fine-tunes, GA with warm
starts and per-layer sensitivity) is started, killed with SIGKILL after a random delay (only
the parent: its workers must die by themselves), and restarted, until the kills are spent and
a last run completes the budget. After every kill and at the end the study, the run logs, the
processes and MLflow are checked:

- no finished trial lost or changed (state, params, values), none trained twice;
- every trial cut short (INTERRUPTED) has a COMPLETE re-run with the same params, unless it
  was cut before it had any params (then there is nothing to re-run); no genuine FAIL;
- the budget ends exact (counted trials == budget, all COMPLETE), progress never past it;
- no worker alive after its parent was killed; never more trial processes than asked;
- MLflow children match the finished trials 1:1 (KILLED for INTERRUPTED), the parent run
  ends FINISHED with n_failed 0, the front is the same in the study, pareto.csv and MLflow.

    python benchmarks/kill_drill.py --kills 7 --workers 1 2 --seed 0 \\
        --out benchmarks/results/kill_drill.md
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import psutil
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from autosparse.search.front import trials_frame  # noqa: E402
from autosparse.search.objective import CACHED_ATTR, KEY_ATTR  # noqa: E402
from autosparse.search.study import RERUN_OF_ATTR, counted_trials, is_interrupted  # noqa: E402

PROGRESS = re.compile(r"^\[(\d+)/(\d+)\] failed (\d+)")


@dataclass
class Scenario:
    workers: int
    name: str
    budget: int
    kills: list[dict] = field(default_factory=list)  # one per kill: delay, phase, checks
    runs: int = 0
    worker_pids: set[tuple[int, float]] = field(default_factory=set)  # (pid, create_time)
    max_alive: int = 0
    max_orphan_s: float = 0.0
    problems: list[str] = field(default_factory=list)
    finished: dict[int, tuple] = field(default_factory=dict)  # trial -> (state, params, values)
    final: dict = field(default_factory=dict)


def drill_config(name: str, budget: int, steps: int, runs: Path) -> dict:
    config = yaml.safe_load((ROOT / "search_spaces" / "quickstart.yaml").read_text())
    config.update(name=name, budget={"trials": budget})
    config["strategy"] = {**config["strategy"], "population_size": 6}
    config["finetune"] = {**config["finetune"], "steps": steps, "reeval_seeds": 1}
    config["tracking"] = {"uri": f"sqlite:///{runs / 'mlflow.db'}"}
    return config


def load(runs: Path, name: str) -> optuna.Study | None:
    path = runs / name / "study.db"
    if not path.is_file():
        return None
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")
    except KeyError:  # killed before the study was created
        return None


def snapshot(study: optuna.Study) -> dict[int, tuple]:
    return {t.number: (("INTERRUPTED" if is_interrupted(t) else t.state.name), dict(t.params),
                       tuple(t.values or ()))
            for t in study.get_trials(deepcopy=False) if t.state.is_finished()}


def check_study(s: Scenario, study: optuna.Study | None, at: str) -> dict:
    """Invariants that hold after any kill: nothing finished is lost, changed or trained twice."""
    if study is None:
        return {"trials": 0}
    now = snapshot(study)
    for number, before in s.finished.items():
        if now.get(number) != before:
            s.problems.append(f"{at}: finished trial {number} lost or changed: {before} -> "
                              f"{now.get(number)}")
    s.finished = now
    trained = [t.user_attrs.get(KEY_ATTR) for t in study.get_trials(deepcopy=False)
               if t.state.name == "COMPLETE" and not t.user_attrs.get(CACHED_ATTR)]
    twice = sorted({k for k in trained if trained.count(k) > 1})
    if twice:
        s.problems.append(f"{at}: candidates trained twice: {twice}")
    fails = [t.number for t in study.get_trials(deepcopy=False)
             if t.state.name == "FAIL" and not is_interrupted(t)]
    if fails:
        s.problems.append(f"{at}: genuine FAIL trials {fails}")
    counted = counted_trials(study)
    if counted > s.budget:
        s.problems.append(f"{at}: {counted} counted trials > budget {s.budget}")
    states = [v[0] for v in now.values()]
    return {"trials": len(study.trials), "complete": states.count("COMPLETE"),
            "interrupted": states.count("INTERRUPTED"), "counted": counted}


def check_progress(s: Scenario, log: str, at: str) -> list[tuple[int, int, int]]:
    lines = [m.groups() for m in map(PROGRESS.match, log.splitlines()) if m]
    for done, total, failed in lines:
        if int(done) > int(total) or int(failed) != 0:
            s.problems.append(f"{at}: progress line [{done}/{total}] failed {failed}")
    return lines


def phase_of(log: str) -> str:
    if "dense model:" not in log:
        return "startup (imports, data, dense model)"
    if not any(PROGRESS.match(line) for line in log.splitlines()):
        return "before the first trial ended (sensitivity, MLflow, first trial)"
    last = [PROGRESS.match(line) for line in log.splitlines() if PROGRESS.match(line)][-1]
    if int(last.group(1)) >= int(last.group(2)):
        return "after the last trial (re-evaluation, report)"
    return "between trials / mid-trial"


def worker_children(pid: int) -> set[tuple[int, float]]:
    """The parent's spawned workers, as (pid, start time): a pid alone may be reused by another
    process on a busy machine (pid_max is 32768 here)."""
    out = set()
    try:
        for child in psutil.Process(pid).children():
            if "spawn_main" in " ".join(child.cmdline()):
                out.add((child.pid, child.create_time()))
    except psutil.Error:
        pass
    return out


def alive(pids: set[tuple[int, float]]) -> set[tuple[int, float]]:
    out = set()
    for pid, created in pids:
        try:
            process = psutil.Process(pid)
            if process.create_time() == created and process.status() != psutil.STATUS_ZOMBIE:
                out.add((pid, created))
        except psutil.Error:
            pass
    return out


def describe(pids: set[tuple[int, float]]) -> str:
    parts = []
    for pid, _ in sorted(pids):
        try:
            process = psutil.Process(pid)
            parts.append(f"{pid} (ppid {process.ppid()}: {' '.join(process.cmdline())[:80]})")
        except psutil.Error:
            parts.append(f"{pid} (gone)")
    return ", ".join(parts)


def run_once(s: Scenario, command: list[str], env: dict, log_path: Path,
             kill_after: float | None) -> tuple[int | None, str]:
    """Start the search; SIGKILL the parent after ``kill_after`` s (None: let it finish)."""
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    s.runs += 1
    start = time.time()
    while process.poll() is None:
        s.worker_pids |= worker_children(process.pid)
        living = alive(s.worker_pids)
        trial_processes = 1 + len(living)
        s.max_alive = max(s.max_alive, trial_processes)
        if trial_processes > s.workers:
            s.problems.append(f"run {s.runs}: {trial_processes} trial processes alive, asked "
                              f"for {s.workers}: parent {process.pid}, {describe(living)}")
        if kill_after is not None and time.time() - start >= kill_after:
            workers = alive(s.worker_pids)
            process.send_signal(signal.SIGKILL)  # the parent only: workers must follow alone
            process.wait()
            t0 = time.time()
            while alive(workers) and time.time() - t0 < 15:
                time.sleep(0.05)
            s.max_orphan_s = max(s.max_orphan_s, time.time() - t0 if workers else 0.0)
            if alive(workers):
                s.problems.append(f"run {s.runs}: workers {describe(alive(workers))} alive "
                                  "15 s after their parent was killed")
            return None, log_path.read_text()
        time.sleep(0.1)
    return process.returncode, log_path.read_text()


def check_final(s: Scenario, runs: Path, log: str, rc: int | None) -> None:
    import mlflow

    study = load(runs, s.name)
    counts = check_study(s, study, "end")
    s.final.update(counts)
    if rc != 0:
        s.problems.append(f"the completing run exited {rc}")
    trials = study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    left = [t.number for t in trials if not t.state.is_finished()]
    if left:
        s.problems.append(f"end: trials not finished: {left}")
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    if counted_trials(study) != s.budget or len(complete) != s.budget:
        s.problems.append(f"end: {len(complete)} COMPLETE, {counted_trials(study)} counted, "
                          f"budget {s.budget}")
    unrun, no_params, reruns = [], [], 0
    for t in trials:
        if not is_interrupted(t):
            continue
        params = dict(t.params) or dict(t.system_attrs.get("fixed_params") or {})
        if not params:
            no_params.append(t.number)
            continue
        same = [c for c in complete if c.number > t.number and dict(c.params) == params]
        if same:
            reruns += 1
        else:
            unrun.append(t.number)
    if unrun:
        s.problems.append(f"end: trials cut short and never re-run: {unrun}")
    marked = [t for t in trials if RERUN_OF_ATTR in t.user_attrs]
    for t in marked:
        original = by_number[t.user_attrs[RERUN_OF_ATTR]]
        want = dict(original.params) or dict(original.system_attrs.get("fixed_params") or {})
        if dict(t.params) != want and t.state.is_finished() and not is_interrupted(t):
            s.problems.append(f"end: re-run {t.number} of {original.number} has other params")
    s.final.update(reruns=reruns, interrupted_without_params=len(no_params),
                   marked_reruns=len(marked))

    # MLflow: children 1:1 with finished trials, statuses, parent closed, front equal
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(s.name)
    mruns = client.search_runs([experiment.experiment_id], max_results=5000)
    parents = [r for r in mruns if r.data.tags.get("autosparse.role") == "search"]
    if len(parents) != 1:
        s.problems.append(f"MLflow: {len(parents)} parent runs, expected 1")
    parent = parents[-1]
    children = [r for r in mruns if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    numbers = [int(r.data.tags["autosparse.trial"]) for r in children]
    finished = sorted(n for n, t in by_number.items() if t.state.is_finished())
    if sorted(numbers) != finished:
        s.problems.append(f"MLflow children {sorted(numbers)} != finished trials {finished}")
    status_of = {"COMPLETE": "FINISHED", "INTERRUPTED": "KILLED", "PRUNED": "KILLED",
                 "FAIL": "FAILED"}
    for r in children:
        number = int(r.data.tags["autosparse.trial"])
        state = "INTERRUPTED" if is_interrupted(by_number[number]) else by_number[number].state.name
        if r.info.status != status_of[state]:
            s.problems.append(f"MLflow child of trial {number}: {r.info.status}, trial {state}")
    if parent.info.status != "FINISHED":
        s.problems.append(f"MLflow parent run {parent.info.status}")
    metrics = parent.data.metrics
    if metrics.get("n_failed") != 0 or metrics.get("n_trials") != s.budget:
        s.problems.append(f"MLflow parent n_trials {metrics.get('n_trials')}, n_failed "
                          f"{metrics.get('n_failed')}")
    objectives = yaml.safe_load((runs / f"{s.name}.yaml").read_text())["objectives"]
    frame = trials_frame(study, objectives)
    front_study = sorted(int(n) for n in frame.loc[frame["on_front"].astype(bool), "trial"])
    front_mlflow = sorted(int(r.data.tags["autosparse.trial"]) for r in children
                          if r.data.tags.get("autosparse.on_front") == "true")
    import pandas as pd
    front_csv = sorted(int(n) for n in pd.read_csv(runs / s.name / "pareto.csv")["trial"])
    if not (front_study == front_mlflow == front_csv):
        s.problems.append(f"front: study {front_study}, MLflow {front_mlflow}, pareto.csv "
                          f"{front_csv}")
    s.final.update(front=front_study, mlflow_children=len(children),
                   parent_status=parent.info.status)
    lines = check_progress(s, log, "final run")
    if "already used" not in log and (not lines or int(lines[-1][0]) != s.budget):
        s.problems.append(f"final run: last progress {lines[-1] if lines else None}")
    left_alive = alive(s.worker_pids)
    if left_alive:
        s.problems.append(f"end: worker processes still alive: {sorted(left_alive)}")


def drill(workers: int, kills: int, rng: random.Random, runs: Path, args) -> Scenario:
    round_ = 0
    kills_left = kills
    s = None
    while kills_left > 0 or s is None:
        s = Scenario(workers=workers, name=f"drill-w{workers}-r{round_}", budget=args.trials)
        args.scenarios.append(s)
        config = drill_config(s.name, args.trials, args.steps, runs)
        (runs / f"{s.name}.yaml").write_text(yaml.safe_dump(config))
        command = [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(runs), "search",
                   str(runs / f"{s.name}.yaml"), "--workers", str(workers),
                   "--threads", str(workers)]
        env = {**os.environ, "OMP_NUM_THREADS": str(workers), "PYTHONUNBUFFERED": "1"}
        env.pop("MLFLOW_TRACKING_URI", None)
        while True:
            kill_after = rng.uniform(args.min_delay, args.max_delay) if kills_left else None
            log_path = runs / f"{s.name}.run{s.runs + 1}.log"
            rc, log = run_once(s, command, env, log_path, kill_after)
            at = f"{s.name} run {s.runs}"
            if rc is None:
                kills_left -= 1
                counts = check_study(s, load(runs, s.name), f"after kill {len(s.kills) + 1}")
                check_progress(s, log, at)
                s.kills.append({"delay_s": round(kill_after, 2), "phase": phase_of(log),
                                **counts})
                print(f"[{s.name}] kill {len(s.kills)} after {kill_after:.1f} s "
                      f"({phase_of(log)}): {counts}", flush=True)
                continue
            check_final(s, runs, log, rc)
            print(f"[{s.name}] completed (rc {rc}) after {s.runs} runs: {s.final}; "
                  f"problems: {len(s.problems)}", flush=True)
            break
        round_ += 1
    return s


def write_report(scenarios: list[Scenario], args, seconds: float) -> str:
    lines = ["# Kill drill", "",
             "SIGKILL of `autosparse search` (the parent only) at random moments, then a restart,",
             "until the kills are spent and a last run completes the budget; every invariant is",
             "checked after each kill and at the end (see `benchmarks/kill_drill.py`).", "",
             "```bash", "python " + " ".join(["benchmarks/kill_drill.py", *args.argv]), "```", "",
             f"Quickstart (digits-cnn, GA population 6 with warm starts and per-layer sensitivity), "
             f"budget {args.trials} trials, {args.steps} fine-tune steps, 1 re-evaluation seed, "
             f"delays uniform in [{args.min_delay}, {args.max_delay}] s, seed {args.seed}; "
             f"{os.cpu_count()} cores shared with other jobs; {seconds / 60:.1f} min in all.", "",
             "| study | workers | kills | runs | trials | COMPLETE | INTERRUPTED | re-run "
             "| cut before params | MLflow children | front | max trial processes "
             "| worker gone after kill | problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in scenarios:
        f = s.final
        lines.append(
            f"| {s.name} | {s.workers} | {len(s.kills)} | {s.runs} | {f.get('trials')} | "
            f"{f.get('complete')} | {f.get('interrupted')} | {f.get('reruns')} | "
            f"{f.get('interrupted_without_params')} | {f.get('mlflow_children')} | "
            f"{len(f.get('front', []))} | {s.max_alive} | "
            f"{f'≤ {s.max_orphan_s:.1f} s' if s.workers > 1 else '–'} | "
            f"{len(s.problems)} |")
    total = sum(len(s.kills) for s in scenarios)
    phases: dict[str, int] = {}
    for k in (k for s in scenarios for k in s.kills):
        phases[k["phase"]] = phases.get(k["phase"], 0) + 1
    lines += ["", f"**{total} kills** ({', '.join(f'{n} {p}' for p, n in phases.items())}), "
              f"{sum(len(s.problems) for s in scenarios)} invariant violations. A study is "
              "restarted after each kill; when its budget completes with kills left, the drill "
              "goes on with a new study (`-r1`, `-r2`).", "", "## Kills", "",
              "| study | # | after (s) | what was running | trials then | COMPLETE | INTERRUPTED |",
              "|---|---|---|---|---|---|---|"]
    for s in scenarios:
        for i, k in enumerate(s.kills, 1):
            lines.append(f"| {s.name} | {i} | {k['delay_s']} | {k['phase']} | {k.get('trials', 0)}"
                         f" | {k.get('complete', 0)} | {k.get('interrupted', 0)} |")
    lines += ["", "## Invariants", ""]
    checks = [
        "no finished trial lost or changed (state, params, values) across any restart",
        "no candidate trained twice (COMPLETE, not a cache hit, same candidate key)",
        "every INTERRUPTED trial with params has a later COMPLETE trial with the same params; "
        "no genuine FAIL; nothing left RUNNING or WAITING",
        "budget exact: counted trials = COMPLETE trials = budget; no progress line past the "
        "budget or with failures",
        "every worker gone after its parent's SIGKILL; never more trial processes than asked",
        "MLflow: one child per finished trial with the matching status, one parent run, "
        "FINISHED, n_trials = budget, n_failed = 0",
        "front equal in the study, runs/<name>/pareto.csv and MLflow's on_front tags",
    ]
    lines += [f"- {c}" for c in checks]
    problems = [f"- {s.name}: {p}" for s in scenarios for p in s.problems]
    lines += ["", "## Violations", ""] + (problems or ["None."])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kills", type=int, default=7, help="SIGKILLs per worker count")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--min-delay", type=float, default=2.0)
    parser.add_argument("--max-delay", type=float, default=35.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--runs-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/kill_drill.md")
    args = parser.parse_args()
    args.argv = sys.argv[1:]
    args.scenarios = []
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    runs = args.runs_dir or Path(tempfile.mkdtemp(prefix="kill-drill-"))
    runs.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    print(f"runs, logs and studies in {runs}", flush=True)
    start = time.time()
    try:
        for workers in args.workers:
            drill(workers, args.kills, rng, runs, args)
    finally:
        for s in args.scenarios:  # never leave a process of ours behind, even on a crash
            for pid in alive(s.worker_pids):
                os.kill(pid[0], signal.SIGKILL)
    report = write_report(args.scenarios, args, time.time() - start)
    args.out.write_text(report)
    (args.out.with_suffix(".json")).write_text(json.dumps(
        [{"name": s.name, "workers": s.workers, "kills": s.kills, "final": s.final,
          "problems": s.problems} for s in args.scenarios], indent=1, default=str))
    print(report)
    sys.exit(1 if any(s.problems for s in args.scenarios) else 0)


if __name__ == "__main__":
    main()
