"""``report.md``: an export's report.json written out for a reader (selection, validation and
test figures per format, the layers' choices, the channel groups removed, sizes and latency,
how to reproduce the test figures).

Split out of ``exporter``: it reads only the report dictionary, so a report can be rendered
again without exporting anything.
"""

from __future__ import annotations

import math

from autosparse.cost.compact_onnx import compact_markdown
from autosparse.export.input_spec import input_markdown, sizes_markdown
from autosparse.export.latency import latency_markdown
from autosparse.space.candidate import FLOAT_BITS


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


def reproduce_markdown(report: dict) -> list[str]:
    """report.md's short section: how to reproduce, and the split and preprocessing used."""
    section = report.get("reproduce")
    if not section:
        return []
    kind = report["metric"]["kind"]
    name = "accuracy" if kind == "classification" else report["metric"]["name"]
    needs = ", ".join(section["requires"])
    return ["", "## Reproduce the test figures", "",
            f"In this folder, `{section['command']}` rebuilds the test split from the raw data "
            f"and recomputes the test {name} of every model file, printing it beside the "
            f"report's figure; it exits 1 when one differs by more than "
            f"{section['tolerance']:.3g} {section['tolerance_unit']}. It needs {needs} "
            f"(`model.packed` also needs {section['packed_requires']}).", "",
            f"- split: {section['split']}",
            f"- preprocessing: {section['preprocessing']}", ""]


SPEED_UP = 0.95  # a file at most this share of the dense model's latency counts as faster


def speed_line(latency_ms: dict[str, float]) -> str:
    """One line for the top of the report: which file runs faster than the dense model on this
    CPU, or that none does and what would make the search buy speed."""
    dense = latency_ms.get("dense_fp32")
    files = {k: v for k, v in latency_ms.items() if k != "dense_fp32" and v}
    if not dense or not files:
        return ""
    best = min(files, key=files.get)
    if files[best] <= SPEED_UP * dense:
        return (f"Speed on this CPU: {best} runs {dense / files[best]:.2f}x faster than the "
                f"dense model ({files[best]:.4f} vs {dense:.4f} ms; onnxruntime, 1 thread, "
                "batch 1).")
    return (f"Speed on this CPU: no exported file runs faster than the dense model (best: "
            f"{best}, {files[best]:.4f} vs {dense:.4f} ms). Sparsity and low bits make the "
            "files smaller, but onnxruntime runs them as dense float. For speed, search with "
            "`latency` among the objectives and `hardware: measure`, and allow the `channel` "
            "pattern: it removes whole channels.")


def deploy_line(report: dict) -> str:
    """Which file the search scored (``deploy:``) and its size here against the score."""
    deploy = report.get("deploy")
    if not deploy:
        return ""
    line = (f"Deploy target: {deploy['target']}: `{deploy['file']}` is "
            f"{deploy['file_kb']:.2f} kB")
    scored, size = deploy.get("scored_kb"), report.get("size_kb") or {}
    if deploy["target"] == "packed" and scored and "packed_payload" in size:
        return (line + f"; its payload, {size['packed_payload']:.2f} kB, is what the search "
                f"scored ({scored:.2f} kB); the header ({size['packed_header']:.2f} kB), the "
                f"graph ({size.get('packed_graph', 0):.2f} kB) and batch-norm statistics come "
                "on top (deploy: onnx scores a whole file).")
    if scored:
        line += (f", the search scored {scored:.2f} kB ({deploy['file_kb'] / scored:.3f}x)"
                 + ("; its validation metric is the file's own (int8 activations)"
                    if deploy["target"] == "onnx-int8" else ""))
    return line + "."


def report_markdown(report: dict) -> str:
    name, key, fmt, unit = _metric_of(report)
    acc, size = report[f"test_{key}"], report["size_kb"]
    speed = speed_line(report.get("latency_ms_measured", {}))
    deploy = deploy_line(report)
    lines = [f"# Export of {report['search']} trial {report['trial']}", "",
             f"Selected: {report['selection']}. Fine-tune steps: {report['finetune_steps']}.", "",
             *([deploy, ""] if deploy else []), *([speed, ""] if speed else [])]
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
    lines += compact_markdown(report)  # model.compact.onnx (compact_onnx.py)
    lines += reproduce_markdown(report)
    return "\n".join(lines) + "\n"
