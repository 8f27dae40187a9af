"""Bokeh resources for pages that must open offline: everything inline, and no external script or stylesheet URLs.

bokeh's own INLINE resources still list the external files that any *registered* model class declares, used or
not: once HoloViews has imported Panel, that is a relative `<script src="static/extensions/panel/...">` which a
standalone file cannot load. The plots here use none of those models, so the pages leave them out.
"""

from __future__ import annotations

from bokeh.resources import Resources


class SelfContained(Resources):
    """`Resources(mode="inline")` without external files: the page carries all the JavaScript and CSS it runs."""

    def __init__(self, components: list[str] | None = None):
        super().__init__(mode="inline", components=components)

    @property
    def js_files(self) -> list[str]:
        return []

    @property
    def css_files(self) -> list[str]:
        return []

    def clone(self, *, components: list[str] | None = None) -> SelfContained:
        # bokeh clones resources to drop unused components; the clone must stay self-contained
        return SelfContained(components=components if components is not None else list(self.components))
