"""The config reference, generated from the pydantic schema at build time.

``render()`` walks ``SearchConfig.model_fields`` recursively (whatever module each section's
model lives in) and writes one table per section: every field's dotted name, type, default,
allowed values and description. The description is the field's own (``Field(description=...)``)
or, for a field that has none, the entry under its dotted name in ``EXTRA_DESCRIPTIONS`` below.
MkDocs calls ``on_files`` (``hooks:`` in mkdocs.yml), which adds the page to the build as
``reference/config.md`` and the benchmarks' committed figures (``benchmarks/results/**.png``) as
``figures/...``; ``on_page_markdown`` puts the stages' docstrings on the architecture page.
Nothing is written into docs/. ``tests/test_docs.py`` checks that every
field appears, and that every field has a description.

Run it alone to print the page: ``.venv/bin/python docs/hooks/config_reference.py``.
"""

from __future__ import annotations

import enum
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

PAGE = "reference/config.md"

# Descriptions of the fields whose schema gives none (key: the dotted name as in the page;
# ``[]`` marks a list item). A field with a description of its own in the schema wins.
EXTRA_DESCRIPTIONS: dict[str, str] = {
    "name": "names the study (runs/<name>/) and the MLflow experiment",
    "seed": "sampler seed: the same seed and config give the same trials (one worker)",
    "model": "the dense model: exactly one of `builtin` or `factory`",
    "model.builtin": "a built-in model, trained from random initialisation on first use and "
                     "cached in runs/dense/",
    "model.factory": "'package.module:function' returning an nn.Module (a module in the working "
                     "directory works too)",
    "model.kwargs": "keyword arguments of the factory (or of a built-in)",
    "model.checkpoint": "a state_dict of the TRAINED model, loaded with weights_only=True "
                        "(`torch.save(model.state_dict(), path)`)",
    "data": "where the data comes from; the search scores on `validation`, `test` is for "
            "final reports",
    "data.source": "a built-in source; `factory` replaces it",
    "data.x_key": "npz array of the inputs (or fixed splits x_train / x_val / x_test)",
    "data.y_key": "npz array of the targets (or y_train / y_val / y_test)",
    "data.layout": "axis order of the inputs as stored; flat: one vector per sample",
    "data.mean": "per-channel mean for normalisation; computed on the train split when absent",
    "data.std": "per-channel std for normalisation; computed on the train split when absent",
    "data.grayscale": "image folders: read images as one channel",
    "data.split": "train / validation / test: three fractions (stratified) or three index "
                  "ranges [start, end) into one array; fixed splits of the source win",
    "data.split.train": "fraction, or index range [start, end)",
    "data.split.validation": "fraction, or index range [start, end)",
    "data.split.test": "fraction, or index range [start, end)",
    "data.batch_size": "evaluation batches (validation, test, export); fine-tuning uses "
                       "finetune.batch_size",
    "data.split_seed": "seed of the stratified split",
    "task": "what the model is for: loss, metric and its direction (see Your own model)",
    "task.kind": "the task; sets the default loss, distillation and metric",
    "task.loss_kwargs": "keyword arguments of `task.loss`",
    "task.metric_kwargs": "keyword arguments of a `task.metric` function",
    "space": "which layers are searched and what each may become",
    "space.default": "choices for every searched layer no rule matches",
    "space.default.sparsity": "fractions of weights removed, a list or {low, high, step}",
    "space.default.sparsity.low": "first sparsity of the range",
    "space.default.sparsity.high": "last sparsity of the range",
    "space.default.sparsity.step": "step between sparsities",
    "space.default.patterns": "unstructured, channel, dense, or any N:M with N < M (e.g. 2:4)",
    "space.default.bits": "weight bit-widths: 2..16 integer, 32 = float32 (not quantized)",
    "space.default.criterion": "magnitude, or taylor (|w·∂L/∂w| over a few batches)",
    "space.rules": "per-layer rules; the first matching rule wins, unset fields inherit from "
                   "`space.default`",
    "space.rules[].layers": "names or regexes (full match) of the layers the rule applies to",
    "space.rules[].sparsity": "as `space.default.sparsity`, for the matched layers",
    "space.rules[].sparsity.low": "first sparsity of the range",
    "space.rules[].sparsity.high": "last sparsity of the range",
    "space.rules[].sparsity.step": "step between sparsities",
    "space.rules[].patterns": "as `space.default.patterns`, for the matched layers",
    "space.rules[].bits": "as `space.default.bits`, for the matched layers",
    "space.rules[].criterion": "as `space.default.criterion`, for the matched layers",
    "strategy": "the search strategy and its settings (see Strategies)",
    "strategy.name": "ga (NSGA-II), bo (TPE/GP), knapsack (budgeted allocation), random, "
                     "grid-uniform, grid-global (the by-hand recipe)",
    "strategy.crossover_prob": "GA: probability of crossover",
    "strategy.bo_kind": "BO: tpe (multivariate TPE) or gp (Optuna's GP sampler, slow)",
    "sensitivity": "per-layer sensitivity (knapsack always; GA/BO with use_sensitivity)",
    "sensitivity.batch_size": "batch size of the sensitivity passes",
    "budget": "when the search stops: any combination stops at the first reached",
    "objectives": "the task metric (accuracy, its own name, or 'metric') and at least one of "
                  "size, macs, bops, latency, energy",
    "constraints": "feasible when true, written as 'metric <= number' or 'metric >= number'; "
                   "infeasible candidates never make the front",
    "constraints[].metric": "the task metric (accuracy or its name), accuracy_drop "
                            "(metric_drop), size_kb, compression, macs, bops, latency_ms, "
                            "energy_uj",
    "constraints[].op": "<= or >=",
    "constraints[].bound": "the bound, in the metric's units",
    "finetune": "the fast fine-tune of every candidate, distilled from the dense model",
    "finetune.steps": "optimizer steps per candidate",
    "finetune.batch_size": "fine-tune batch size",
    "finetune.lr": "learning rate (Adam)",
    "finetune.temperature": "distillation temperature T",
    "finetune.seed": "fine-tune seed (also seeds the train loader's shuffling)",
    "fidelity": "with budget.finetune_steps: a short fine-tune first, the full one only if "
                "promising",
    "storage_heartbeat": "database storages: a trial silent this long had its worker die",
    "tracking": "MLflow tracking",
    "export": "defaults of `autosparse export` (its flags win)",
}


