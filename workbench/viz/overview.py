"""Layouts of several plots: `entropy`, the default look at a run's uncertainty, and `overview` / `supported_plots`,
every plot a trace has the records for (what the HTML report shows)."""

from __future__ import annotations

from typing import Any

import holoviews as hv

from workbench.decode.telemetry import acceptance
from workbench.viz.attention_plots import attention_pattern
from workbench.viz.backend import ensure_bokeh
from workbench.viz.cache_plots import cache_bytes, cache_occupancy
from workbench.viz.decoding_plots import acceptance_by_position, accepted_lengths, decisions, phase_times
from workbench.viz.entropy_plots import entropy_curve, entropy_heatmap, head_entropy_map
from workbench.viz.fidelity_plots import fidelity, fidelity_variables
from workbench.viz.inputs import as_trace, require, require_steps
from workbench.viz.stream import token_stream


def entropy(trace: Any) -> hv.Layout:
    """The default overview of a run recorded with "entropy": the token stream coloured by entropy, next-token
    entropy over steps, attention entropy by step and layer, and by layer and head over the prompt."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "entropy", "attention_entropy", purpose="entropy")
    require_steps(trace, "entropy")
    plots = [token_stream(trace), entropy_curve(trace), entropy_heatmap(trace)]
    if "prompt_attention_entropy" in trace:
        plots.append(head_entropy_map(trace))
    return hv.Layout(plots).cols(2).opts(backend="bokeh", shared_axes=False)


def supported_plots(trace: Any) -> dict[str, hv.core.Dimensioned]:
    """Every plot the trace has the records for, with default choices (first and last recorded layers, head 0),
    keyed by a short name such as "entropy_heatmap" or "cache_occupancy layer 0 kv_head 0"."""
    ensure_bokeh()
    trace = as_trace(trace)
    steps = trace.sizes.get("step", 0) > 0
    plots: dict[str, hv.core.Dimensioned] = {}
    if steps:
        plots["token_stream"] = token_stream(trace, prompt=True)
    if steps and "entropy" in trace:
        plots["entropy_curve"] = entropy_curve(trace)
        plots["entropy_heatmap"] = entropy_heatmap(trace)
    if "prompt_attention_entropy" in trace:
        plots["head_entropy_map"] = head_entropy_map(trace)
    if "prompt_attention" in trace:
        head = int(trace["attn_head"].values[0])
        for layer in _first_and_last(trace["attn_layer"].values):
            plots[f"attention_pattern layer {layer} head {head}"] = attention_pattern(trace, layer, head)
    if steps and "cache_bytes" in trace:
        plots["cache_bytes"] = cache_bytes(trace)
    if steps and "cache_evicted_at" in trace:
        for layer in _first_and_last(trace["layer"].values):
            plots[f"cache_occupancy layer {layer} kv_head 0"] = cache_occupancy(trace, layer, 0)
    if steps and fidelity_variables(trace):
        plots["fidelity"] = fidelity(trace)
    if steps and "token_origin" in trace:
        plots["token_stream by origin"] = token_stream(trace, color_by="origin")
    if steps and "verify_drafted" in trace and acceptance(trace) is not None:
        plots["acceptance_by_position"] = acceptance_by_position(trace)
        plots["accepted_lengths"] = accepted_lengths(trace)
        plots["phase_times"] = phase_times(trace)
    if steps and "decode_decision" in trace:
        plots["decisions"] = decisions(trace)
    return plots


def overview(trace: Any) -> hv.Layout:
    """All of `supported_plots(trace)` in one layout."""
    return hv.Layout(list(supported_plots(trace).values())).cols(1).opts(backend="bokeh", shared_axes=False)


def _first_and_last(values) -> list[int]:
    values = [int(v) for v in values]
    return sorted({values[0], values[-1]})
