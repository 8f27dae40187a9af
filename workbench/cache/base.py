"""Cache policies: what a KV cache keeps. A policy is the registered component (its parameters, e.g. a budget);
for every run it builds a fresh `KVCache` (workbench.cache.kvcache), a real transformers `Cache` that
`model.generate` accepts too, whose layers keep keys and values in a store (workbench.cache.storage).

A policy decides; it never touches storage tensors. The cache calls it with one layer at a time
(workbench.cache.kvcache.CacheLayer: what the layer holds, the policy's per-slot statistics, `keep` and `merge`):

    begin_pass(cache, forward)   a forward pass starts (its phase, positions and token ids)
    wants(layer, phase)          attention statistics the policy needs from this layer's attention
    attended(layer, call)        the keys and values the call's queries read (default: as stored)
    visible(layer, call)         query-aware selection: bool (kv_heads, q, slots) narrowing what each query sees
    observe(layer, call, result) the layer's attention ran: update statistics
    evict(layer, call, result)   decide what goes (from the call's phase, the budget, the statistics) and keep/merge
"""

from __future__ import annotations

from typing import ClassVar

from workbench.cache.kvcache import ForwardPass, KVCache
from workbench.cache.storage import DenseStore
from workbench.registry import Component


class CachePolicy(Component):
    """Base of cache policies. Subclasses set `store`, the statistics they need, and override the hooks."""

    store: ClassVar[type] = DenseStore  # DenseStore: every head keeps the same tokens (built by `new_store`)
    needs: ClassVar[frozenset[str]] = frozenset()  # attention statistics wanted from every pass
    tentative: ClassVar[bool] = True  # can evict tentatively inside a provisional pass; False for merging ones
    needs_bridge: ClassVar[bool] = True  # acts on attention, so refuses a forward that workbench does not see

    def build(self, model, forward=None) -> KVCache:
        """A fresh cache for one run of `model`. `forward(ids, observer, attention)` runs one forward pass through a
        workbench session, for policies that measure the model first (workbench.run.build_cache supplies it)."""
        return KVCache(model.config, self, self.new_store)

    def new_store(self) -> DenseStore:
        """A fresh store for one layer: `store()` by default; a policy whose store takes its parameters (the
        quantized ones: bits, group, residual) builds it here."""
        return self.store()

    @property
    def acts_while_decoding(self) -> bool:
        """Whether decoding passes change anything (statistics, evictions, selection): provisional passes are then
        observed row by row."""
        return False

    def begin_pass(self, cache: KVCache, forward: ForwardPass) -> None:
        pass

    def wants(self, layer: int, phase: str) -> frozenset[str]:
        return self.needs

    def attended(self, layer, call):
        return call.key, call.value

    def visible(self, layer, call):
        return None

    def observe(self, layer, call, result) -> None:
        pass

    def evict(self, layer, call, result) -> None:
        pass
