"""What the plots accept and check: a Run or its trace, the variables a plot needs, indices in range, and token
text made readable for labels and hover tooltips."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from workbench.errors import ParameterError, WorkbenchError
from workbench.trace import schema


def as_trace(run_or_trace: Any, taker: str = "plots take") -> xr.Dataset:
    """The trace of a Run, or the Dataset itself (e.g. one read back with wb.load_trace), with its one sequence
    selected (plots show one sequence); `taker` begins the error message for anything else."""
    trace = run_or_trace if isinstance(run_or_trace, xr.Dataset) else getattr(run_or_trace, "trace", None)
    if not isinstance(trace, xr.Dataset):
        raise WorkbenchError(f"{taker} a Run or its trace (an xarray.Dataset), got {type(run_or_trace).__name__}")
    return one_sequence(trace)


def one_sequence(trace: xr.Dataset, sequence: int = 0) -> xr.Dataset:
    """The trace of one sequence, without the `sequence` dimension."""
    if "sequence" not in trace.dims:
        return trace
    if trace.sizes["sequence"] > 1 and sequence == 0:
        raise WorkbenchError(f"the trace holds {trace.sizes['sequence']} sequences; plots show one: pass "
                             "trace.isel(sequence=i)")
    return trace.isel(sequence=sequence)


def require(trace: xr.Dataset, *names: str, purpose: str) -> None:
    """Fail with the `record=` choice that would have produced the missing variables."""
    missing = [name for name in names if name not in trace]
    if not missing:
        return
    records = sorted({schema.recorded_by(name) or name for name in missing})
    how = " and ".join(repr(r) for r in records)
    raise WorkbenchError(f"the trace has no {', '.join(missing)}: record {how} when generating to plot {purpose} "
                         f"(e.g. wb.generate(..., record=[{', '.join(map(repr, records))}]))")


def require_steps(trace: xr.Dataset, purpose: str) -> None:
    if not trace.sizes.get("step", 0):
        raise WorkbenchError(f"the trace has no generated tokens (max_new_tokens=0): nothing to plot {purpose} for")


def check_choice(value: Any, allowed: np.ndarray | list, what: str, hint: str = "") -> int:
    """An integer index among the allowed ones (negative counts from the end), or a ParameterError listing them
    (and `hint`, how to get another one)."""
    allowed = [int(a) for a in allowed]
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{what} must be an integer, got {value!r}")
    value = int(value)
    if value < 0 and allowed == list(range(len(allowed))):
        value += len(allowed)
    if value not in allowed:
        raise ParameterError(f"{what} {value} is out of range; the trace has {what}s {_span(allowed)}{hint}")
    return value


def _span(values: list[int]) -> str:
    if values and values == list(range(values[0], values[-1] + 1)):
        return f"{values[0]}..{values[-1]}"
    return str(values)


# what bokeh would read as the start of TeX (and then fetch MathJax from a CDN to typeset): split by an invisible
# zero-width space so that token text stays text
MATH_DELIMITERS = {"$$": "$\u200b$", "\\[": "\\\u200b[", "\\(": "\\\u200b("}


def readable(token: str) -> str:
    """Token text as it should appear in a label: newlines and tabs as arrows, other control characters escaped,
    the empty string as a visible mark, TeX delimiters broken up."""
    if token == "":
        return "∅"
    out = []
    for char in token:
        if char == "\n":
            out.append("↵")
        elif char == "\t":
            out.append("⇥")
        elif not char.isprintable() and char != " ":
            out.append(char.encode("unicode_escape").decode("ascii"))
        else:
            out.append(char)
    text = "".join(out)
    for delimiter, harmless in MATH_DELIMITERS.items():
        text = text.replace(delimiter, harmless)
    return text


def step_tokens(trace: xr.Dataset) -> list[str]:
    """Readable text of each generated token, by step."""
    return [readable(str(t)) for t in trace["token"].values]


def position_tokens(trace: xr.Dataset) -> list[str]:
    """Readable text of every token of the run (prompt then generated), by position."""
    return [readable(str(t)) for t in trace["position_token"].values]


def tokens_at(tokens: list[str], indices) -> np.ndarray:
    """The token text at each index (a step or position), as an object array for a DataFrame column."""
    return np.asarray(tokens, dtype=object)[np.asarray(indices, dtype=np.intp)]


def prompt_length(trace: xr.Dataset) -> int:
    return int(trace["is_prompt"].values.sum())


def token_ticks(tokens: list[str], most: int = 48) -> list[tuple[int, str]]:
    """Axis ticks naming tokens: every token when there are few, else every k-th so that labels stay legible."""
    every = max(1, -(-len(tokens) // most))
    return [(i, text) for i, text in enumerate(tokens) if i % every == 0]


def index_ticks(values, most: int = 20) -> list[int]:
    """Integer axis ticks for layers, heads or steps: every one when there are few, else every k-th."""
    values = [int(v) for v in values]
    every = max(1, -(-len(values) // most))
    return values[::every]
