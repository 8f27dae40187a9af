"""Entropy plots: next-token entropy over steps, attention entropy over steps and layers, and over layers and
heads (where each head looks: low entropy is a sharp, focused head; high is a head spread over many tokens)."""

from __future__ import annotations

from typing import Any

import holoviews as hv

from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import as_trace, check_choice, index_ticks, require, require_steps, step_tokens
from workbench.viz.shapes import step_curve, step_layer_heatmap


def entropy_curve(trace: Any, *, title: str | None = None) -> hv.Curve:
    """Next-token entropy (nats) at every step; hover shows the token chosen there."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "entropy", purpose="next-token entropy")
    require_steps(trace, "entropy")
    return step_curve(trace, "entropy", trace["entropy"].values.astype(float), step_tokens(trace),
                      title=title or "next-token entropy", ylabel="entropy (nats)", hover=("entropy", "{0.000} nats"))


def entropy_heatmap(trace: Any, head: int | None = None) -> hv.HeatMap:
    """Attention entropy of the row that chose each token, step x layer: one head's, or the mean over heads
    (head=None). Hover shows the step's token."""
    ensure_bokeh()
    trace = as_trace(trace)
    require(trace, "attention_entropy", purpose="attention entropy")
    require_steps(trace, "attention entropy")
    values = trace["attention_entropy"]
    if head is None:
        values, which = values.mean("head"), "mean over heads"
    else:
        head = check_choice(head, trace["head"].values, "head")
        values, which = values.sel(head=head), f"head {head}"
    return step_layer_heatmap(trace, "attention_entropy", values, step_tokens(trace),
                              title=f"attention entropy by step and layer ({which})",
                              hover=("entropy", "{0.000} nats"), colorbar_title="nats")


def head_entropy_map(trace: Any, step: int | None = None) -> hv.HeatMap:
    """Attention entropy per layer and head: averaged over the prompt's query rows (step=None), or the row that
    chose the token at `step`."""
    ensure_bokeh()
    trace = as_trace(trace)
    if step is None:
        require(trace, "prompt_attention_entropy", purpose="attention entropy over the prompt")
        values = trace["prompt_attention_entropy"].mean("query")
        token, which = f"(mean of {trace.sizes['query']} prompt rows)", "prompt mean"
    else:
        require(trace, "attention_entropy", purpose="attention entropy")
        require_steps(trace, "attention entropy")
        step = check_choice(step, trace["step"].values, "step")
        values = trace["attention_entropy"].sel(step=step)
        token = step_tokens(trace)[step]
        which = f"step {step}, token '{token}'"
    data = values.transpose("layer", "head").to_dataframe(name="attention_entropy").reset_index()
    data = data[["head", "layer", "attention_entropy"]]
    data["token"] = token
    return hv.HeatMap(data, ["head", "layer"], ["attention_entropy", "token"]).opts(
        backend="bokeh", title=f"attention entropy per head ({which})", xlabel="head", ylabel="layer",
        hover_tooltips=[("layer", "@{layer}"), ("head", "@{head}"), ("token", "@{token}"),
                        ("entropy", "@{attention_entropy}{0.000} nats")],
        tools=["hover"], cmap=style.HEATMAP_CMAP, colorbar=True, colorbar_opts={"title": "nats"},
        xticks=index_ticks(trace["head"].values), yticks=index_ticks(trace["layer"].values),
        width=style.SQUARE, height=style.HEIGHT)
