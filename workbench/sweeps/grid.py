"""A sweep definition: axes over models, components, their parameters, tasks and seeds; and the cells it makes.

    grid = Grid.parse({"model": "tiny:llama",
                       "axes": {"cache": ["full", "snapkv", "h2o"], "budget": [64, 128],
                                "task": [{"passkey": {"length": 200}}, {"perplexity": {"context": 200}}],
                                "seed": [0, 1]}})
    plan = grid.plan()        # every grid point, the distinct cells behind them, and the invalid points

Axis names: `model`, `attention`, `cache`, `decoder`, `router`, `task`, `seed`, and a component parameter as
`<family>.<parameter>` (`cache.window`, `decoder.temperature`); `budget` is short for `cache.budget`. A key that
is not under `axes` fixes that axis for every cell (`attention: sdpa`). Settings (`max_new_tokens`, `chunk`,
`prefill`) hold for the whole sweep.

Component values are a registered name ("snapkv"), a name with parameters ({"snapkv": {"window": 16}}, or
("snapkv", {...}) in Python) or a built component; tasks are a name ("passkey"), a name with parameters, or a
`workbench.eval` Task object.

A grid point's result depends only on what applies to it, and points that agree on that share one cell, computed
once: a policy without a budget (`full`) runs once for all budgets, a parameter axis applies only to the
components that have the parameter, and the decoder applies only to the `speed` task (retrieval replies are
greedy, perplexity is teacher-forced). A cell is keyed by a hash of its full configuration (every parameter of
every component that applies, defaults included), so a changed default is a new cell.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

from workbench.errors import WorkbenchError
from workbench.families import FAMILIES

COMPONENT_AXES = tuple(FAMILIES)  # attention, cache, decoder, router
AXES = ("model",) + COMPONENT_AXES + ("task", "seed")
DEFAULTS = {"model": "embedded", "attention": "sdpa", "cache": "full", "decoder": "greedy", "router": "native",
            "task": "passkey", "seed": 0}
SETTINGS = {"max_new_tokens": 16, "chunk": 1, "prefill": "replay"}
ALIASES = {"budget": "cache.budget"}
FORMAT = 1  # of the cell records; a store written with another format is not read


class SweepError(WorkbenchError):
    """A sweep definition, grid or results store that cannot be used as given."""


# What each kind of task depends on, besides the model, the task and the seed.
APPLIES = {
    "retrieval": (("attention", "cache", "router"), ("max_new_tokens", "prefill")),
    "perplexity": (("attention", "cache", "router"), ("chunk", "prefill")),
    "speed": (("attention", "cache", "decoder", "router"), ()),
}


@dataclass(frozen=True)
class Choice:
    """One value of a component axis: a registered name and the parameters given for it."""

    name: str
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.name}({extra})" if extra else self.name


@dataclass
class Cell:
    """One computation: its key, its full configuration (JSON), and what a worker needs to run it."""

    key: str
    config: dict[str, Any]
    task: Any  # the workbench.eval Task object
    group: str  # cells of one group share a prompt and its prefill (run them on one worker, in a row)


@dataclass
class Plan:
    points: list[dict[str, Any]]  # per grid point: its label on every axis
    point_keys: list[str | None]  # per grid point: its cell's key (None: invalid)
    cells: dict[str, Cell]  # the distinct cells, by key
    invalid: list[tuple[dict[str, Any], str]] = field(default_factory=list)  # (point labels, reason)


@dataclass
class Grid:
    axes: dict[str, list]  # the varying axes in order, values as given (parsed)
    fixed: dict[str, Any]  # every other axis: its one value
    settings: dict[str, Any]

    @classmethod
    def parse(cls, definition: Mapping[str, Any] | "Grid") -> "Grid":
        if isinstance(definition, Grid):
            return definition
        if not isinstance(definition, Mapping):
            raise SweepError(f"a sweep definition is a mapping with 'axes' (and optionally model, settings, ...), "
                             f"got {type(definition).__name__}")
        definition = dict(definition)
        axes_given = definition.pop("axes", None)
        if not isinstance(axes_given, Mapping) or not axes_given:
            raise SweepError("a sweep definition needs 'axes': a mapping of axis name to a list of values, e.g. "
                             "axes: {cache: [full, snapkv], budget: [64, 128]}")
        settings = dict(SETTINGS)
        given_settings = definition.pop("settings", None) or {}
        for name in list(definition):  # settings may also sit at the top level
            if name in SETTINGS:
                given_settings[name] = definition.pop(name)
        for name, value in dict(given_settings).items():
            if name not in SETTINGS:
                raise SweepError(f"unknown setting {name!r}; settings: {', '.join(SETTINGS)}")
            settings[name] = value
        _check_settings(settings)
        axes: dict[str, list] = {}
        for raw_name, values in axes_given.items():
            name = _axis_name(raw_name)
            if name in axes:
                raise SweepError(f"axis {raw_name!r} is given twice")
            if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
                values = [values]
            values = [_parse_value(name, v) for v in values]
            if not values:
                raise SweepError(f"axis {raw_name!r} is empty; give it at least one value or leave it out")
            labels = [_label(name, v) for v in values]
            if len(set(labels)) != len(labels):
                raise SweepError(f"axis {raw_name!r} lists a value twice: {labels}")
            axes[name] = values
        fixed = {}
        for name, value in definition.items():
            name = _axis_name(name)
            if name in axes:
                raise SweepError(f"{name!r} is both fixed and an axis; keep one")
            fixed[name] = _parse_value(name, value)
        for name in AXES:
            if name not in axes and name not in fixed:
                fixed[name] = _parse_value(name, DEFAULTS[name])
        grid = cls(axes, fixed, settings)
        grid._check_parameter_axes()
        return grid

    # -- what the definition says ------------------------------------------------------------------------------
    def values(self, name: str) -> list:
        return self.axes[name] if name in self.axes else [self.fixed[name]]

    def coords(self) -> dict[str, list]:
        """Per varying axis, the labels of its values (the dataset's coordinates)."""
        return {name: [_label(name, v) for v in values] for name, values in self.axes.items()}

    def dimension(self, name: str) -> str:
        """The dataset dimension of an axis: `cache.window` becomes `cache_window`; budget stays `budget`."""
        return "budget" if name == "cache.budget" else name.replace(".", "_")

    def describe(self) -> dict[str, Any]:
        """The definition as plain JSON (the store's record of what it holds)."""
        return {"axes": {n: [_plain(n, v) for v in vs] for n, vs in self.axes.items()},
                "fixed": {n: _plain(n, v) for n, v in self.fixed.items()}, "settings": self.settings}

    def _check_parameter_axes(self) -> None:
        for name in list(self.axes) + list(self.fixed):
            if "." not in name:
                continue
            family, parameter = name.split(".", 1)
            classes = [FAMILIES[family].registry.component_class(c.name) for c in self.values(family)]
            if not any(parameter in {s.name for s in cls.parameters()} for cls in classes):
                names = ", ".join(sorted({c.name for c in self.values(family)}))
                raise SweepError(f"no {family} in the grid ({names}) has a parameter {parameter!r}")

    # -- the cells --------------------------------------------------------------------------------------------
    def plan(self) -> Plan:
        names = list(self.axes)
        points, keys, cells, invalid = [], [], {}, []
        built: dict[Any, Any] = {}  # (family, name, params) -> built component or the error's message
        for combination in itertools.product(*(self.axes[n] for n in names)):
            chosen = {**self.fixed, **dict(zip(names, combination))}
            labels = {self.dimension(n): _label(n, chosen[n]) for n in names}
            points.append(labels)
            try:
                cell = self._cell(chosen, built)
            except WorkbenchError as error:
                keys.append(None)
                invalid.append((labels, str(error)))
                continue
            keys.append(cell.key)
            cells.setdefault(cell.key, cell)
        return Plan(points, keys, cells, invalid)

    def _cell(self, chosen: dict[str, Any], built: dict) -> Cell:
        task = chosen["task"]
        kind = task.kind
        if kind not in APPLIES:
            raise SweepError(f"task {task.label!r} is of kind {kind!r}; sweeps run {', '.join(APPLIES)} tasks")
        families, settings = APPLIES[kind]
        config: dict[str, Any] = {"format": FORMAT, "model": chosen["model"],
                                  "task": {"name": task.name, "kind": kind, "params": task.params()},
                                  "seed": int(chosen["seed"])}
        for family in families:
            choice: Choice = chosen[family]
            cls = FAMILIES[family].registry.component_class(choice.name)
            accepted = {s.name for s in cls.parameters()}
            params = dict(choice.params)
            for name, value in chosen.items():  # parameter axes that apply to this component
                if name.startswith(family + ".") and name.split(".", 1)[1] in accepted:
                    params[name.split(".", 1)[1]] = value
            if family == "decoder" and "seed" in accepted and "seed" not in params:
                params["seed"] = int(chosen["seed"])  # the sweep's seed also seeds sampling
            ident = (family, choice.name, json.dumps(params, sort_keys=True, default=str))
            if ident not in built:
                try:
                    built[ident] = FAMILIES[family].get(choice.name, **params).params()
                except WorkbenchError as error:
                    built[ident] = error
            if isinstance(built[ident], WorkbenchError):
                raise built[ident]
            config[family] = {"name": choice.name, "params": _jsonable(built[ident])}
        config["settings"] = {name: self.settings[name] for name in settings}
        key = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:20]
        group = json.dumps([config["model"], config.get("attention"), config.get("router"), config["task"],
                            config["seed"]], sort_keys=True)
        return Cell(key, config, task, group)


