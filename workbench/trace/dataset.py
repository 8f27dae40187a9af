"""Turning a run's records into a self-describing xarray.Dataset, and reading one back from netCDF.

The variables, their dimensions and attributes come from the trace schema (workbench.trace.schema). Dimensions
and coordinates:
  sequence        the run's sequences (1: runs are batch 1)
  step            generated tokens, 0..n-1; coords `token` (text), `token_id`, `forward_of_step` (the forward pass
                  whose logits chose it)
  forward         every forward pass of the run (prefill, decode, verify, rollout, append), in order
  position        every token of the run (prompt then generated); coords `position_token`, `is_prompt`
  query           the prompt's query rows (positions 0..P-1), for the prefill statistics
  layer, head     all attention layers and query heads; `kv_head_of` maps a query head to its KV head (GQA)
  kv_head         KV heads, for cache records
  attn_layer, attn_head   the layers and heads whose attention rows were recorded
  vocab           token ids, for logits
  rank, expert    an MoE token's chosen experts (best first), and every expert (router logits)
  cache_part      what the cache's bytes are made of (dense, codes, scales, zeros, residual, ...)
  side            key, value (a quantized cache's error)
attrs hold the run's configuration (also as JSON in attrs["config"]), so a saved trace says how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from workbench.trace import schema
from workbench.trace.recorder import Recorder, missing

ENGINE = "h5netcdf"


def build_dataset(recorder: Recorder, *, prompt_tokens: list[str], tokens: list[str], token_ids: list[int],
                  num_kv_heads: int, vocab_size: int, attrs: dict[str, Any]) -> xr.Dataset:
    n_prompt, n_steps = len(prompt_tokens), len(tokens)
    n_positions = n_prompt + n_steps
    groups = recorder.num_heads // num_kv_heads
    sizes = {"step": n_steps, "forward": recorder.forwards, "position": n_positions, "query": n_prompt,
             "layer": recorder.num_layers, "head": recorder.num_heads, "kv_head": num_kv_heads,
             "attn_layer": len(recorder.attention_layers), "attn_head": len(recorder.attention_heads),
             "vocab": vocab_size, "rank": recorder.max_rank, "expert": recorder.routing.num_experts,
             "cache_part": len(recorder.cache_parts), "side": 2}
    coords = {
        "sequence": np.arange(1),
        "step": np.arange(n_steps),
        "token": (("sequence", "step"), np.array([tokens], dtype=object).reshape(1, n_steps)),
        "token_id": (("sequence", "step"), np.array([token_ids], dtype=np.int64).reshape(1, n_steps)),
        "forward_of_step": (("sequence", "step"),
                            np.array([recorder.forward_of_step[:n_steps]], dtype=np.int64).reshape(1, n_steps)),
        "forward": np.arange(recorder.forwards),
        "position": np.arange(n_positions),
        "position_token": (("sequence", "position"), np.array([prompt_tokens + tokens], dtype=object)
                           .reshape(1, n_positions)),
        "is_prompt": (("sequence", "position"), (np.arange(n_positions) < n_prompt)[None]),
        "layer": np.arange(recorder.num_layers),
        "head": np.arange(recorder.num_heads),
        "kv_head_of": ("head", np.arange(recorder.num_heads) // groups),
        "kv_head": np.arange(num_kv_heads),
    }
    data: dict[str, Any] = {}
    for variable in schema.variables(recorder.spec.names):
        values = _assemble(variable, recorder, sizes)
        if values is None:
            continue
        data[variable.name] = (variable.full_dims, values[None])
        for dim in variable.dims:
            if dim == "attn_layer":
                coords["attn_layer"] = np.array(recorder.attention_layers)
            elif dim == "attn_head":
                coords["attn_head"] = np.array(recorder.attention_heads)
            elif dim == "query":
                coords["query"] = np.arange(n_prompt)
            elif dim in ("vocab", "rank", "expert"):
                coords[dim] = np.arange(sizes[dim])
            elif dim == "cache_part":
                coords["cache_part"] = np.array(recorder.cache_parts, dtype=object)
            elif dim == "side":
                coords["side"] = np.array(["key", "value"], dtype=object)
    dataset = xr.Dataset(data, coords=coords, attrs=_netcdf_attrs(attrs))
    for variable in schema.variables(recorder.spec.names):
        if variable.name in dataset:
            dataset[variable.name].attrs.update(units=variable.units, description=variable.description,
                                                record=variable.record or "always", source=variable.source)
    return dataset


def _assemble(variable: schema.Variable, recorder: Recorder, sizes: dict[str, int]) -> np.ndarray | None:
    """The variable's values (without the sequence dimension), or None when a once-per-run value never came."""
    dtype = object if variable.dtype == "str" else np.dtype(variable.dtype)
    if variable.axis is None:
        if variable.name not in recorder.whole:
            return None
        return _fit(np.asarray(recorder.whole[variable.name]), variable, sizes).astype(dtype)
    rows = recorder.along.get(variable.name, [])[:sizes[variable.axis]]
    rest = [sizes[d] for d in variable.dims[1:]]
    if not rows:
        if sizes[variable.axis]:
            return None  # asked for, but no component of this run produces it (a verify count without a drafter)
        return np.zeros((0, *rest), dtype=dtype)
    rows = rows + [missing(rows[-1])] * (sizes[variable.axis] - len(rows))  # passes after the last value
    return np.stack([_fit(np.asarray(row), variable, sizes, offset=1) for row in rows]).astype(dtype)


