"""Real-browser test: the quickstart notebook, run by JupyterLab in headless Chromium.

It starts `jupyter lab` on 127.0.0.1 (random free port, random token, every Jupyter/IPython directory in a
temporary folder so nothing of the user's setup leaks in), opens a copy of notebooks/00_quickstart.ipynb with
Debian's `chromium` driven by Playwright's Python client (never a downloaded browser), runs all cells, and checks
what a user would see: no cell failed, a bokeh plot and the Workbench widget rendered, no errors in the browser
console, no request leaving the machine (plots carry their JS and CSS inline). Then it changes widget values (max
new tokens, the prompt), presses Run and checks that the live plots changed: the bokeh data source of the live
entropy curve holds one row per generated token, and the plots' pixels differ from before. Screenshots, the browser
console and the server log go to test-artifacts/browser/.

Skipped, with the reason, when Playwright or chromium is missing (`WORKBENCH_CHROMIUM` names another chromium
binary); `.ci/run` installs chromium and sets WORKBENCH_REQUIRE_BROWSER=1, which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = [pytest.mark.browser, pytest.mark.embedded, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "00_quickstart.ipynb"
ARTIFACTS = REPO / "test-artifacts" / "browser"
NOTEBOOK_SECONDS = 900  # the whole quickstart on a slow shared CPU, model conversion included on a cold cache
RUN_SECONDS = 240  # one Workbench run of a few tokens

# The state of the open notebook, read from JupyterLab's own models (window.jupyterapp is exposed by the
# server's `expose_app_in_browser`): how many code cells still wait, and the first error output if any.
NOTEBOOK_STATE = """() => {
    const panel = window.jupyterapp.shell.currentWidget;
    const cells = panel.content.widgets.filter(cell => cell.model.type === "code");
    let error = null;
    for (const cell of cells) {
        for (const output of cell.model.outputs.toJSON()) {
            if (output.output_type === "error" && error === null) {
                error = output.ename + ": " + output.evalue;
            }
        }
    }
    const pending = cells.filter(cell => cell.model.executionCount === null).length;
    const kernel = panel.sessionContext.session && panel.sessionContext.session.kernel;
    return {pending, cells: cells.length, error, kernel: kernel ? kernel.status : "none"};
}"""

# The columns of the bokeh data sources among the plots rendered inside the element that `selector` finds, one
# {column: [length, shape of the first item or null]} per source (Bokeh.index holds every rendered root view, and
# each view's model knows its document).
SOURCE_COLUMNS = """(selector) => {
    const area = document.querySelector(selector);
    const sources = [];
    if (area === null || window.Bokeh === undefined) return sources;
    const index = window.Bokeh.index;
    for (const view of (index.roots ? index.roots : [...index])) {
        if (!area.contains(view.el)) continue;
        for (const model of view.model.document.all_models) {
            const data = model.data;
            if (data === undefined || data === null || typeof data !== "object") continue;
            const columns = {};
            for (const key of (data instanceof Map ? [...data.keys()] : Object.keys(data))) {
                const values = data instanceof Map ? data.get(key) : data[key];
                const first = values.length ? values[0] : null;
                columns[key] = [values.length, first && first.shape ? Array.from(first.shape) : null];
            }
            sources.push(columns);
        }
    }
    return sources;
}"""


def source_rows(page, selector: str, column: str) -> list[int]:
    """Rows of each data source with a column named `column` inside `selector`."""
    return [columns[column][0] for columns in page.evaluate(SOURCE_COLUMNS, selector) if column in columns]


def wait_for_rows(page, selector: str, column: str, timeout_ms: int, at_least: int = 1) -> list[int]:
    """source_rows once a source with `column` holds `at_least` rows (the browser can draw the kernel's last
    redraw after the status and result line on a busy machine), or after timeout_ms."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    filled = (f"([selector, column, at_least]) => ({SOURCE_COLUMNS})(selector)"
              ".some(c => column in c && c[column][0] >= at_least)")
    try:
        page.wait_for_function(filled, arg=[selector, column, at_least], timeout=timeout_ms)
    except PlaywrightTimeout:
        pass  # the caller's assertion says what is missing
    return source_rows(page, selector, column)


