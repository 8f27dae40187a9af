"""`fidelity`: how closely a sparse or approximate attention variant followed dense attention, from whichever
fidelity variables the trace holds (attention_recall, attention_output_error, kl_vs_dense, cache_dropped_mass)."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import pandas as pd
import xarray as xr

from workbench.errors import WorkbenchError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, index_ticks, require_steps, step_tokens

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
    return hv.Layout([_fidelity_plot(trace, name) for name in present]).cols(1)


def _fidelity_plot(trace: xr.Dataset, name: str) -> hv.Element:
    values = trace[name]
    if "step" not in values.dims:
        raise WorkbenchError(f"cannot plot {name}: it has dims {values.dims}, expected a 'step' dimension")
    units = values.attrs.get("units", "")
    label = f"{name} ({units})" if units else name
    tokens = step_tokens(trace)
    if "layer" in values.dims:
        values = values.mean([d for d in values.dims if d not in ("step", "layer")])
        data = values.transpose("step", "layer").to_dataframe(name=name).reset_index()[["step", "layer", name]]
        data["token"] = [tokens[s] for s in data["step"]]
        reduced = " (mean over heads)" if "head" in trace[name].dims else ""
        return hv.HeatMap(data, ["step", "layer"], [name, "token"]).opts(
            backend="bokeh", title=FIDELITY[name] + reduced, xlabel="step (generated token)", ylabel="layer",
            hover_tooltips=[("step", "@{step}"), ("token", "@{token}"), ("layer", "@{layer}"),
                            (name, "@{" + name + "}{0.0000}")],
            tools=["hover"], cmap=style.HEATMAP_CMAP, colorbar=True, colorbar_opts={"title": label},
            xticks=index_ticks(trace["step"].values, most=12), yticks=index_ticks(trace["layer"].values),
            width=style.WIDTH, height=style.HEIGHT)
    values = values.mean([d for d in values.dims if d != "step"]) if values.ndim > 1 else values
    data = pd.DataFrame({"step": trace["step"].values, name: values.values.astype(float), "token": tokens})
    return hv.Curve(data, "step", [name, "token"]).opts(
        backend="bokeh", title=FIDELITY[name], xlabel="step (generated token)", ylabel=label,
        hover_tooltips=[("step", "@{step}"), ("token", "@{token}"), (name, "@{" + name + "}{0.0000}")],
        hover_mode="vline", tools=["hover"], width=style.WIDTH, height=style.HEIGHT, line_width=2)
