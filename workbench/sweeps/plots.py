"""Pictures of a sweep's dataset (HoloViews, bokeh backend, like workbench.viz):

    heatmap(ds, "accuracy", x="budget", y="cache")       a measure over two axes, the mean over the others
    frontier(ds, x="peak_cache_bytes", y="accuracy")     memory against quality, Pareto-optimal points marked
    spread(ds, "perplexity", x="budget", by="cache")     the mean over seeds with the seeds' spread as error bars

Every function takes the dataset `wb.sweep` returned (or one loaded with xarray) and fails with a one-line
WorkbenchError naming the axes and measures the dataset has.
"""

from __future__ import annotations

import holoviews as hv
import numpy as np
import pandas as pd
import xarray as xr

from workbench.errors import ParameterError
from workbench.viz import style
from workbench.viz.backend import ensure_bokeh

HIGHER_IS_BETTER = {"accuracy": True, "correct": True, "tokens_per_s": True, "decode_tokens_per_s": True,
                    "perplexity": False, "nll": False, "peak_cache_bytes": False, "held_cache_bytes": False,
                    "prefill_seconds": False,
                    "seconds": False}


def measures(ds: xr.Dataset) -> list[str]:
    return [name for name, var in ds.data_vars.items() if var.dtype.kind == "f"]


def _measure(ds: xr.Dataset, name: str) -> xr.DataArray:
    if name not in ds or ds[name].dtype.kind != "f":
        raise ParameterError(f"the sweep has no measure {name!r}; measures: {', '.join(measures(ds)) or 'none yet'}")
    return ds[name]


def _axis(ds: xr.Dataset, name: str) -> str:
    if name not in ds.dims:
        raise ParameterError(f"the sweep has no axis {name!r}; axes: {', '.join(map(str, ds.dims)) or 'none'}")
    return name


def default_axes(ds: xr.Dataset, count: int = 2) -> list[str]:
    """The first `count` axes with more than one value, seeds last (they are usually averaged)."""
    names = [d for d in ds.dims if ds.sizes[d] > 1 and d != "seed"] + (["seed"] if ds.sizes.get("seed", 0) > 1
                                                                           else [])
    names += [d for d in ds.dims if d not in names]
    return names[:count]


def _mean_over_others(values: xr.DataArray, keep: list[str]) -> xr.DataArray:
    others = [d for d in values.dims if d not in keep]
    return values.mean(others, skipna=True) if others else values


def heatmap(ds: xr.Dataset, measure: str, x: str | None = None, y: str | None = None, *,
            title: str | None = None) -> hv.HeatMap:
    """`measure` over axes x and y (default the first two with several values), the mean over every other axis;
    cells not computed yet are blank."""
    ensure_bokeh()
    values = _measure(ds, measure)
    axes = default_axes(ds)
    x = _axis(ds, x or axes[0])
    y = _axis(ds, y or (axes[1] if len(axes) > 1 and axes[1] != x else axes[0]))
    if x == y:
        raise ParameterError(f"heatmap needs two different axes, got x = y = {x!r}")
    grid = _mean_over_others(values, [x, y]).transpose(y, x)
    frame = pd.DataFrame([(str(xv), str(yv), float(grid.sel({x: xv, y: yv})))
                          for yv in grid[y].values for xv in grid[x].values], columns=[x, y, measure])
    averaged = [d for d in values.dims if d not in (x, y)]
    note = f" (mean over {', '.join(averaged)})" if averaged else ""
    finite = frame[measure].dropna()
    cmap = style.HEATMAP_CMAP if HIGHER_IS_BETTER.get(measure, True) else style.HEATMAP_CMAP + "_r"
    plot = hv.HeatMap(frame, [x, y], measure).opts(
        backend="bokeh", cmap=cmap, colorbar=True, tools=["hover"], width=style.WIDTH, height=style.HEIGHT + 60,
        title=title or f"{measure}{note}", xlabel=x, ylabel=y, xrotation=30, clipping_colors={"NaN": style.NO_VALUE_COLOR},
        clim=(float(finite.min()), float(finite.max())) if len(finite) else (0, 1))
    labels = hv.Labels(frame.dropna().assign(text=lambda f: f[measure].map(_short)), [x, y], "text").opts(
        backend="bokeh", text_font_size="9pt", text_color="white")
    return plot * labels


