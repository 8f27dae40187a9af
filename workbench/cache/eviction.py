"""The shared base of eviction policies (in the manner of kvpress: one scoring base, one small class per method).

A policy scores the tokens each KV head holds; `EvictingCache` keeps, per layer and head, the protected tokens
(the first `sinks` and the last `window`) plus the best-scored others up to the budget, and really frees the rest.
It compresses after a layer's attention has run, at the prefill (the prompt's forward pass), during decoding
(whenever a head holds more than its budget, checked every `every` steps), or both.

Policies that score by attention receive it through workbench's attention bridge (see `wants` / `observe`), so
they run in `workbench.generate`, or in `model.generate` inside `workbench.attention.use_attention(...)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.base import CachePolicy, KVCache
from workbench.cache.headwise import HeadwiseLayer
from workbench.errors import ParameterError, WorkbenchError
from workbench.registry import param

PHASES = ("prefill", "decode", "both")


@dataclass
class EvictionPolicy(CachePolicy):
    """Base of policies that keep at most `budget` tokens per layer and KV head."""

    budget: int = param(128, "tokens kept per layer and KV head", min=1)
    ratio: float | None = param(None, "keep this fraction of the prompt instead of a fixed budget", min=0.0, max=1.0)
    sinks: int = param(4, "first tokens always kept (attention sinks)", min=0)
    window: int = param(16, "most recent tokens always kept", min=0)
    compress: str = param("both", "when to evict: at the prefill, during decoding, or both", choices=PHASES)
    every: int = param(1, "during decoding, evict every this many steps (the cache may exceed the budget between)",
                       min=1)

    needs: ClassVar[frozenset[str]] = frozenset()  # attention statistics wanted every forward pass

    def validate(self) -> None:
        if self.ratio is not None and self.ratio <= 0:
            raise ParameterError(f"cache '{self.name}' parameter 'ratio' must be > 0")
        if self.ratio is None and self.budget < self.sinks + self.window:
            raise ParameterError(f"cache '{self.name}' budget {self.budget} is smaller than sinks + window "
                                 f"({self.sinks} + {self.window}); raise the budget or lower sinks/window")

    def build(self, model) -> EvictingCache:
        return EvictingCache(model.config, self)

    # -- what subclasses override ---------------------------------------------------------------------------
    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int | list[int]]:
        """Tokens each layer keeps per KV head, from the policy's budget: an int per layer, or a list with one int
        per KV head (PyramidKV-style policies vary it by layer, RazorAttention-style ones by head)."""
        return [base] * num_layers

    def observe(self, state: LayerState, call, result) -> None:
        """See a layer's attention every forward pass (accumulate statistics here)."""

    def score(self, state: LayerState, head: int, call, result) -> torch.Tensor:
        """A score per token the head holds (higher: more worth keeping)."""
        raise NotImplementedError

    def merge(self, state: LayerState, head: int, keep: torch.Tensor, drop: torch.Tensor) -> torch.Tensor | None:
        """Merging policies fold the dropped entries (storage indices `drop`) into kept ones (`keep`) by updating
        the kept keys/values in place, and return, per dropped entry, the position it went into (-1: none).
        Plain eviction returns None: dropped entries are simply freed."""
        return None


class LayerState:
    """A layer's storage plus whatever a policy accumulates about its tokens (e.g. H2O's attention sums)."""

    def __init__(self, index: int, layer: HeadwiseLayer):
        self.index = index
        self.layer = layer
        self.head_scores: list[torch.Tensor] | None = None  # accumulated per-token scores, aligned with storage