# -- parsing values ------------------------------------------------------------------------------------------------
def _axis_name(name: str) -> str:
    name = ALIASES.get(name, name)
    if name in AXES:
        return name
    family = name.split(".", 1)[0]
    if "." in name and family in COMPONENT_AXES:
        return name
    raise SweepError(f"unknown axis {name!r}; axes: {', '.join(AXES)}, budget, or <family>.<parameter> with "
                     f"family one of {', '.join(COMPONENT_AXES)} (e.g. cache.window)")


def _parse_value(axis: str, value: Any):
    if axis in COMPONENT_AXES:
        return _choice(axis, value)
    if axis == "task":
        return _task(value)
    if axis == "seed":
        if isinstance(value, bool) or not isinstance(value, int):
            raise SweepError(f"seeds are integers, got {value!r}")
        return value
    if axis == "model":
        if value is None:
            return "embedded"
        if not isinstance(value, str) or not value:
            raise SweepError(f"models are named by a string (embedded, tiny:llama, a hub id or a path), got {value!r}")
        return value
    if isinstance(value, (Mapping, list, tuple)):  # a parameter value
        raise SweepError(f"axis {axis!r} takes plain values (numbers, strings), got {value!r}")
    return value


def _choice(family: str, value: Any) -> Choice:
    registry = FAMILIES[family].registry
    if isinstance(value, registry.base):
        defaults = {s.name: s.default for s in type(value).parameters()}
        return Choice(value.name, tuple(sorted((k, v) for k, v in value.params().items() if v != defaults.get(k))))
    if isinstance(value, Mapping) and len(value) == 1:
        value = next(iter(value.items()))
    if isinstance(value, (tuple, list)) and len(value) == 2 and isinstance(value[1], (Mapping, type(None))):
        name, params = value[0], dict(value[1] or {})
    elif isinstance(value, str):
        name, params = value, {}
    else:
        raise SweepError(f"a {family} is a registered name, {{name: {{parameter: value}}}} or a built component, "
                         f"got {value!r}")
    cls = registry.component_class(name)  # unknown names fail here, naming the registered ones
    accepted = [s.name for s in cls.parameters()]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise SweepError(f"{family} '{name}' has no parameter {', '.join(map(repr, unknown))}; its parameters: "
                         f"{', '.join(accepted) or 'none'}")
    return Choice(name, tuple(sorted(params.items())))


