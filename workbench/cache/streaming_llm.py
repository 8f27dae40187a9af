"""`streaming_llm`: attention sinks plus a recent window."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.storage import DenseStore
from workbench.registry import param


@dataclass
class StreamingLLM(EvictionPolicy):
    name = "streaming_llm"
    summary = "Keep the first few tokens (attention sinks) and the most recent ones; evict the middle."
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)"

    window: int = param(0, "most recent tokens always kept (the rest of the budget is recent anyway)", min=0)

    store = DenseStore  # every head keeps the same positions

    def score(self, layer, call, result) -> torch.Tensor:
        return layer.positions().float()  # newer is better
