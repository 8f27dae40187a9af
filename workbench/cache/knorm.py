"""`knorm`: keep the keys with the smallest L2 norm.

As in the paper's code, layers 0 and 1 are not compressed (their attention is not concentrated on low-norm keys),
no sinks or recent window are protected, and the prompt is compressed once (compress="prefill", as kvpress's
KnormPress too): evicting while decoding with no window would drop the newest token whenever its key is the
longest (on the embedded model, perplexity 498 at budget 64 against 23 for the full cache). Scores are per KV head,
so heads keep different tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import PHASES, EvictionPolicy
from workbench.registry import param


@dataclass
class KNorm(EvictionPolicy):
    name = "knorm"
    summary = "Keep the tokens whose keys have the lowest L2 norm (they tend to draw the most attention)."
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al., EMNLP 2024)"

    sinks: int = param(0, "first tokens always kept (KNorm keeps none)", min=0)
    window: int = param(0, "most recent tokens always kept (KNorm keeps none)", min=0)
    full_layers: str = param("0,1", "layers never compressed (KNorm leaves layers 0 and 1 whole)")
    compress: str = param("prefill", "when to evict (KNorm's code compresses the prompt once)", choices=PHASES)

    def score(self, layer, call, result) -> torch.Tensor:
        return -layer.held_keys().float().norm(dim=-1)  # computed when scoring: tokens of unobserved passes too