def _task(value: Any):
    from workbench.eval.tasks import TASKS, Task

    if isinstance(value, Task):
        return value
    if isinstance(value, Mapping) and len(value) == 1:
        name, params = next(iter(value.items()))
    elif isinstance(value, str):
        name, params = value, {}
    else:
        raise SweepError(f"a task is a name, {{name: {{parameter: value}}}} or a workbench.eval Task, got {value!r}")
    if name not in TASKS:
        raise SweepError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    try:
        return TASKS[name](**dict(params or {}))
    except TypeError as error:  # an unknown keyword
        raise SweepError(f"task {name!r}: {error}") from None


def _label(axis: str, value: Any) -> Any:
    if isinstance(value, Choice):
        return value.label
    if axis == "task":
        return value.label
    return value


def _plain(axis: str, value: Any) -> Any:
    if isinstance(value, Choice):
        return {value.name: dict(value.params)} if value.params else value.name
    if axis == "task":
        return {value.name: value.params()}
    return value


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=str))


def _check_settings(settings: dict[str, Any]) -> None:
    for name in ("max_new_tokens", "chunk"):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"setting {name} must be an integer >= 1, got {value!r}")
    if settings["prefill"] not in ("replay", "run"):
        raise SweepError(f"setting prefill must be 'replay' or 'run', got {settings['prefill']!r}")
