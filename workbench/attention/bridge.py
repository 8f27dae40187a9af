"""The bridge between transformers and workbench attention variants.

workbench registers one implementation, "workbench", in transformers' `AttentionInterface` (and its mask
builder in `AttentionMaskInterface`, the same one SDPA uses). While `use_attention(...)` is active, every
attention layer of the model calls `workbench_attention`, which hands the call to the chosen variant and gives
the statistics it returns to an observer (the trace recorder).
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.attention.fidelity import attention_fidelity, kept_keys
from workbench.errors import WorkbenchError

IMPLEMENTATION = "workbench"
FIDELITY = "fidelity"  # an observer asking for this gets recall and output error against dense attention


class AttentionObserver(Protocol):
    def wants(self, layer: int) -> frozenset[str]:
        """Which statistics ("entropy", "probs", "key_mass") to compute for this layer, and "fidelity" for a
        comparison with dense attention; empty for none."""

    def observe(self, call: AttentionCall, result: AttentionResult) -> None:
        """Receive a layer's result (called only when `wants(layer)` was not empty)."""

    def observe_fidelity(self, call: AttentionCall, recall, output_error) -> None:
        """Receive a layer's fidelity against dense attention (called when `wants(layer)` has "fidelity")."""


@dataclass
class _Binding:
    variant: AttentionVariant
    observer: AttentionObserver | None
    cache: Any = None  # a workbench KVCache: it may mask slots, want statistics, and evict after attention


_active: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("workbench_attention", default=None)


def workbench_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    binding = _active.get()
    if binding is None:
        raise RuntimeError("the 'workbench' attention implementation runs only inside workbench.generate "
                           "(or `use_attention`); set the model's attn_implementation back to 'sdpa' to use it alone")
    layer = getattr(module, "layer_idx", 0)
    call = AttentionCall(layer, query, key, value, attention_mask,
                         scaling if scaling is not None else query.shape[-1] ** -0.5, module, kwargs)
    observer, cache = binding.observer, binding.cache
    want = observer.wants(layer) if observer is not None else frozenset()
    fidelity = FIDELITY in want
    want = want - {FIDELITY}
    if "probs" in want and hasattr(observer, "probs_heads"):
        call.probs_heads = observer.probs_heads(layer)
    if cache is not None:
        cache_wants = cache.wants(layer)
        if "probs" in cache_wants:
            call.probs_heads = None  # the cache needs every head's rows
        want = want | cache_wants
        if "probs" in want:
            call.slot_positions = cache.slot_positions(layer)
        slots = cache.attention_mask(layer, call)  # per KV head, when heads hold or select different tokens
        if slots is not None:
            call.mask = slots.repeat_interleave(call.groups, dim=1)
    result = binding.variant.attend(call, want)
    if observer is not None and want:
        observer.observe(call, result)
    if fidelity:  # a dense recomputation of the same call: what the variant changed
        observer.observe_fidelity(call, *attention_fidelity(call, result.output, kept_keys(binding.variant, call)))
    if cache is not None:
        cache.after_attention(call, result)
    return result.output, None


AttentionInterface.register(IMPLEMENTATION, workbench_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def use_attention(hf_model, variant: AttentionVariant | str, observer: AttentionObserver | None = None, cache=None):
    """Route the model's attention through `variant` for the duration of the block, then restore it.

    observer -- receives the statistics it asks for, layer by layer (the trace recorder)
    cache    -- the workbench KVCache of the run: eviction policies see attention and evict through it
    """
    if isinstance(variant, str):
        from workbench.attention import get as get_variant  # the registry imports this module

        variant = get_variant(variant)
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(IMPLEMENTATION)
    if hf_model.config._attn_implementation != IMPLEMENTATION:  # transformers only warns; we refuse
        raise WorkbenchError(f"{type(hf_model).__name__} does not route attention through transformers' "
                             "AttentionInterface, so workbench attention variants cannot plug into it")
    token = _active.set(_Binding(variant, observer, cache))
    if cache is not None:
        cache.bridged = True
    try:
        yield
    finally:
        if cache is not None:
            cache.bridged = False
        _active.reset(token)
        hf_model.set_attn_implementation(previous)