def _short(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def pareto(points: np.ndarray, higher_y: bool) -> np.ndarray:
    """Indices of the Pareto-optimal rows of `points` (x: lower is better; y: higher is better if higher_y): no
    other point is at least as good on both and better on one. Ties: the first of equal points is kept."""
    best = []
    for i, (xi, yi) in enumerate(points):
        dominated = False
        for j, (xj, yj) in enumerate(points):
            if j == i:
                continue
            better_y = yj >= yi if higher_y else yj <= yi
            strictly = xj < xi or (yj > yi if higher_y else yj < yi)
            if xj <= xi and better_y and (strictly or j < i):
                dominated = True
                break
        if not dominated:
            best.append(i)
    return np.array(best, dtype=int)


def frontier(ds: xr.Dataset, x: str = "peak_cache_bytes", y: str = "accuracy", *, by: str | None = None,
             title: str | None = None) -> hv.Overlay:
    """Every configuration as a point (means over seeds and tasks where they apply), coloured by axis `by`
    (default the first non-budget axis); the Pareto front - less of x, better y - drawn as a line and ringed."""
    ensure_bokeh()
    xs, ys = _measure(ds, x), _measure(ds, y)
    by = _axis(ds, by) if by else next((d for d in default_axes(ds, len(ds.dims)) if d not in ("budget", "seed",
                                                                                                "task")), None)
    keep = [d for d in ds.dims if d not in ("seed", "task")]
    mean_x, mean_y = _mean_over_others(xs, keep), _mean_over_others(ys, keep)
    frame = mean_x.to_dataframe(name=x).join(mean_y.to_dataframe(name=y)).reset_index()
    frame = frame[[c for c in frame.columns if c in keep or c in (x, y)]].dropna(subset=[x, y])
    if frame.empty:
        raise ParameterError(f"no grid point has both {x} and {y} yet")
    frame["label"] = frame[keep].astype(str).agg(" ".join, axis=1)
    higher = HIGHER_IS_BETTER.get(y, True)
    front = frame.iloc[pareto(frame[[x, y]].to_numpy(float), higher)].sort_values(x)
    points = hv.Points(frame, [x, y], ["label"] + ([by] if by else [])).opts(
        backend="bokeh", color=by if by else "#1f77b4", cmap="Category10", size=8, tools=["hover"],
        hover_tooltips=[("configuration", "@{label}"), (x, f"@{{{x}}}"), (y, f"@{{{y}}}")], legend_position="right")
    line = hv.Curve(front, x, y, label="Pareto front").opts(backend="bokeh", color="black", line_dash="dashed")
    rings = hv.Points(front, [x, y], ["label"], label="Pareto-optimal").opts(
        backend="bokeh", fill_alpha=0, line_color="black", line_width=2, size=14)
    better = "higher" if higher else "lower"
    return (points * line * rings).opts(
        backend="bokeh", width=style.WIDTH + 160, height=style.HEIGHT + 80,
        title=title or f"{y} ({better} is better) against {x} (lower is better)")


def spread(ds: xr.Dataset, measure: str, x: str | None = None, *, by: str | None = None,
           title: str | None = None) -> hv.Overlay:
    """The mean of `measure` over seeds along axis x, one line per value of `by`, with error bars of one
    standard deviation across seeds (other axes averaged first)."""
    ensure_bokeh()
    values = _measure(ds, measure)
    if "seed" not in values.dims:
        raise ParameterError("spread needs a seed axis with several seeds; the sweep has none")
    axes = [d for d in default_axes(ds, len(ds.dims)) if d != "seed"]
    x = _axis(ds, x or axes[0])
    by = _axis(ds, by) if by else next((d for d in axes if d != x), None)
    keep = [d for d in (x, by) if d] + ["seed"]
    per_seed = _mean_over_others(values, keep)
    mean, std = per_seed.mean("seed", skipna=True), per_seed.std("seed", skipna=True)
    layers = []
    for group in (mean[by].values if by else [None]):
        m = mean.sel({by: group}) if by else mean
        s = std.sel({by: group}) if by else std
        frame = pd.DataFrame({x: [str(v) for v in m[x].values], measure: m.values, "std": s.values})
        label = str(group) if by else measure
        layers.append(hv.Curve(frame, x, measure, label=label) * hv.ErrorBars(frame, x, [measure, "std"]))
    return hv.Overlay(layers).opts(
        backend="bokeh", width=style.WIDTH + 160, height=style.HEIGHT + 40, legend_position="right",
        title=title or f"{measure}: mean over {ds.sizes['seed']} seeds, bars one standard deviation")
