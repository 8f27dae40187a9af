"""`sweep(definition, store=...)`: plan the grid, skip what the store already holds, run the rest (serially or on
Ray), write each cell as it finishes, and return the whole grid as one xarray.Dataset."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import xarray as xr

from workbench.sweeps.dataset import assemble, provenance
from workbench.sweeps.execute import run_ray, run_serial
from workbench.sweeps.grid import Grid, Plan, SweepError
from workbench.sweeps.store import Store


def load_definition(definition: Mapping[str, Any] | Grid | str | os.PathLike) -> Grid:
    """A Grid from a mapping, a Grid, or a YAML file's path."""
    if isinstance(definition, (str, os.PathLike)):
        import yaml

        path = Path(definition)
        if not path.exists():
            raise SweepError(f"no sweep definition at {path}")
        try:
            definition = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise SweepError(f"{path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if isinstance(definition, Mapping):
            definition = {k: v for k, v in definition.items() if k != "store"}  # where results go, not what
    return Grid.parse(definition)


def default_store(path: str | os.PathLike) -> str:
    """Where `workbench sweep grid.yaml` keeps results: the YAML's `store:`, else grid.results/ beside it."""
    import yaml

    path = Path(path)
    given = (yaml.safe_load(path.read_text()) or {}).get("store") if path.exists() else None
    if given:
        return str(given) if "://" in str(given) or Path(given).is_absolute() else str(path.parent / given)
    return str(path.with_suffix(".results"))


def sweep(definition, store: str | os.PathLike | None = None, *, workers: int = 0, address: str | None = None,
          cpus_per_worker: int | None = None, gpus_per_worker: float = 0, retry_failed: bool = False, skip_invalid: bool = False,
          progress: bool = True, live: str | Callable[[xr.Dataset], None] | None = None,
          models: Mapping[str, Any] | None = None) -> xr.Dataset:
    """Run a grid of configurations; see workbench.sweeps.grid for the definition. Returns one Dataset.

    store        -- a directory or fsspec URL keeping every finished cell; re-running skips them (None: keep
                    nothing, compute everything)
    workers      -- 0: this process; N: a local Ray cluster of N worker processes (threads split between them)
    address      -- an existing Ray cluster ("auto", "host:port", "ray://head:10001"; default $RAY_ADDRESS when
                    workers is given and it is set); results still come back here and go to `store`
    cpus_per_worker, gpus_per_worker -- what each Ray worker reserves (default 1 CPU, no GPU)
    retry_failed -- run again the cells stored as failed (default: keep their error)
    skip_invalid -- run the valid cells of a grid that has invalid combinations (default: refuse, listing them)
    live         -- in a notebook, a measure to draw as a heatmap that fills in as cells finish (or a callable
                    given the partial dataset after each cell)
    models       -- already loaded models by name, for serial runs ({"embedded": model} reuses a notebook's)
    """
    grid = load_definition(definition)
    plan = grid.plan()
    _check_invalid(plan, skip_invalid)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise SweepError(f"workers must be an integer >= 0 (0: run in this process), got {workers!r}")
    if address is None and workers and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
    if models and (workers or address):
        raise SweepError("models= shares this process's models; Ray workers load their own: drop models= or "
                         "workers=")
    target = Store(store) if store is not None else None
    records = {}
    if target is not None:
        target.bind(grid)
        records = {k: r for k, r in target.records().items() if k in plan.cells}
    pending = [cell for key, cell in plan.cells.items()
               if key not in records or (retry_failed and records[key]["status"] == "failed")]
    reused = len(plan.cells) - len(pending)
    computed = 0
    bar = _progress(len(plan.cells), reused) if progress else None
    show = _live(live) if live is not None else None
    origin = provenance()  # once: it asks git

    def done(record: dict[str, Any]) -> None:
        nonlocal computed
        if target is not None:
            target.write(record)
        records[record["key"]] = record
        computed += 1
        if bar is not None:
            bar.update(1)
            if record["status"] == "failed":
                bar.write(f"workbench.sweep: cell {record['key'][:8]} failed: {record['error']}")
        if show is not None:
            show(lambda: assemble(grid, plan, records, origin))

    started = time.perf_counter()
    try:
        if _wants_embedded(pending) and address is None:
            from workbench.models.embedded import ensure_converted

            ensure_converted()  # once here, not racing in every worker
        if pending and (workers or address):
            run_ray(pending, done, workers=workers or None, address=address, cpus_per_worker=cpus_per_worker,
                    gpus_per_worker=gpus_per_worker,
                    report=(bar.write if bar is not None else _stderr))
        elif pending:
            run_serial(pending, done, dict(models or {}))
    finally:
        if bar is not None:
            bar.close()
    ds = assemble(grid, plan, records, {
        **origin, "store": "" if target is None else target.url, "cells": len(plan.cells), "cells_computed": computed,
        "cells_reused": reused, "seconds": time.perf_counter() - started,
        "workers": workers, "ray_address": address or ""})
    if show is not None:
        show(lambda: ds, final=True)
    return ds


def status(definition, store: str | os.PathLike) -> dict[str, int]:
    """How many of the grid's cells the store holds as done or failed, and how many are pending or invalid."""
    grid = load_definition(definition)
    plan = grid.plan()
    target = Store(store)
    header = target.header()
    records = target.records() if header is not None else {}
    counts = {"done": 0, "failed": 0, "pending": 0}
    for key in plan.cells:
        counts[records[key]["status"] if key in records else "pending"] += 1
    counts["invalid"] = len(plan.invalid)
    counts["cells"] = len(plan.cells)
    counts["points"] = len(plan.points)
    return counts


def _check_invalid(plan: Plan, skip_invalid: bool) -> None:
    if not plan.invalid or skip_invalid:
        return
    reasons: dict[str, list[dict]] = {}
    for labels, reason in plan.invalid:
        reasons.setdefault(reason, []).append(labels)
    shown = "; ".join(f"{reason} ({len(points)} point{'s' * (len(points) > 1)}, e.g. "
                      f"{' '.join(f'{k}={v}' for k, v in points[0].items())})"
                      for reason, points in list(reasons.items())[:3])
    more = f"; and {len(reasons) - 3} other reasons" if len(reasons) > 3 else ""
    raise SweepError(f"{len(plan.invalid)} of {len(plan.points)} grid points are invalid: {shown}{more}; fix the "
                     "grid or skip them (skip_invalid=True, --skip-invalid)")


def _wants_embedded(cells) -> bool:
    return any(cell.config["model"] in ("embedded", "smollm2") for cell in cells)


def _progress(total: int, reused: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=reused, desc="sweep", unit="cell", smoothing=0.1)


def _stderr(text: str) -> None:
    print(text, file=sys.stderr)


def _live(live):
    if callable(live):
        def call(make, final=False):
            live(make())
        return call
    from workbench.sweeps.live import LiveHeatmap

    return LiveHeatmap(live)
