"""The recorder: what components write to during a run, keeping only what `record=` asked for.

It is the attention observer of the run's session (see workbench.run.bridge), hears about every forward pass (a
session listener), and is handed each step's logits, entropy and cache. Values are stored under the names the
trace schema declares (workbench.trace.schema), along the variable's axis; `build_dataset` turns them into the
Dataset. With nothing recorded it asks attention for nothing, so the run computes nothing extra.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch

from workbench.errors import ParameterError, WorkbenchError
from workbench.trace import schema
from workbench.trace.layer_records import LayerRecords
from workbench.trace.routing_records import RoutingRecords


class _Recordable(Mapping):
    """The record= options and what each turns on (a live view of the schema's options)."""

    def __getitem__(self, name):
        return schema.OPTIONS[name].description

    def __iter__(self):
        return iter(schema.OPTIONS)

    def __len__(self):
        return len(schema.OPTIONS)


RECORDABLE = _Recordable()


@dataclass(frozen=True)
class RecordSpec:
    """What a run records. `attention_layers` / `attention_heads` choose rows for "attention" (None: all)."""

    names: frozenset[str] = frozenset()
    attention_layers: tuple[int, ...] | None = None
    attention_heads: tuple[int, ...] | None = None

    @classmethod
    def parse(cls, record: None | str | Iterable[str] | Mapping[str, Any]) -> RecordSpec:
        """Accepts None, "entropy", ["entropy", "cache"], or {"entropy": True, "attention": {"layers": [0, 5],
        "heads": [1]}}."""
        if isinstance(record, RecordSpec):
            return record
        if record is None:
            return cls()
        if isinstance(record, str):
            record = [record]
        options: dict[str, Any] = {}
        if isinstance(record, Mapping):
            options = {k: v for k, v in record.items() if v}
            names = list(options)
        else:
            names = list(record)
        schema.check_options(names)
        attention = options.get("attention")
        layers = heads = None
        if isinstance(attention, Mapping):
            extra = set(attention) - {"layers", "heads"}
            if extra:
                raise ParameterError(f"record 'attention' takes 'layers' and 'heads'; got {sorted(extra)}")
            layers = _indices(attention.get("layers"))
            heads = _indices(attention.get("heads"))
        return cls(frozenset(names), layers, heads)

    def check(self, num_layers: int, num_heads: int) -> None:
        for label, chosen, size in (("layers", self.attention_layers, num_layers),
                                    ("heads", self.attention_heads, num_heads)):
            bad = [i for i in chosen or () if not 0 <= i < size]
            if bad:
                raise ParameterError(f"record attention {label} {bad} out of range; the model has {size} {label} "
                                     f"(0..{size - 1})")


def _indices(value) -> tuple[int, ...] | None:
    if value is None:
        return None
    return (int(value),) if isinstance(value, int) else tuple(int(v) for v in value)


def by_position(probs: torch.Tensor, slot_positions: torch.Tensor | None, heads, groups: int) -> torch.Tensor:
    """Attention rows over key slots (heads, queries, slots) -> over token positions (heads, queries, positions up
    to the latest one held). Evicted positions get 0: they received no attention."""
    if slot_positions is None:
        return probs
    positions = slot_positions.to(probs.device).repeat_interleave(groups, dim=0)[list(heads)]  # (heads, slots)
    out = probs.new_zeros(probs.shape[0], probs.shape[1], int(positions.max()) + 1)
    index = positions.clamp_min(0)[:, None, :].expand_as(probs)
    return out.scatter_add_(2, index, torch.where(positions[:, None, :] >= 0, probs, 0.0))


def missing(value):
    """A missing value shaped like `value`: NaN for floats, -1 for integers, "" for text."""
    if isinstance(value, str):
        return ""
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.floating):
        return np.full_like(array, np.nan)
    return np.full_like(array, -1)