def image_shapes(page, selector: str) -> list[list[int]]:
    """The shapes (rows, columns) of the images the plots inside `selector` draw (the live cache raster)."""
    return [columns["image"][1] for columns in page.evaluate(SOURCE_COLUMNS, selector)
            if "image" in columns and columns["image"][1]]


@pytest.fixture(scope="module")
def lab(tmp_path_factory, chromium):
    """A JupyterLab server on loopback serving a temporary folder that holds a copy of the quickstart."""
    home = tmp_path_factory.mktemp("jupyter")
    root = home / "notebooks"
    root.mkdir()
    shutil.copy(NOTEBOOK, root / NOTEBOOK.name)
    env = _isolated_env(home)
    port, token = _free_port(), secrets.token_hex(16)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = open(ARTIFACTS / "jupyterlab.log", "w")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
               "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate", "--LabApp.extension_manager=readonly",
               "--ServerApp.allow_root=True"]  # CI runs as root
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(f"{url}/api/status?token={token}", server)
        yield {"url": url, "token": token, "root": root}
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def test_quickstart_renders_widget_and_live_plots(lab, chromium):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    outside: list[str] = []  # requests to anywhere but the Jupyter server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.on("request", lambda request: _is_local(request.url, lab["url"]) or outside.append(request.url))
            page.goto(f"{lab['url']}/lab/tree/{NOTEBOOK.name}?token={lab['token']}")
            _run_all_cells(page)

            # a bokeh plot from the notebook's own plotting cell, and the panel with its live plots
            assert page.locator(".bk-Canvas").count() >= 2, "no bokeh plot rendered"
            panel = page.locator(".workbench-panel")
            panel.scroll_into_view_if_needed()
            assert panel.locator(".widget-button", has_text="Run").is_visible()
            live = panel.locator(".workbench-live")
            live.locator(".bk-Canvas").first.wait_for(timeout=60_000)
            assert source_rows(page, ".workbench-live", "entropy") == [0], "live plots missing or not empty"
            assert source_rows(page, ".workbench-live", "weight") == [0], "no empty live attention row"
            before = live.screenshot()

            # change widget values, run, and wait until the panel has drawn the finished run's plots
            _set_slider(panel, "max new tokens", 6)
            panel.locator(".widget-checkbox", has_text="ignore EOS").locator("input").check()  # exactly 6 tokens
            panel.locator("textarea").fill("Name a color.")
            panel.locator(".widget-button", has_text="Run").click()
            panel.locator(".workbench-status", has_text="done").wait_for(timeout=RUN_SECONDS * 1000)
            panel.locator(".workbench-results .bk-Canvas").first.wait_for(timeout=60_000)
            rows = wait_for_rows(page, ".workbench-live", "entropy", timeout_ms=30_000, at_least=6)
            page.wait_for_timeout(1000)  # let the last redraw paint
            assert rows == [6], f"the live entropy curve should hold the 6 generated steps; its source holds {rows}"
            # the latest token's attention row over every position it saw, and the cache raster: 6 steps x the
            # positions given to the cache (the prompt and the 5 tokens fed back)
            for _ in range(30):  # the row's and the raster's redraws may arrive in either order, and late
                [seen] = source_rows(page, ".workbench-live", "weight")
                shapes = image_shapes(page, ".workbench-live")
                if [6, seen] in shapes:
                    break
                page.wait_for_timeout(1000)
            assert [6, seen] in shapes, f"the live cache raster should be 6 steps x {seen} positions: {shapes}"
            assert live.screenshot() != before, "the live plots look the same after a run"
            assert "6 tokens" in panel.inner_text() and panel.locator(".workbench-error").count() == 0
            page.set_viewport_size({"width": 1400, "height": 2400})  # tall enough for the whole panel
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=ARTIFACTS / "workbench_panel.png")
            page.screenshot(path=ARTIFACTS / "quickstart_page.png")

            # a speculative decoder: the live acceptance curve gets a row per verify pass
            assert source_rows(page, ".workbench-live", "tokens") == [0], "no empty live acceptance curve"
            decoder = panel.locator(".widget-dropdown", has=page.locator("label", has_text="decoder")).first
            decoder.locator("select").select_option("prompt_lookup")
            panel.locator(".widget-checkbox", has_text="decoding").locator("input").check()
            _set_slider(panel, "max new tokens", 12)
            panel.locator("textarea").fill("Repeat exactly: red, green, blue. red, green, blue. red, green, blue.")
            panel.locator(".widget-button", has_text="Run").click()
            # the status still says "done" from the first run: wait for this run's result line instead
            page.wait_for_function("() => /12 tokens, [0-9.]+ tok\\/s, finish/.test("
                                   "document.querySelector('.workbench-panel').innerText)", timeout=RUN_SECONDS * 1000)
            # a busy machine has been seen to draw this redraw more than 30 s after the result line
            [verifies] = wait_for_rows(page, ".workbench-live", "tokens", timeout_ms=90_000)
            assert verifies > 0, f"the live acceptance curve received no verify pass; the panel says {panel.inner_text()}"
            panel.screenshot(path=ARTIFACTS / "workbench_panel_speculative.png")
        finally:
            browser.close()
    report = {"console_errors": errors, "requests_outside_jupyter": outside}
    (ARTIFACTS / "console.json").write_text(json.dumps(report, indent=1))
    assert not outside, f"the page fetched resources from outside the Jupyter server (offline they fail): {outside}"
    assert not errors, f"errors in the browser console: {errors}"


