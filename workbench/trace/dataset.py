"""Turning a run's records into a self-describing xarray.Dataset, and reading one back from netCDF.

Dimensions and coordinates:
  step            generated tokens, 0..n-1; coords `token` (text) and `token_id`
  position        every token of the run (prompt then generated); coords `position_token`, `is_prompt`
  query           the prompt's query rows (positions 0..P-1), for the prefill statistics
  layer, head     all attention layers and query heads; `kv_head_of` maps a query head to its KV head (GQA)
  kv_head         KV heads, for cache records
  attn_layer, attn_head   the layers and heads whose attention rows were recorded
  vocab           token ids, for logits
attrs hold the run's configuration (also as JSON in attrs["config"]), so a saved trace says how it was made.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from workbench.trace.recorder import Recorder

ENGINE = "h5netcdf"


def build_dataset(recorder: Recorder, *, prompt_tokens: list[str], tokens: list[str], token_ids: list[int],
                  num_kv_heads: int, vocab_size: int, attrs: dict[str, Any]) -> xr.Dataset:
    n_prompt, n_steps = len(prompt_tokens), len(tokens)
    n_positions = n_prompt + n_steps
    groups = recorder.num_heads // num_kv_heads
    coords = {
        "step": np.arange(n_steps),
        "token": ("step", np.array(tokens, dtype=object)),
        "token_id": ("step", np.array(token_ids, dtype=np.int64)),
        "position": np.arange(n_positions),
        "position_token": ("position", np.array(prompt_tokens + tokens, dtype=object)),
        "is_prompt": ("position", np.arange(n_positions) < n_prompt),
        "layer": np.arange(recorder.num_layers),
        "head": np.arange(recorder.num_heads),
        "kv_head_of": ("head", np.arange(recorder.num_heads) // groups),
        "kv_head": np.arange(num_kv_heads),
    }
    steps = recorder.steps
    data: dict[str, Any] = {"step_seconds": ("step", np.array(steps["step_seconds"], dtype=np.float64))}
    names = recorder.spec.names
    if "entropy" in names:
        data["entropy"] = ("step", np.array(steps["entropy"], dtype=np.float32))
        data["attention_entropy"] = (("step", "layer", "head"),
                                     _stack(steps["attention_entropy"], (0, recorder.num_layers, recorder.num_heads)))
        if recorder.prompt_attention_entropy is not None:
            coords["query"] = np.arange(n_prompt)
            data["prompt_attention_entropy"] = (("layer", "head", "query"), recorder.prompt_attention_entropy)
    if "attention" in names:
        coords["attn_layer"] = np.array(recorder.attention_layers)
        coords["attn_head"] = np.array(recorder.attention_heads)
        shape = (len(recorder.attention_layers), len(recorder.attention_heads))
        rows = [_pad(row, n_positions) for row in steps["attention"]]
        data["attention"] = (("step", "attn_layer", "attn_head", "position"), _stack(rows, (0, *shape, n_positions)))
        if recorder.prompt_attention is not None:
            coords["query"] = np.arange(n_prompt)
            data["prompt_attention"] = (("attn_layer", "attn_head", "query", "position"),
                                        _pad(recorder.prompt_attention, n_positions))
    if "logits" in names:
        coords["vocab"] = np.arange(vocab_size)
        data["logits"] = (("step", "vocab"), _stack(steps["logits"], (0, vocab_size))[:, :vocab_size])
    if "cache" in names:
        data["cache_bytes"] = ("step", np.array(steps["cache_bytes"], dtype=np.int64))
        data["cache_tokens"] = (("step", "layer", "kv_head"),
                                _stack(steps["cache_tokens"], (0, recorder.num_layers, num_kv_heads), np.int64))
        evicted_at = np.full((recorder.num_layers, num_kv_heads, n_positions), -1, dtype=np.int32)
        merged_into = np.full_like(evicted_at, -1)
        for step, layer, head, positions, merged in recorder.evictions:
            evicted_at[layer, head, positions] = step
            if merged is not None:
                merged_into[layer, head, positions] = merged
        data["cache_evicted_at"] = (("layer", "kv_head", "position"), evicted_at)
        data["cache_merged_into"] = (("layer", "kv_head", "position"), merged_into)
    if "fidelity" in names:
        per_head = ("step", "layer", "head")
        empty = (0, recorder.num_layers, recorder.num_heads)
        data["attention_recall"] = (per_head, _stack(steps["attention_recall"], empty))
        data["attention_output_error"] = (per_head, _stack(steps["attention_output_error"], empty))
        if recorder.prompt_attention_recall is not None:
            coords["query"] = np.arange(n_prompt)
            data["prompt_attention_recall"] = (("layer", "head", "query"), recorder.prompt_attention_recall)
        kl = recorder.kl_vs_dense if recorder.kl_vs_dense is not None else np.zeros(0)
        data["kl_vs_dense"] = ("step", kl.astype(np.float32))
        dropped = recorder.cache_dropped_mass
        if dropped is None:  # nothing evicted: the dense model's attention all fell on held positions
            dropped = np.zeros((len(kl), recorder.num_layers, recorder.num_heads))
        data["cache_dropped_mass"] = (per_head, dropped.astype(np.float32))
    dataset = xr.Dataset(data, coords=coords, attrs=_netcdf_attrs(attrs))
    _describe_variables(dataset)
    return dataset


def _stack(rows: list[np.ndarray], empty_shape: tuple[int, ...], dtype=np.float32) -> np.ndarray:
    return np.stack(rows).astype(dtype) if rows else np.zeros(empty_shape, dtype=dtype)


def _pad(rows: np.ndarray, length: int) -> np.ndarray:
    """Pad the last (key) axis with NaN up to `length` positions: keys a row could not see yet."""
    missing = length - rows.shape[-1]
    pad = [(0, 0)] * (rows.ndim - 1) + [(0, missing)]
    return np.pad(rows.astype(np.float32), pad, constant_values=np.nan)


DESCRIPTIONS = {
    "step_seconds": ("seconds", "wall time of the forward pass that chose this token (step 0 includes the prefill)"),
    "entropy": ("nats", "Shannon entropy of the next-token distribution this token was chosen from"),
    "attention_entropy": ("nats", "entropy of the attention row of the query that chose this token"),
    "prompt_attention_entropy": ("nats", "entropy of each prompt query's attention row (prefill)"),
    "attention": ("probability", "attention row of the query that chose this token, over positions (NaN: unseen)"),
    "prompt_attention": ("probability", "prefill attention matrix: prompt queries x positions"),
    "logits": ("logit", "next-token logits this token was chosen from"),
    "cache_bytes": ("bytes", "bytes held by the KV cache after this step"),
    "cache_tokens": ("tokens", "tokens held per layer and KV head after this step"),
    "cache_evicted_at": ("step", "the step during which the cache evicted this position (-1: never evicted)"),
    "cache_merged_into": ("position", "the kept position an evicted entry was merged into (-1: dropped, or kept)"),
    "attention_recall": ("fraction", "share of dense attention mass on the keys the variant kept (mean over the "
                                     "step's queries; NaN for variants without a kept set)"),
    "attention_output_error": ("relative L2", "|attention output - dense output| / |dense output| (mean over the "
                                              "step's queries)"),
    "prompt_attention_recall": ("fraction", "attention recall of each prompt query row (prefill)"),
    "cache_dropped_mass": ("fraction", "share of the dense full-cache model's attention at this step that falls on "
                                       "positions the cache had evicted"),
    "kl_vs_dense": ("nats", "KL(dense full-cache model || this run) of the next-token distribution at this step"),
}


def _describe_variables(dataset: xr.Dataset) -> None:
    for name, (units, text) in DESCRIPTIONS.items():
        if name in dataset:
            dataset[name].attrs.update(units=units, description=text)


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
    """Bool (step, layer, kv_head, position): whether each position is in the cache after each step.

    After step s the cache has been given the prompt and the first s generated tokens, minus what it evicted
    during steps 0..s (decoded from the compact `cache_evicted_at`)."""
    evicted_at = dataset["cache_evicted_at"]
    n_prompt = int(dataset["is_prompt"].sum())
    given = dataset["position"] < n_prompt + dataset["step"]
    evicted = (evicted_at >= 0) & (evicted_at <= dataset["step"])
    return (given & ~evicted).transpose("step", "layer", "kv_head", "position").rename("cache_alive")


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
