"""``autosparse export``: from a trial of the study to deployable, checked artifacts.

    pick      trial by number, by rule (max drop + minimise a metric) or the front's knee
    rebuild   compress the dense model with the trial's candidate, fine-tune exactly as the
              search did (or longer, on request), check the validation metric (accuracy, mse,
              perplexity: the task's) against the trial's
    bake      masks and quantization into plain weights; remove the pruned channel groups for
              real (Torch-Pruning); parameters must equal the footprint's prediction
    write     model.pt2 (torch.export of the shrunk model), model.packed (the shrunk model, what
              the size objective counted), model.onnx, model.int8.onnx (QDQ) where every searched
              layer is <= 8 bits, model.compact.onnx (model.onnx with every searched weight
              stored at its searched bits and sparsity, decoded by onnxruntime at load)
    check     the task metric on the test split in every format; formats must agree; measured
              vs predicted latency
    report    report.json / report.md; the model registered in MLflow, linked to the search
    publish   everything is written to a temporary folder and renamed into place at the end, so a
              failure leaves no half-written output

The request and the trial's selection live in ``request``, the tolerances and format checks in
``checks``, the latency predictions in ``latency`` and report.md in ``report``; this module runs
the steps.
"""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import torch

from autosparse.compress.apply import bake
from autosparse.compress.footprint import footprint_metrics
from autosparse.compress.shrink import ShrinkError, ShrinkReport, shrink_as_compressed
from autosparse.compress.storage import model_zeros
from autosparse.config.runtime import DEPLOY_FILES
from autosparse.config.sections import FinetuneConfig
from autosparse.cost.compact_onnx import COMPACT_FILE, write_compact_onnx
from autosparse.cost.onnx_files import (
    ScoredRun,
    export_onnx,
    onnx_module,
    quantize_onnx_int8,
    time_onnx_files,
)
from autosparse.export.checks import (
    FLOAT_FORMATS,
    INT8_MAX_DROP,
    INT8_MAX_WORSE,
    OUTPUT_TOLERANCE,
    SAME_PREDICTIONS,
    SEARCH_MARGIN,
    SEARCH_MARGIN_RELATIVE,
    ExportCheckFailed,
    _agreement,
    _batches,
    _logits,
    _onnx_logits,
    _output_error,
    _tolerances,
    int8_margin,
    metric_key,
    rebuild_margin,
    shown_value,
)
from autosparse.export.folder import (
    DIGEST_KEY,
    folder_state,
    publish,
    read_report,
    staging_folder,
    update_report,
)
from autosparse.export.gguf_export import export_oneshot, gguf_report_markdown
from autosparse.export.input_spec import input_spec
from autosparse.export.latency import _profiles, predicted_latencies
from autosparse.export.packed import load_packed, save_packed
from autosparse.export.report import report_markdown
from autosparse.export.reproduction import write_reproduction
from autosparse.export.request import (
    REEVALUATION,
    ExportOutcome,
    ExportRequest,
    _digest,
    _load_study,
    _reevaluation,
    _select,
)
from autosparse.search.context import SearchContext
from autosparse.search.lr_choice import require_lr
from autosparse.search.objective import THREADS_ATTR, CandidateEvaluator
from autosparse.search.preparation import prepare
from autosparse.search.selection import Selection
from autosparse.search.study import study_uid
from autosparse.search.trial_attrs import CANDIDATE_ATTR, METRICS_ATTR
from autosparse.space.candidate import Candidate
from autosparse.space.discovery import example_input
from autosparse.workload.devices import torch_threads
from autosparse.workload.evaluate import evaluate

Printer = Callable[[str], None]


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
    state = folder_state(final_dir, digest, registration=request.mlflow,
                         owner=(context.config.name, trial.number), force=request.force)
    if state == "complete" and not request.force:
        printer(f"{final_dir} already holds this export (trial {trial.number}, same candidate "
                "and settings, every file in place): reused; --force exports it again")
        return ExportOutcome(final_dir, read_report(final_dir) or {}, list(selection.warnings),
                             reused=True)
    tmp = staging_folder(final_dir)
    if context.oneshot is not None:  # a GGUF of the stored levels: nothing to rebuild or tune
        return _export_oneshot(context, selection, candidate, searched, digest, tmp, final_dir,
                               state, printer)
    try:
        report, shrunk = _export_into(context, request, selection, candidate, searched, tmp,
                                      runs_dir, printer, trial.user_attrs.get(THREADS_ATTR))
        write_reproduction(context, report, tmp)  # split.json, reproduce.py, report["reproduce"]
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
                               runs_dir, printer, study_uid(study))
        if registered:
            report["registered_model"] = registered
            update_report(final_dir, registered_model=registered)
    return ExportOutcome(final_dir, report, list(selection.warnings))


