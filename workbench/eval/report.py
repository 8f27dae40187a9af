"""Plain-text tables of an evaluation result (policy rows x budget columns, one table per task and measure)."""

from __future__ import annotations

import json

import numpy as np
import xarray as xr


def table(ds: xr.Dataset) -> str:
    """Per task: accuracy (retrieval) or perplexity (exp of the mean NLL over seeds); then peak cache MiB."""
    blocks = []
    seeds = ds.sizes["seed"]
    for task in ds.task.values:
        one = ds.sel(task=task)
        tokens = np.nanmean(one.context_tokens.values) if np.isfinite(one.context_tokens.values).any() else 0
        if np.isfinite(one.accuracy.values).any():
            cells = one.accuracy.mean("seed", skipna=True)
            blocks.append(_grid(f"{task}: accuracy (mean over {seeds} seeds; prompt ~{tokens:.0f} tokens)", cells,
                                "{:.2f}"))
        if np.isfinite(one.nll.values).any():
            cells = np.exp(one.nll.mean("seed", skipna=True))
            blocks.append(_grid(f"{task}: perplexity (exp of the mean NLL over {seeds} seeds; context ~{tokens:.0f} "
                                "tokens)", cells, "{:.2f}"))
        cells = one.peak_cache_bytes.mean("seed", skipna=True) / 2**20
        blocks.append(_grid(f"{task}: peak cache MiB", cells, "{:.2f}"))
    failures = json.loads(ds.attrs.get("errors", "[]"))
    if failures:
        blocks.append(f"{len(failures)} run(s) failed (NaN above):\n" + "\n".join(
            f"  {f['policy']} budget={f['budget']} {f['task']} seed={f['seed']}: {f['error']}" for f in failures))
    return "\n\n".join(blocks)


def _grid(title: str, cells: xr.DataArray, fmt: str) -> str:
    budgets = [str(b) for b in cells.budget.values]
    width = max(8, *(len(b) + 1 for b in budgets))
    name_width = max(14, *(len(str(p)) + 1 for p in cells.policy.values))
    lines = [title, f"{'policy':<{name_width}}" + "".join(f"{b:>{width}}" for b in budgets)]
    for policy in cells.policy.values:
        row = cells.sel(policy=policy).values
        text = "".join(f"{(fmt.format(v) if np.isfinite(v) else '-'):>{width}}" for v in row)
        lines.append(f"{str(policy):<{name_width}}" + text)
    return "\n".join(lines)
