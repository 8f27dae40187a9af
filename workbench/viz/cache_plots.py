"""What the KV cache held: `cache_occupancy`, a position x step raster of each entry's state for one layer and
KV head, and `cache_bytes`, the memory the cache held after each step."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import xarray as xr
from bokeh.models import NumeralTickFormatter

from workbench.trace import cache_alive
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import (as_trace, check_choice, index_ticks, position_tokens, prompt_length, require,
                                  require_steps, step_tokens, token_ticks, tokens_at)
from workbench.viz.shapes import step_curve

CACHE_VARIABLES = ("cache_evicted_at", "cache_merged_into", "cache_bytes")


def cache_states(trace: Any, layer: int, kv_head: int) -> xr.DataArray:
    """The state of every position after every step, (step, position) strings: "alive" (in the cache),
    "evicted" (dropped), "merged" (evicted after being merged into a kept entry), "not yet cached"."""
    trace = as_trace(trace)
    require(trace, *CACHE_VARIABLES, purpose="cache occupancy")
    layer = check_choice(layer, trace["layer"].values, "layer")
    kv_head = check_choice(kv_head, trace["kv_head"].values, "kv_head")
    alive = cache_alive(trace).sel(layer=layer, kv_head=kv_head)
    given = trace["position"] < prompt_length(trace) + trace["step"]
    merged = trace["cache_merged_into"].sel(layer=layer, kv_head=kv_head) >= 0
    states = xr.where(alive, "alive", xr.where(~given, "not yet cached", xr.where(merged, "merged", "evicted")))
    return states.transpose("step", "position").rename("cache_state")


def cache_occupancy(trace: Any, layer: int = 0, kv_head: int = 0) -> hv.Rectangles:
    """Raster of positions (x) over steps (y) for one layer and KV head, coloured by state: alive, evicted,
    merged, not yet cached. Hover shows the token, its position, its state and the steps it stayed in it."""
    ensure_bokeh()
    trace = as_trace(trace)
    require_steps(trace, "cache occupancy")
    states = cache_states(trace, layer, kv_head)
    layer, kv_head = int(states["layer"]), int(states["kv_head"])
    merged_into = trace["cache_merged_into"].sel(layer=layer, kv_head=kv_head).values
    tokens = position_tokens(trace)
    spans = _spans(states.values)  # one rectangle per run of equal state down a position's column
    data = pd.DataFrame(spans, columns=["position", "first_step", "last_step", "state"])
    data["x0"], data["x1"] = data["position"] - 0.5, data["position"] + 0.5
    data["y0"], data["y1"] = data["first_step"] - 0.5, data["last_step"] + 0.5
    data["token"] = tokens_at(tokens, data["position"])
    data["merged_into"] = [_merge_target(merged_into[p], tokens) if s == "merged" else ""
                           for p, s in zip(data["position"], data["state"])]
    present = [s for s in style.CACHE_STATE_COLORS if s in set(data["state"])]
    return hv.Rectangles(data, ["x0", "y0", "x1", "y1"],
                         ["state", "token", "position", "first_step", "last_step", "merged_into"]).opts(
        backend="bokeh", title=f"cache occupancy, layer {layer} KV head {kv_head}", xlabel="position (token)",
        ylabel="step (after generating)", color="state", line_alpha=0, line_width=0,
        cmap={s: style.CACHE_STATE_COLORS[s] for s in present},
        hover_tooltips=[("token", "@{token}"), ("position", "@{position}"), ("state", "@{state}"),
                        ("steps", "@{first_step}–@{last_step}"), ("merged into", "@{merged_into}")],
        tools=["hover"], show_legend=True, legend_position="right", invert_yaxis=True,
        xticks=token_ticks(tokens), xrotation=90, yticks=index_ticks(states["step"].values, most=12),
        xlim=(-0.5, len(tokens) - 0.5), ylim=(-0.5, states.sizes["step"] - 0.5),
        width=style.WIDTH + 140, height=style.HEIGHT + 60)


def _spans(states: np.ndarray) -> list[tuple[int, int, int, str]]:
    """(position, first step, last step, state) for each run of one state along the step axis."""
    spans = []
    n_steps = states.shape[0]
    for position, column in enumerate(states.T):
        starts = [0, *(np.flatnonzero(column[1:] != column[:-1]) + 1)]
        ends = [*(s - 1 for s in starts[1:]), n_steps - 1]
        spans += [(position, first, last, str(column[first])) for first, last in zip(starts, ends)]
    return spans


def _merge_target(position: int, tokens: list[str]) -> str:
    return f"position {position} ({tokens[position]})"


def cache_bytes(trace: Any, *, title: str | None = None) -> hv.Curve:
    """Bytes the KV cache's tensors held after each step; hover shows the token generated at that step."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "cache_bytes", purpose="cache memory")
    require_steps(trace, "cache memory")
    held = pd.Series(trace["cache_bytes"].values.reshape(-1)).where(lambda v: v >= 0).ffill()  # see below
    # the later tokens of a multi-token step (accepted drafts) hold no value of their own: the step's applies
    return step_curve(trace, "cache_bytes", held.to_numpy(), step_tokens(trace),
                      title=title or "KV cache memory", ylabel="bytes held by the KV cache",
                      hover=("cache", "{0.00 b}"), yformatter=NumeralTickFormatter(format="0.0 b"), ylim=(0, None))
