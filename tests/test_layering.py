"""The house by stage: every module imports only from its own stage or an earlier one, with no
import circles (function-level and ``TYPE_CHECKING`` imports included), and no module is over
600 lines. The stage order is declared once, here and in ``autosparse/__init__.py``'s docstring.
"""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "autosparse"

# The pipeline, in order. ``tracking`` comes before ``search``: the runner drives MLflow and the
# terminal while its study runs (DESIGN.md's layout), and tracking needs nothing of the search.
STAGES = ("config", "workload", "space", "compress", "cost", "tracking", "search", "export", "cli")
# top-level modules that are not folders: the command line and the Python API are the last stage
TOP_LEVEL = {"cli": "cli", "api": "cli"}
# user-facing example code that configs name by import path: it may import no autosparse module
EXAMPLES = "examples"
MAX_LINES = 600

# Third-party packages a module must not import, so a config error stays fast and the pure parts
# stay pure (prefix of the path relative to autosparse/ -> forbidden top-level packages).
FORBIDDEN = {
    "config/": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "space/candidate.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "space/layers.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "space/structure.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "cost/estimate.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "cost/latency_table.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "tracking/pareto_page.py": {"numpy", "torch", "optuna", "deap", "mlflow", "pandas"},
    "space/search_space.py": {"torch", "mlflow"},
    "compress/footprint.py": {"torch", "mlflow"},
    "search/pareto.py": {"torch", "mlflow"},
    "search/samplers/": {"torch", "mlflow"},
    "workload/": {"optuna", "mlflow", "deap"},
    "space/": {"optuna", "mlflow", "deap"},
    "compress/": {"optuna", "mlflow", "deap"},
    "cost/report.py": {"torch", "optuna", "mlflow", "deap"},
    "cost/": {"optuna", "mlflow", "deap"},
    "search/sensitivity.py": {"optuna", "mlflow", "deap"},
    "search/selection.py": {"torch", "optuna", "mlflow", "deap"},
    "search/allocation/": {"torch", "optuna", "mlflow", "deap"},
    "search/reeval.py": {"mlflow", "deap"},
    "tracking/": {"optuna", "torch"},
    # the terminal and the first-generation check: light, so a config error stays fast
    "tracking/progress.py": {"numpy", "torch", "optuna", "mlflow", "deap"},
    "search/early_stop.py": {"numpy", "torch", "optuna", "mlflow", "deap", "pandas"},
    "compress/bitpack.py": {"optuna", "mlflow", "deap"},
    "export/packed.py": {"optuna", "mlflow", "deap"},
    "export/folder.py": {"optuna", "mlflow", "deap"},
    "export/input_spec.py": {"optuna", "mlflow", "deap"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage_of(module: str) -> str | None:
    """``autosparse.search.runner`` -> ``search``; the package itself -> None (the API face)."""
    parts = module.split(".")[1:]
    if not parts:
        return None
    return TOP_LEVEL.get(parts[0], parts[0])


MODULES = sorted(PACKAGE.rglob("*.py"))
NAMES = {module_name(p) for p in MODULES}


def internal_imports(path: Path, *, include_typing: bool = True) -> set[str]:
    """Every autosparse module ``path`` imports, anywhere in the file (relative ones resolved);
    without ``include_typing``, less those under ``if TYPE_CHECKING:`` (they never run)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set()
    if not include_typing:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped |= {id(sub) for sub in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            candidates = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in candidates:
            while name and name not in NAMES:
                name = name.rpartition(".")[0]
            if name.startswith("autosparse") and name != me:
                found.add(name)
    return found


def third_party(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names - {"autosparse"}


def ids(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


def test_every_module_belongs_to_a_declared_stage():
    for path in MODULES:
        stage = stage_of(module_name(path))
        assert stage is None or stage in STAGES or stage == EXAMPLES, (
            f"{ids(path)} is in no stage; put it in one of {', '.join(STAGES)}")


@pytest.mark.parametrize("path", MODULES, ids=ids)
def test_module_imports_only_its_own_stage_or_earlier(path):
    stage = stage_of(module_name(path))
    if stage is None:  # autosparse/__init__.py: the public face, imports lazily from any stage
        return
    for target in sorted(internal_imports(path)):
        other = stage_of(target)
        if stage == EXAMPLES:
            pytest.fail(f"{ids(path)} is example code and imports {target}")
        assert other is not None, f"{ids(path)} imports the package face {target}"
        assert other != EXAMPLES, f"{ids(path)} imports example code {target}"
        assert STAGES.index(other) <= STAGES.index(stage), (
            f"{ids(path)} ({stage}) imports {target} ({other}), a later stage: the order is "
            f"{' -> '.join(STAGES)}")


def test_no_import_circles():
    """Imports that run (``TYPE_CHECKING`` ones are type names, checked by the stage order)."""
    graph = {module_name(p): internal_imports(p, include_typing=False) for p in MODULES}
    faces = {module_name(p) for p in MODULES if p.name == "__init__.py"}
    graph = {m: {t for t in ts if t not in faces} for m, ts in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "import circles: " + "; ".join(" <-> ".join(c) for c in circles)


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    """The rule itself can fail: a config module importing the search stage is caught."""
    bad = PACKAGE / "config" / "schema.py"
    text = bad.read_text(encoding="utf-8") + "\n\ndef _late():\n    from ..search import runner\n"
    fake = tmp_path / "autosparse" / "config" / "schema.py"
    fake.parent.mkdir(parents=True)
    fake.write_text(text, encoding="utf-8")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "autosparse")
    with pytest.raises(AssertionError, match=r"config/schema.py \(config\) imports "
                                             r"autosparse\.search(\.runner)? \(search\)"):
        test_module_imports_only_its_own_stage_or_earlier(fake)


@pytest.mark.parametrize("path", MODULES, ids=ids)
def test_module_respects_its_third_party_limits(path):
    relative = ids(path)
    imported = third_party(path)
    for prefix, forbidden in FORBIDDEN.items():
        if relative.startswith(prefix):
            assert not imported & forbidden, f"{relative} imports {sorted(imported & forbidden)}"
    if not relative.startswith("tracking/"):
        assert "mlflow" not in imported, f"only tracking/ may import mlflow, not {relative}"


@pytest.mark.parametrize("path", MODULES, ids=ids)
def test_no_module_over_600_lines(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{ids(path)} has {lines} lines (at most {MAX_LINES}): split it"


def test_every_stage_says_what_it_owns_and_may_import():
    for stage in STAGES[:-1]:
        doc = ast.get_docstring(ast.parse((PACKAGE / stage / "__init__.py").read_text()))
        assert doc and "May import" in doc, f"autosparse/{stage}/__init__.py needs its docstring"