class Recorder:
    """Collects one run's records, as numpy arrays on the CPU, under the schema's variable names."""

    def __init__(self, spec: RecordSpec, num_layers: int, num_heads: int):
        spec.check(num_layers, num_heads)
        self.spec = spec
        self.num_layers, self.num_heads = num_layers, num_heads
        self.attention_layers = spec.attention_layers or tuple(range(num_layers))
        self.attention_heads = spec.attention_heads or tuple(range(num_heads))
        names = spec.names
        self._wants = {layer: frozenset(
            ({"entropy"} if "entropy" in names else set())
            | ({"probs"} if "attention" in names and layer in self.attention_layers else set())
            | ({"fidelity"} if "fidelity" in names else set())) for layer in range(num_layers)}
        self.observes_attention = any(self._wants.values())
        self.observes_routing = bool(names & {"routing", "router_logits"})  # the router bridge's observer protocol
        self.routing = RoutingRecords(num_layers, logits="router_logits" in names)
        self.observes_layers = "layers" in names  # the layer bridge's observer protocol (workbench.run.layers)
        self.measures_quant_error = "cache" in names  # generate turns on the stores' error measurement
        self.layers = LayerRecords(num_layers)
        self.cache_parts: list[str] = []  # the `cache_part` coordinate: what KVCache.nbytes_by_component names
        self.max_rank = 0  # the most experts any token used in one layer (the trace's `rank` size)
        self.wants_cache_events = bool(names & {"cache", "fidelity"})  # fidelity measures attention on evictions
        self.enabled = {v.name for v in schema.variables(names)}
        self.along: dict[str, list] = {}  # step- and forward-axis variables: one entry per step / forward
        self.whole: dict[str, np.ndarray] = {}  # variables set once per run
        self.steps = 0
        self.forwards = 0
        self.forward_of_step: list[int] = []
        self.log_probs: list[torch.Tensor] = []  # per step, for the fidelity replay's KL
        # (step, layer, kv_head, evicted positions, positions they were merged into or None)
        self.evictions: list[tuple[int, int, int, np.ndarray, np.ndarray | None]] = []
        self._layer: dict[str, dict[int, torch.Tensor]] = {"entropy": {}, "probs": {}, "recall": {}, "error": {}}
        self._rows: dict[int, dict[str, np.ndarray]] = {}  # forward index -> its rows per statistic, until a step

    # -- writing variables ----------------------------------------------------------------------------------
    def record(self, name: str, value) -> None:
        """Append this step's (or forward pass's) value of a declared variable; ignored when not recorded."""
        variable = schema.VARIABLES.get(name)
        if variable is None:
            raise ParameterError(f"no trace variable {name!r} is declared (workbench.trace.schema.declare)")
        if name not in self.enabled:
            return
        if variable.axis is None:
            self.whole[name] = np.asarray(value)
            return
        values = self.along.setdefault(name, [])
        # a step value belongs to the step under way (index self.steps on), a forward value to the latest pass:
        # entries that never came are missing, so every variable stays aligned with its axis
        start = self.steps if variable.axis == "step" else self.forwards - 1
        values += [missing(value)] * (start - len(values))
        values.append(value)

    # -- the attention observer protocol -------------------------------------------------------------------
    def wants(self, layer: int) -> frozenset[str]:
        return self._wants.get(layer, frozenset())

    def probs_heads(self, layer: int) -> tuple[int, ...] | None:
        """The query heads whose attention rows are kept (None: all of them)."""
        return None if self.spec.attention_heads is None else self.attention_heads

    def observe(self, call, result) -> None:
        if result.entropy is not None:
            self._layer["entropy"][call.layer] = result.entropy[0].float()
        if result.probs is not None:
            probs = result.probs[0]
            if probs.shape[0] != len(self.attention_heads):  # the variant computed every head's rows
                probs = probs[list(self.attention_heads)]
            self._layer["probs"][call.layer] = by_position(probs.float(), call.slot_positions, self.attention_heads,
                                                           call.groups)

    def observe_routing(self, call, routing) -> None:
        self.routing.observe(call, routing)

    def observe_layer(self, call) -> None:
        self.layers.observe(call)

    def observe_fidelity(self, call, recall: torch.Tensor, output_error: torch.Tensor) -> None:
        self._layer["recall"][call.layer] = recall[0].float()
        self._layer["error"][call.layer] = output_error[0].float()

    # -- after every forward pass (a session listener) -----------------------------------------------------
    def end_forward(self, forward, seconds: float) -> None:
        self.forwards += 1
        self.record("forward_seconds", seconds)
        self.record("forward_phase", forward.phase)
        self.record("forward_start", forward.start)
        self.record("forward_tokens", forward.count)
        layers, latest = self._layer, {}
        if layers["entropy"]:
            latest["entropy"] = torch.stack([layers["entropy"][i] for i in range(self.num_layers)]).cpu().numpy()
        if layers["probs"]:
            per_layer = [layers["probs"][i] for i in self.attention_layers]
            width = max(p.shape[-1] for p in per_layer)  # layers may hold different key counts
            latest["probs"] = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1]))
                                           for p in per_layer]).cpu().numpy()
        if layers["recall"]:
            latest["recall"] = torch.stack([layers["recall"][i] for i in range(self.num_layers)]).cpu().numpy()
            latest["error"] = torch.stack([layers["error"][i] for i in range(self.num_layers)]).cpu().numpy()
        if forward.phase == "prefill":  # every prompt query's row is kept too
            if "entropy" in latest:
                self.record("prompt_attention_entropy", latest["entropy"])
            if "probs" in latest:
                self.record("prompt_attention", latest["probs"])
            if "recall" in latest:
                self.record("prompt_attention_recall", latest["recall"])
        routed = self.routing.end_forward()
        if routed is not None:
            self.max_rank = max(self.max_rank, routed["expert_ids"].shape[-1])
            if forward.phase == "prefill":
                for name, rows in routed.items():
                    if name != "router_logits":
                        self.record(f"prompt_{name}", rows)
            # the row whose logits chose the step's token: the last after a prefill or append, else the first
            # (a decode pass has one; a verify pass's first row is the pending token, a tree's root)
            row = -1 if forward.phase in ("prefill", "append") else 0
            latest["routing"] = {name: rows[row] for name, rows in routed.items()}
        per_layer = self.layers.end_forward()
        if per_layer is not None:
            similarity = per_layer.pop("layer_similarity")
            if forward.phase == "prefill":
                self.record("prompt_layer_similarity", similarity)
            per_layer["layer_similarity"] = similarity[-1 if forward.phase in ("prefill", "append") else 0]
            latest["layers"] = per_layer
        if latest:
            self._rows[self.forwards - 1] = latest
        for per_layer in layers.values():
            per_layer.clear()

    # -- after every step -------------------------------------------------------------------------------------
    def end_step(self, logits: torch.Tensor, entropy, cache, seconds: float, forward: int | None = None,
                 tokens: int = 1) -> dict:
        """Store this step's records and return them (for the stream callback). `logits` (vocab,) float32 chose
        the step's first token, from the last row of forward pass `forward` (default: the latest); `entropy` is
        its entropy (a 0-d tensor computed once for the step, or None). The trace's `step` axis is tokens: when a
        decoder step returned `tokens` > 1 (accepted draft tokens), the later ones get missing values (NaN, -1,
        "") in every step variable the step recorded, and the same `forward_of_step`."""
        records: dict[str, Any] = {"seconds": seconds}
        self.record("step_seconds", seconds)
        forward = self.forwards - 1 if forward is None else forward
        self.forward_of_step.append(forward)
        latest = self._rows.get(forward, {})
        self._rows = {}  # passes after it (look-aheads) chose nothing
        if entropy is not None and "entropy" in self.enabled:
            records["entropy"] = float(entropy)
            self.record("entropy", records["entropy"])
        if "entropy" in latest:
            records["attention_entropy"] = latest["entropy"][:, :, -1]
            self.record("attention_entropy", records["attention_entropy"])
        if "probs" in latest:
            records["attention"] = latest["probs"][:, :, -1, :]
            self.record("attention", records["attention"])
        for name, value in {**latest.get("routing", {}), **latest.get("layers", {})}.items():
            records[name] = value
            self.record(name, value)
        if "logits" in self.enabled:
            records["logits"] = logits.cpu().numpy()
            self.record("logits", records["logits"])
        if "recall" in latest:  # a step's value is the mean over its pass's query rows (all prompt rows at first)
            records["attention_recall"] = latest["recall"].mean(-1)
            records["attention_output_error"] = latest["error"].mean(-1)
            self.record("attention_recall", records["attention_recall"])
            self.record("attention_output_error", records["attention_output_error"])
            self.log_probs.append(torch.log_softmax(logits.float(), -1).cpu())
        if self.wants_cache_events and cache is not None:
            events = cache.drain_events()
            self.evictions += [(self.steps, layer, head, positions.cpu().numpy(),
                                None if merged is None else merged.cpu().numpy())
                               for layer, head, positions, merged in events]
            records["cache_evicted"] = sum(len(positions) for _, _, positions, _ in events)
            records["cache_events"] = self.evictions[len(self.evictions) - len(events):]  # for live views
            records["cache_positions"] = cache.position  # positions given to the cache so far
        if "cache_bytes" in self.enabled and cache is not None:
            parts = cache.nbytes_by_component()  # what nbytes() sums: one walk over the stores for both
            records["cache_bytes"] = sum(parts.values())
            records["cache_tokens"] = cache.tokens_held().numpy()
            self.record("cache_bytes", records["cache_bytes"])
            self.record("cache_tokens", records["cache_tokens"])
            self.cache_parts = self.cache_parts or list(parts)  # a store reports the same parts every time
            if set(parts) - set(self.cache_parts):
                raise WorkbenchError(f"the cache's parts changed during the run: {list(parts)} after "
                                     f"{self.cache_parts} (a store must name every part from its first pass)")
            self.record("cache_part_bytes", np.array([parts.get(name, 0) for name in self.cache_parts], np.int64))
            error = cache.quant_error()
            if error is not None:
                self.record("kv_quant_error", error.numpy())
        accepted = self.along.get("verify_accepted", [])
        if len(accepted) == self.forwards and accepted[-1] >= 0:  # the step ended with a verify pass (live views)
            records["verify_drafted"], records["verify_accepted"] = self.along["verify_drafted"][-1], accepted[-1]
        self._pad_step(tokens, forward)
        self.steps += tokens
        return records

    def _pad_step(self, tokens: int, forward: int) -> None:
        """Every step variable gets one entry per token of the step: the later tokens of a multi-token step are
        missing unless the decoder recorded them; values past the run's last token are dropped."""
        end = self.steps + tokens
        for name, values in self.along.items():
            if schema.VARIABLES[name].axis == "step" and values:
                del values[end:]
                values += [missing(values[-1])] * (end - len(values))
        self.forward_of_step += [forward] * (tokens - 1)
        if self.log_probs and len(self.log_probs) < self.steps + tokens:  # the fidelity KL of those tokens: NaN
            self.log_probs += [torch.full_like(self.log_probs[-1], float("nan"))] * (tokens - 1)

    def eviction_log(self, num_kv_heads: int, n_positions: int) -> None:
        """Turn the eviction events into the run-level `cache_evicted_at` / `cache_merged_into` arrays."""
        evicted_at = np.full((self.num_layers, num_kv_heads, n_positions), -1, dtype=np.int32)
        merged_into = np.full_like(evicted_at, -1)
        for step, layer, head, positions, merged in self.evictions:
            evicted_at[layer, head, positions] = step
            if merged is not None:
                merged_into[layer, head, positions] = merged
        self.record("cache_evicted_at", evicted_at)
        self.record("cache_merged_into", merged_into)