@dataclass(frozen=True)
class FieldRow:
    path: str          # dotted name, "[]" for list items
    type: str
    default: str
    allowed: str
    description: str


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Pydantic models inside a type (``X | None``, ``list[X]``, ``float | X``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for model in _models_in(arg):
            if model not in found:
                found.append(model)
    return found


def _is_list_of_models(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return any(_models_in(arg) for arg in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return any(_is_list_of_models(arg) for arg in typing.get_args(annotation))
    return False


def _type_name(annotation: Any) -> str:
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "section"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        kinds = sorted({type(a).__name__ for a in args})
        return " | ".join("string" if k == "str" else k for k in kinds)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        if origin is tuple and args and all(a is not Ellipsis for a in args):
            return "[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type):
        return {"str": "string", "int": "int", "float": "float", "bool": "bool"}.get(
            annotation.__name__, annotation.__name__)
    return str(annotation).replace("typing.", "")


def _literals(annotation: Any) -> list[Any]:
    if typing.get_origin(annotation) is Literal:
        return list(typing.get_args(annotation))
    values: list[Any] = []
    for arg in typing.get_args(annotation):
        values += [v for v in _literals(arg) if v not in values]
    return values


def _bounds(field: Any) -> list[str]:
    out = []
    for meta in field.metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {value:g}" if isinstance(value, (int, float)) else
                           f"{sign} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            out.append(f"matches `{pattern}`")
    return out


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        try:
            value = field.default_factory()
        except TypeError:
            value = field.default_factory({})
    else:
        value = field.default
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {v}" for k, v in value.items()) + "}"
    return f"{value}"


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and ``<`` outside code spans (``runs/<name>/`` is no tag)."""
    parts = str(text).replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def walk(model: type[BaseModel], prefix: str = "") -> list[FieldRow]:
    """Every field of ``model`` and of the models inside it, depth first, in schema order."""
    rows: list[FieldRow] = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        annotation = field.annotation
        allowed = [", ".join(f"`{v}`" for v in _literals(annotation))] if _literals(annotation) \
            else []
        allowed += _bounds(field)
        description = field.description or EXTRA_DESCRIPTIONS.get(path, "")
        rows.append(FieldRow(path, _type_name(annotation), _default(field),
                             "; ".join(a for a in allowed if a), description))
        for sub in _models_in(annotation):
            child = f"{path}[]." if _is_list_of_models(annotation) else f"{path}."
            rows += walk(sub, child)
    return rows


def field_rows() -> list[FieldRow]:
    from autosparse.config.schema import SearchConfig

    return walk(SearchConfig)


def render() -> str:
    rows = field_rows()
    lines = [
        "# Config reference",
        "",
        "<!-- generated by docs/hooks/config_reference.py from the pydantic schema at build "
        "time: do not edit -->",
        "",
        "Every field of a search config, generated from the schema the code validates with "
        "(`autosparse.config.schema.SearchConfig`), so it cannot drift from it. Only `name` "
        "and `model` are required; a section left out takes its defaults. A list item is "
        "written `[]` (`space.rules[].layers`). See [Writing a config](../configuration.md) "
        "for a commented example.",
        "",
    ]
    top_level = [r for r in rows if "." not in r.path]
    sections = ["(top level)"] + [r.path for r in top_level if any(
        x.path.startswith(r.path + ".") or x.path.startswith(r.path + "[].") for x in rows)]
    for section in sections:
        if section == "(top level)":
            chosen = top_level
            lines += ["## Top level", ""]
        else:
            chosen = [r for r in rows if r.path.startswith(section + ".")
                      or r.path.startswith(section + "[].")]
            head = next(r for r in rows if r.path == section)
            lines += [f"## `{section}`", ""]
            if head.description:
                lines += [head.description[0].upper() + head.description[1:] + ".", ""]
        lines += ["| field | type | default | allowed | description |",
                  "|---|---|---|---|---|"]
        for r in chosen:
            lines.append(f"| `{r.path}` | {_cell(r.type)} | `{_cell(r.default)}` | "
                         f"{_cell(r.allowed)} | {_cell(r.description)} |")
        lines.append("")
    return "\n".join(lines)


STAGES = ("config", "workload", "space", "compress", "cost", "tracking", "search", "export")
STAGE_MARKER = "<!-- autosparse:stage-docstrings -->"


def stage_docstrings() -> str:
    """Each stage's ``__init__`` docstring (read from the source, nothing imported), as Markdown."""
    import ast
    from pathlib import Path

    import autosparse

    root = Path(autosparse.__file__).parent
    parts = []
    for stage in STAGES:
        doc = ast.get_docstring(ast.parse((root / stage / "__init__.py").read_text("utf-8"))) or ""
        text = doc.replace("``", "`")
        parts += [f"### `autosparse.{stage}`", "", text, ""]
    return "\n".join(parts)


def on_page_markdown(markdown, page, config, files):  # MkDocs hook: the stage docstrings
    if STAGE_MARKER in markdown:
        markdown = markdown.replace(STAGE_MARKER, stage_docstrings())
    return markdown


def on_files(files, config):  # MkDocs hook: add the generated page to the build
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    # the benchmarks' committed figures, served from benchmarks/results/ (no copies in docs/)
    from pathlib import Path

    results = Path(config["config_file_path"]).parent / "benchmarks" / "results"
    for png in sorted(results.rglob("*.png")):
        uri = "figures/" + png.relative_to(results).as_posix()
        files.append(File.generated(config, uri, abs_src_path=str(png)))
    return files


if __name__ == "__main__":
    print(render())
