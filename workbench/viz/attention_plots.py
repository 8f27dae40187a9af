"""`attention_pattern`: where one head of one layer looked — the prompt's query x key matrix from the prefill,
or the single row of the query that chose a generated token."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
import xarray as xr

from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import (as_trace, check_choice, position_tokens, prompt_length, require, require_steps,
                                  step_tokens, token_ticks, tokens_at)

RECORD_HINT = " (choose them with record={'attention': {'layers': [...], 'heads': [...]}})"


def attention_pattern(trace: Any, layer: int, head: int, step: int | None = None) -> hv.HeatMap | hv.Spikes:
    """Attention weights of `head` in `layer`: with step=None the prompt's matrix (queries x keys, prompt tokens on
    both axes); with a step, the row of the query that chose that token, over the positions it could see.

    Needs record=["attention"] (or {"attention": {"layers": [...], "heads": [...]}}: then only those rows exist).
    """
    ensure_bokeh()
    trace = as_trace(trace)
    needed = "prompt_attention" if step is None else "attention"
    require(trace, needed, purpose="attention patterns")
    layer = check_choice(layer, trace["attn_layer"].values, "attention layer", RECORD_HINT)
    head = check_choice(head, trace["attn_head"].values, "attention head", RECORD_HINT)
    if step is None:
        return _prompt_matrix(trace, layer, head)
    require_steps(trace, "attention rows")
    step = check_choice(step, trace["step"].values, "step")
    return _step_row(trace, layer, head, step)


def _prompt_matrix(trace: xr.Dataset, layer: int, head: int) -> hv.HeatMap:
    n_prompt = prompt_length(trace)
    weights = trace["prompt_attention"].sel(attn_layer=layer, attn_head=head).values[:, :n_prompt]
    tokens = position_tokens(trace)[:n_prompt]
    query, key = np.meshgrid(np.arange(n_prompt), np.arange(n_prompt), indexing="ij")
    visible = key <= query  # causal: keys after the query were never attended to
    key, query = key[visible], query[visible]
    data = pd.DataFrame({"key": key, "query": query, "attention": weights[visible].astype(float),
                         "query_token": tokens_at(tokens, query), "key_token": tokens_at(tokens, key)})
    ticks = token_ticks(tokens)
    return hv.HeatMap(data, ["key", "query"], ["attention", "query_token", "key_token"]).opts(
        backend="bokeh",
        title=f"prompt attention, layer {layer} head {head}", xlabel="key (position)", ylabel="query (position)",
        hover_tooltips=[("query", "@{query} @{query_token}"), ("key", "@{key} @{key_token}"),
                        ("attention", "@{attention}{0.0000}")],
        tools=["hover"], cmap=style.ATTENTION_CMAP, colorbar=True, clim=(0.0, 1.0), invert_yaxis=True,
        xticks=ticks, yticks=ticks, xrotation=90, width=style.SQUARE + 120, height=style.SQUARE + 60)


def _step_row(trace: xr.Dataset, layer: int, head: int, step: int) -> hv.Spikes:
    row = trace["attention"].sel(step=step, attn_layer=layer, attn_head=head).values
    seen = ~np.isnan(row)
    chosen = step_tokens(trace)[step]
    keys = np.flatnonzero(seen)
    # rows are over token positions (the recorder maps cache slots back; evicted positions hold 0)
    tokens = position_tokens(trace)
    data = pd.DataFrame({"key": keys, "attention": row[seen].astype(float), "key_token": tokens_at(tokens, keys)})
    data["token"] = chosen
    return hv.Spikes(data, "key", ["attention", "key_token", "token"]).opts(
        backend="bokeh", title=f"attention of step {step} (token '{chosen}'), layer {layer} head {head}",
        xlabel="position", ylabel="attention weight",
        hover_tooltips=[("token", "@{token}"), ("position", "@{key} @{key_token}"),
                        ("attention", "@{attention}{0.0000}")],
        tools=["hover"], line_width=3, color=style.RUN_COLORS[0], width=style.WIDTH, height=style.HEIGHT,
        xticks=token_ticks(tokens[:len(keys)]), xrotation=90)
