"""`ComponentPicker`: a dropdown over one registry plus the controls of the chosen component's parameters."""

from __future__ import annotations

import html

import ipywidgets as widgets

from workbench.registry import Component, Registry
from workbench.widgets.controls import STYLE, control_for, value_of


class ComponentPicker:
    """Choose a member of one component family and set its parameters.

    `dropdown` lists `registry.available()`; choosing another member rebuilds `controls` (parameter name ->
    widget) from that member's declared parameters. `component()` builds it through the registry, so bad values
    fail with the registry's own message.
    """

    def __init__(self, registry: Registry, label: str, value: str, int_limit: int = 4096):
        self.registry = registry
        self.int_limit = int_limit
        self.dropdown = widgets.Dropdown(options=registry.available(), value=value, description=label,
                                         style=STYLE)
        self.summary = widgets.HTML()
        self.params_box = widgets.VBox(layout=widgets.Layout(margin="0 0 0 1.5em"))
        self.controls: dict[str, widgets.ValueWidget] = {}
        self.widget = widgets.VBox([self.dropdown, self.summary, self.params_box])
        self.dropdown.observe(self._rebuild, names="value")
        self._rebuild()

    @property
    def name(self) -> str:
        return self.dropdown.value

    def params(self) -> dict:
        """The values the controls hold, as `registry.get(name, **params)` takes them."""
        return {spec.name: value_of(self.controls[spec.name], spec) for spec in self.specs}

    def component(self) -> Component:
        return self.registry.get(self.name, **self.params())

    def _rebuild(self, change=None) -> None:
        cls = self.registry.component_class(self.name)
        self.specs = cls.parameters()
        self.controls = {spec.name: control_for(spec, self.int_limit) for spec in self.specs}
        self.params_box.children = list(self.controls.values())
        paper = f"<br><i>{html.escape(cls.paper)}</i>" if cls.paper else ""
        self.summary.value = f"<small>{html.escape(cls.summary)}{paper}</small>"
