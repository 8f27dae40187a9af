"""A sweep's dataset as plain-text tables for the terminal: one table per task and measure, the mean over seeds,
one row per combination of the other axes, one column per value of `columns` (default the budget)."""

from __future__ import annotations

import itertools

import numpy as np
import xarray as xr

from workbench.errors import ParameterError

SHOWN = ("accuracy", "perplexity", "tokens_per_s", "peak_cache_bytes")  # by default; others on request
FORMATS = {"accuracy": "{:.2f}", "perplexity": "{:.2f}", "nll": "{:.3f}", "tokens_per_s": "{:.1f}",
           "decode_tokens_per_s": "{:.1f}", "peak_cache_bytes": "{:.2f}",
           "held_cache_bytes": "{:.2f}"}


def table(ds: xr.Dataset, measures: list[str] | tuple[str, ...] | None = None, columns: str | None = None) -> str:
    """Tables of `measures` (default: accuracy, perplexity, tokens/s and peak cache MiB where present)."""
    names = list(measures) if measures else [m for m in SHOWN if m in ds]
    for name in names:
        if name not in ds:
            raise ParameterError(f"the sweep has no measure {name!r}; measures: "
                                 f"{', '.join(n for n, v in ds.data_vars.items() if v.dtype.kind == 'f')}")
    dims = list(ds.dims)
    columns = columns or ("budget" if "budget" in dims else next((d for d in reversed(dims) if d not in
                                                                    ("seed", "task")), None))
    if columns is not None and columns not in dims:
        raise ParameterError(f"the sweep has no axis {columns!r}; axes: {', '.join(map(str, dims))}")
    tasks = list(ds["task"].values) if "task" in dims else [None]
    blocks = []
    for task in tasks:
        one = ds.sel(task=task) if task is not None else ds
        for name in names:
            values = one[name]
            if not np.isfinite(values.values).any():
                continue
            if "seed" in values.dims:
                values = values.mean("seed", skipna=True)
            unit = ""
            if name.endswith("cache_bytes"):
                values, unit = values / 2**20, " (MiB)"
            seeds = f", mean over {ds.sizes['seed']} seeds" if "seed" in ds.dims else ""
            title = f"{task + ': ' if task is not None else ''}{name}{unit}{seeds}"
            blocks.append(_grid(title, values, columns, FORMATS.get(name, "{:.3g}")))
    counts = {s: int((ds["status"].values == s).sum()) for s in ("done", "failed", "invalid", "pending")}
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    blocks.append(f"grid points: {summary}")
    failed = [str(e) for e in np.unique(ds["error"].values[ds["status"].values == "failed"])]
    if failed:
        blocks.append("failures:\n" + "\n".join(f"  {e}" for e in failed[:10]))
    return "\n\n".join(blocks)


def _grid(title: str, values: xr.DataArray, columns: str | None, fmt: str) -> str:
    row_dims = [d for d in values.dims if d != columns]
    column_labels = [str(v) for v in values[columns].values] if columns in values.dims else [""]
    rows = list(itertools.product(*(values[d].values for d in row_dims))) or [()]
    row_labels = [" ".join(str(v) for v in row) for row in rows]
    width = max(8, *(len(c) + 1 for c in column_labels))
    name_width = max(14, *(len(r) + 1 for r in row_labels), len(" ".join(row_dims)) + 1)
    lines = [title, f"{' '.join(row_dims):<{name_width}}" + "".join(f"{c:>{width}}" for c in column_labels)]
    for row, label in zip(rows, row_labels):
        cell = values.sel(dict(zip(row_dims, row))) if row_dims else values
        numbers = np.atleast_1d(cell.values)
        lines.append(f"{label:<{name_width}}" + "".join(
            f"{(fmt.format(v) if np.isfinite(v) else '-'):>{width}}" for v in numbers))
    return "\n".join(lines)
