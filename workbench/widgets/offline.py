"""Showing HoloViews objects inside widgets so that they render without a network."""

from __future__ import annotations


def offline_view(plot):
    """A Panel view of a HoloViews object, for `Output.append_display_data`.

    HoloViews renders through Panel, whose layout stylesheets are links to cdn.holoviz.org unless
    `panel.config.inline` is set; a Panel object displayed with it set carries their CSS inline instead, so the
    plot's page makes no request outside the Jupyter server.
    """
    import panel as pn

    pn.config.inline = True
    return pn.panel(plot)
