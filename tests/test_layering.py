"""The import boundaries of DESIGN.md, checked by parsing every module's imports."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autosparse"

PURE = {"config", "candidate", "objectives", "layers", "validation", "hardware", "cost",
        "latency_table",
        "structure", "pareto_page"}
SEARCH_SIDE = {"space", "footprint", "pareto", "samplers"}
MODEL_SIDE = {"data", "models", "discovery", "dense", "compress", "finetune", "evaluate",
              "sensitivity", "graph", "storage", "measured_latency", "devices", "data_factory",
              "task", "task_builtins"}
FORBIDDEN = {
    **{m: {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"} for m in PURE},
    **{m: {"torch", "mlflow"} for m in SEARCH_SIDE},
    **{m: {"optuna", "mlflow", "deap"} for m in MODEL_SIDE},
    "cost_report": {"torch", "optuna", "mlflow", "deap"},
    "calibration": {"optuna", "mlflow", "deap"},
    "export": {"optuna", "mlflow", "deap"},
    "selection": {"torch", "optuna", "mlflow", "deap"},
    "allocation": {"torch", "optuna", "mlflow", "deap"},
    "reeval": {"mlflow", "deap"},
    # the terminal and the first-generation check: light, so a config error stays fast
    "progress": {"numpy", "torch", "optuna", "mlflow", "deap"},
    "early_stop": {"numpy", "torch", "optuna", "mlflow", "deap", "pandas"},
}


def imports_of(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_module_respects_its_layer(path):
    relative = path.relative_to(PACKAGE)
    layer = relative.parts[0].removesuffix(".py")
    imported = imports_of(path)
    assert not imported & FORBIDDEN.get(layer, set()), f"{relative} imports {imported & FORBIDDEN[layer]}"
    if layer != "tracking":
        assert "mlflow" not in imported, f"only tracking.py may import mlflow, not {relative}"
