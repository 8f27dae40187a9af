"""`Configuration`: one picker per component family, i.e. everything `generate` needs besides the prompt."""

from __future__ import annotations

import ipywidgets as widgets

from workbench.registry import Component, Registry
from workbench.widgets.picker import ComponentPicker


class Configuration:
    """A column of component pickers, one per family (attention, cache, decoder, router).

    families -- generate() keyword -> registry, e.g. {"cache": workbench.cache.registry}
    chosen   -- generate() keyword -> the member selected at first, e.g. {"cache": "full"}
    """

    def __init__(self, title: str, families: dict[str, Registry], chosen: dict[str, str], int_limit: int):
        self.title = title
        self.pickers = {family: ComponentPicker(registry, family, chosen[family], int_limit)
                        for family, registry in families.items()}
        header = widgets.HTML(f"<b>configuration {title}</b>")
        self.widget = widgets.VBox([header, *(picker.widget for picker in self.pickers.values())],
                                   layout=widgets.Layout(border="1px solid #ddd", padding="4px", margin="2px",
                                                         width="50%"))

    def components(self) -> dict[str, Component]:
        """Build every chosen component (a bad parameter raises the registry's ParameterError)."""
        return {family: picker.component() for family, picker in self.pickers.items()}