def _export_oneshot(context: SearchContext, selection: Selection, candidate: Candidate,
                    searched: dict, digest: str, tmp: Path, final_dir: Path, state: str,
                    printer: Printer) -> ExportOutcome:
    """A one-shot search's export: ``model.gguf`` and its report (``gguf_export``)."""
    try:
        report = export_oneshot(context, candidate, searched, tmp, printer)
        report.update(trial=selection.trial, selection=selection.reason)
        report[DIGEST_KEY] = digest
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=float))
        (tmp / "report.md").write_text(gguf_report_markdown(report))
        if publish(tmp, final_dir):
            printer(f"replaced the earlier export in {final_dir}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportOutcome(final_dir, report, list(selection.warnings))


def _export_into(context: SearchContext, request: ExportRequest, selection: Selection,
                 candidate: Candidate, searched: dict, out: Path, runs_dir: Path,
                 printer: Printer, threads: int | None = None) -> tuple[dict, torch.nn.Module]:
    config = context.config
    require_lr(context)
    tune_cfg: FinetuneConfig = context.finetune  # lr auto: the study's probed lr
    steps = request.finetune_steps if request.finetune_steps is not None \
        else config.export.finetune_steps
    if steps is not None:
        # an explicit step count replaces the search's length, epochs included
        tune_cfg = context.finetune.model_copy(update={"steps": steps, "epochs": None})
    evaluator = CandidateEvaluator(context.dense, context.data, context.table, context.finetune,
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
    with torch_threads(threads):  # the trial's own count: a CPU rebuild then repeats it exactly
        student, rebuilt_loss = evaluator.compress_and_tune(candidate, tune_cfg)
    # fine-tuned on the search's device (so the rebuild repeats the trial); export itself
    # (packing, torch.export, ONNX, onnxruntime checks) is CPU work
    student.cpu()
    context.dense.cpu()
    validation = evaluate(student, context.data.loader("validation", context.data.batch_size),
                          context.task)  # the task metric the trial recorded (top5, ...)
    # the rebuild repeats the trial's own fine-tune (its seed), so it must match the trial's own
    # score, not the mean over a re-evaluated front point's extra seeds
    own = searched.get("accuracy_single", searched.get("accuracy"))
    if "accuracy_pytorch" in searched:  # deploy onnx-int8: the trial's metric is the file's
        own = searched["accuracy_pytorch"]
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
                              kept=kept, example=(torch.cat([one, one]),))
    packed_model = load_packed(out / "model.packed")  # its own graph: no model code
    logits["packed"] = _logits(packed_model, context)

    export_onnx(shrunk, context.data.input_shape, out / "model.onnx")
    logits["onnx"] = _onnx_logits(out / "model.onnx", context)
    quantized = all(candidate.get_choice(n).bits <= 8 for n in context.table.names)
    if quantized:
        calibration = (x for x, _ in _batches(context, "train"))
        quantize_onnx_int8(out / "model.onnx", out / "model.int8.onnx", calibration,
                           weighted_only=tokens)  # an LM: not its masked scores and norms
        logits["onnx_int8"] = _onnx_logits(out / "model.int8.onnx", context)
    # the searched bits and sparsity in standard ONNX: checked like every float format below
    compact = write_compact_onnx(shrunk, context.table, candidate, context.data.input_shape,
                                 out / COMPACT_FILE)
    logits["onnx_compact"] = _onnx_logits(out / COMPACT_FILE, context)
    output_error = {name: _output_error(values, logits["pytorch"])
                    for name, values in logits.items() if name in FLOAT_FORMATS}
    if task.kind == "classification":  # class predictions: accuracy and agreement, as always
        predictions = {name: values.argmax(axis=1) for name, values in logits.items()}
        labels = np.concatenate([y for _, y in _batches(context, "test")])
        accuracy = {name: _agreement(pred, labels) for name, pred in predictions.items()}
    else:  # the task's own metric of every format on the test split (mse, perplexity, yours)
        runs = {"pytorch": baked, "pytorch_shrunk": shrunk, "pt2": ScoredRun(program),
                "packed": packed_model, "onnx": onnx_module(out / "model.onnx")}
        if quantized:
            runs["onnx_int8"] = onnx_module(out / "model.int8.onnx")
        runs["onnx_compact"] = onnx_module(out / COMPACT_FILE)
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
    files["onnx_compact"] = out / COMPACT_FILE
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
        "finetune_loss": {"search": searched.get("finetune_loss"), "rebuilt": float(rebuilt_loss),
                          "torch_threads": threads},
        "reevaluation": {metric_key(task, key): searched[key] for key in REEVALUATION
                         if key in searched},
        metric_key(task, "test_accuracy"): {**accuracy,
                                            "dense": context.dense_metrics.get("test_accuracy")},
        "agreement_percent": agreement,
        "output_error": output_error,
        "size_kb": {"dense_predicted": dense_size, "predicted": footprint["size_kb"],
                    "search": searched.get("size_kb"),
                    "packed_file": files["model.packed"] / 1000,
                    "packed_header": packed_info.header_bytes / 1000,
                    "packed_payload": packed_info.payload_bytes / 1000,
                    "packed_buffers": packed_info.buffer_bytes / 1000,
                    "packed_graph": packed_info.graph_bytes / 1000},
        "files_bytes": files,
        "deploy": {"target": config.deploy, "file": DEPLOY_FILES[config.deploy],
                   "file_kb": files[DEPLOY_FILES[config.deploy]] / 1000,
                   "scored_kb": searched.get("size_kb")},
        "compact_onnx": compact.to_report(searched.get("size_kb") or footprint["size_kb"]),
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
              selection: Selection, runs_dir: Path, printer: Printer,
              uid: str = "") -> dict | None:
    from autosparse.tracking.mlflow_tracker import Tracker
    from autosparse.tracking.ui import resolve_tracking_uri

    uri = resolve_tracking_uri(context.config.tracking.uri, runs_dir)
    tracker = Tracker(tracking_uri=uri, experiment=context.config.tracking.experiment
                      or context.config.name, runs_dir=runs_dir)
    name = (request.registered_name or context.config.export.registered_name
            or f"{context.config.name}-trial-{selection.trial}")
    x = example_input(model, context.data.input_shape).numpy()  # token ids for an LM
    if not np.issubdtype(x.dtype, np.integer):
        x = np.zeros((1, *context.data.input_shape), dtype=np.float32)
    parent, child = tracker.find_search_runs(context.config.name, selection.trial,
                                             uid) or (None, None)
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
