"""The two plot shapes several plots share: a curve over generated steps and a step x layer heat map, both with the
step's token in the hover tooltip. Callers give the title, labels and hover format; everything else is common."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import xarray as xr

from workbench.viz import style
from workbench.viz.inputs import index_ticks, tokens_at

STEP_LABEL = "step (generated token)"


def step_curve(trace: xr.Dataset, name: str, values: np.ndarray, tokens: list[str], *, title: str, ylabel: str,
               hover: tuple[str, str], **opts: Any) -> hv.Curve:
    """`values` (one per step) as a curve over steps; `hover` is the tooltip's (label, format) for the value, e.g.
    ("entropy", "{0.000} nats"). Extra `opts` are passed on to the element's options."""
    data = pd.DataFrame({"step": trace["step"].values, name: values, "token": tokens})
    label, fmt = hover
    return hv.Curve(data, "step", [name, "token"]).opts(
        backend="bokeh", title=title, xlabel=STEP_LABEL, ylabel=ylabel,
        hover_tooltips=[("step", "@{step}"), ("token", "@{token}"), (label, "@{" + name + "}" + fmt)],
        hover_mode="vline", tools=["hover"], width=style.WIDTH, height=style.HEIGHT, line_width=2, **opts)


def step_layer_heatmap(trace: xr.Dataset, name: str, values: xr.DataArray, tokens: list[str], *, title: str,
                       hover: tuple[str, str], colorbar_title: str) -> hv.HeatMap:
    """`values` over (step, layer) as a heat map, steps across and layers up; `hover` as for `step_curve`."""
    data = values.transpose("step", "layer").to_dataframe(name=name).reset_index()[["step", "layer", name]]
    data["token"] = tokens_at(tokens, data["step"])
    label, fmt = hover
    return hv.HeatMap(data, ["step", "layer"], [name, "token"]).opts(
        backend="bokeh", title=title, xlabel=STEP_LABEL, ylabel="layer",
        hover_tooltips=[("step", "@{step}"), ("token", "@{token}"), ("layer", "@{layer}"),
                        (label, "@{" + name + "}" + fmt)],
        tools=["hover"], cmap=style.HEATMAP_CMAP, colorbar=True, colorbar_opts={"title": colorbar_title},
        xticks=index_ticks(trace["step"].values, most=12), yticks=index_ticks(trace["layer"].values),
        width=style.WIDTH, height=style.HEIGHT)
