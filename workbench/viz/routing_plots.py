"""Pictures of MoE routing (record "routing"): which expert each token visits at each layer, how the load spreads
over experts, and how sure the routers are.

    expert_map(trace)        token x layer, colour = the token's top expert there; hover: token, every expert
    expert_load(trace)       per layer and expert, the share of the tokens' expert slots it took
    router_entropy(trace)    token x layer, entropy of the router's distribution
    cache_hit_rates(curves)  expert-cache hit rate against size, one line per policy
    prediction_quality(predicted, events)   each expert predictor's precision per layer
    routing_consistency(events)             SRP and SCH against segment length
"""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
from holoviews.plotting.util import process_cmap

from workbench.routers.events import moe_layers, routing_events
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, index_ticks, position_tokens, require, token_ticks

EXPERT_CMAP = "Category20"


def _routed(trace: Any):
    trace = as_trace(trace)
    require(trace, "expert_ids", "prompt_expert_ids", purpose="MoE routing")
    events = routing_events(trace)
    return trace, events, position_tokens(trace)[:len(events)]


def expert_map(trace: Any, rank: int = 0) -> hv.HeatMap:
    """Each token (prompt then generated, in the order the model routed them) against each MoE layer, coloured
    by its rank-`rank` expert (0: the highest router logit); hover lists all the token's experts there."""
    ensure_bokeh()
    trace, events, tokens = _routed(trace)
    layers = moe_layers(events)
    rows = [{"token_index": t, "layer": layer, "expert": int(events[t, layer, rank]) if rank < events.shape[-1]
             else -1, "token": tokens[t], "experts": ", ".join(str(e) for e in events[t, layer] if e >= 0)}
            for t in range(len(events)) for layer in layers]
    data = pd.DataFrame(rows)
    data = data[data["expert"] >= 0]
    experts = int(events.max()) + 1
    colours = process_cmap(EXPERT_CMAP, ncolors=experts, categorical=True)  # one colour per expert
    return hv.HeatMap(data, ["token_index", "layer"], ["expert", "token", "experts"]).opts(
        backend="bokeh", title=f"expert of each token (rank {rank}) by layer", xlabel="token", ylabel="layer",
        hover_tooltips=[("token", "@{token}"), ("layer", "@{layer}"), ("experts", "@{experts}")],
        tools=["hover"], cmap=colours, color_levels=experts, clim=(-0.5, experts - 0.5), colorbar=True,
        colorbar_opts={"title": "expert"},
        xticks=token_ticks(tokens, most=24), yticks=index_ticks(layers), xrotation=60,
        width=max(style.WIDTH, 14 * len(tokens)), height=style.HEIGHT)


def expert_load(trace: Any) -> hv.HeatMap:
    """Per MoE layer and expert: the share of all expert slots (tokens x k) it took over the run. An even load
    is 1 / experts everywhere; hot experts stand out."""
    ensure_bokeh()
    trace, events, _ = _routed(trace)
    experts = int(events.max()) + 1
    rows = []
    for layer in moe_layers(events):
        used = events[:, layer][events[:, layer] >= 0]
        share = np.bincount(used, minlength=experts) / max(len(used), 1)
        rows += [{"expert": e, "layer": layer, "share": float(share[e])} for e in range(experts)]
    data = pd.DataFrame(rows)
    return hv.HeatMap(data, ["expert", "layer"], ["share"]).opts(
        backend="bokeh", title="expert load (share of expert slots)", xlabel="expert", ylabel="layer",
        hover_tooltips=[("layer", "@{layer}"), ("expert", "@{expert}"), ("share", "@{share}{0.0%}")],
        tools=["hover"], cmap=style.HEATMAP_CMAP, colorbar=True, colorbar_opts={"title": "share"},
        xticks=index_ticks(range(experts)), yticks=index_ticks(moe_layers(events)),
        width=style.SQUARE, height=style.HEIGHT)


