"""The MLflow window in a real browser: a tiny real search, `autosparse ui`, headless Chromium.

Checks what a user sees, not what the API returns: the runs table at the URL `autosparse ui`
prints lists the search's parent run and, expanded, one child per trial with its figures in the
name, the front marked with ★ and the metric columns of autosparse's shared view; the
``pareto.html`` artifact renders (its SVG drawn inside MLflow's sandboxed iframe) and the seconds
it took are printed. Debian's ``chromium`` is needed: ``.ci/run`` installs it when missing
(``AUTOSPARSE_INSTALL_CHROMIUM=1`` through ``scripts/chromium.sh``); without it and without the
switch the test is skipped with that reason. With ``AUTOSPARSE_SCREENSHOTS=<dir>`` it also
writes the screenshots the README shows (``docs/``).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from chromium import INSTALL_SWITCH, Browser, find_chromium

pytestmark = pytest.mark.integration
CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get(INSTALL_SWITCH) == "1":
    raise RuntimeError(f"{INSTALL_SWITCH}=1 but no chromium was found: "
                       f"{os.environ.get('AUTOSPARSE_CHROMIUM_SKIP_REASON', 'not installed')}")
if CHROMIUM is None:
    pytest.skip(os.environ.get("AUTOSPARSE_CHROMIUM_SKIP_REASON")
                or "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it "
                   f"as root with {INSTALL_SWITCH}=1)", allow_module_level=True)

CONFIG = {
    "name": "window",
    "model": {"builtin": "digits-cnn", "train_epochs": 4},
    "space": {"default": {"sparsity": [0.0, 0.5, 0.8], "patterns": ["unstructured", "channel"],
                          "bits": [4, 8, 32]}},
    "strategy": {"name": "ga", "population_size": 4},
    "budget": {"trials": 5},
    "constraints": ["accuracy_drop <= 30"],
    "finetune": {"steps": 8, "reeval_seeds": 0},
}
SHOTS = os.environ.get("AUTOSPARSE_SCREENSHOTS", "")
# a child row's name: "t3 87.2% 9.96x", "★ t1 86.6% 14.4x"
CHILD = re.compile(r"^(★ )?t\d+ (\d+\.\d%|failed|interrupted|screened)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_http(url: str, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        assert process.poll() is None, "autosparse ui exited"
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:.0f} s"
        time.sleep(0.3)


@pytest.fixture(scope="module")
def search(tmp_path_factory, one_thread):
    from autosparse.search.runner import run_search

    runs_dir = tmp_path_factory.mktemp("window")
    config = runs_dir / "window.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    outcome = run_search(config, runs_dir=runs_dir, printer=lambda line: None)
    return runs_dir, outcome


@pytest.fixture(scope="module")
def ui(search):
    """`autosparse ui` on a free port: (runs-table URL it printed, base URL)."""
    runs_dir, _ = search
    port = _free_port()
    env = {**os.environ}
    env.pop("MLFLOW_TRACKING_URI", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "autosparse.cli", "--runs-dir", str(runs_dir), "ui", "--port",
         str(port)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        url = lines[1].split(": ", 1)[-1].strip()
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/"), lines
        _wait_http(f"http://127.0.0.1:{port}/health", process, 90)
        yield url, f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    with Browser(CHROMIUM, width=1500, height=900) as page:
        yield page


_ROW_NAMES = ("[...document.querySelectorAll('[role=row] a, .ag-row a')]"
              ".map(a => a.innerText.trim()).filter(t => t)")
_CLICK = ("(sel => {{ const e = document.querySelector(sel); if (!e) return false; "
          "e.click(); return true; }})({!r})")


def _close_assistant(page: Browser) -> None:
    """MLflow 3.17 opens its assistant panel beside the table; close it (screenshots)."""
    page.evaluate(_CLICK.format('[data-component-id="mlflow.assistant.chat_panel.close"]'))


def test_runs_table_shows_parent_children_front_and_metric_columns(search, ui, browser):
    _, outcome = search
    url, _ = ui
    assert url.endswith("/runs?viewStateShareKey=autosparse")  # autosparse's view, columns on
    browser.open(url)
    browser.wait_for(f"{_ROW_NAMES}.includes('window')", timeout=60)
    # children are folded under the parent: unfold them as a user would (the row's + button)
    browser.evaluate(_CLICK.format('button[data-component-id*="runnamecellrenderer"]'))
    names, _ = browser.wait_for(
        f"(n => n.length >= {1 + len(outcome.trials)} && n)({_ROW_NAMES})", timeout=30)
    children = [n for n in names if CHILD.match(n)]
    assert "window" in names and len(children) == len(outcome.trials), names
    front = [n for n in children if n.startswith("★ ")]
    assert len(front) == len(outcome.front) >= 1, names
    _close_assistant(browser)
    # the first metric columns of the view (the grid only renders the columns in sight)
    headers, _ = browser.wait_for("(t => t.includes('compression') && t)"
                                  "(document.body.innerText)", timeout=10)
    for column in ("Duration", "accuracy", "compression"):
        assert column in headers, f"no {column} column in the runs table"
    if SHOTS:
        time.sleep(1.0)
        browser.screenshot(Path(SHOTS) / "mlflow-runs-table.png")


def test_pareto_html_renders_in_the_artifact_viewer(search, ui, browser):
    runs_dir, outcome = search
    url, _ = ui
    experiment = re.search(r"#/experiments/(\d+)/", url).group(1)
    artifact = url.split("#", 1)[0] + (f"#/experiments/{experiment}/runs/{outcome.parent_run_id}"
                                       "/artifacts/pareto.html")
    browser.open("about:blank")
    start = time.monotonic()
    browser.open(artifact)
    deadline = start + 60
    drawn = framed = None
    while time.monotonic() < deadline:
        drawn = browser.evaluate_in_frame(
            "blob:", "document.querySelectorAll('svg.plot [data-t]').length")
        if drawn is not None and framed is None:
            framed = time.monotonic() - start  # MLflow fetched the file and made its iframe
        if drawn:
            break
        time.sleep(0.05)
    seconds = time.monotonic() - start
    n_complete = int((outcome.trials["state"] == "COMPLETE").sum())
    assert drawn and drawn >= n_complete, f"pareto.html did not render in {seconds:.1f} s"
    print(f"\npareto.html in the artifact viewer: URL opened -> iframe {framed or seconds:.2f} s "
          f"-> SVG drawn {seconds:.2f} s")
    if SHOTS:
        _close_assistant(browser)
        time.sleep(1.0)
        browser.screenshot(Path(SHOTS) / "mlflow-pareto-html.png")


def test_pareto_html_hover_and_view_switch_work(browser, tmp_path):
    """The page's few lines of JavaScript: hover shows a trial's text, the drop-down switches
    the cost objective (three objectives here, so three panels)."""
    from test_plots import make_trials

    from autosparse.tracking.plots import pareto_figure_html

    path = tmp_path / "pareto.html"
    pareto_figure_html(make_trials(), ["accuracy", "size", "macs", "bops"], path)
    browser.open(path.as_uri())
    browser.wait_for("document.querySelectorAll('svg.plot').length === 3", timeout=10)
    visible = ("[...document.querySelectorAll('.panel')].map(p => p.style.display !== 'none')")
    assert browser.evaluate(visible) == [True, False, False]
    tip = browser.evaluate(
        "(() => { const c = document.querySelector('.panel circle[data-t]');"
        " const r = c.getBoundingClientRect();"
        " c.dispatchEvent(new MouseEvent('mousemove', {bubbles: true,"
        " clientX: r.x + 2, clientY: r.y + 2}));"
        " const box = document.getElementById('tip');"
        " return box.style.display === 'block' && box.innerText; })()")
    assert tip and tip.startswith("trial ") and "layers" in tip
    browser.evaluate("(() => { const s = document.getElementById('view'); s.value = '2';"
                     " s.dispatchEvent(new Event('change')); })()")
    assert browser.evaluate(visible) == [False, False, True]
