"""Saving plots: a standalone HTML file with bokeh's JavaScript inlined (opens offline), or a static PNG drawn by
HoloViews' matplotlib backend."""

from __future__ import annotations

from pathlib import Path

import holoviews as hv

from workbench.errors import WorkbenchError
from workbench.viz.backend import ensure_bokeh
from workbench.viz.resources import SelfContained

# bokeh options that mean something else, or nothing, to matplotlib: never carried over as they are
BOKEH_ONLY = {"width", "height", "tools", "hover_tooltips", "hover_mode", "toolbar", "xformatter", "yformatter",
              "colorbar_opts", "legend_position", "fontsize", "text_font"}
# bokeh style names and their matplotlib equivalents
RENAMED = {"line_color": "edgecolor", "line_width": "linewidth", "text_color": "color", "text_font_size": "size"}
# what a static picture needs that an interactive one does not: hover shows values, so a PNG's heat map should not
# print them in its cells, and a layout's panels need no "A", "B" labels
STATIC_EXTRAS = {"HeatMap": {"show_values": False}, "Layout": {"sublabel_format": "", "vspace": 0.5, "hspace": 0.5}}
# smaller text than matplotlib's default, so that long titles of panels side by side do not run into each other
STATIC_FONTS = {"title": 10, "labels": 9, "ticks": 8}


def save_html(plot: hv.core.Dimensioned, path: str | Path, *, title: str | None = None) -> Path:
    """Write `plot` as a standalone HTML page with bokeh's JS and CSS inlined: no CDN, works without a network."""
    from bokeh.embed import file_html

    ensure_bokeh()
    path = _prepare(path, ".html")
    page = file_html(hv.render(plot, backend="bokeh"), resources=SelfContained(), title=title or _title(plot))
    path.write_text(page, encoding="utf-8")
    return path


def save_png(plot: hv.core.Dimensioned, path: str | Path, *, dpi: int = 110) -> Path:
    """Write `plot` as a PNG through HoloViews' matplotlib backend (titles, labels, ticks and colour maps carried
    over from the bokeh options; hover and sizes in pixels have no static meaning). Needs matplotlib."""
    try:  # matplotlib picks a non-interactive canvas itself where there is no display
        import holoviews.plotting.mpl  # noqa: F401  (registers the matplotlib backend without switching to it)
    except ImportError as error:
        raise WorkbenchError("save_png draws with matplotlib, which is not installed: pip install matplotlib") \
            from error
    ensure_bokeh()
    path = _prepare(path, ".png")
    static = _with_matplotlib_options(plot)
    hv.save(static, path, backend="matplotlib", fmt="png", dpi=dpi)
    return path


def _with_matplotlib_options(plot):
    """A copy of `plot` whose elements also carry, for matplotlib, the bokeh options matplotlib understands."""
    plot = plot.map(lambda element: element.clone(), [hv.Element])

    def carry(obj):
        allowed = hv.Store.options(backend="matplotlib")
        kind = type(obj).__name__
        if kind not in allowed.children:
            return obj
        keywords = {k for group in ("plot", "style") for k in allowed[kind].groups[group].allowed_keywords}
        given = {**hv.Store.lookup_options("bokeh", obj, "plot").kwargs,
                 **hv.Store.lookup_options("bokeh", obj, "style").kwargs}
        options = {RENAMED.get(k, k): _static_value(k, v) for k, v in given.items() if k not in BOKEH_ONLY}
        if "width" in given and "height" in given:  # keep the shape the plot was designed with
            options["aspect"] = given["width"] / given["height"]
            options["fig_inches"] = given["width"] / 100
        if given.get("fill_alpha") == 0:  # an outline only (compare's divergence mark)
            options["facecolor"] = "none"
        options.update(STATIC_EXTRAS.get(kind, {}))
        options.setdefault("fontsize", STATIC_FONTS)
        options = {k: v for k, v in options.items() if k in keywords}
        if options:
            obj.opts(backend="matplotlib", **options)
        return obj

    plot.traverse(carry)
    return plot


def _static_value(name: str, value):
    """A bokeh option value as matplotlib takes it: font sizes in CSS pixels or points become numbers of points."""
    if name == "text_font_size" and isinstance(value, str) and value[-2:] in ("px", "pt"):
        # a figure is width/100 inches wide and its axes about three quarters of that
        return float(value[:-2]) * (0.55 if value.endswith("px") else 0.75)
    return value


def _prepare(path: str | Path, suffix: str) -> Path:
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise WorkbenchError(f"expected a {suffix} path, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _title(plot) -> str:
    title = hv.Store.lookup_options("bokeh", plot, "plot").kwargs.get("title")
    return str(title) if title else "workbench plot"