# -- helpers -----------------------------------------------------------------------------------------------------
def _run_all_cells(page) -> None:
    """Clear the stored outputs, run every cell, and wait until each code cell has run (failing on the first
    error output, with its message)."""
    page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget "
                           "&& window.jupyterapp.shell.currentWidget.content", timeout=120_000)
    page.evaluate("""async () => {
        const panel = window.jupyterapp.shell.currentWidget;
        await panel.context.ready;
        await panel.sessionContext.ready;
    }""")
    page.evaluate("() => window.jupyterapp.commands.execute('notebook:clear-all-cell-outputs')")
    page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
    deadline = time.monotonic() + NOTEBOOK_SECONDS
    state = {}
    while time.monotonic() < deadline:
        state = page.evaluate(NOTEBOOK_STATE)
        assert state["error"] is None, f"a notebook cell failed: {state['error']}"
        if state["pending"] == 0 and state["kernel"] == "idle":
            return
        page.wait_for_timeout(1000)
    page.screenshot(path=ARTIFACTS / "timeout.png")
    pytest.fail(f"the notebook did not finish in {NOTEBOOK_SECONDS} s: {state}")


def _is_local(url: str, server: str) -> bool:
    return url.startswith((server, "data:", "blob:"))


def _set_slider(panel, description: str, value: int) -> None:
    """Type a value into an IntSlider's editable readout, as a user can."""
    slider = panel.locator(".widget-slider", has=panel.page.locator("label", has_text=description))
    readout = slider.locator(".widget-readout")
    readout.click()
    readout.press("Control+A")
    readout.type(str(value))
    readout.press("Enter")


def _isolated_env(home: Path) -> dict[str, str]:
    """The server's environment: Jupyter's config, data, runtime and settings dirs and IPython's dir under
    `home`, with JupyterLab's notebook windowing off (every cell stays in the DOM, scrolled into view or not) and
    no news or update checks (which would ask the internet and pop up a notification over the page)."""
    env = dict(os.environ)
    dirs = {"JUPYTER_CONFIG_DIR": "config", "JUPYTER_DATA_DIR": "data", "JUPYTER_RUNTIME_DIR": "runtime",
            "JUPYTERLAB_SETTINGS_DIR": "settings", "JUPYTERLAB_WORKSPACES_DIR": "workspaces",
            "IPYTHONDIR": "ipython"}
    for variable, name in dirs.items():
        (home / name).mkdir()
        env[variable] = str(home / name)
    tracker = home / "settings" / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings"
    tracker.parent.mkdir(parents=True)
    tracker.write_text(json.dumps({"windowingMode": "none"}))
    notifications = home / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notifications.parent.mkdir(parents=True)
    notifications.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}))
    env.pop("JUPYTER_PATH", None)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_serving(url: str, server: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with status {server.returncode}; see {ARTIFACTS / 'jupyterlab.log'}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"jupyter lab did not answer within {seconds} s; see {ARTIFACTS / 'jupyterlab.log'}")
