"""``autosparse export``: from a trial of the study to deployable, checked artifacts.

    pick      trial by number, by rule (max drop + minimise a metric) or the front's knee
    rebuild   compress the dense model with the trial's candidate, fine-tune exactly as the
              search did (or longer, on request), check the validation metric (accuracy, mse,
              perplexity: the task's) against the trial's
    bake      masks and quantization into plain weights; remove the pruned channel groups for
              real (Torch-Pruning); parameters must equal the footprint's prediction
    write     model.pt2 (torch.export of the shrunk model), model.packed (the shrunk model, what
              the size objective counted), model.onnx, model.int8.onnx (QDQ) where every searched
              layer is <= 8 bits
    check     the task metric on the test split in every format; formats must agree; measured
              vs predicted latency
    report    report.json / report.md; the model registered in MLflow, linked to the search
    publish   everything is written to a temporary folder and renamed into place at the end, so a
              failure leaves no half-written output
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import asdict, dataclass, field
from importlib.metadata import version as _installed_version
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import optuna
import torch

from autosparse.compress.apply import bake
from autosparse.compress.footprint import footprint_metrics
from autosparse.compress.shrink import ShrinkError, ShrinkReport, shrink_as_compressed
from autosparse.compress.storage import model_zeros
from autosparse.config.hardware import HardwareProfile, builtin_profiles, load_profile
from autosparse.config.objectives import shown_metric
from autosparse.config.schema import FinetuneConfig
from autosparse.config.validation import ConfigError
from autosparse.cost.calibration.machine import (
    fingerprint_mismatch,
    recorded_fingerprint,
    this_machine,
)
from autosparse.cost.estimate import estimate_cost
from autosparse.cost.onnx_files import (
    export_onnx,
    input_array,
    onnx_outputs,
    onnx_session,
    quantize_onnx_int8,
    time_onnx_files,
)
from autosparse.export.folder import (
    DIGEST_KEY,
    export_digest,
    folder_state,
    publish,
    read_report,
    staging_folder,
    update_report,
)
from autosparse.export.input_spec import input_markdown, input_spec, sizes_markdown
from autosparse.export.packed import load_packed, save_packed
from autosparse.search.context import SearchContext
from autosparse.search.front import trials_frame
from autosparse.search.objective import CandidateEvaluator
from autosparse.search.runner import prepare
from autosparse.search.selection import Selection, by_number, by_rule, knee
from autosparse.search.study import make_storage
from autosparse.search.trial_attrs import CANDIDATE_ATTR, METRICS_ATTR
from autosparse.space.candidate import FLOAT_BITS, Candidate, LayerChoice
from autosparse.space.discovery import example_input
from autosparse.space.layers import LayerTable
from autosparse.workload.evaluate import evaluate
from autosparse.workload.models import build_model
from autosparse.workload.task import Task, model_outputs

Printer = Callable[[str], None]

# Documented tolerances (README, "Export"). A percentage metric (accuracy, topK) is checked in
# points; any other task metric (mse, perplexity, yours) relative to the reference value.
SAME_PREDICTIONS = 99.5  # % of test images on which every float format predicts the same class
INT8_MAX_DROP = 1.0  # points the QDQ int8 model (activations quantized too) may lose vs PyTorch
INT8_MAX_WORSE = 0.01  # non-percentage metric: int8 at most 1 % worse than PyTorch
SEARCH_MARGIN = 1.0  # points the rebuilt model's validation accuracy may differ from the trial's
SEARCH_MARGIN_RELATIVE = 0.01  # non-percentage metric: rebuilt within 1 % of the trial's value
OUTPUT_TOLERANCE = 1e-4  # largest output difference of a float format, relative to the largest output
FLOAT_FORMATS = ("pytorch_shrunk", "pt2", "packed", "onnx")  # must compute the compressed model


# What a front point re-evaluated with extra seeds adds (front.trials_frame): "accuracy" is then
# the mean over its seeds, "accuracy_single" the trial's own score.
REEVALUATION = ("accuracy_seeds", "accuracy_std", "test_accuracy")


class ExportCheckFailed(RuntimeError):
    """The exported formats disagree, or do not reproduce the search's figure."""


@dataclass(frozen=True)
class ExportRequest:
    trial: int | None = None
    max_drop: float | None = None
    minimize: str | None = None
    knee: bool = False
    finetune_steps: int | None = None
    out: Path | None = None
    registered_name: str | None = None
    mlflow: bool = True
    hardware: str | None = None
    timing_rounds: int = 21
    timing_calls: int = 21
    force: bool = False  # export again even when the folder already holds this export


