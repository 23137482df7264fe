"""The documentation runs: README.md and docs/*.md, checked as a user would use them.

- the site builds with ``mkdocs build --strict`` (warnings are errors);
- every ```python block runs, every ```bash command runs (or is checked, or is allow-listed
  below with its reason), every ```yaml block is a valid piece of a config;
- the generated config reference lists every field of ``SearchConfig``, recursively.

Where they run: a scratch project in a temporary folder laid out like the repository root, whose
``search_spaces/quickstart.yaml`` is the quickstart made tiny (``TINY``) and in which that
config has been searched once (``autosparse search search_spaces/quickstart.yaml``, shared by the
whole session). A documented command or snippet therefore runs unchanged, apart from the
``DOC_SUBSTITUTIONS`` below. The rules are documented in docs/development.md.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

# The tiny search every command and snippet runs against: the shipped quickstart with these
# settings changed.
TINY = {"budget": {"trials": 3}, "finetune": {"steps": 10}}

# Each documented command is changed by these replacements (in order) before it runs: the
# venv's programs by their absolute paths (the scratch project has no .venv of its own).
DOC_SUBSTITUTIONS: list[tuple[str, str]] = [
    (".venv/bin/autosparse", str(BIN / "autosparse")),
    (".venv/bin/python", sys.executable),
    (".venv/bin/mkdocs", str(BIN / "mkdocs")),
]

# Commands of ```bash blocks that are not run, each with the reason. A command the test can
# neither run nor check must be listed here; an entry no page holds any more is an error.
NOT_RUN: dict[str, str] = {
    "autosparse search my-llm.yaml":
        "needs a language-model folder; the page's Python block and "
        "tests/search/test_oneshot_search.py run the same search and export",
    "autosparse export my-llm.yaml --knee":
        "needs a language-model folder; the page's Python block and "
        "tests/search/test_oneshot_search.py run the same search and export",
    ".venv/bin/autosparse ui":
        "a server that runs until stopped; tests/tracking/test_browser.py starts it and drives it in "
        "headless Chromium",
    ".venv/bin/autosparse calibrate":
        "times ~160 ONNX variants (over a minute); tests/cost/test_calibrate_cli.py runs it with "
        "small settings",
    ".venv/bin/autosparse calibrate --config search_spaces/digits-resnet18.yaml":
        "trains and times ResNet-18 variants (minutes); tests/cost/test_latency_table_model.py "
        "builds tables on small models",
    ".venv/bin/autosparse calibrate --config search_spaces/quickstart.yaml":
        "times 35 ONNX models (over 10 s on 2 busy cores); tests/cost/test_latency_table_model.py "
        "builds tables on small models",
    "autosparse search search.yaml --workers 2":
        "one of several machines sharing a PostgreSQL study; tests/search/test_postgres_storage.py "
        "runs this on a real server",
    "autosparse search search.yaml":
        "one of several machines sharing a PostgreSQL study; tests/search/test_postgres_storage.py "
        "runs this on a real server",
    'initdb -D /srv/pg && pg_ctl -D /srv/pg -o "-h 0.0.0.0 -p 5432" -l /srv/pg/log start':
        "sets up a database server for several machines; scripts/postgres.sh does the same for "
        "the tests",
    "createdb -h db-host -U postgres autosparse": "needs the database host of a real deployment",
    "createdb -h db-host -U postgres mlflow": "needs the database host of a real deployment",
    "mlflow server --backend-store-uri postgresql://postgres:PW@db-host:5432/mlflow "
    "--artifacts-destination /srv/mlflow-artifacts --host 0.0.0.0 --port 5000":
        "a tracking server for several machines; needs the database host of a real deployment",
    "ssh -N -L 5000:127.0.0.1:5000 user@remote-machine":
        "a tunnel to another machine; tests/tracking/test_browser.py opens the UI on 127.0.0.1",
    ".venv/bin/mkdocs serve": "a server that runs until stopped; test_docs_build_strictly builds "
                              "the same site",
    ".venv/bin/mkdocs build --strict --site-dir /tmp/autosparse-site":
        "test_docs_build_strictly runs the same build into a temporary folder",
    ".venv/bin/python -m pytest -q -p no:cacheprovider tests/test_docs.py": "this very file",
}
# Benchmarks take minutes to hours: their commands are documented as they were run.
NOT_RUN_PREFIXES: dict[str, str] = {
    "python benchmarks/": "a benchmark (minutes to an hour); its output is committed under "
                          "benchmarks/results/",
    ".venv/bin/python benchmarks/": "a benchmark (minutes to an hour); its output is committed "
                                    "under benchmarks/results/",
    "OMP_NUM_THREADS=1 python benchmarks/": "a benchmark; its output is committed under "
                                            "benchmarks/results/",
}

# A ```python block preceded by this comment is not run; the reason is reported as a skip.
NOT_RUN_MARK = re.compile(r"<!--\s*docs-test:\s*not-run:\s*(.+?)\s*-->")


@dataclass(frozen=True)
class Block:
    path: Path
    line: int       # of the opening fence
    lang: str
    text: str
    not_run: str | None  # reason, from a NOT_RUN_MARK right before the fence

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def blocks(lang: str) -> list[Block]:
    found = []
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        i = 0
        while i < len(lines):
            match = re.match(r"^(\s*)```(\w+)?\s*$", lines[i])
            if not match:
                i += 1
                continue
            indent, kind = len(match[1]), match[2] or ""
            start, body = i, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
                i += 1
            i += 1
            if kind == lang:
                before = next((l for l in reversed(lines[:start]) if l.strip()), "")
                mark = NOT_RUN_MARK.search(before)
                found.append(Block(path, start + 1, kind, "\n".join(body) + "\n",
                                   mark[1] if mark else None))
    return found


def bash_commands() -> list[tuple[str, str]]:
    """(where, command) of every command in ```bash blocks: continuations joined, comments and
    prompts dropped."""
    commands = []
    for block in blocks("bash"):
        pending = ""
        for offset, raw in enumerate(block.text.splitlines(), start=1):
            line = raw.strip()
            if not pending and (not line or line.startswith("#")):
                continue
            if line.startswith("$ "):
                line = line[2:]
            if line.endswith("\\"):
                pending += line[:-1].strip() + " "
                continue
            command = (pending + _strip_comment(line)).strip()
            pending = ""
            if command:
                commands.append((f"{block.where}+{offset}", command))
    return commands


def _strip_comment(line: str) -> str:
    """The line without a trailing ``# comment`` (a ``#`` after a blank, outside quotes)."""
    quote = None
    for i, char in enumerate(line):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line


def substitute(command: str) -> str:
    for old, new in DOC_SUBSTITUTIONS:
        command = command.replace(old, new)
    if command.startswith("autosparse "):
        command = str(BIN / "autosparse") + command[len("autosparse"):]
    return command


def not_run_reason(command: str) -> str | None:
    if command in NOT_RUN:
        return NOT_RUN[command]
    return next((reason for prefix, reason in NOT_RUN_PREFIXES.items()
                 if command.startswith(prefix)), None)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["NO_MKDOCS_2_WARNING"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(command: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=timeout)


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


# What the scratch project has run before any command or snippet: the quickstart's search, and
# the export the snippets of docs/export.md load.
FIXTURE_COMMANDS = [
    ".venv/bin/autosparse search search_spaces/quickstart.yaml",
    ".venv/bin/autosparse export search_spaces/quickstart.yaml --trial 2",
]
_RAN: dict[str, subprocess.CompletedProcess] = {}


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """The scratch project: the tiny quickstart searched once, as the docs' first command."""
    root = tmp_path_factory.mktemp("docs-project")
    (root / "search_spaces").mkdir()
    shipped = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    (root / "search_spaces" / "quickstart.yaml").write_text(yaml.safe_dump(_merge(shipped, TINY)))
    (root / "scripts").symlink_to(REPO / "scripts")
    dense = REPO / "runs" / "dense"
    if dense.is_dir():  # a cache only: without it the dense model is trained (about 10 s)
        shutil.copytree(dense, root / "runs" / "dense")
    for command in FIXTURE_COMMANDS:  # as documented; the same command in a page is not rerun
        substituted = substitute(command)
        result = _RAN[substituted] = _run(substituted, root)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root


# ---------------------------------------------------------------------------------- the site


def test_docs_build_strictly(tmp_path):
    """``mkdocs build --strict`` (a broken link, a missing nav page, a bad anchor: an error)."""
    result = subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--quiet",
                             "--site-dir", str(tmp_path / "site")], cwd=REPO, env=_env(),
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    page = (tmp_path / "site" / "reference" / "config" / "index.html").read_text()
    assert "space.rules[].layers" in page
    assert (tmp_path / "site" / "figures" / "search_quality.png").is_file()


def _reference():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "docs" / "hooks" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _schema_paths(schema: dict, node: dict, prefix: str = "") -> set[str]:
    """Every field's dotted name, from pydantic's JSON schema (independent of the hook's walk)."""
    paths: set[str] = set()
    for name, prop in node.get("properties", {}).items():
        path = prefix + name
        paths.add(path)
        for ref, is_list in _refs(prop):
            target = schema["$defs"][ref.rsplit("/", 1)[1]]
            paths |= _schema_paths(schema, target, path + ("[]." if is_list else "."))
    return paths


def _refs(prop: dict, in_list: bool = False):
    if "$ref" in prop:
        yield prop["$ref"], in_list
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in prop.get(key, []):
            yield from _refs(sub, in_list)
    if "items" in prop and isinstance(prop["items"], dict):
        yield from _refs(prop["items"], True)


def test_config_reference_lists_every_field():
    """Every field of SearchConfig, recursively, is a row of the generated page, with a
    description (its own in the schema, or EXTRA_DESCRIPTIONS in docs/hooks/config_reference.py);
    no EXTRA_DESCRIPTIONS entry names a field that does not exist."""
    from autosparse.config.schema import SearchConfig

    reference = _reference()
    page = reference.render()
    expected = _schema_paths(SearchConfig.model_json_schema(),
                             SearchConfig.model_json_schema())
    missing = sorted(p for p in expected if f"| `{p}` |" not in page)
    assert not missing, f"fields missing from the config reference: {missing}"
    rows = {row.path: row for row in reference.field_rows()}
    assert set(rows) >= expected
    undescribed = sorted(p for p, row in rows.items() if not row.description)
    assert not undescribed, (
        f"fields without a description: {undescribed}; give them Field(description=...) in the "
        "schema or an entry in EXTRA_DESCRIPTIONS (docs/hooks/config_reference.py)")
    stale = sorted(set(reference.EXTRA_DESCRIPTIONS) - set(rows))
    assert not stale, f"EXTRA_DESCRIPTIONS names fields that do not exist: {stale}"


# --------------------------------------------------------------------------------- snippets


@pytest.mark.parametrize("block", blocks("yaml"), ids=lambda b: b.where)
def test_yaml_block_is_config(block):
    """Every ```yaml block is a config or a valid piece of one (over a minimal config)."""
    from autosparse.config.schema import parse_config

    data = yaml.safe_load(block.text)
    assert isinstance(data, dict), f"{block.where}: not a YAML mapping"
    base = {"name": "docs", "model": {"builtin": "digits-cnn"}}
    if "model" in data:
        base.pop("model")
    parse_config({**base, **data}, block.where)


@pytest.mark.integration
@pytest.mark.parametrize("block", blocks("python"), ids=lambda b: b.where)
def test_python_block_runs(block, project, monkeypatch):
    """Every ```python block runs in the scratch project after the tiny search."""
    if block.not_run:
        pytest.skip(f"{block.where}: {block.not_run}")
    # a fresh interpreter, as a user's notebook or script is: a block's MLflow or torch global
    # state must not leak into the tests that run after it in this process
    result = subprocess.run([sys.executable, "-c", block.text], cwd=project, env=_env(),
                            capture_output=True, text=True)
    assert result.returncode == 0, f"{block.where}:\n{result.stderr[-3000:]}"


COMMANDS = bash_commands()


def test_not_run_entries_are_documented():
    """No allow-list entry outlives the command it excuses."""
    documented = {command for _, command in COMMANDS}
    stale = sorted(c for c in NOT_RUN if c not in documented)
    assert not stale, f"NOT_RUN entries no page documents any more: {stale}"


@pytest.mark.integration
@pytest.mark.parametrize("where,command", COMMANDS, ids=[w for w, _ in COMMANDS])
def test_bash_command(where, command, project):
    """``bash scripts/...``: the script exists and parses (``bash -n``); ``autosparse ...``:
    runs for real in the scratch project and exits 0; anything else is in NOT_RUN."""
    if command.startswith("bash scripts/") or command.startswith("bash .ci/"):
        script = REPO / shlex.split(command)[1]
        assert script.is_file(), f"{where}: {script} does not exist"
        check = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert check.returncode == 0, f"{where}: {check.stderr}"
        return
    reason = not_run_reason(command)
    if reason is not None:
        pytest.skip(f"not run: {reason}")
    runnable = command.startswith(("autosparse ", ".venv/bin/autosparse "))
    assert runnable, (f"{where}: {command!r} is neither run nor checked; make it an autosparse "
                      "or `bash scripts/...` command, or add it to NOT_RUN with the reason")
    substituted = substitute(command)
    if substituted not in _RAN:  # the same command on two pages runs once
        _RAN[substituted] = _run(substituted, project)
    result = _RAN[substituted]
    assert result.returncode == 0, (f"{where}: {command}\n" + result.stdout[-3000:]
                                    + result.stderr[-3000:])
