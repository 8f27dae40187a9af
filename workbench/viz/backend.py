"""The HoloViews backend the plots are built for (bokeh), and `setup()` for notebooks that must work offline.

Building a plot needs bokeh's plotting options registered, not a notebook: `ensure_bokeh()` imports them once
without touching the notebook. Displaying plots in JupyterLab needs the bokeh and HoloViews JavaScript in the
page; `setup()` puts it there inline, so nothing is fetched from a CDN.
"""

from __future__ import annotations

import holoviews as hv


def ensure_bokeh() -> None:
    """Register HoloViews' bokeh plotting options (idempotent; makes bokeh the current backend if none was)."""
    if "bokeh" not in hv.Store.renderers:
        import holoviews.plotting.bokeh  # noqa: F401  (registers the renderer and its options)
    if hv.Store.current_backend not in hv.Store.renderers:
        hv.Store.set_current_backend("bokeh")


def setup(*, logo: bool = False) -> None:
    """Load HoloViews' bokeh backend for a notebook, with every JS/CSS resource inlined (works offline).

    Call it once near the top of a notebook, before the first plot:

        import workbench as wb
        wb.viz.setup()

    It is `hv.extension("bokeh", inline=True)`: the bokeh, Panel and HoloViews JavaScript goes into the
    notebook's output itself instead of `<script src=...>` tags pointing at a CDN, so plots render in an offline
    JupyterLab and in a saved notebook opened later without a network (JupyterLab also needs the
    `@pyviz/jupyterlab_pyviz` extension, which the `pyviz_comms` package installs). It also sets bokeh's own
    default resources to inline, so `bokeh.io.save`/`show` called directly embed their scripts as well.
    """
    import panel as pn
    from bokeh.settings import settings
    from panel.viewable import Viewable

    settings.resources.set_value("inline")
    pn.config.inline = True
    # HoloViews' notebook display links Panel's stylesheets from cdn.holoviz.org even when inline; swap the links
    # for the CSS Panel ships. `_preprocessing_hooks` is private Panel API (Panel's own modules use it).
    if _inline_stylesheets not in Viewable._preprocessing_hooks:
        Viewable._preprocessing_hooks.append(_inline_stylesheets)
    hv.extension("bokeh", inline=True, logo=logo)


def _inline_stylesheets(viewable, root) -> None:
    """Replace Panel's stylesheet links to the CDN in a model tree by the CSS Panel ships."""
    from bokeh.models import UIElement
    from panel.io.notebook import patch_inline_stylesheets

    for model in root.select({"type": UIElement}):
        patch_inline_stylesheets(model)