def router_entropy(trace: Any) -> hv.HeatMap:
    """Entropy of softmax(router logits) per token and MoE layer (nats): low where the router is sure."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "router_entropy", "prompt_router_entropy", purpose="router entropy")
    values = routing_events(trace, "router_entropy")
    tokens = position_tokens(trace)[:len(values)]
    layers = [layer for layer in range(values.shape[1]) if not np.isnan(values[:, layer]).all()]
    data = pd.DataFrame([{"token_index": t, "layer": layer, "entropy": float(values[t, layer]), "token": tokens[t]}
                         for t in range(len(values)) for layer in layers])
    return hv.HeatMap(data, ["token_index", "layer"], ["entropy", "token"]).opts(
        backend="bokeh", title="router entropy by token and layer", xlabel="token", ylabel="layer",
        hover_tooltips=[("token", "@{token}"), ("layer", "@{layer}"), ("entropy", "@{entropy}{0.000} nats")],
        tools=["hover"], cmap=style.ENTROPY_CMAP, colorbar=True, colorbar_opts={"title": "nats"},
        xticks=token_ticks(tokens, most=24), yticks=index_ticks(layers), xrotation=60,
        width=max(style.WIDTH, 14 * len(tokens)), height=style.HEIGHT)


def cache_hit_rates(curves: dict) -> hv.Overlay:
    """Hit rate against cache size (in active experts per layer) per policy: `curves` maps a label to a
    `workbench.routers.expert_cache.HitRateCurve` (from `hit_rates`)."""
    ensure_bokeh()
    lines = []
    for label, curve in curves.items():
        data = pd.DataFrame({"size": curve.in_active, "hit_rate": curve.hit_rate, "slots": curve.capacities})
        lines.append(hv.Curve(data, "size", ["hit_rate", "slots"], label=label).opts(
            backend="bokeh", tools=["hover"], line_width=2,
            hover_tooltips=[("policy", label), ("size", "@{size}{0.0}x active"), ("slots", "@{slots}"),
                            ("hit rate", "@{hit_rate}{0.0%}")]))
    return hv.Overlay(lines).opts(
        backend="bokeh", title="expert cache hit rate by size", xlabel="cache size (x active experts per layer)",
        ylabel="hit rate", legend_position="bottom_right", width=style.WIDTH, height=style.HEIGHT)


def prediction_quality(scores: dict, events: np.ndarray) -> hv.Overlay:
    """Precision per MoE layer of each expert predictor: `scores` maps a label to its predicted array (from
    workbench.routers.prediction), scored against `events` (the experts actually used)."""
    from workbench.routers.prediction import precision_recall

    ensure_bokeh()
    lines = []
    for label, predicted in scores.items():
        precision, recall = precision_recall(predicted, events)
        data = pd.DataFrame({"layer": np.arange(len(precision)), "precision": precision, "recall": recall}).dropna()
        lines.append(hv.Curve(data, "layer", ["precision", "recall"], label=label).opts(
            backend="bokeh", tools=["hover"], line_width=2,
            hover_tooltips=[("predictor", label), ("layer", "@{layer}"), ("precision", "@{precision}{0.0%}"),
                            ("recall", "@{recall}{0.0%}")]))
    return hv.Overlay(lines).opts(
        backend="bokeh", title="expert prediction precision by layer", xlabel="layer", ylabel="precision",
        ylim=(0, 1.02), legend_position="bottom_right", width=style.WIDTH, height=style.HEIGHT)


def routing_consistency(events: np.ndarray, lengths=None, capacity_in_active: float = 2.0) -> hv.Overlay:
    """SRP and SCH (mean over MoE layers) against segment length, the local routing consistency metrics of
    "Not All Models Suit Expert Offloading" (SCH at a cache of `capacity_in_active` x the active experts)."""
    from workbench.routers import consistency

    ensure_bokeh()
    lengths = [m for m in (lengths or consistency.PAPER_LENGTHS) if m <= len(events)]
    rows = [{"length": m,
             "SRP": float(np.nanmean(consistency.segment_routing_performance(events, m))),
             "SCH": float(np.nanmean(consistency.segment_cache_hit_rate(events, m,
                                                                        capacity_in_active=capacity_in_active)))}
            for m in lengths]
    data = pd.DataFrame(rows).melt("length", var_name="metric", value_name="score")
    curves = [hv.Curve(data[data["metric"] == metric], "length", "score", label=metric).opts(
        backend="bokeh", tools=["hover"], line_width=2, logx=True,
        hover_tooltips=[("segment", "@{length} tokens"), (metric, "@{score}{0.000}")])
        for metric in ("SRP", "SCH")]
    return hv.Overlay(curves).opts(
        backend="bokeh", title="local routing consistency", xlabel="segment length (tokens)", ylabel="score",
        ylim=(0, 1.02), legend_position="bottom_right", width=style.WIDTH, height=style.HEIGHT)
