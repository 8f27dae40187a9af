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
from typing import Protocol

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant

IMPLEMENTATION = "workbench"


class AttentionObserver(Protocol):
    def wants(self, layer: int) -> frozenset[str]:
        """Which statistics ("entropy", "probs") to compute for this layer; empty for none."""

    def observe(self, call: AttentionCall, result: AttentionResult) -> None:
        """Receive a layer's result (called only when `wants(layer)` was not empty)."""


@dataclass
class _Binding:
    variant: AttentionVariant
    observer: AttentionObserver | None


_active: contextvars.ContextVar[_Binding | None] = contextvars.ContextVar("workbench_attention", default=None)


def workbench_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    binding = _active.get()
    if binding is None:
        raise RuntimeError("the 'workbench' attention implementation runs only inside workbench.generate "
                           "(or `use_attention`); set the model's attn_implementation back to 'sdpa' to use it alone")
    layer = getattr(module, "layer_idx", 0)
    call = AttentionCall(layer, query, key, value, attention_mask,
                         scaling if scaling is not None else query.shape[-1] ** -0.5, module, kwargs)
    observer = binding.observer
    want = observer.wants(layer) if observer is not None else frozenset()
    result = binding.variant.attend(call, want)
    if want:
        observer.observe(call, result)
    return result.output, None


AttentionInterface.register(IMPLEMENTATION, workbench_attention)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)


@contextmanager
def use_attention(hf_model, variant: AttentionVariant, observer: AttentionObserver | None = None):
    """Route the model's attention through `variant` for the duration of the block, then restore it."""
    previous = hf_model.config._attn_implementation
    hf_model.set_attn_implementation(IMPLEMENTATION)
    token = _active.set(_Binding(variant, observer))
    try:
        yield
    finally:
        _active.reset(token)
        hf_model.set_attn_implementation(previous)
