"""`token_stream`: the generated text laid out token by token, each token on a cell coloured by the entropy of
the distribution it was chosen from, so uncertain moments stand out while reading."""

from __future__ import annotations

from typing import Any

import holoviews as hv
import numpy as np
import pandas as pd
from bokeh.core.property.vectorization import value

from workbench.errors import ParameterError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh
from workbench.viz.inputs import (as_trace, check_choice, position_tokens, prompt_length, require, require_steps,
                                  step_tokens)

LINE_PIXELS = 24
CORNERS = ["x0", "y0", "x1", "y1"]


def token_stream(trace: Any, *, prompt: bool = False, line_chars: int = 48, mark_step: int | None = None,
                 title: str | None = None, color_by: str = "entropy") -> hv.Overlay:
    """Generated tokens as text, wrapped into lines of about `line_chars` characters, coloured by next-token
    entropy when the trace recorded it ("entropy"); hover shows each token's text, step and entropy.

    prompt    -- show the prompt's tokens first, in grey
    mark_step -- outline the token of this step (compare() marks where two runs diverge)
    color_by  -- "entropy", or "origin": where a speculative decoder's token came from (accepted draft,
                 resampled, bonus, plain; record "decoding")
    """
    ensure_bokeh()
    trace = as_trace(trace)
    require_steps(trace, "a token stream")
    if isinstance(line_chars, bool) or not isinstance(line_chars, int) or line_chars < 8:
        raise ParameterError(f"line_chars must be an integer >= 8, got {line_chars!r}")
    shown_prompt = position_tokens(trace)[:prompt_length(trace)] if prompt else []
    cells = _wrap(shown_prompt + step_tokens(trace), line_chars)
    prompt_cells, cells = cells.iloc[:len(shown_prompt)].copy(), cells.iloc[len(shown_prompt):].copy()
    prompt_cells["position"] = np.arange(len(shown_prompt))
    cells["step"] = trace["step"].values
    if color_by not in ("entropy", "origin"):
        raise ParameterError(f"color_by must be 'entropy' or 'origin', got {color_by!r}")
    if color_by == "origin":
        require(trace, "token_origin", purpose="a token stream coloured by origin")
    has_entropy = "entropy" in trace
    cells["entropy"] = trace["entropy"].values.astype(float) if has_entropy else np.nan

    layers = [] if not prompt else [hv.Rectangles(prompt_cells, CORNERS, ["token", "position"], label="prompt").opts(
        backend="bokeh", hover_tooltips=[("prompt token", "@{token}"), ("position", "@{position}")],
        color=style.NO_VALUE_COLOR, line_color="white", line_width=2)]
    if color_by == "origin":
        cells["origin"] = trace["token_origin"].values.astype(str)
        layers += _origin_cells(cells)
    else:
        layers.append(_generated_cells(cells, has_entropy))
    if mark_step is not None:
        step = check_choice(mark_step, trace["step"].values, "step")
        layers.append(hv.Rectangles(cells.iloc[[step]], CORNERS, ["token", "step"], label="marked").opts(
            backend="bokeh", fill_alpha=0, line_color=style.DIVERGENCE_COLOR, line_width=3,
            hover_tooltips=[("marked token", "@{token}"), ("step", "@{step}")]))
    everything = pd.concat([prompt_cells, cells])
    # the text must fit inside its cells: one character of a cell is frame / (line_chars + 1) pixels, less the 2 px
    # of white border between cells, the frame being the width less the colorbar, its labels and the margins
    # (~170 px, measured in the browser test's screenshot), and a monospace glyph is ~0.6 em wide (DejaVu: 0.602)
    frame = style.WIDTH - 170
    font_pixels = min(16, max(6, int((frame / (line_chars + 1) - 2) / 0.62)))
    layers.append(hv.Labels(everything, ["x", "y"], "token").opts(
        backend="bokeh", text_font=value("monospace"), text_font_size=f"{font_pixels}px", text_color="black"))
    lines = int(everything["y1"].max()) + 1
    default = "generated tokens, coloured by next-token entropy" if has_entropy else \
        "generated tokens (record 'entropy' to colour them by it)"
    if color_by == "origin":
        default = "generated tokens by origin (accepted and rejected drafts)"
    return hv.Overlay(layers).opts(
        backend="bokeh", title=title or default, xaxis=None, yaxis=None, invert_yaxis=True,
        show_legend=color_by == "origin", legend_position="right",
        width=style.WIDTH, height=max(120, 60 + LINE_PIXELS * lines), xlim=(-0.5, line_chars + 0.5),
        ylim=(-0.2, lines + 0.2), toolbar="above")


def _generated_cells(cells: pd.DataFrame, has_entropy: bool) -> hv.Rectangles:
    tokens = hv.Rectangles(cells, CORNERS, ["token", "step", "entropy"], label="generated").opts(
        backend="bokeh", line_color="white", line_width=2,
        hover_tooltips=[("token", "@{token}"), ("step", "@{step}"), ("entropy", "@{entropy}{0.000} nats")])
    if not has_entropy:
        return tokens.opts(backend="bokeh", color="#cfe3f5")
    return tokens.opts(backend="bokeh", color="entropy", cmap=style.ENTROPY_CMAP, colorbar=True,
                       clim=(0.0, max(float(np.nanmax(cells["entropy"])), 1e-6)),
                       colorbar_opts={"title": "entropy (nats)"})


def _origin_cells(cells: pd.DataFrame) -> list[hv.Rectangles]:
    """One layer of cells per origin, each in its fixed colour (a legend entry each)."""
    return [hv.Rectangles(cells[cells["origin"] == origin], CORNERS, ["token", "step", "origin"],
                          label=origin).opts(
        backend="bokeh", color=colour, line_color="white", line_width=2,
        hover_tooltips=[("token", "@{token}"), ("step", "@{step}"), ("origin", "@{origin}")])
        for origin, colour in style.ORIGIN_COLORS.items() if (cells["origin"] == origin).any()]


def _wrap(tokens: list[str], line_chars: int) -> pd.DataFrame:
    """One cell per token, in character units: tokens fill a line left to right and a token that would overflow
    starts the next one; a token that is a newline ends its line."""
    rows, column, line = [], 0, 0
    for token in tokens:
        width = max(len(token), 1)
        if column and column + width > line_chars:
            column, line = 0, line + 1
        rows.append({"x0": column, "x1": column + width, "y0": line + 0.05, "y1": line + 0.95,
                     "x": column + width / 2, "y": line + 0.5, "token": token})
        column += width
        if token.endswith("↵"):
            column, line = 0, line + 1
    return pd.DataFrame(rows, columns=["x0", "y0", "x1", "y1", "x", "y", "token"])
