"""The recorder: what components write to during a run, keeping only what `record=` asked for.

It is the attention observer of the run (see workbench.attention.bridge) and receives the logits and the cache
after every forward pass. With nothing recorded it asks attention for nothing, so the run computes nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from workbench.errors import ParameterError
from workbench.kernels import softmax_entropy

RECORDABLE = {
    "entropy": "next-token entropy per step; attention entropy per step, layer and head (and for the prompt rows)",
    "attention": "attention rows over positions per step for chosen layers and heads, and the prompt's matrix",
    "logits": "the full next-token logits at every step",
    "cache": "bytes the KV cache holds, tokens held per layer and KV head, and which positions were evicted when",
    "fidelity": "against dense attention and a dense full-cache run: attention recall and output error per step, "
                "layer and head, and the KL divergence of each step's next-token distribution",
}


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
        unknown = [n for n in names if n not in RECORDABLE]
        if unknown:
            raise ParameterError(f"cannot record {', '.join(map(repr, unknown))}; recordable: "
                                 f"{', '.join(RECORDABLE)}")
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


class Recorder:
    """Collects one run's records step by step, as numpy arrays on the CPU."""

    def __init__(self, spec: RecordSpec, num_layers: int, num_heads: int):
        spec.check(num_layers, num_heads)
        self.spec = spec
        self.num_layers, self.num_heads = num_layers, num_heads
        self.attention_layers = spec.attention_layers or tuple(range(num_layers))
        self.attention_heads = spec.attention_heads or tuple(range(num_heads))
        self._wants: dict[int, frozenset[str]] = {}
        for layer in range(num_layers):
            want = set()
            if "entropy" in spec.names:
                want.add("entropy")
            if "attention" in spec.names and layer in self.attention_layers:
                want.add("probs")
            if "fidelity" in spec.names:
                want.add("fidelity")
            self._wants[layer] = frozenset(want)
        self.observes_attention = any(self._wants.values())
        self._entropy: dict[int, torch.Tensor] = {}  # this forward pass: layer -> (heads, queries)
        self._probs: dict[int, torch.Tensor] = {}  # this forward pass: layer -> (chosen heads, queries, keys)
        self._recall: dict[int, torch.Tensor] = {}  # this forward pass: layer -> (heads, queries)
        self._output_error: dict[int, torch.Tensor] = {}
        self.steps: dict[str, list] = {name: [] for name in
                                       ("step_seconds", "entropy", "attention_entropy", "attention", "logits",
                                        "cache_bytes", "cache_tokens", "attention_recall",
                                        "attention_output_error", "log_probs")}
        # filled after the run by the dense replay (workbench.run.fidelity):
        self.kl_vs_dense: np.ndarray | None = None  # (steps,)
        self.cache_dropped_mass: np.ndarray | None = None  # (steps, layers, heads)
        # (step, layer, kv_head, evicted positions, positions they were merged into or None)
        self.evictions: list[tuple[int, int, int, np.ndarray, np.ndarray | None]] = []
        self.prompt_attention_entropy: np.ndarray | None = None  # (layers, heads, prompt queries)
        self.prompt_attention: np.ndarray | None = None  # (chosen layers, chosen heads, prompt queries, keys)
        self.prompt_attention_recall: np.ndarray | None = None  # (layers, heads, prompt queries)

    # -- the attention observer protocol -------------------------------------------------------------------
    def wants(self, layer: int) -> frozenset[str]:
        return self._wants.get(layer, frozenset())

    def probs_heads(self, layer: int) -> tuple[int, ...] | None:
        """The query heads whose attention rows are kept (None: all of them)."""
        return None if self.spec.attention_heads is None else self.attention_heads

    def observe(self, call, result) -> None:
        if result.entropy is not None:
            self._entropy[call.layer] = result.entropy[0].float()
        if result.probs is not None:
            probs = result.probs[0]
            if probs.shape[0] != len(self.attention_heads):  # the variant computed every head's rows
                probs = probs[list(self.attention_heads)]
            self._probs[call.layer] = by_position(probs.float(), call.slot_positions, self.attention_heads,
                                                  call.groups)

    def observe_fidelity(self, call, recall: torch.Tensor, output_error: torch.Tensor) -> None:
        self._recall[call.layer] = recall[0].float()
        self._output_error[call.layer] = output_error[0].float()

    # -- after every forward pass --------------------------------------------------------------------------
    def end_step(self, logits: torch.Tensor, cache, seconds: float, prefill: bool) -> dict[str, Any]:
        """Store this step's records and return them (for the stream callback). `logits` is (vocab,) float32;
        `prefill` marks the forward pass over the prompt, whose every query row is kept as well."""
        records: dict[str, Any] = {"seconds": seconds}
        self.steps["step_seconds"].append(seconds)
        names = self.spec.names
        if "entropy" in names:
            _, entropy = softmax_entropy(logits)
            records["entropy"] = float(entropy)
            self.steps["entropy"].append(records["entropy"])
            rows = torch.stack([self._entropy[layer] for layer in range(self.num_layers)]).cpu().numpy()
            if prefill:  # the prefill: every prompt query's row; the last one chose the first token
                self.prompt_attention_entropy = rows
            records["attention_entropy"] = rows[:, :, -1]
            self.steps["attention_entropy"].append(records["attention_entropy"])
        if "attention" in names:
            per_layer = [self._probs[layer] for layer in self.attention_layers]
            width = max(p.shape[-1] for p in per_layer)  # layers may hold different key counts
            rows = torch.stack([torch.nn.functional.pad(p, (0, width - p.shape[-1])) for p in per_layer])
            rows = rows.cpu().numpy()
            if prefill:
                self.prompt_attention = rows
            records["attention"] = rows[:, :, -1, :]
            self.steps["attention"].append(records["attention"])
        if "logits" in names:
            records["logits"] = logits.cpu().numpy()
            self.steps["logits"].append(records["logits"])
        if "fidelity" in names:
            recall = torch.stack([self._recall[layer] for layer in range(self.num_layers)]).cpu().numpy()
            error = torch.stack([self._output_error[layer] for layer in range(self.num_layers)]).cpu().numpy()
            if prefill:
                self.prompt_attention_recall = recall
            # a step's value is the mean over its query rows (all prompt rows at the prefill)
            records["attention_recall"] = recall.mean(-1)
            records["attention_output_error"] = error.mean(-1)
            self.steps["attention_recall"].append(records["attention_recall"])
            self.steps["attention_output_error"].append(records["attention_output_error"])
            self.steps["log_probs"].append(torch.log_softmax(logits.float(), -1).cpu())
        events = cache.drain_events()  # drained every step so they never pile up
        if names & {"cache", "fidelity"}:  # fidelity measures the dense attention on what was evicted
            step = len(self.steps["step_seconds"]) - 1
            self.evictions += [(step, layer, head, positions.cpu().numpy(),
                                None if merged is None else merged.cpu().numpy())
                               for layer, head, positions, merged in events]
        if "cache" in names:
            records["cache_evicted"] = sum(len(positions) for _, _, positions, _ in events)
            records["cache_bytes"] = cache.nbytes()
            records["cache_tokens"] = cache.tokens_held().numpy()
            self.steps["cache_bytes"].append(records["cache_bytes"])
            self.steps["cache_tokens"].append(records["cache_tokens"])
        for per_layer in (self._entropy, self._probs, self._recall, self._output_error):
            per_layer.clear()
        return records
