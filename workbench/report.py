"""`write_report`: one self-contained HTML page about a run — configuration, prompt, generated text, summary and
every plot its trace supports — with bokeh's JavaScript and CSS inlined, so it opens offline and can be mailed
or archived as a single file. It fetches nothing: no CDN, no fonts, no images from elsewhere."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import xarray as xr

from workbench.errors import WorkbenchError
from workbench.trace import RECORDABLE, trace_config

PAGE = """
{% block postamble %}<style>{{ style }}</style>{% endblock %}
{% block contents %}
{{ header }}
{% for root in roots %}
<section class="plot"><h3>{{ headings[loop.index0] }}</h3>{{ embed(root) }}</section>
{% endfor %}
{% endblock %}
"""

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
td, th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; vertical-align: top; font-size: 0.9em; }
th { background: #f6f6f6; }
pre { background: #f6f6f6; padding: 0.8em; white-space: pre-wrap; word-break: break-word; }
section.plot { margin: 1.5em 0; }
.note { color: #666; }
"""


def write_report(run: Any, path: str | Path, *, title: str | None = None) -> Path:
    """Write an HTML report of `run` (a Run, or a trace read back with wb.load_trace) to `path`."""
    import holoviews as hv
    from bokeh.embed import file_html

    from workbench.viz import supported_plots
    from workbench.viz.inputs import as_trace
    from workbench.viz.resources import SelfContained

    trace = as_trace(run, "write_report takes")
    path = check_report_path(path)
    config = run.config if hasattr(run, "trace") and run.config else _config_of(trace)
    title = title or f"workbench run: {config.get('model', 'model')}"
    plots = supported_plots(trace)
    models = [hv.render(plot, backend="bokeh") for plot in plots.values()]
    header = _header(run, trace, config, title)
    if not models:
        header += '<p class="note">Nothing was recorded that can be plotted.</p>'
    page = file_html(models, resources=SelfContained(), title=title, template=PAGE,
                     template_variables={"header": header, "headings": [html.escape(k) for k in plots],
                                         "style": STYLE})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def check_report_path(path: str | Path) -> Path:
    """The report's path, which must name an HTML file (checked before a run, so a typo fails fast)."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise WorkbenchError(f"a report is an HTML file: give a path ending in .html, got {str(path)!r}")
    return path


def _config_of(trace: xr.Dataset) -> dict[str, Any]:
    return trace_config(trace) if "config" in trace.attrs else {}


def _header(run: Any, trace: xr.Dataset, config: dict[str, Any], title: str) -> str:
    """The report's text part, HTML-escaped: title, prompt, generated text, summary, configuration."""
    text = getattr(run, "text", None)
    if text is None:
        text = "".join(str(t) for t in trace["token"].values)
    prompt = config.get("prompt", "")
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt, indent=2, ensure_ascii=False)
    parts = [f"<h1>{html.escape(title)}</h1>",
             "<h2>Prompt</h2>", f"<pre>{html.escape(prompt)}</pre>",
             "<h2>Generated text</h2>", f"<pre>{html.escape(text)}</pre>",
             "<h2>Summary</h2>", _table(_summary(run, trace)),
             "<h2>Configuration</h2>", _table(config)]
    missing = [name for name in RECORDABLE if name not in _recorded(config, trace)]
    if missing:
        parts.append(f'<p class="note">Not recorded: {", ".join(missing)} (pass record=[...] to generate, or '
                     "--record to the command line, to add their plots).</p>")
    parts.append("<h2>Plots</h2>")
    return "\n".join(parts)


def _summary(run: Any, trace: xr.Dataset) -> dict[str, Any]:
    from workbench.viz.inputs import prompt_length  # workbench.viz imports HoloViews: only when writing a report

    if hasattr(run, "summary"):
        summary = run.summary()
        summary.pop("text", None)
        summary.pop("config", None)
        return summary
    summary: dict[str, Any] = {"new_tokens": trace.sizes.get("step", 0),
                               "prompt_tokens": prompt_length(trace)}
    if "entropy" in trace and trace.sizes.get("step", 0):
        summary["mean entropy (nats)"] = round(float(trace["entropy"].mean()), 4)
    if "cache_bytes" in trace and trace.sizes.get("step", 0):
        summary["peak_cache_bytes"] = int(trace["cache_bytes"].max())
    return summary


def _recorded(config: dict[str, Any], trace: xr.Dataset) -> set[str]:
    from workbench.trace import schema

    record = config.get("record")
    if isinstance(record, list):
        return set(record)
    return {schema.recorded_by(variable) for variable in trace.data_vars} - {None}


def _table(values: dict[str, Any]) -> str:
    rows = []
    for key, value in values.items():
        shown = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        rows.append(f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(shown)}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"
