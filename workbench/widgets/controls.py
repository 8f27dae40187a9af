"""ipywidgets generated from a component's declared parameters (`workbench.registry.param`).

One rule table turns a `ParamSpec` into a control, so every registered component gets a panel without writing
one by hand:

    choices                    -> Dropdown
    bool                       -> Checkbox
    may be None (`int | None`) -> Text; empty means None (the registry converts the text to the declared type)
    int with min and max       -> IntSlider
    int with a min only        -> IntSlider up to `int_limit` (the model's context length: budgets, windows and
                                  other token counts cannot usefully exceed it); BoundedIntText past that
    float with min and max     -> FloatSlider
    other int / float          -> BoundedIntText / BoundedFloatText (no invented upper bound)
    anything else              -> Text
"""

from __future__ import annotations

from typing import Any

import ipywidgets as widgets

from workbench.registry import ParamSpec, accepts_none, value_types

STYLE = {"description_width": "initial"}
UNBOUNDED = 1e12  # what Bounded*Text widgets use for a side the declaration leaves open


def control_for(spec: ParamSpec, int_limit: int = 4096) -> widgets.ValueWidget:
    """The widget that edits one parameter, initialised to its default, with its help text as the tooltip."""
    common = {"description": spec.name, "tooltip": spec.help, "style": STYLE}
    kind = _base_type(spec.type)
    if spec.choices is not None:
        return widgets.Dropdown(options=list(spec.choices), value=spec.default, **common)
    if kind is bool:
        return widgets.Checkbox(value=bool(spec.default), indent=False, **common)
    if accepts_none(spec.type) or kind is None:
        text = "" if spec.default is None else str(spec.default)
        return widgets.Text(value=text, placeholder="None", **common)
    if kind is int:
        return _int_control(spec, int_limit, common)
    if kind is float:
        return _float_control(spec, common)
    return widgets.Text(value="" if spec.default is None else str(spec.default), **common)


def value_of(control: widgets.ValueWidget, spec: ParamSpec) -> Any:
    """The parameter value a control holds. Text boxes give their text for the registry to convert to the
    declared type; an empty box means None where the parameter accepts None."""
    value = control.value
    if isinstance(control, widgets.Text) and accepts_none(spec.type):
        value = value.strip()
        return None if value == "" else value
    return value


def _int_control(spec: ParamSpec, int_limit: int, common: dict) -> widgets.ValueWidget:
    low = int(spec.min) if spec.min is not None else None
    high = int(spec.max) if spec.max is not None else None
    default = int(spec.default)
    if low is not None and high is None and low < int_limit and default <= int_limit:
        high = int_limit
    if low is not None and high is not None:
        return widgets.IntSlider(value=default, min=low, max=high, continuous_update=False, **common)
    return widgets.BoundedIntText(value=default, min=low if low is not None else -int(UNBOUNDED),
                                  max=high if high is not None else int(UNBOUNDED), **common)


def _float_control(spec: ParamSpec, common: dict) -> widgets.ValueWidget:
    default = float(spec.default)
    if spec.min is not None and spec.max is not None:
        step = min(0.01, (spec.max - spec.min) / 100)
        return widgets.FloatSlider(value=default, min=spec.min, max=spec.max, step=step, continuous_update=False,
                                   readout_format=".2f", **common)
    return widgets.BoundedFloatText(value=default, min=spec.min if spec.min is not None else -UNBOUNDED,
                                    max=spec.max if spec.max is not None else UNBOUNDED, **common)


def _base_type(tp: Any) -> type | None:
    """int for `int`, `int | None` -> int; None when the declaration names no single plain type."""
    options = value_types(tp)
    return options[0] if len(options) == 1 and options[0] in (bool, int, float, str) else None
