"""Command line: autosparse search | runs | space | front | sensitivity | profile | export |
calibrate | ui.

Errors a user can fix (bad config, missing file) print one clear message and exit with 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from autosparse.config.schema import ConfigError, load_config

if TYPE_CHECKING:
    import pandas as pd

# Heavy packages (torch, optuna, mlflow, pandas) are imported inside the commands, after the
# config file has been read and checked: a typo then costs a fraction of a second, not seconds.

RUNS_DIR = Path("runs")


def _print_front(front: pd.DataFrame) -> None:
    """The front as a table no wider than the terminal (whole in a pipe or a file)."""
    from autosparse.tracking.progress import fit_table, terminal_width

    if front.empty:
        print("no feasible finished trial yet: the front is empty")
        return
    text, left_out = fit_table(front.rename(columns=_SHORT_NAMES), terminal_width(),
                               drop_order=_DROP_FIRST)
    print(text)
    if left_out:
        print(f"(left out to fit the terminal: {', '.join(left_out)}; all in pareto.csv)")


# Short headers for a re-evaluated front's columns (accuracy is then the mean over the seeds).
_SHORT_NAMES = {"accuracy_std": "± std", "accuracy_seeds": "seeds", "test_accuracy": "test acc",
                "accuracy_single": "acc (1 seed)"}
# What a narrow terminal loses first (all of it stays in pareto.csv): never the trial, the
# accuracy or a cost objective; the per-layer summary is cut, and left out last.
_DROP_FIRST = ("acc (1 seed)", "seeds", "compression", "accuracy_drop", "test acc", "± std")


def _search(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: must be at least 1")
    if args.extend < 0:
        raise ConfigError(f"--extend {args.extend}: must be 0 or more (trials to add)")
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads {args.threads}: must be at least 1")
    if args.threads is not None and args.threads < args.workers:
        raise ConfigError(f"--threads {args.threads} is fewer than --workers {args.workers}: "
                          "each worker process needs at least one thread; give --threads >= "
                          f"{args.workers}, or fewer workers")
    load_config(args.config)  # file-only checks before the heavy imports
    from autosparse.search.runner import run_search

    outcome = run_search(args.config, runs_dir=args.runs_dir, workers=args.workers,
                         extend=args.extend, threads=args.threads, fresh=args.fresh)
    print(f"\nPareto front ({len(outcome.front)} of {len(outcome.trials)} finished trials, "
          f"hypervolume {outcome.hypervolume['hypervolume']:.4f}):")
    _print_front(outcome.front)
    print(f"\nstudy: {outcome.storage_url}\nresults: {args.runs_dir}/ (pareto.csv, trials.csv); "
          "browse them with `autosparse ui`")
    return 0 if outcome.trials["state"].eq("COMPLETE").any() else 1


def _sensitivity(args: argparse.Namespace) -> int:
    load_config(args.config)  # file-only checks before the heavy imports
    from autosparse.search.runner import run_sensitivity

    run_sensitivity(args.config, args.runs_dir, print)
    return 0


def _front(args: argparse.Namespace) -> int:
    config = load_config(args.config)  # file-only checks before the heavy imports
    from autosparse.search.runner import report_front
    from autosparse.search.study import require_study

    require_study(config, args.runs_dir)
    outcome = report_front(args.config, runs_dir=args.runs_dir)
    print(f"Pareto front ({len(outcome.front)} of {len(outcome.trials)} finished trials, "
          f"hypervolume {outcome.hypervolume['hypervolume']:.4f})"
          + ("; logged to MLflow" if outcome.parent_run_id else ""))
    _print_front(outcome.front)
    return 0


def _runs(args: argparse.Namespace) -> int:
    from autosparse.tracking.progress import fit_table, terminal_width
    from autosparse.tracking.runs_list import compare_fronts, search_rows

    if len(args.names) not in (0, 2):
        raise ConfigError(f"runs takes no name (list the searches) or two (compare their "
                          f"fronts), got {len(args.names)}: {' '.join(args.names)}")
    table = (compare_fronts(args.runs_dir, *args.names) if args.names
             else search_rows(args.runs_dir))
    if table.empty:
        print(f"no search in {args.runs_dir}/ yet: `autosparse search CONFIG` starts one")
        return 0
    print(fit_table(table, terminal_width(), drop_order=())[0])
    if args.names:
        for name in args.names:
            mine = table[table["search"] == name]
            print(f"{name}: {int(mine['dominated'].sum())} of {len(mine)} front points "
                  "dominated by the other search")
    return 0


def _space(args: argparse.Namespace) -> int:
    load_config(args.config)  # file-only checks before the heavy imports
    import pandas as pd

    from autosparse.search.runner import prepare
    from autosparse.space.structure import describe_group

    context = prepare(args.config, args.runs_dir)
    decision_of = {name: d for d in context.space.decisions for name in d.layers}
    rows = []
    for layer in context.table.layers:
        decision = decision_of.get(layer.name)
        rows.append({
            "layer": layer.name,
            "type": layer.kind,
            "shape": "x".join(map(str, layer.weight_shape)),
            "params": layer.weight_count + layer.bias_count,
            "MACs/sample": layer.macs,
            "searched": decision.name if decision else "no (dense fp32)",
            "patterns": ",".join(decision.patterns) if decision else "",
            "sparsity": ",".join(f"{s:g}" for s in decision.sparsities) if decision else "",
            "bits": ",".join(map(str, decision.bits)) if decision else "",
        })
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"\nother parameters (stored fp32): {context.table.other_params}")
    print("\nchannel groups (channels removed together; channel is offered on the leader):")
    if context.table.graph_error:
        print(f"  none: the dependency graph could not be built ({context.table.graph_error})")
    for group in context.table.channel_groups:
        print(f"  {describe_group(group)}")
    for note in context.space.notes:
        print(f"note: {note}")
    print(f"search space: {len(context.space.decisions)} decisions, "
          f"{len(context.space.param_names())} params, {context.space.size():.4g} distinct candidates")
    return 0


def _profile(args: argparse.Namespace) -> int:
    from autosparse.config.hardware import builtin_profiles, load_profile

    hardware = args.hardware or load_config(args.config).cost_profile()  # measure: planning
    if hardware is None:
        raise ConfigError("no target device: give --hardware or set 'hardware' in the config "
                          f"(built-in profiles: {', '.join(builtin_profiles())})")
    import pandas as pd

    from autosparse.cost.report import format_cost_report
    from autosparse.search.runner import candidate_from_reference, prepare

    context = prepare(args.config, args.runs_dir)
    candidate = candidate_from_reference(context, args.candidate)
    unknown = sorted(set(candidate) - set(context.table.names))
    if unknown:
        raise ConfigError(f"the candidate names layers the model does not have: {unknown}")
    from autosparse.cost.calibration.machine import this_machine
    from autosparse.cost.latency_table import find_latency_table

    profile = load_profile(hardware)
    latency_table, note = find_latency_table(args.runs_dir / context.config.name, context.table,
                                             profile, this_machine()["cpu"])
    with pd.option_context("display.width", 220, "display.max_colwidth", 60):
        print(format_cost_report(context.table, candidate, profile, latency_table))
    print(note or f"latency: analytic {profile.name} for every layer (no measured table; "
          "`autosparse calibrate --config CONFIG` measures one)")
    return 0


def _export(args: argparse.Namespace) -> int:
    chosen = sum(x is not None and x is not False for x in (args.trial, args.max_drop, args.knee or None))
    if chosen > 1:
        raise ConfigError("give one of --trial, --max-drop (with --minimize) or --knee")
    if args.minimize is not None and args.max_drop is None:
        raise ConfigError(f"--minimize {args.minimize}: it picks a trial within --max-drop "
                          "points of dense; give --max-drop too (--trial and --knee pick "
                          "otherwise)")
    if args.finetune_steps is not None and args.finetune_steps < 1:
        raise ConfigError(f"--finetune-steps {args.finetune_steps}: must be at least 1")
    config = load_config(args.config)  # file-only checks before the heavy imports
    from autosparse.cost.onnx_files import ExportError
    from autosparse.export.exporter import ExportCheckFailed, ExportRequest, run_export
    from autosparse.search.study import require_study

    require_study(config, args.runs_dir)
    if args.out is not None:  # /proc/..., a file, a read-only place: before the fine-tune
        from autosparse.tracking.writable import check_folder

        check_folder(args.out.parent, "--out's folder")
        if args.out.exists() and not args.out.is_dir():
            raise ConfigError(f"--out {args.out} is a file: give a folder for the export")
    request = ExportRequest(trial=args.trial, max_drop=args.max_drop, minimize=args.minimize,
                            knee=args.knee, finetune_steps=args.finetune_steps, out=args.out,
                            registered_name=args.registered_name, mlflow=not args.no_mlflow,
                            hardware=args.hardware, force=args.force)
    try:
        outcome = run_export(args.config, request, runs_dir=args.runs_dir)
    except ExportError as err:  # the model has an operator ONNX cannot express: user-fixable
        raise ConfigError(str(err)) from None
    except ExportCheckFailed as err:
        print(f"export failed its checks (nothing written): {err}", file=sys.stderr)
        return 1
    report = outcome.report
    print(f"\n{'already exported' if outcome.reused else 'exported'} trial {report['trial']} "
          f"to {outcome.out_dir}/")
    metric = report.get("metric") or {}
    task_metric = "accuracy" if metric.get("kind", "classification") == "classification" \
        else metric["name"]  # mse, perplexity: the task's own metric, by its name
    for name, value in report[f"test_{task_metric}"].items():
        if isinstance(value, (int, float)):
            print(f"  test accuracy {name}: {value:.2f} %" if task_metric == "accuracy"
                  else f"  test {task_metric} {name}: {value:.4g}")
    size = report["size_kb"]
    print(f"  packed checkpoint {size['packed_file']:.2f} kB (predicted {size['predicted']:.2f} kB "
          f"+ {size['packed_header']:.2f} kB header), dense {size['dense_predicted']:.2f} kB")
    files, dense_onnx = report.get("files_bytes", {}), report.get("dense_onnx_bytes")
    if files:  # which file is the small one: the ONNX and pt2 files hold dense float32 weights
        shown = ", ".join(f"{name} {size / 1000:.1f} kB" for name, size in files.items()
                          if name.startswith("model."))
        print(f"  files: {shown}" + (f" (dense fp32 ONNX {dense_onnx / 1000:.1f} kB); "
                                     "model.packed and model.compact.onnx hold the scored bits"
                                     if dense_onnx else ""))
    latency = report["latency_ms_measured"]
    for name, value in latency.items():
        print(f"  measured latency {name}: {value:.4f} ms")
    if latency.get("onnx_int8", 0) > latency.get("onnx", float("inf")):
        print("  int8 is slower than fp32 on this CPU (onnxruntime runs QDQ convs in float; "
              "report.md says more): prefer model.onnx for speed here")
    print(f"  report: {outcome.out_dir / 'report.md'}")
    return 0


def _calibrate_model(args: argparse.Namespace) -> int:
    """``calibrate --config``: the per-layer latency table of the config's own model."""
    load_config(args.config)  # file-only checks before the heavy imports
    from autosparse.config.hardware import load_profile
    from autosparse.cost.calibration.model_table import build_latency_table
    from autosparse.cost.latency_table import TABLE_FILE
    from autosparse.search.runner import prepare

    context = prepare(args.config, args.runs_dir)
    profile = context.profile or load_profile(args.base)
    table = build_latency_table(context.table_model(), profile, rounds=args.rounds, calls=args.calls,
                                seed=args.seed)
    path = args.runs_dir / context.config.name / TABLE_FILE
    existed = path.is_file()
    table.save(path)
    channel = sum(len(e.channels) - 1 for e in table.entries.values() if e.channels)
    print(f"dense {table.dense_us:.1f} µs (spread {table.dense_spread:.1%}) on {table.machine}, "
          f"onnxruntime {table.onnxruntime}; {len(table.entries)} layers: {channel} kept-channel "
          "levels"
          + (f", {len(table.uniform)} uniform shrinks" if table.uniform else "")
          + (f", whole-model int8 {table.dense_us + table.whole_int8[-1].delta_us:.1f} µs"
             if table.whole_int8 else "")
          + f"; {table.settings.get('seconds')} s")
    print(f"{'overwrote' if existed else 'wrote'} {path}; the search and `autosparse profile` "
          f"use it with profile {profile.name} (analytic where it has no entry)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    if args.config is not None:
        return _calibrate_model(args)
    from autosparse.config.validation import did_you_mean
    from autosparse.cost.calibrate import (
        DEFAULT_ARCHITECTURES,
        CalibrationSettings,
        run_calibration,
        summary_lines,
    )
    from autosparse.cost.calibration.architectures import ARCHITECTURES
    from autosparse.tracking.calibration_run import log_calibration
    from autosparse.tracking.ui import resolve_tracking_uri

    args.architectures = args.architectures or list(DEFAULT_ARCHITECTURES)
    for name in args.architectures:  # checked here, not by argparse: its list imports torch
        if name not in ARCHITECTURES:
            raise ConfigError(f"--architectures {name!r}: not one of {', '.join(ARCHITECTURES)}"
                              f"{did_you_mean(name, list(ARCHITECTURES))}")
    settings = CalibrationSettings(
        base=args.base, architectures=tuple(args.architectures),
        per_architecture=args.per_architecture, fit_share=args.fit_share, rounds=args.rounds,
        calls=args.calls, seed=args.seed, name=args.name)
    out_dir = args.out or args.runs_dir / "calibration"
    outcome = run_calibration(settings, out_dir)
    for line in summary_lines(outcome):
        print(line)
    print(f"report: {out_dir / 'calibration.md'}, plot: {out_dir / 'calibration.png'}")
    if not args.no_mlflow:
        uri = resolve_tracking_uri(args.tracking_uri, args.runs_dir)
        if log_calibration(outcome, out_dir, uri, args.runs_dir):
            print(f"logged to MLflow ({uri}), experiment autosparse-calibration")
    return 0


def _ui(args: argparse.Namespace) -> int:
    from autosparse.tracking.databases import check_tracking_store
    from autosparse.tracking.ui import (
        resolve_tracking_uri,
        runs_table_urls,
        ui_command,
        ui_environment,
    )

    if not 1 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be a TCP port from 1 to 65535")
    host = args.host
    try:
        socket.getaddrinfo(host, args.port)
    except (socket.gaierror, UnicodeError):
        raise ConfigError(f"--host {host!r}: not an address of this machine (e.g. 127.0.0.1, "
                          "or 0.0.0.0 for every interface)") from None
    uri = resolve_tracking_uri(args.tracking_uri, args.runs_dir)
    check_tracking_store(uri)  # a study.db would get MLflow's tables
    try:
        command = ui_command(uri, args.runs_dir, args.port, host=host)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    with socket.socket() as probe:  # a busy port would make MLflow exit after a slow start
        if probe.connect_ex((local, args.port)) == 0:
            raise ConfigError(f"--port {args.port}: already in use on {local}; pick another")
    base = f"http://{local}:{args.port}"
    print(f"MLflow UI on {base} (tracking store {uri}); Ctrl-C to stop")
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: --host {host}: the UI is reachable from other machines and has no "
              "login; an SSH tunnel (docs/ui.md) keeps it private")
    for name, url in runs_table_urls(uri, base).items():
        print(f"  {name}: {url}")
    # its own session, so that stopping this command (Ctrl-C, SIGTERM) stops every server process
    server = subprocess.Popen(command, env=ui_environment(), start_new_session=True)

    def stop(*_: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, lambda *_: (stop(), sys.exit(143)))
    try:
        return server.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("autosparse")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


