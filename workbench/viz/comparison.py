"""`compare`: two runs side by side — their token streams, entropy and cache memory on shared axes — with the
first step where their generated tokens differ marked on every plot."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import xarray as xr

from workbench.errors import ParameterError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.cache_plots import cache_bytes
from workbench.viz.entropy_plots import entropy_curve
from workbench.viz.inputs import as_trace, require_steps, step_tokens
from workbench.viz.stream import token_stream


def divergence_step(a: Any, b: Any) -> int | None:
    """The first step at which two runs (or traces) generated different tokens; None if they generated the same
    ones. When one run is a prefix of the other, they diverge where the shorter one stopped."""
    ids_a, ids_b = (as_trace(run)["token_id"].values for run in (a, b))
    shared = min(len(ids_a), len(ids_b))
    differ = np.flatnonzero(ids_a[:shared] != ids_b[:shared])
    if len(differ):
        return int(differ[0])
    return None if len(ids_a) == len(ids_b) else shared


def compare(run_a: Any, run_b: Any, labels: tuple[str, str] = ("A", "B")) -> hv.Layout:
    """Runs (or traces) A and B side by side: token streams, then next-token entropy and KV cache bytes of both
    on the same axes where both recorded them, with a vertical line and a note at the first diverging step."""
    ensure_bokeh()
    if len(labels) != 2 or not all(isinstance(label, str) for label in labels):
        raise ParameterError(f"labels must be two strings, got {labels!r}")
    traces = [as_trace(run_a), as_trace(run_b)]
    for trace in traces:
        require_steps(trace, "a comparison")
    diverge = divergence_step(*traces)
    note = _divergence_note(traces, labels, diverge)
    plots = [token_stream(trace, title=f"{label}: {note}", line_chars=48,
                          mark_step=diverge if diverge is not None and diverge < trace.sizes["step"] else None)
             .opts(backend="bokeh", width=style.WIDTH * 3 // 4)
             for trace, label in zip(traces, labels)]
    if all("entropy" in trace for trace in traces):
        curves = [entropy_curve(trace).relabel(label) for trace, label in zip(traces, labels)]
        plots.append(_shared_axes(curves, traces, diverge, "entropy", "next-token entropy, " + " vs ".join(labels)))
    if all("cache_bytes" in trace for trace in traces):
        curves = [cache_bytes(trace).relabel(label) for trace, label in zip(traces, labels)]
        plots.append(_shared_axes(curves, traces, diverge, "cache_bytes", "KV cache memory, " + " vs ".join(labels)))
    return hv.Layout(plots).cols(2).opts(backend="bokeh", shared_axes=False)


def _shared_axes(curves: list[hv.Curve], traces: list[xr.Dataset], diverge: int | None, variable: str,
                 title: str) -> hv.Overlay:
    curves = [curve.opts(backend="bokeh", color=color, title=title)
              for curve, color in zip(curves, style.RUN_COLORS)]
    layers: list[hv.Element] = list(curves)
    if diverge is not None:
        top = max(float(np.nanmax(trace[variable].values)) for trace in traces)
        layers.append(hv.VLine(diverge, label="divergence").opts(
            backend="bokeh", color=style.DIVERGENCE_COLOR, line_dash="dashed", line_width=2))
        layers.append(hv.Text(diverge, top, f" diverge at step {diverge}", halign="left", valign="top").opts(
            backend="bokeh", color=style.DIVERGENCE_COLOR, text_font_size="10pt"))
    return hv.Overlay(layers).opts(backend="bokeh", title=title, legend_position="top_right",
                                   width=style.WIDTH * 3 // 4, height=style.HEIGHT)


def _divergence_note(traces: list[xr.Dataset], labels: tuple[str, str], diverge: int | None) -> str:
    if diverge is None:
        return f"{labels[0]} and {labels[1]} generated the same tokens"
    tokens = [step_tokens(trace) for trace in traces]
    shown = [f"'{t[diverge]}'" if diverge < len(t) else "(stopped)" for t in tokens]
    return f"diverges at step {diverge} ({labels[0]} {shown[0]}, {labels[1]} {shown[1]})"