def _fit(values: np.ndarray, variable: schema.Variable, sizes: dict[str, int], offset: int = 0) -> np.ndarray:
    """Pad a trailing `position` dimension to every position with the variable's fill (keys a row could not see
    yet), a trailing `rank` dimension to the most experts any token used, and cut a trailing `vocab` dimension to the vocabulary (models pad their output layer)."""
    last = variable.dims[-1]
    if last in ("position", "rank") and values.shape[-1] < sizes[last]:
        pad = [(0, 0)] * (values.ndim - 1) + [(0, sizes[last] - values.shape[-1])]
        values = np.pad(values.astype(np.dtype(variable.dtype)), pad, constant_values=variable.fill)
    elif last == "vocab":
        values = values[..., :sizes["vocab"]]
    return values


def _netcdf_attrs(attrs: dict[str, Any]) -> dict[str, Any]:
    """netCDF attributes take strings and numbers only: keep those, JSON-encode the rest."""
    flat = {"config": json.dumps(attrs, default=str)}
    for key, value in attrs.items():
        if isinstance(value, bool):
            flat[key] = int(value)
        elif isinstance(value, str):
            flat[key] = str(value)  # plain str: subclasses such as torch's version string do not serialize
        elif isinstance(value, (int, float)):
            flat[key] = value
        elif value is None:
            flat[key] = ""
        else:
            flat[key] = json.dumps(value, default=str)
    return flat


def cache_alive(dataset: xr.Dataset) -> xr.DataArray:
    """Bool (sequence, step, layer, kv_head, position): whether each position is in the cache after each step (the
    trace of one sequence, without `sequence`, gives the same without it).

    After step s the cache has been given the prompt and the first s generated tokens, minus what it evicted
    during steps 0..s (decoded from the compact `cache_evicted_at`)."""
    evicted_at = dataset["cache_evicted_at"]
    n_prompt = dataset["is_prompt"].sum("position")
    given = dataset["position"] < n_prompt + dataset["step"]
    evicted = (evicted_at >= 0) & (evicted_at <= dataset["step"])
    alive = given & ~evicted
    order = [d for d in ("sequence", "step", "layer", "kv_head", "position") if d in alive.dims]
    return alive.transpose(*order).rename("cache_alive")


def save_trace(dataset: xr.Dataset, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.to_netcdf(path, engine=ENGINE)
    return path


def load_trace(path: str | Path) -> xr.Dataset:
    """Read a trace saved by `Run.save` (netCDF) back as an xarray.Dataset, fully in memory."""
    return xr.load_dataset(path, engine=ENGINE)


def trace_config(dataset: xr.Dataset) -> dict[str, Any]:
    """The run configuration stored in a trace."""
    return json.loads(dataset.attrs["config"])