CONFIG_HELP = "the search's YAML config (see search_spaces/quickstart.yaml)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autosparse", description="Search per-layer sparsity and bit-width of a trained "
        "PyTorch model for the best accuracy/size/latency trade-offs; browse the Pareto front in "
        "MLflow and export deployable files.", epilog="Each command's options: autosparse "
        "COMMAND --help. Docs: docs/ in the repository (README.md to start).")
    parser.add_argument("--version", action="version",
                        version=f"autosparse {_version()}")
    parser.add_argument("--runs-dir", type=Path, default=RUNS_DIR,
                        help="where studies, the dense model cache and MLflow data live (default runs/)")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser("search", help="run or resume a search from a YAML config")
    search.add_argument("config", help=CONFIG_HELP)
    search.add_argument("--workers", type=int, default=1, help="local processes sharing the study")
    search.add_argument("--threads", type=int, default=None,
                        help="torch threads in all, split across workers (default: "
                             "OMP_NUM_THREADS, else the CPUs this process may use)")
    search.add_argument("--extend", type=int, default=0, metavar="N",
                        help="add N trials to the config's budget (to continue a finished search)")
    search.add_argument("--fresh", action="store_true",
                        help="start this name afresh: an earlier study of the name is kept as "
                             "<name>.previous-N (its runs folder too), not continued")
    search.set_defaults(run=_search)

    runs = commands.add_parser("runs", help="list the searches in the runs folder (status, "
                               "trials, front); with two names, compare their fronts")
    runs.add_argument("names", nargs="*", metavar="NAME",
                      help="two search names to compare (default: list them all)")
    runs.set_defaults(run=_runs)

    space = commands.add_parser("space", help="print the discovered layer table and the space size")
    space.add_argument("config", help=CONFIG_HELP)
    space.set_defaults(run=_space)

    front = commands.add_parser("front", help="recompute the Pareto front from storage, log it to MLflow")
    front.add_argument("config", help=CONFIG_HELP)
    front.set_defaults(run=_front)

    sensitivity = commands.add_parser(
        "sensitivity", help="per-layer sensitivity of each choice (stored with the study, "
        "logged to MLflow); measures only what the study does not hold yet")
    sensitivity.add_argument("config", help=CONFIG_HELP)
    sensitivity.set_defaults(run=_sensitivity)

    profile = commands.add_parser(
        "profile", help="per-layer predicted latency and energy of a candidate on a device")
    profile.add_argument("config", help=CONFIG_HELP)
    profile.add_argument("--candidate", default="dense",
                         help="dense (default), trial-N of this config's study, or a JSON file")
    profile.add_argument("--hardware", default=None,
                         help="built-in profile name or YAML path (default: the config's)")
    profile.set_defaults(run=_profile)

    export = commands.add_parser(
        "export", help="turn a trial of the study into deployable, checked artifacts")
    export.add_argument("config", help=CONFIG_HELP)
    export.add_argument("--trial", type=int, default=None, help="trial number")
    export.add_argument("--max-drop", type=float, default=None,
                        help="rule: within this many points of dense accuracy ...")
    export.add_argument("--minimize", default=None,
                        help="... the smallest of this objective (default: first cost objective)")
    export.add_argument("--knee", action="store_true", help="the knee of the front (default)")
    export.add_argument("--finetune-steps", type=int, default=None,
                        help="fine-tune longer than the search did before export")
    export.add_argument("--out", type=Path, default=None,
                        help="output folder (default runs/<name>/export/trial-N)")
    export.add_argument("--registered-name", default=None,
                        help="MLflow registered model name (default <name>-trial-N)")
    export.add_argument("--hardware", default=None,
                        help="profile for the predicted latency (default: the config's; the newest "
                        "runs/calibration/ profile is added when present)")
    export.add_argument("--no-mlflow", action="store_true",
                        help="do not log or register the exported model in MLflow")
    export.add_argument("--force", action="store_true",
                        help="export again even when the folder already holds this export "
                        "(same trial and settings); the folder is replaced as a whole")
    export.set_defaults(run=_export)

    calibrate = commands.add_parser(
        "calibrate", help="time real variants here with onnxruntime, fit a measured profile, "
        "report its accuracy on held-out variants")
    calibrate.add_argument("--config", default=None,
                           help="measure this search config's own model instead: a per-layer "
                           "latency table written to runs/<name>/latency-table.json")
    calibrate.add_argument("--base", default="x86-server-vnni",
                           help="profile whose structure and energy figures are kept")
    calibrate.add_argument("--architectures", nargs="+", default=None,
                           help="built-in calibration architectures (default: the calibration "
                           "set; calibration/architectures.py lists them)")
    calibrate.add_argument("--per-architecture", type=int, default=30,
                           help="variants timed per architecture (default 30)")
    calibrate.add_argument("--fit-share", type=float, default=0.5,
                           help="share of each architecture's variants to fit on (rest: held out)")
    calibrate.add_argument("--rounds", type=int, default=61, help="interleaved timing rounds")
    calibrate.add_argument("--calls", type=int, default=21, help="timed calls per round")
    calibrate.add_argument("--seed", type=int, default=0,
                           help="seed of the variants drawn and the fit/held-out split")
    calibrate.add_argument("--name", default=None, help="profile name (default measured-<host>)")
    calibrate.add_argument("--out", type=Path, default=None,
                           help="output folder (default runs/calibration)")
    calibrate.add_argument("--tracking-uri", default=None,
                           help="MLflow tracking URI (default: MLFLOW_TRACKING_URI or "
                           "runs/mlflow.db)")
    calibrate.add_argument("--no-mlflow", action="store_true",
                           help="do not log the calibration to MLflow")
    calibrate.set_defaults(run=_calibrate)

    ui = commands.add_parser("ui", help="serve the MLflow UI against the same store (this "
                             "machine only by default)")
    ui.add_argument("--port", type=int, default=5000, help="TCP port (default 5000)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to serve on (default 127.0.0.1: this machine only; 0.0.0.0 "
                    "opens it to the network, with no login: prefer an SSH tunnel)")
    ui.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or runs/mlflow.db")
    ui.set_defaults(run=_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: with several workers, or other jobs on few
    # cores, spinning threads slowed fine-tuning 8x here. Set before torch starts its pool.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # MLflow's INFO lines ("Creating initial MLflow database tables...") are noise in a terminal
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # The variable is read when mlflow is imported; a caller that imported it already (a
    # notebook, a test session) gets the same level set on the logger itself.
    logging.getLogger("mlflow").setLevel(os.environ["MLFLOW_LOGGING_LEVEL"].upper())
    # MLflow logs each database error with its traceback before raising it; the tracker turns
    # what it raises into one warning (or, for a full disk, the one error line)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    args = build_parser().parse_args(argv)
    default_hook = threading.excepthook
    threading.excepthook = _quiet_write_failures(default_hook)
    try:
        return args.run(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:  # a full disk or a folder made read-only mid-run: one line
        from autosparse.tracking.writable import storage_failure

        line = storage_failure(err)
        if line is None:
            raise
        print(f"error: {line} (what finished is kept: free space or fix the permissions, then "
              "run the same command again)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials are in the study; run the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        threading.excepthook = default_hook


def _quiet_write_failures(default_hook):
    """A background thread (Optuna's heartbeat) that meets a full disk stays quiet: the main
    thread meets the same failure and reports it in one line."""
    def hook(args: threading.ExceptHookArgs) -> None:
        from autosparse.tracking.writable import storage_failure

        if args.exc_value is None or storage_failure(args.exc_value) is None:
            default_hook(args)
    return hook


if __name__ == "__main__":
    sys.exit(main())
