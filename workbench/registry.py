"""Components and their registries.

A component is a small dataclass whose fields are its parameters. Each field is declared with `param()`, which
records a help text and an allowed range, so that errors, `describe()`, the CLI and the widgets can all be
generated from the same declaration. Each component family (attention, cache, decode, routers) owns one
`Registry`, and later work adds members to it without touching the generation loop.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from workbench.errors import ParameterError, UnknownComponentError


@dataclass(frozen=True)
class ParamSpec:
    """What a component declares about one parameter."""

    name: str
    type: Any
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple | None = None

    def describe(self, value: Any = dataclasses.MISSING) -> str:
        shown = self.default if value is dataclasses.MISSING else value
        bounds = []
        if self.min is not None:
            bounds.append(f">= {self.min}")
        if self.max is not None:
            bounds.append(f"<= {self.max}")
        if self.choices is not None:
            bounds.append("one of " + ", ".join(map(str, self.choices)))
        extra = f" ({'; '.join(bounds)})" if bounds else ""
        return f"{self.name} = {shown!r}: {self.help}{extra}"


def param(default: Any, help: str, *, min: float | None = None, max: float | None = None,
          choices: tuple | list | None = None) -> Any:
    """Declare a component parameter: its default, what it means, and the values it accepts."""
    meta = {"help": help, "min": min, "max": max, "choices": tuple(choices) if choices is not None else None}
    return dataclasses.field(default=default, metadata={"workbench": meta})


class Component:
    """Base of every registered component. Subclasses are dataclasses; their fields are their parameters.

    Class attributes every component sets:
      name     -- the registry name, e.g. "sdpa"
      summary  -- one line saying what it does
      paper    -- the paper it implements (title, venue/year), or None for plain references
      departs  -- where it departs from that paper (None: it does what the paper's reference does)
    """

    name: ClassVar[str] = ""
    family: ClassVar[str] = "component"
    summary: ClassVar[str] = ""
    paper: ClassVar[str | None] = None
    departs: ClassVar[str | None] = None  # where it departs from the paper (shown by describe())

    def __post_init__(self) -> None:
        for spec in self.parameters():
            _check_value(self, spec, getattr(self, spec.name))
        self.validate()

    def validate(self) -> None:
        """Cross-parameter checks; raise ParameterError with a message saying what is allowed."""

    @classmethod
    def parameters(cls) -> list[ParamSpec]:
        hints = typing.get_type_hints(cls)
        specs = []
        for f in (f for f in dataclasses.fields(cls) if f.init):
            meta = f.metadata.get("workbench", {})
            default = f.default if f.default is not dataclasses.MISSING else None
            specs.append(ParamSpec(f.name, hints.get(f.name, Any), default, meta.get("help", ""),
                                   meta.get("min"), meta.get("max"), meta.get("choices")))
        return specs

    def params(self) -> dict[str, Any]:
        return {spec.name: getattr(self, spec.name) for spec in self.parameters()}

    def describe(self) -> str:
        lines = [f"{self.family} '{self.name}': {self.summary}"]
        if self.paper:
            lines.append(f"  paper: {self.paper}")
        if self.departs:
            lines.append(f"  departs from the paper: {self.departs}")
        specs = self.parameters()
        if specs:
            lines.append("  parameters:")
            lines += [f"    {spec.describe(getattr(self, spec.name))}" for spec in specs]
        else:
            lines.append("  parameters: none")
        return "\n".join(lines)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({args})" if args else self.name


def _check_value(component: Component, spec: ParamSpec, value: Any) -> None:
    where = f"{component.family} '{component.name}' parameter '{spec.name}'"
    if value is None:
        if accepts_none(spec.type):
            return
        raise ParameterError(f"{where} must not be None")
    if spec.choices is not None and value not in spec.choices:
        raise ParameterError(f"{where} is {value!r}; allowed: {', '.join(map(repr, spec.choices))}")
    if spec.min is not None and value < spec.min:
        raise ParameterError(f"{where} is {value!r}; it must be >= {spec.min}")
    if spec.max is not None and value > spec.max:
        raise ParameterError(f"{where} is {value!r}; it must be <= {spec.max}")


def accepts_none(tp: Any) -> bool:
    """Whether a parameter declared with type `tp` may be None."""
    return tp is Any or type(None) in typing.get_args(tp)


def value_types(tp: Any) -> list:
    """The types a parameter declared with `tp` takes besides None: [int] for `int` and for `int | None`."""
    return [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]


def _coerce(spec: ParamSpec, value: Any, where: str) -> Any:
    """Turn a value (often a string from the CLI or a widget) into the parameter's declared type."""
    if value is None:
        return None
    tp = spec.type
    options = value_types(tp)
    if isinstance(value, str) and value.strip().lower() == "none" and accepts_none(tp):
        return None
    for option in options:
        if option is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
        elif option is int:
            if isinstance(value, bool):
                continue
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    continue
        elif option is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    continue
        elif option is str:
            if isinstance(value, str):
                return value
        elif option is Any or isinstance(value, option if isinstance(option, type) else object):
            return value
    raise ParameterError(f"{where} got {value!r}; expected {_type_name(tp)}")


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if _is_union(tp):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


class Registry:
    """The named members of one component family."""

    def __init__(self, family: str, base: type[Component]):
        self.family = family
        self.base = base
        self._members: dict[str, type[Component]] = {}

    def register(self, cls: type[Component]) -> type[Component]:
        """Class decorator adding a component to this family under `cls.name`."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"{cls!r} is not a {self.base.__name__}")
        if not cls.name:
            raise TypeError(f"{cls.__name__} needs a `name`")
        if cls.name in self._members and self._members[cls.name] is not cls:
            raise ValueError(f"{self.family} '{cls.name}' is already registered")
        cls.family = self.family
        self._members[cls.name] = cls
        return cls

    def available(self) -> list[str]:
        return sorted(self._members)

    def component_class(self, name: str) -> type[Component]:
        if not isinstance(name, str):
            raise UnknownComponentError(f"{self.family} must be named by a string, got {name!r}; "
                                        f"registered: {', '.join(self.available())}")
        try:
            return self._members[name]
        except KeyError:
            raise UnknownComponentError(f"unknown {self.family} '{name}'; registered: "
                                        f"{', '.join(self.available())}") from None

    def get(self, name: str | Component, **params: Any) -> Component:
        """Build a component by name with keyword parameters (strings are converted to the declared types)."""
        if isinstance(name, self.base):
            if params:
                raise ParameterError(f"{self.family} {name} is already built; pass parameters to get() by name")
            return name
        cls = self.component_class(name)
        specs = {spec.name: spec for spec in cls.parameters()}
        unknown = sorted(set(params) - set(specs))
        if unknown:
            valid = ", ".join(specs) if specs else "none"
            raise ParameterError(f"{self.family} '{name}' has no parameter {', '.join(map(repr, unknown))}; "
                                 f"its parameters: {valid}")
        values = {k: _coerce(specs[k], v, f"{self.family} '{name}' parameter '{k}'") for k, v in params.items()}
        return cls(**values)

    def describe(self, name: str | None = None) -> str:
        if name is not None:
            return self.get(name).describe()
        return "\n".join(f"{n:<16} {self._members[n].summary}" for n in self.available())

    def __contains__(self, name: object) -> bool:
        return name in self._members

    def __iter__(self):
        return iter(self.available())

    def __repr__(self) -> str:
        return f"Registry({self.family!r}: {', '.join(self.available())})"
