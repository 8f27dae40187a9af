"""Pictures of a quantized KV cache (record "cache"): what its bytes are made of and what quantizing cost.

    cache_parts(runs, labels)   one stacked bar per run: bytes by part (codes, scales, zeros, residual, ...)
    quant_error(trace)          layer x (KV head, key/value): relative error of what each quantized
"""

from __future__ import annotations

from typing import Any, Sequence

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.models import NumeralTickFormatter

from workbench.errors import ParameterError, WorkbenchError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, require, require_steps

PART_COLORS = {"dense": "#7f7f7f", "residual": "#1f77b4", "codes": "#2ca02c", "scales": "#ff7f0e",
               "zeros": "#ffbb78"}
OTHER_COLORS = ("#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#d62728")  # parts other stores name


def cache_parts(runs: Sequence[Any], labels: Sequence[str] | None = None, *, step: int = -1) -> hv.Bars:
    """One stacked bar per run (a Run or its trace): the bytes its KV cache held after `step` (default the last),
    split by what occupies them. Hover shows each part's bytes and share."""
    ensure_bokeh()
    traces = [as_trace(run) for run in runs]
    labels = list(labels) if labels is not None else [str(i) for i in range(len(traces))]
    if len(labels) != len(traces):
        raise ParameterError(f"cache_parts got {len(traces)} runs but {len(labels)} labels")
    rows = []
    for trace, label in zip(traces, labels):
        require(trace, "cache_part_bytes", purpose="cache bytes by part")
        require_steps(trace, "cache bytes by part")
        values = trace["cache_part_bytes"].isel(step=step)
        total = int(values.sum())
        rows += [(label, str(part), int(size), size / total if total else 0.0)
                 for part, size in zip(trace["cache_part"].values, values.values)]
    data = pd.DataFrame(rows, columns=["run", "part", "bytes", "share"])
    parts = list(dict.fromkeys(data["part"]))
    return hv.Bars(data, ["run", "part"], ["bytes", "share"]).opts(
        backend="bokeh", stacked=True, title="KV cache bytes by part", ylabel="bytes", xlabel="",
        cmap={p: PART_COLORS.get(p, OTHER_COLORS[i % len(OTHER_COLORS)]) for i, p in enumerate(parts)},
        tools=["hover"], hover_tooltips=[("run", "@{run}"), ("part", "@{part}"), ("bytes", "@{bytes}{0.00 b}"),
                                         ("share", "@{share}{0.0%}")],
        yformatter=NumeralTickFormatter(format="0.0 b"), legend_position="right", width=style.WIDTH,
        height=style.HEIGHT)


def quant_error(trace: Any, *, step: int = -1) -> hv.HeatMap:
    """Layer (x) against KV head and side (y: "key h0" ... "value hN"): the relative error ||x - x_hat|| / ||x||
    of everything the layer and head had quantized after `step` (default the last). Keys quantized per channel and
    values per token differ here; so do heads with outlier channels."""
    ensure_bokeh()
    trace = as_trace(trace)
    if "cache_bytes" in trace and "kv_quant_error" not in trace:
        raise WorkbenchError(f"this run's cache ({trace.attrs.get('cache', 'unknown')}) does not quantize: no "
                             "quantization error to plot (quantized caches: kivi, int_per_token, kvquant, fp8, mikv, "
                             "zipcache)")
    require(trace, "kv_quant_error", purpose="the quantization error")
    require_steps(trace, "the quantization error")
    values = trace["kv_quant_error"].isel(step=step)
    values = values.transpose("layer", "kv_head", "side").values  # (layer, kv_head, side)
    layers, heads, sides = trace["layer"].values, range(values.shape[1]), [str(s) for s in trace["side"].values]
    data = pd.DataFrame([(int(layer), f"{side} h{head}", float(values[i, head, j])) for i, layer in enumerate(layers)
                         for j, side in enumerate(sides) for head in heads], columns=["layer", "head", "error"])
    top = float(np.nanmax(data["error"])) if data["error"].notna().any() else 1.0
    return hv.HeatMap(data, ["layer", "head"], "error").opts(
        backend="bokeh", title="relative quantization error by layer and KV head", cmap=style.HEATMAP_CMAP,
        colorbar=True, clim=(0, top), tools=["hover"],
        hover_tooltips=[("layer", "@{layer}"), ("head", "@{head}"), ("error", "@{error}{0.000}")],
        xlabel="layer", ylabel="", width=style.WIDTH, height=max(style.HEIGHT // 2, 24 * len(sides) * len(heads) + 80))
