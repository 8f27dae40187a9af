"""A sweep's records as one labelled xarray.Dataset: a dimension per varying axis, the measures as variables,
and provenance (versions, the lock file's hash, the commit, the definition) in attrs."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from workbench.sweeps.grid import Grid, Plan

MEASURES = {  # name: (description, units); the order of the dataset's variables
    "accuracy": ("fraction of questions answered correctly (retrieval)", "1"),
    "correct": ("questions answered correctly (retrieval)", "1"),
    "questions": ("questions asked (retrieval)", "1"),
    "perplexity": ("perplexity of the continuation (perplexity)", "1"),
    "nll": ("mean negative log-likelihood per continuation token (perplexity)", "nats"),
    "tokens_per_s": ("generated tokens per second, prefill included (speed)", "1/s"),
    "decode_tokens_per_s": ("generated tokens per second after the first (speed)", "1/s"),
    "prefill_seconds": ("time to the first token (speed)", "s"),
    "new_tokens": ("tokens generated (speed)", "1"),
    "peak_cache_bytes": ("most bytes the cache held at any moment, uncompressed prefill included", "bytes"),
    "held_cache_bytes": ("most bytes the cache held after a forward pass", "bytes"),
    "context_tokens": ("prompt or context tokens", "1"),
    "replayed": ("1 where the prompt's prefill was replayed from one shared full-cache prefill", "1"),
    "seconds": ("wall time of the cell on its worker (model loading excluded)", "s"),
}
TIMING = ("tokens_per_s", "decode_tokens_per_s", "prefill_seconds", "seconds")  # differ from run to run


def assemble(grid: Grid, plan: Plan, records: dict[str, dict[str, Any]], extra_attrs: dict[str, Any]) -> xr.Dataset:
    coords = grid.coords()
    dims = [grid.dimension(name) for name in coords]
    shape = tuple(len(values) for values in coords.values())
    flat = {name: np.full(len(plan.points), np.nan) for name in MEASURES}
    status = np.full(len(plan.points), "pending", dtype=object)
    reply = np.full(len(plan.points), "", dtype=object)
    error = np.full(len(plan.points), "", dtype=object)
    invalid = {json.dumps(labels, sort_keys=True, default=str): reason for labels, reason in plan.invalid}
    for index, (labels, key) in enumerate(zip(plan.points, plan.point_keys)):
        if key is None:
            status[index] = "invalid"
            error[index] = invalid[json.dumps(labels, sort_keys=True, default=str)]
            continue
        record = records.get(key)
        if record is None:
            continue
        status[index] = record["status"]
        reply[index] = record.get("reply", "")
        error[index] = record.get("error") or ""
        for name, value in record.get("metrics", {}).items():
            if name in flat:
                flat[name][index] = value
        if record["status"] == "done":
            flat["seconds"][index] = record.get("seconds", np.nan)
    variables = {name: (dims, values.reshape(shape)) for name, values in flat.items()
                 if np.isfinite(values).any()}
    variables.update(status=(dims, status.reshape(shape)), reply=(dims, reply.reshape(shape)),
                     error=(dims, error.reshape(shape)))
    ds = xr.Dataset(variables, coords={grid.dimension(n): _coord(v) for n, v in coords.items()})
    for name, (description, units) in MEASURES.items():
        if name in ds:
            ds[name].attrs.update(description=description, units=units)
    ds["status"].attrs["description"] = "done, failed (see error), invalid (see error) or pending"
    ds.attrs["definition"] = json.dumps(grid.describe(), default=str)
    ds.attrs.update(extra_attrs)
    return ds


def _coord(values: list) -> np.ndarray:
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=np.int64)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return np.array(values, dtype=float)
    return np.array([str(v) for v in values], dtype=object)  # netCDF stores object strings, not numpy unicode


def provenance() -> dict[str, Any]:
    import torch
    import transformers

    from workbench.version import __version__

    root = Path(__file__).resolve().parents[2]
    lock = root / "requirements.lock"
    attrs = {"workbench_version": __version__, "torch_version": str(torch.__version__),
             "transformers_version": transformers.__version__, "python_version": platform.python_version(),
             "host": platform.node(),
             "lock_sha256": hashlib.sha256(lock.read_bytes()).hexdigest() if lock.exists() else "",
             "commit": _commit(root)}
    try:
        import ray

        attrs["ray_version"] = ray.__version__
    except ImportError:
        pass
    return attrs


def _commit(root: Path) -> str:
    """The checkout's commit, with "+dirty" when it has uncommitted changes ("" outside a git checkout)."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return ""
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""
