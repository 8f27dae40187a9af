"""`knorm`: keep the keys with the smallest L2 norm."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy


@dataclass
class KNorm(EvictionPolicy):
    name = "knorm"
    summary = "Keep the tokens whose keys have the lowest L2 norm (they tend to draw the most attention)."
    paper = "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression (Devoto et al., EMNLP 2024)"

    def score(self, layer, call, result) -> torch.Tensor:
        return -layer.held_keys().float().norm(dim=-1)