@dataclass
class ExportOutcome:
    out_dir: Path
    report: dict
    warnings: list[str] = field(default_factory=list)
    reused: bool = False  # the folder already held this very export: nothing was redone


def _select(context: SearchContext, study: optuna.Study, request: ExportRequest) -> Selection:
    trials = trials_frame(study, context.config.objectives)
    if trials.empty:
        raise ConfigError(f"the study {context.config.name!r} has no finished trial yet")
    if request.trial is not None:
        return by_number(trials, request.trial)
    maximize = context.task.maximize  # a minimised metric (mse): better is lower
    if request.max_drop is not None:
        minimize = request.minimize or next(o for o in context.config.objectives if o != "accuracy")
        return by_rule(trials, request.max_drop, minimize, maximize=maximize,
                       quality=context.task.name)
    cost = request.minimize or next(o for o in context.config.objectives if o != "accuracy")
    return knee(trials, cost, maximize=maximize, quality=context.task.name)


def _reevaluation(context: SearchContext, study: optuna.Study, number: int) -> dict[str, float]:
    """The mean accuracy, spread and test accuracy of a re-evaluated trial; {} for the others."""
    trials = trials_frame(study, context.config.objectives)
    if "accuracy_single" not in trials.columns:
        return {}
    row = trials.set_index("trial").loc[number]
    if not np.isfinite(row.get("accuracy_std", np.nan)):
        return {}
    return {key: float(row[key])
            for key in ("accuracy", "accuracy_single", *REEVALUATION) if np.isfinite(row[key])}


def _load_study(context: SearchContext) -> optuna.Study:
    try:
        return optuna.load_study(study_name=context.config.name,
                                 storage=make_storage(context.storage_url))
    except KeyError:
        raise ConfigError(f"no study {context.config.name!r} in {context.storage_url}: run "
                          "`autosparse search` first") from None


def _batches(context: SearchContext, split: str) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    """Inputs as the ONNX files take them (float32, or int64 token ids) and targets."""
    for x, y in context.data.loader(split, context.data.batch_size):
        yield input_array(x.numpy()), np.asarray(y)


def _logits(model: torch.nn.Module, context: SearchContext) -> np.ndarray:
    """The model's outputs on the whole test split (eval mode)."""
    out = []
    with torch.no_grad():
        if isinstance(model, torch.nn.Module) and not isinstance(model, torch.fx.GraphModule):
            model.eval()  # a loaded torch.export program is already in eval form
        for x, _ in context.data.loader("test", context.data.batch_size):
            out.append(model_outputs(model(x)).numpy())  # a tensor, or transformers' .logits
    return np.concatenate(out)


def _onnx_logits(path: Path, context: SearchContext) -> np.ndarray:
    session = onnx_session(path)
    return np.concatenate([onnx_outputs(session, x) for x, _ in _batches(context, "test")])


def _output_error(logits: np.ndarray, reference: np.ndarray) -> float:
    """Largest output difference relative to the reference's largest output."""
    return float(np.abs(logits - reference).max() / max(float(np.abs(reference).max()), 1e-12))


