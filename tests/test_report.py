"""The HTML report: one self-contained page (nothing fetched from anywhere) with the run's configuration, prompt,
text, summary and every plot its trace supports; from a Run or from a saved trace."""

import html
import re

import pytest

import workbench as wb
from workbench import viz
from workbench.errors import WorkbenchError
from workbench.report import write_report

PROMPT = "<b>bold</b> & more"  # markup in the prompt must come out as text
EXTERNAL = re.compile(r"<(script|link|img|iframe|source|object|embed)\b[^>]*\b(src|href|data)\s*=", re.IGNORECASE)


@pytest.fixture(scope="module")
def run(tiny_models):
    return wb.generate(tiny_models["llama"], PROMPT, record=["entropy", "attention", "cache"], max_new_tokens=5,
                       ignore_eos=True, cache=wb.cache.get("h2o", budget=12, sinks=2, window=2))


@pytest.fixture(scope="module")
def page_path(run, tmp_path_factory):
    return write_report(run, tmp_path_factory.mktemp("report") / "run.html")


def test_report_is_one_offline_page(page_path):
    page = page_path.read_text(encoding="utf-8")
    assert not EXTERNAL.search(page)  # no <script src>, <link href>, <img src>: bokeh is inlined
    assert "root.Bokeh" in page and page.count("<script") >= 2


def test_report_holds_the_run_and_a_section_per_supported_plot(run, page_path):
    page = page_path.read_text(encoding="utf-8")
    assert "<title>workbench run: tiny-llama</title>" in page
    assert html.escape(PROMPT) in page and PROMPT not in page
    assert f"<pre>{html.escape(run.text)}</pre>" in page
    assert "<th>cache</th><td>h2o</td>" in page and "&quot;budget&quot;: 12" in page  # configuration
    assert f"<th>new_tokens</th><td>{len(run.token_ids)}</td>" in page  # summary
    plots = viz.supported_plots(run)
    assert {"token_stream", "entropy_heatmap", "attention_pattern layer 0 head 0", "cache_bytes"} <= set(plots)
    for name in plots:
        assert f"<h3>{html.escape(name)}</h3>" in page
    assert page.count("data-root-id=") == len(plots)  # one bokeh root per plot
    assert "Not recorded: logits" in page


def test_report_from_a_saved_trace(run, tmp_path):
    trace = wb.load_trace(run.save(tmp_path / "run.nc"))
    page = write_report(trace, tmp_path / "trace.html", title="from disk").read_text(encoding="utf-8")
    assert "<title>from disk</title>" in page and html.escape(PROMPT) in page
    assert f"<th>new_tokens</th><td>{len(run.token_ids)}</td>" in page
    assert "<h3>cache_occupancy layer 0 kv_head 0</h3>" in page


def test_report_errors(run, tmp_path):
    with pytest.raises(WorkbenchError, match="ending in .html"):
        write_report(run, tmp_path / "run.pdf")
    with pytest.raises(WorkbenchError, match="takes a Run or its trace"):
        write_report("run", tmp_path / "run.html")


@pytest.mark.browser
@pytest.mark.slow
def test_report_renders_offline_in_chromium(page_path, chromium):
    """Opened from disk with every network request refused, the page draws each plot with no JavaScript error."""
    from playwright.sync_api import sync_playwright

    errors, requests = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = browser.new_page()
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.on("pageerror", lambda error: errors.append(f"uncaught: {error}"))
            page.on("request", lambda request: request.url.startswith(("file:", "data:", "blob:"))
                    or requests.append(request.url))
            page.route(re.compile(r"^(?!file:|data:|blob:)"), lambda route: route.abort())
            page.goto(page_path.as_uri())
            page.wait_for_function("() => window.Bokeh && Object.keys(Bokeh.index).length > 0", timeout=60_000)
            page.wait_for_timeout(500)
            roots = page.evaluate("() => Bokeh.documents.reduce((n, doc) => n + doc.roots().length, 0)")
        finally:
            browser.close()
    assert (errors, requests) == ([], [])
    assert roots == page_path.read_text(encoding="utf-8").count("data-root-id=")
