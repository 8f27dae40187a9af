"""`knorm`: keep the keys with the smallest L2 norm.

As in the paper's code, layers 0 and 1 are not compressed (their attention is not concentrated on low-norm keys)
and no sinks or recent window are protected; scores are per KV head, so heads keep different tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.registry import param


@dataclass
class KNorm(EvictionPolicy):
    name = "knorm"
    summary = "Keep the tokens whose keys have the lowest L2 norm (they tend to draw the most attention)."
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al., EMNLP 2024)"

    sinks: int = param(0, "first tokens always kept (KNorm keeps none)", min=0)
    window: int = param(0, "most recent tokens always kept (KNorm keeps none)", min=0)
    full_layers: str = param("0,1", "layers never compressed (KNorm leaves layers 0 and 1 whole)")

    def observe(self, layer, call, result) -> None:
        """Each key's norm, computed once, when it arrives (the new tokens are the last slots of every head)."""
        norms = layer.extra("key_norm")
        new = layer.next_position - layer.cache.current.start  # the pass's tokens, provisional rows included
        new = new if len(set(layer.store.lengths)) == 1 else norms.shape[1]
        norms[:, -new:] = layer.held_keys()[:, -new:].float().norm(dim=-1)

    def score(self, layer, call, result) -> torch.Tensor:
        return -layer.extra("key_norm")
