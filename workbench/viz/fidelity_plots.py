"""`fidelity`: how closely a sparse or approximate attention variant followed dense attention, from whichever
fidelity variables the trace holds (attention_recall, attention_output_error, kl_vs_dense, cache_dropped_mass)."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import xarray as xr

from workbench.errors import WorkbenchError
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, require_steps, step_tokens
from workbench.viz.shapes import step_curve, step_layer_heatmap

FIDELITY = {
    "attention_recall": "attention recall (share of dense attention mass the variant kept)",
    "attention_output_error": "attention output error vs dense",
    "kl_vs_dense": "KL divergence of next-token distribution from dense",
    "cache_dropped_mass": "dense attention on positions the cache had evicted",
}


def fidelity_variables(trace: Any) -> list[str]:
    """The fidelity variables a trace holds values for (record "fidelity"; attention recall is all NaN for
    variants that keep no explicit set of keys, and is left out then)."""
    trace = as_trace(trace)
    present = [name for name in FIDELITY if name in trace and bool(trace[name].notnull().any())]
    if "cache_dropped_mass" in present and not bool((trace["cache_dropped_mass"] > 0).any()):
        present.remove("cache_dropped_mass")  # the cache evicted nothing: an all-zero plot says nothing
    return present


def fidelity(trace: Any) -> hv.Layout:
    """One plot per fidelity variable: a curve over steps for per-step values, a step x layer heat map (mean over
    any other dimension, such as heads) for per-layer ones. Hover shows each step's token."""
    ensure_bokeh()
    trace = as_trace(trace)
    present = fidelity_variables(trace)
    if not present:
        raise WorkbenchError(f"the trace has no fidelity values ({', '.join(FIDELITY)}): record 'fidelity' when "
                             "generating to plot how closely the attention variant followed dense attention "
                             "(e.g. wb.generate(..., record=['fidelity']))")
    require_steps(trace, "fidelity")
    tokens = step_tokens(trace)
    return hv.Layout([_fidelity_plot(trace, name, tokens) for name in present]).cols(1)


def _fidelity_plot(trace: xr.Dataset, name: str, tokens: list[str]) -> hv.Element:
    values = trace[name]  # every fidelity variable is per step: (step,) or (step, layer, head)
    units = values.attrs.get("units", "")
    label = f"{name} ({units})" if units else name
    if "layer" in values.dims:
        values = values.mean([d for d in values.dims if d not in ("step", "layer")])
        reduced = " (mean over heads)" if "head" in trace[name].dims else ""
        return step_layer_heatmap(trace, name, values, tokens, title=FIDELITY[name] + reduced,
                                  hover=(name, "{0.0000}"), colorbar_title=label)
    return step_curve(trace, name, values.values.astype(float), tokens, title=FIDELITY[name], ylabel=label,
                      hover=(name, "{0.0000}"))