class EvictingCache(KVCache):
    """A transformers cache whose layers store per KV head and evict what their policy scores lowest."""

    def __init__(self, config, policy: EvictionPolicy):
        super().__init__(config)
        self.policy = policy
        self.num_layers = config.get_text_config(decoder=True).num_hidden_layers
        self.layers = [HeadwiseLayer() for _ in range(self.num_layers)]
        self.states = [LayerState(i, layer) for i, layer in enumerate(self.layers)]
        self.budgets: list[int] | None = None  # per layer, fixed when the prompt arrives
        self.decode_steps = 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # transformers builds masks in index space: queries sit after the tokens the layer holds
        return self.layers[layer_idx].held_max() if layer_idx < len(self.layers) else 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if not self.bridged:  # without the bridge nothing would ever be evicted: refuse rather than mislead
            raise WorkbenchError(f"cache '{self.policy.name}' evicts after each layer's attention, which it sees "
                                 "through workbench's attention: use workbench.generate, or run model.generate "
                                 "inside `with workbench.attention.use_attention(model.hf, 'sdpa', cache=cache):`")
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    # -- accounting ---------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def tokens_held(self) -> torch.Tensor:
        return torch.tensor([layer.held() or [0] * self.num_kv_heads for layer in self.layers], dtype=torch.long)

    def positions(self, layer_idx: int) -> list[torch.Tensor]:
        """Per KV head, the absolute positions the layer keeps (heads may differ in count)."""
        return list(self.layers[layer_idx].head_positions)

    def slot_positions(self, layer_idx: int) -> torch.Tensor:
        return self.layers[layer_idx].slot_positions()

    # -- the attention bridge's hooks ---------------------------------------------------------------------
    def wants(self, layer_idx: int) -> frozenset[str]:
        return self.policy.needs

    def attention_mask(self, layer_idx: int, call) -> torch.Tensor | None:
        return self.layers[layer_idx].attention_mask()

    def after_attention(self, call, result) -> None:
        """Called by the bridge once a layer's attention ran: let the policy observe, then evict."""
        state = self.states[call.layer]
        layer = state.layer
        self.policy.observe(state, call, result)
        prefill = call.query.shape[2] > 1
        if self.budgets is None:  # the first forward pass carries the prompt: budgets may depend on its length
            policy = self.policy
            base = policy.budget if policy.ratio is None else max(1, math.ceil(policy.ratio * layer.seen))
            self.budgets = policy.layer_budgets(base, self.num_layers, prompt_length=layer.seen)
        phase_on = self.policy.compress == "both" or self.policy.compress == ("prefill" if prefill else "decode")
        if not phase_on:
            return
        if not prefill and call.layer == 0:
            self.decode_steps += 1
        if not prefill and self.decode_steps % self.policy.every:
            return
        budget = self.budgets[call.layer]
        per_head = budget if isinstance(budget, list) else [budget] * layer.num_heads
        for head, (held, limit) in enumerate(zip(layer.held(), per_head)):
            if held > limit:
                self._evict(state, head, limit, call, result)

    def _evict(self, state: LayerState, head: int, budget: int, call, result) -> None:
        layer = state.layer
        positions = layer.head_positions[head]
        n = positions.shape[0]
        protected = positions < self.policy.sinks
        protected[max(0, n - self.policy.window):] = True
        scores = self.policy.score(state, head, call, result).float().clone()
        free = budget - int(protected.sum())
        if free <= 0:  # only protected tokens fit: the most recent of them win
            keep = torch.nonzero(protected).flatten()[-budget:]
        else:
            scores[protected] = float("-inf")
            chosen = torch.topk(scores, min(free, n - int(protected.sum()))).indices
            keep = torch.cat([torch.nonzero(protected).flatten(), chosen])
        drop = torch.ones(n, dtype=torch.bool, device=keep.device)
        drop[keep] = False
        merged_into = self.policy.merge(state, head, keep.sort().values, torch.nonzero(drop).flatten())
        layer.keep(head, keep, merged_into)
        if state.head_scores is not None:
            state.head_scores[head] = state.head_scores[head][keep.sort().values]

    def drain_events(self) -> list[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        return [(i, *event) for i, layer in enumerate(self.layers) for event in layer.drain_events()]
