"""Pictures of the decoder layers (record "layers"): the logit lens and how much each layer changes the stream.

    logit_lens(trace)         per layer: how often its lens already gives the model's token, and its KL
    layer_similarity(trace)   token x layer, cosine of each layer's input and output; skipped layers marked
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd

from workbench.routers.early_exit import early_exit
from workbench.routers.events import sequence_values
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, index_ticks, position_tokens, require, token_ticks


def logit_lens(trace: Any) -> hv.Layout:
    """Left: per layer, the share of steps whose logit-lens top token is the model's own (early-exit agreement);
    right: the mean KL(model || lens) in nats. Skipped layers (a layer router) are listed in the hover."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "lens_token", "lens_kl", purpose="the logit lens")
    table = early_exit(trace)
    hover = [("layer", "@{layer}"), ("agreement", "@{agreement}{0.0%}"), ("KL", "@{kl}{0.00} nats"),
             ("skipped", "@{skipped}{0%} of steps")]
    agreement = hv.Curve(table, "layer", ["agreement", "kl", "skipped"]).opts(
        backend="bokeh", title="logit lens: the layer already gives the model's token", ylabel="share of steps",
        ylim=(0, 1.02), tools=["hover"], hover_tooltips=hover, line_width=2, width=style.WIDTH // 2 + 80,
        height=style.HEIGHT)
    kl = hv.Curve(table, "layer", ["kl", "agreement", "skipped"]).opts(
        backend="bokeh", title="logit lens: KL from the model's distribution", ylabel="nats", tools=["hover"],
        hover_tooltips=hover, line_width=2, color="#d62728", width=style.WIDTH // 2 + 80, height=style.HEIGHT)
    return (agreement * hv.Scatter(table, "layer", "agreement").opts(backend="bokeh", size=5) + kl).cols(2)


def layer_similarity(trace: Any) -> hv.HeatMap:
    """Each token (prompt, then generated) against each decoder layer: cosine similarity of the layer's input
    and output hidden state (1: the layer changed nothing). Layers a pass skipped show 1 and say so in the hover."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "layer_similarity", "prompt_layer_similarity", purpose="layer similarity")
    prompt = sequence_values(trace, "prompt_layer_similarity")
    steps = sequence_values(trace, "layer_similarity")
    skipped = sequence_values(trace, "layer_skipped")
    values = np.concatenate([prompt, steps[1:]])  # step 0's query is the prompt's last row
    skips = np.concatenate([np.zeros_like(prompt, dtype=np.int64), skipped[1:]])
    tokens = position_tokens(trace)[:len(values)]
    data = pd.DataFrame([{"token_index": t, "layer": layer, "similarity": float(values[t, layer]),
                          "token": tokens[t], "skipped": "yes" if skips[t, layer] == 1 else "no"}
                         for t in range(len(values)) for layer in range(values.shape[1])]).dropna()
    return hv.HeatMap(data, ["token_index", "layer"], ["similarity", "token", "skipped"]).opts(
        backend="bokeh", title="cosine of each layer's input and output", xlabel="token", ylabel="layer",
        hover_tooltips=[("token", "@{token}"), ("layer", "@{layer}"), ("cosine", "@{similarity}{0.000}"),
                        ("skipped", "@{skipped}")],
        tools=["hover"], cmap=style.HEATMAP_CMAP, colorbar=True, colorbar_opts={"title": "cosine"},
        xticks=token_ticks(tokens, most=24), yticks=index_ticks(range(values.shape[1])), xrotation=60,
        width=max(style.WIDTH, 14 * len(tokens)), height=style.HEIGHT)