def _agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Percent of positions where two label vectors agree (accuracy when ``b`` is the truth)."""
    return float((a == b).mean() * 100)


@dataclass(frozen=True)
class ProfileUse:
    """A profile the report predicts with, and where it came from (named in the report)."""

    profile: HardwareProfile
    file: str  # the YAML file read (a built-in profile's file inside the package)
    role: str  # why it is used: the config's, --hardware, or the newest measured one


def _profile_file(source: str) -> str:
    if source in builtin_profiles():
        return f"built-in {source} ({Path(__file__).parent / 'profiles' / f'{source}.yaml'})"
    return str(Path(source))


def _profiles(context: SearchContext, runs_dir: Path,
              hardware: str | None) -> dict[str, ProfileUse]:
    """The requested (or the search's) profile, plus the newest measured profile in
    ``runs/calibration/`` fitted on this CPU (the newest of any CPU when none was; the report
    then warns), each with its file."""
    profiles: dict[str, ProfileUse] = {}
    source = hardware or context.config.cost_profile()
    chosen = load_profile(hardware) if hardware else context.profile
    if chosen is not None and source:
        role = "--hardware" if hardware else "the config's hardware"
        profiles[chosen.name] = ProfileUse(chosen, _profile_file(str(source)), role)
    measured = sorted((runs_dir / "calibration").glob("*.yaml"),
                      key=lambda p: p.stat().st_mtime, reverse=True)
    newest: tuple[Path, HardwareProfile] | None = None
    here = False
    for index, path in enumerate(measured):
        try:
            profile = load_profile(path)
        except ConfigError:
            if index == 0:
                raise
            continue  # an older file this version cannot read: not the newest, not chosen
        newest = newest or (path, profile)
        recorded = recorded_fingerprint(profile.fitted, profile.measured)
        if recorded is not None and fingerprint_mismatch(recorded, this_machine()) is None:
            newest, here = (path, profile), True
            break
    if newest is not None:
        path, profile = newest
        role = f"the newest measured profile in {runs_dir / 'calibration'}" + (
            "" if here else " (none there was measured on this CPU)")
        profiles.setdefault(profile.name, ProfileUse(profile, str(path), role))
    return profiles


def at_float(candidate: Candidate, table: LayerTable) -> Candidate:
    """The candidate's structure (patterns, sparsities) with every layer at 32-bit float: what
    ``model.onnx`` computes."""
    choices = {}
    for name in table.names:
        c = candidate.get_choice(name)
        choices[name] = LayerChoice.make(c.pattern, c.sparsity, FLOAT_BITS, c.criterion)
    return Candidate(choices)


def precision_label(candidate: Candidate, table: LayerTable) -> str:
    """The searched layers' precisions, e.g. ``int8 x5`` or ``fp32 x1, int4 x2, int8 x2``."""
    counts: dict[int, int] = {}
    for name in table.names:
        bits = candidate.get_choice(name).bits
        counts[bits] = counts.get(bits, 0) + 1
    return ", ".join(f"{'fp32' if b == FLOAT_BITS else f'int{b}'} x{n}"
                     for b, n in sorted(counts.items(), reverse=True))


def predicted_latencies(table: LayerTable, candidate: Candidate,
                        profiles: dict[str, ProfileUse], int8_file: bool,
                        machine: dict | None = None) -> dict[str, dict]:
    """Per profile: the dense fp32 model, the candidate as scored (its own bits) and its
    structure at fp32, each labelled with the exported file it predicts, plus the profile's file
    and, when it was measured on another CPU, why its figures may not hold here."""
    here = machine if machine is not None else this_machine()
    scored_label = precision_label(candidate, table)
    all_float = all(candidate.get_choice(n).bits == FLOAT_BITS for n in table.names)
    scored_file = "model.int8.onnx" if int8_file else ("model.onnx" if all_float else None)
    fp32 = at_float(candidate, table)
    predicted = {}
    for name, use in profiles.items():
        cost = estimate_cost(table, candidate, use.profile)
        recorded = recorded_fingerprint(use.profile.fitted, use.profile.measured)
        predicted[name] = {
            "profile_file": use.file,
            "profile_role": use.role,
            "dense_ms": estimate_cost(table, Candidate({}), use.profile).latency_ms,
            "dense_format": "fp32 (the dense model's ONNX, dense_fp32)",
            "candidate_ms": cost.latency_ms,
            "candidate_format": scored_label,
            "candidate_file": scored_file,
            "candidate_energy_uj": cost.energy_uj,
            "candidate_fp32_ms": estimate_cost(table, fp32, use.profile).latency_ms,
            "candidate_fp32_file": "model.onnx",
            "machine_warning": None if recorded is None else fingerprint_mismatch(recorded, here),
        }
    return predicted


class _Scored(torch.nn.Module):
    """One exported format as a module the task's metric can score (``Task.evaluate``): a
    plain function inside, so ``eval()`` never reaches a loaded torch.export program."""

    def __init__(self, run: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self._run = lambda x: run(x)  # a function: a module given here is not registered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)


def _onnx_run(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    session = onnx_session(path)
    return lambda x: torch.from_numpy(onnx_outputs(session, x.numpy()))


def metric_key(task: Task, key: str) -> str:
    """A report key under the task's metric name (``test_accuracy`` -> ``test_mse``); a
    classifier's report keeps its historic ``accuracy`` keys whatever its metric."""
    return key if task.kind == "classification" else shown_metric(key, task.name)


def shown_value(task: Task, value: float) -> str:
    """``97.22 %`` for a percentage, ``mse 0.4312`` for another metric."""
    return f"{value:.2f} %" if task.percent else f"{task.name} {value:.4g}"


def rebuild_margin(task: Task, recorded: float) -> float:
    """How far the rebuilt model's validation metric may be from the trial's recorded one."""
    return SEARCH_MARGIN if task.percent else SEARCH_MARGIN_RELATIVE * abs(recorded)


def int8_margin(task: Task, reference: float) -> float:
    """How much worse than the PyTorch model the int8 ONNX model may score on test."""
    return INT8_MAX_DROP if task.percent else INT8_MAX_WORSE * abs(reference)


def run_export(config_path: str | Path, request: ExportRequest, *, runs_dir: Path = Path("runs"),
               printer: Printer = print) -> ExportOutcome:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    context = prepare(config_path, runs_dir)
    study = _load_study(context)
    selection = _select(context, study, request)
    for warning in selection.warnings:
        printer(f"warning: {warning}")
    trial = study.trials[selection.trial]
    candidate = Candidate.from_json(trial.user_attrs[CANDIDATE_ATTR])
    searched = {**trial.user_attrs.get(METRICS_ATTR, {}),
                **_reevaluation(context, study, trial.number)}
    final_dir = request.out or runs_dir / context.config.name / "export" / f"trial-{selection.trial}"
    digest = _digest(context, study, request, trial.number, candidate)
    state = folder_state(final_dir, digest, registration=request.mlflow)
    if state == "complete" and not request.force:
        printer(f"{final_dir} already holds this export (trial {trial.number}, same candidate "
                "and settings, every file in place): reused; --force exports it again")
        return ExportOutcome(final_dir, read_report(final_dir) or {}, list(selection.warnings),
                             reused=True)
    tmp = staging_folder(final_dir)
    try:
        report, shrunk = _export_into(context, request, selection, candidate, searched, tmp,
                                      runs_dir, printer)
        report[DIGEST_KEY] = digest
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "report.md").write_text(report_markdown(report))
        if publish(tmp, final_dir):  # the earlier folder is replaced as a whole
            printer(f"replaced the earlier export in {final_dir} ("
                    + ("--force" if state == "complete" else "it came from other settings, "
                       "was not registered, or missed a file") + ")")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if request.mlflow:
        registered = _register(context, report, shrunk, final_dir, request, selection,
                               runs_dir, printer)
        if registered:
            report["registered_model"] = registered
            update_report(final_dir, registered_model=registered)
    return ExportOutcome(final_dir, report, list(selection.warnings))


def _digest(context: SearchContext, study: optuna.Study, request: ExportRequest, number: int,
            candidate: Candidate) -> str:
    """What decides an export folder's content: the same digest means the same files."""
    from autosparse.search.study import study_uid

    config = context.config
    return export_digest({
        "version": _installed_version("autosparse"), "search": config.name, "study": study_uid(study),
        "trial": number, "candidate": candidate.to_json(),
        "finetune_steps": request.finetune_steps if request.finetune_steps is not None
        else config.export.finetune_steps,
        "model": config.model.model_dump(mode="json"), "data": config.data.model_dump(mode="json"),
        "finetune": config.finetune.model_dump(mode="json"),
        "hardware": request.hardware or config.hardware,
        "registered_name": request.registered_name or config.export.registered_name,
        # another task's metric and loss change what is checked (a classifier's digest as before)
        **({} if config.task.is_default else {"task": config.task.model_dump(mode="json")}),
    })


def _export_into(context: SearchContext, request: ExportRequest, selection: Selection,
                 candidate: Candidate, searched: dict, out: Path, runs_dir: Path,
                 printer: Printer) -> tuple[dict, torch.nn.Module]:
    config = context.config
    tune_cfg: FinetuneConfig = config.finetune
    steps = request.finetune_steps if request.finetune_steps is not None \
        else config.export.finetune_steps
    if steps is not None:
        # an explicit step count replaces the search's length, epochs included
        tune_cfg = config.finetune.model_copy(update={"steps": steps, "epochs": None})
    evaluator = CandidateEvaluator(context.dense, context.data, context.table, config.finetune,
                                   context.dense_metrics["accuracy"], context.profile,
                                   graph=context.graph, task=context.task)
    tune_steps = evaluator.finetune_steps(tune_cfg)
    # the dense model's ONNX first (timed beside the export at the end): a model ONNX cannot
    # express (an operator with no opset equivalent, named with its layer) fails here, in a
    # second, not after the rebuild's fine-tune
    dense_onnx = export_onnx(copy.deepcopy(context.dense).cpu(), context.data.input_shape,
                             out / ".dense.onnx")
    printer(f"trial {selection.trial} ({selection.reason}): rebuilding with "
            f"{tune_steps} fine-tune steps ...")
    student, _ = evaluator.compress_and_tune(candidate, tune_cfg)
    # fine-tuned on the search's device (so the rebuild repeats the trial); export itself
    # (packing, torch.export, ONNX, onnxruntime checks) is CPU work
    student.cpu()
    context.dense.cpu()
    validation = evaluate(student, context.data.loader("validation", context.data.batch_size),
                          context.task)  # the task metric the trial recorded (top5, ...)
    # the rebuild repeats the trial's own fine-tune (its seed), so it must match the trial's own
    # score, not the mean over a re-evaluated front point's extra seeds
    own = searched.get("accuracy_single", searched.get("accuracy"))
    task = context.task
    if steps is None and own is not None:
        gap, allowed = abs(validation - own), rebuild_margin(task, own)
        if gap > allowed:
            margin = (f"{SEARCH_MARGIN} points" if task.percent else
                      f"{SEARCH_MARGIN_RELATIVE:.0%} of the recorded value, {allowed:.3g}")
            raise ExportCheckFailed(
                f"rebuilt model scores {shown_value(task, validation)} on validation, the search "
                f"recorded {shown_value(task, own)} for this seed (allowed difference {margin})")
    baked = bake(student)
    shrunk, shrink_report, kept = _shrink(context, evaluator, candidate, baked)

    # one pass over the test split per format: outputs, accuracy and agreement all come from it
    logits = {"pytorch": _logits(baked, context), "pytorch_shrunk": _logits(shrunk, context)}

    # batch 2 as the example (torch.export specialises size-1 dimensions), dynamic batch: the
    # program serves any batch size, like the ONNX files and the MLflow model
    one = example_input(shrunk, context.data.input_shape)  # token ids for a language model
    tokens = not one.is_floating_point()
    exported = torch.export.export(shrunk.eval(), (torch.cat([one, one]),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(exported, out / "model.pt2")
    program = torch.export.load(out / "model.pt2").module()
    logits["pt2"] = _logits(program, context)

    packed_info = save_packed(shrunk, candidate, out / "model.packed", table=context.table,
                              kept=kept)
    skeleton = build_model(config.model, context.data.input_shape, context.data.num_classes)
    packed_model = load_packed(out / "model.packed", skeleton)
    logits["packed"] = _logits(packed_model, context)

    export_onnx(shrunk, context.data.input_shape, out / "model.onnx")
    logits["onnx"] = _onnx_logits(out / "model.onnx", context)
    quantized = all(candidate.get_choice(n).bits <= 8 for n in context.table.names)
    if quantized:
        calibration = (x for x, _ in _batches(context, "train"))
        quantize_onnx_int8(out / "model.onnx", out / "model.int8.onnx", calibration,
                           weighted_only=tokens)  # an LM: not its masked scores and norms
        logits["onnx_int8"] = _onnx_logits(out / "model.int8.onnx", context)
    output_error = {name: _output_error(values, logits["pytorch"])
                    for name, values in logits.items() if name in FLOAT_FORMATS}
    if task.kind == "classification":  # class predictions: accuracy and agreement, as always
        predictions = {name: values.argmax(axis=1) for name, values in logits.items()}
        labels = np.concatenate([y for _, y in _batches(context, "test")])
        accuracy = {name: _agreement(pred, labels) for name, pred in predictions.items()}
    else:  # the task's own metric of every format on the test split (mse, perplexity, yours)
        runs = {"pytorch": baked, "pytorch_shrunk": shrunk, "pt2": _Scored(program),
                "packed": packed_model, "onnx": _Scored(_onnx_run(out / "model.onnx"))}
        if quantized:
            runs["onnx_int8"] = _Scored(_onnx_run(out / "model.int8.onnx"))
        test = context.data.loader("test", context.data.batch_size)
        accuracy = {name: task.evaluate(run, test) for name, run in runs.items()}
        # a language model: the predicted next token at every position; regression: none
        predictions = {name: values.argmax(axis=-1).reshape(-1) for name, values in logits.items()
                       } if task.kind == "language-model" else {}
    agreement = {name: _agreement(pred, predictions["pytorch"])
                 for name, pred in predictions.items() if name in FLOAT_FORMATS}

    what = "test images" if task.kind == "classification" else "test tokens"
    problems = [f"{name} predicts like PyTorch on only {value:.2f} % of {what} "
                f"(needs >= {SAME_PREDICTIONS} %)"
                for name, value in agreement.items() if value < SAME_PREDICTIONS]
    problems += [f"{name} outputs differ from the compressed model's by {value:.2e} (relative; "
                 f"allowed {OUTPUT_TOLERANCE:g})"
                 for name, value in output_error.items() if value > OUTPUT_TOLERANCE]
    if quantized:
        worse = task.drop(accuracy["pytorch"], accuracy["onnx_int8"])
        allowed = int8_margin(task, accuracy["pytorch"])
        if worse > allowed:
            problems.append(
                f"int8 ONNX loses {worse:.2f} points vs PyTorch (allowed {INT8_MAX_DROP})"
                if task.percent else
                f"int8 ONNX scores {shown_value(task, accuracy['onnx_int8'])} on test, "
                f"{worse / abs(accuracy['pytorch']):.1%} worse than PyTorch's "
                f"{accuracy['pytorch']:.4g} (allowed {INT8_MAX_WORSE:.0%})")
    if problems:
        raise ExportCheckFailed("exported formats disagree: " + "; ".join(problems))

    printer("timing the dense and exported ONNX models (1 thread) ...")
    files = {"dense_fp32": dense_onnx, "onnx": out / "model.onnx"}
    if quantized:
        files["onnx_int8"] = out / "model.int8.onnx"
    measured = time_onnx_files(files, context.data.input_shape, request.timing_rounds,
                               request.timing_calls)
    dense_onnx_bytes = dense_onnx.stat().st_size
    dense_onnx.unlink()
    predicted = predicted_latencies(context.table, candidate,
                                    _profiles(context, runs_dir, request.hardware), quantized)
    for name, values in predicted.items():
        if values["machine_warning"]:
            printer(f"warning: predicted latency on {name}: {values['machine_warning']}")
    # the formula on the exported weights' own zeros: what the trial's size objective measured
    footprint = footprint_metrics(context.table, candidate,
                                  model_zeros(shrunk, context.table, candidate))
    dense_size = footprint_metrics(context.table, Candidate({}))["size_kb"]
    files = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
    return {
        "search": config.name,
        "trial": selection.trial,
        "selection": selection.reason,
        "warnings": list(selection.warnings),
        "finetune_steps": tune_steps,
        "layers": [{"layer": name, **asdict(candidate.get_choice(name))}
                   for name in context.table.names],
        "metric": {"name": task.name, "kind": task.kind, "direction": task.direction,
                   "percent": task.percent},
        metric_key(task, "validation_accuracy"): {
            "search": searched.get("accuracy"), "search_single": own, "rebuilt": validation,
            "dense": context.dense_metrics["accuracy"]},
        "reevaluation": {metric_key(task, key): searched[key] for key in REEVALUATION
                         if key in searched},
        metric_key(task, "test_accuracy"): {**accuracy,
                                            "dense": context.dense_metrics.get("test_accuracy")},
        "agreement_percent": agreement,
        "output_error": output_error,
        "size_kb": {"dense_predicted": dense_size, "predicted": footprint["size_kb"],
                    "search": searched.get("size_kb"),
                    "packed_file": files["model.packed"] / 1000,
                    "packed_header": packed_info.header_bytes / 1000},
        "files_bytes": files,
        "dense_onnx_bytes": dense_onnx_bytes,
        "input": input_spec(config.data, context.data.input_shape, context.data.mean or (),
                            context.data.std or (), context.data.classes,
                            context.data.num_classes, kind=task.kind,
                            tokens=tokens),
        "shrink": shrink_report.to_dict(),
        "parameters": {"predicted": shrink_report.parameters_predicted,
                       "shrunk": shrink_report.parameters_after,
                       "dense": shrink_report.parameters_before},
        "latency_ms_measured": {k: v * 1e3 for k, v in measured.items()},
        "predicted": predicted,
        "tolerances": _tolerances(task),
    }, shrunk


def _tolerances(task: Task) -> dict[str, float]:
    """The checks' margins as report.json states them (points, or relative for a metric that is
    not a percentage; class agreement only where there are class or token predictions)."""
    out: dict[str, float] = {}
    if task.kind in ("classification", "language-model"):
        out["same_predictions_percent"] = SAME_PREDICTIONS
    out["output_error_relative"] = OUTPUT_TOLERANCE
    if task.percent:
        return {**out, "int8_max_drop_points": INT8_MAX_DROP,
                "search_margin_points": SEARCH_MARGIN}
    return {**out, "int8_max_worse_relative": INT8_MAX_WORSE,
            "search_margin_relative": SEARCH_MARGIN_RELATIVE}


def _shrink(context: SearchContext, evaluator: CandidateEvaluator, candidate: Candidate,
            baked: torch.nn.Module) -> tuple[torch.nn.Module, ShrinkReport, dict]:
    """The baked model with the candidate's channel groups removed, the report, and the kept
    channels per group (the same ones compression chose: computed on the dense model with the
    same scores). A group that cannot be removed, or a shrunk model whose parameters are not
    the footprint's, fails the export: it would not be what the search scored."""
    try:
        shrunk, report, kept = shrink_as_compressed(baked, context.dense, candidate, context.table,
                                                    context.graph, evaluator._scores(candidate))
    except ShrinkError as err:  # also a parameter count other than the footprint's
        raise ExportCheckFailed(f"shrinking failed: {err}") from err
    return shrunk, report, kept


def _register(context: SearchContext, report: dict, model: torch.nn.Module, out: Path,
              request: ExportRequest,
              selection: Selection, runs_dir: Path, printer: Printer) -> dict | None:
    from autosparse.tracking.mlflow_tracker import Tracker, resolve_tracking_uri

    uri = resolve_tracking_uri(context.config.tracking.uri, runs_dir)
    tracker = Tracker(tracking_uri=uri, experiment=context.config.tracking.experiment
                      or context.config.name, runs_dir=runs_dir)
    name = (request.registered_name or context.config.export.registered_name
            or f"{context.config.name}-trial-{selection.trial}")
    x = example_input(model, context.data.input_shape).numpy()  # token ids for an LM
    if not np.issubdtype(x.dtype, np.integer):
        x = np.zeros((1, *context.data.input_shape), dtype=np.float32)
    parent, child = tracker.find_search_runs(context.config.name, selection.trial) or (None, None)
    test = metric_key(context.task, "test_accuracy")  # test_mse_onnx, ...
    metrics = {f"{test}_{k}": v for k, v in report[test].items() if isinstance(v, (int, float))}
    result = tracker.log_exported_model(
        model=model, input_example=x, registered_name=name, parent_run_id=parent,
        trial_run_id=child, artifacts={p.name: p for p in out.iterdir() if p.is_file()},
        metrics=metrics, params={"trial": str(selection.trial), "selection": selection.reason})
    if not result:
        return None
    printer(f"registered in MLflow as {name!r} version {result[1]} ({uri})")
    return {"name": name, "version": str(result[1]), "tracking_uri": uri}


def _shrink_markdown(report: dict) -> list[str]:
    """The channel groups removed and the parameter count against the footprint's."""
    params = report["parameters"]
    lines = [f"Parameters: {params['shrunk']} in the shrunk model (footprint predicts "
             f"{params['predicted']}; dense {params['dense']})."]
    groups = report["shrink"]["groups"]
    if groups:
        lines += ["", "| channel group | channels | producers | consumers |", "|---|---|---|---|"]
        lines += [f"| {g['name']} | {g['channels_before']} -> {g['channels_after']} | "
                  f"{', '.join(g['producers'])} | {', '.join(g['consumers'])} |" for g in groups]
    return lines


def _metric_of(report: dict) -> tuple[str, str, str, str]:
    """(name, report key suffix, value format, unit) of the report's task metric; a classifier's
    report (and one written before tasks) says accuracy in %."""
    metric = report.get("metric") or {}
    if metric.get("kind", "classification") == "classification":
        return "accuracy", "accuracy", ".2f", " %"
    return metric["name"], metric["name"], ".4g", ""


def _checks_markdown(report: dict, name: str) -> list[str]:
    """What a non-percentage metric was checked against (relative margins)."""
    tolerances = report.get("tolerances", {})
    if "search_margin_relative" not in tolerances:
        return []
    direction = (report.get("metric") or {}).get("direction", "minimize")
    return ["", f"Checks ({name} is {direction}d; margins relative to the reference value): the "
            f"rebuilt model's validation {name} within "
            f"{tolerances['search_margin_relative']:.0%} of the trial's; `model.int8.onnx` at "
            f"most {tolerances['int8_max_worse_relative']:.0%} worse than PyTorch on test; float "
            f"formats' outputs within {tolerances['output_error_relative']:g} of the largest "
            "output."]


def report_markdown(report: dict) -> str:
    name, key, fmt, unit = _metric_of(report)
    acc, size = report[f"test_{key}"], report["size_kb"]
    lines = [f"# Export of {report['search']} trial {report['trial']}", "",
             f"Selected: {report['selection']}. Fine-tune steps: {report['finetune_steps']}.", ""]
    if "input" in report:
        lines += input_markdown(report["input"])
    lines += [f"- warning: {w}" for w in report["warnings"]]
    reevaluated, validation = report.get("reevaluation") or {}, report[f"validation_{key}"]
    if f"{key}_std" in reevaluated:
        test = reevaluated.get(f"test_{key}")
        lines += ["", f"Validation {name} in the search: {validation['search']:{fmt}} ± "
                  f"{reevaluated[f'{key}_std']:{fmt}}{unit} over "
                  f"{reevaluated[f'{key}_seeds']:.0f} fine-tune seeds (the trial's own seed: "
                  f"{validation['search_single']:{fmt}}{unit})"
                  + (f"; test {name} of the re-fine-tuned models {test:{fmt}}{unit}."
                     if test else ".")]
    elif key != "accuracy":
        lines += ["", f"Validation {name}: {validation['rebuilt']:{fmt}} rebuilt, "
                  f"{validation['search_single']:{fmt}} in the search, "
                  f"{validation['dense']:{fmt}} dense."]
    lines += _checks_markdown(report, name)
    lines += ["", "| layer | pattern | sparsity | bits |", "|---|---|---|---|"]
    for layer in report["layers"]:
        bits = "fp32" if layer["bits"] == FLOAT_BITS else f"int{layer['bits']}"
        lines.append(f"| {layer['layer']} | {layer['pattern']} | {layer['sparsity']:.0%} | {bits} |")
    lines += ["", *_shrink_markdown(report)]
    header = "test accuracy (%)" if key == "accuracy" else f"test {name}"
    same = "same prediction as PyTorch (%) | " if key == "accuracy" else \
        "same next token as PyTorch (%) | " if report["agreement_percent"] else ""
    lines += ["", f"| format | {header} | {same}output error (relative) |",
              "|---|---|" + ("---|" if same else "") + "---|"]
    for format_name, value in acc.items():
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            agree = report["agreement_percent"].get(format_name)
            error = report.get("output_error", {}).get(format_name)
            agree_cell = ("" if agree is None else f"{agree:.2f}") + " | " if same else ""
            lines.append(f"| {format_name} | {value:{fmt}} | {agree_cell}"
                         f"{'' if error is None else f'{error:.1e}'} |")
    lines += ["", f"Stored size: {size['packed_file']:.2f} kB packed file "
              f"(predicted {size['predicted']:.2f} kB + {size['packed_header']:.2f} kB header) vs "
              f"{size['dense_predicted']:.2f} kB dense.", ""]
    lines += sizes_markdown(report["files_bytes"], report.get("dense_onnx_bytes"),
                            report["latency_ms_measured"])
    lines += latency_markdown(report["latency_ms_measured"], report["predicted"])
    return "\n".join(lines) + "\n"


def latency_markdown(measured: dict[str, float], predicted: dict[str, dict]) -> list[str]:
    """Measured and predicted latency side by side, one row per exported file, one column per
    profile: each prediction stands beside the file (and precision) it is for."""
    names = list(predicted)
    header = "| latency, ms (onnxruntime, 1 thread, batch 1) | measured |" + "".join(
        f" predicted: {name} |" for name in names)
    lines = [header, "|---|---|" + "---|" * len(names)]

    def row(label: str, measured_key: str | None, key: str) -> None:
        value = measured.get(measured_key) if measured_key else None
        cells = "".join(f" {p[key]:.4f} |" for p in predicted.values())
        lines.append(f"| {label} | {'—' if value is None else f'{value:.4f}'} |{cells}")

    first = next(iter(predicted.values()), None)
    scored = first["candidate_format"] if first else None
    scored_file = first["candidate_file"] if first else None
    row("dense model, fp32 (dense_fp32)", "dense_fp32", "dense_ms")
    if first is None:
        for key in ("onnx", "onnx_int8"):
            if key in measured:
                row(f"model{'.int8' if key == 'onnx_int8' else ''}.onnx", key, "dense_ms")
    elif scored_file == "model.onnx":
        row(f"model.onnx: the candidate as scored ({scored})", "onnx", "candidate_ms")
    else:
        row("model.onnx: the candidate's structure at fp32", "onnx", "candidate_fp32_ms")
        if scored_file == "model.int8.onnx":
            row(f"model.int8.onnx: the candidate as scored ({scored}; the file holds every "
                "searched layer at int8)", "onnx_int8", "candidate_ms")
        else:
            row(f"the candidate as scored ({scored}): no exported file has these precisions",
                None, "candidate_ms")
    if not predicted:
        return lines + ["", "Predicted: no hardware profile; give --hardware, or run "
                        "`autosparse calibrate` on this machine."]
    lines.append("")
    for name, p in predicted.items():
        lines.append(f"- {name}: {p['profile_role']}, file {p['profile_file']}; predicted energy "
                     f"of the candidate as scored {p['candidate_energy_uj']:.3g} µJ")
    lines += [f"- warning: {name}: {p['machine_warning']}" for name, p in predicted.items()
              if p.get("machine_warning")]
    return lines
