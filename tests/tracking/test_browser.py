"""The MLflow window in a real browser: a tiny real search, `autosparse ui`, headless Chromium.

Checks what a user sees, not what the API returns: the runs table at the URL `autosparse ui`
prints lists the search's parent run and, expanded, one child per trial with its figures in the
name, the front marked with ★ and the metric columns of autosparse's shared view; the
``pareto.html`` artifact renders (its SVG drawn inside MLflow's sandboxed iframe) and the seconds
it took are printed. The browser is driven with Playwright for Python (the ``test`` extra), on
Debian's ``chromium`` rather than a browser Playwright downloads: ``.ci/run`` installs it when
missing (``AUTOSPARSE_INSTALL_CHROMIUM=1`` through ``scripts/chromium.sh``); without it and
without the switch the test is skipped with that reason. With ``AUTOSPARSE_SCREENSHOTS=<dir>``
it also writes the screenshots the README shows (``docs/``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
INSTALL_SWITCH = "AUTOSPARSE_INSTALL_CHROMIUM"


def find_chromium() -> str | None:
    """``$AUTOSPARSE_CHROMIUM`` if set, else Debian's ``chromium`` (or a Chrome) on PATH: the
    same search as ``scripts/chromium.sh``."""
    explicit = os.environ.get("AUTOSPARSE_CHROMIUM", "").strip()
    if explicit:
        found = shutil.which(explicit)
        if found:
            return found
        return explicit if Path(explicit).is_file() else None
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


CHROMIUM = find_chromium()
if CHROMIUM is None and os.environ.get(INSTALL_SWITCH) == "1":
    raise RuntimeError(f"{INSTALL_SWITCH}=1 but no chromium was found: "
                       f"{os.environ.get('AUTOSPARSE_CHROMIUM_SKIP_REASON', 'not installed')}")
if CHROMIUM is None:
    pytest.skip(os.environ.get("AUTOSPARSE_CHROMIUM_SKIP_REASON")
                or "no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it "
                   f"as root with {INSTALL_SWITCH}=1)", allow_module_level=True)
try:
    from playwright.sync_api import Page, expect, sync_playwright
except ImportError as err:  # the `test` extra has it; where the CI asks for the browser, fail
    if os.environ.get(INSTALL_SWITCH) == "1":
        raise
    pytest.skip(f"playwright is not installed ({err}): pip install -e '.[test]'",
                allow_module_level=True)

# Debian's chromium, headless, on a machine that may have no network: without the background
# networking switches it keeps trying (and failing) to reach Google's services.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio"]

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
    """One headless Chromium page (a fresh profile, gone on close), 1500 x 900."""
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=CHROMIUM_ARGS)
        try:
            page = chromium.new_page(viewport={"width": 1500, "height": 900},
                                     device_scale_factor=1)
            page.set_default_timeout(30_000)
            yield page
        finally:
            chromium.close()


# the run-name links of the runs table (MLflow's grid, or its newer table)
ROW_LINKS = "[role=row] a, .ag-row a"
ASSISTANT_CLOSE = '[data-component-id="mlflow.assistant.chat_panel.close"]'


def _row_names(page: Page) -> list[str]:
    return [t.strip() for t in page.locator(ROW_LINKS).all_inner_texts() if t.strip()]


def _close_assistant(page: Page) -> None:
    """MLflow 3.17 opens its assistant panel beside the table; close it (screenshots)."""
    close = page.locator(ASSISTANT_CLOSE)
    if close.count():
        close.first.click()


def test_runs_table_shows_parent_children_front_and_metric_columns(search, ui, browser):
    _, outcome = search
    url, _ = ui
    page = browser
    assert url.endswith("/runs?workflowType=machine_learning&viewStateShareKey=autosparse")
    page.goto(url)
    links = page.locator(ROW_LINKS)
    expect(links.filter(has_text=re.compile(r"^\s*window\s*$")).first).to_be_attached(
        timeout=60_000)
    # children are folded under the parent: unfold them as a user would (the row's + button)
    page.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
    expect(links.filter(has_text=CHILD)).to_have_count(len(outcome.trials), timeout=30_000)
    names = _row_names(page)
    assert len(names) >= 1 + len(outcome.trials), names
    children = [n for n in names if CHILD.match(n)]
    assert "window" in names and len(children) == len(outcome.trials), names
    front = [n for n in children if n.startswith("★ ")]
    assert len(front) == len(outcome.front) >= 1, names
    _close_assistant(page)
    # the first metric columns of the view (the grid only renders the columns in sight)
    body = page.locator("body")
    expect(body).to_contain_text("compression", timeout=10_000)
    headers = body.inner_text()
    for column in ("Duration", "accuracy", "compression"):
        assert column in headers, f"no {column} column in the runs table"
    # the parent's row: a figure in every metric cell (the knee's), none of them "-"
    parts = page.locator(f"[row-id='{outcome.parent_run_id}']").all_inner_texts()
    cells = [c for part in parts for c in part.split("\n")]
    start = next(i for i, c in enumerate(cells) if re.fullmatch(r"[\d.]+m?s", c))  # Duration
    figures = cells[start + 1:start + 7]  # accuracy .. n_trials, as the header lists them
    assert len(figures) == 6 and all(re.fullmatch(r"-?[\d.e+-]+", f) for f in figures), parts
    if SHOTS:
        page.wait_for_timeout(1000)
        page.screenshot(path=Path(SHOTS) / "mlflow-runs-table.png")


def test_the_printed_link_opens_the_model_training_view(search, ui, browser):
    """MLflow 3.17 opens in its GenAI mode (traces, "Evaluation runs", an assistant) unless the
    URL asks for model training, which the link `autosparse ui` prints does."""
    url, _ = ui
    page = browser
    page.goto("about:blank")
    page.goto(url)
    expect(page.locator(ROW_LINKS).filter(has_text=re.compile(r"^\s*window\s*$")).first
           ).to_be_attached(timeout=60_000)
    assert "workflowType=machine_learning" in page.url
    body = page.locator("body").inner_text()
    assert "Model training" in body and "Evaluation runs" not in body


def test_pareto_html_renders_in_the_artifact_viewer(search, ui, browser):
    runs_dir, outcome = search
    url, _ = ui
    page = browser
    experiment = re.search(r"#/experiments/(\d+)/", url).group(1)
    artifact = url.split("#", 1)[0] + (f"#/experiments/{experiment}/runs/{outcome.parent_run_id}"
                                       "/artifacts/pareto.html")
    page.goto("about:blank")
    start = time.monotonic()
    page.goto(artifact, wait_until="commit")
    # MLflow fetches the file and shows it in a sandboxed iframe of a blob: URL (its own
    # renderer process: Playwright reaches into it all the same)
    frame = page.locator('iframe[src^="blob:"]')
    marks = page.frame_locator('iframe[src^="blob:"]').locator("svg.plot [data-t]")
    framed = None
    try:
        expect(frame.first).to_be_attached(timeout=60_000)
        framed = time.monotonic() - start
        expect(marks.first).to_be_attached(timeout=max(1.0, start + 60 - time.monotonic()) * 1000)
    except AssertionError:
        pass  # reported below, with the seconds
    drawn = marks.count()
    seconds = time.monotonic() - start
    n_complete = int((outcome.trials["state"] == "COMPLETE").sum())
    assert drawn and drawn >= n_complete, f"pareto.html did not render in {seconds:.1f} s"
    print(f"\npareto.html in the artifact viewer: URL opened -> iframe {framed or seconds:.2f} s "
          f"-> SVG drawn {seconds:.2f} s")
    if SHOTS:
        _close_assistant(page)
        page.wait_for_timeout(1000)
        page.screenshot(path=Path(SHOTS) / "mlflow-pareto-html.png")


def test_pareto_html_hover_and_view_switch_work(browser, tmp_path):
    """The page's few lines of JavaScript: hover shows a trial's text, the drop-down switches
    the cost objective (three objectives here, so three panels)."""
    from test_plots import make_trials

    from autosparse.tracking.plots import pareto_figure_html

    page = browser
    path = tmp_path / "pareto.html"
    pareto_figure_html(make_trials(), ["accuracy", "size", "macs", "bops"], path)
    page.goto(path.as_uri())
    expect(page.locator("svg.plot")).to_have_count(3, timeout=10_000)
    panels = page.locator(".panel")

    def visible() -> list[bool]:
        return panels.evaluate_all("ps => ps.map(p => p.style.display !== 'none')")

    assert visible() == [True, False, False]
    # a real mouse over a point of the shown panel
    page.locator(".panel circle[data-t]").first.hover()
    tip = page.locator("#tip")
    expect(tip).to_be_visible()
    assert tip.evaluate("box => box.style.display") == "block"
    text = tip.inner_text()
    assert text and text.startswith("trial ") and "layers" in text
    page.locator("#view").select_option("2")
    assert visible() == [False, False, True]
