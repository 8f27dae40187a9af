"""`streaming_llm`: attention sinks plus a recent window.

Positions, as in the paper: a cached key takes its position inside the cache, not in the text (`positions="cache"`,
the default). Keys are cached rotated for their original positions; before each attention the cache rotates them
by (place - position) - (the newest token's place - position), so query and keys are as far apart as they are in the
cache. Past the model's context length this keeps every distance within what it was trained on.
`positions="original"` keeps the text's positions (what most eviction policies do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.rope import inverse_frequencies, rotate
from workbench.cache.storage import DenseStore
from workbench.registry import param


@dataclass
class StreamingLLM(EvictionPolicy):
    name = "streaming_llm"
    summary = ("Keep the first few tokens (attention sinks) and the most recent ones; evict the middle; keys take "
               "their positions inside the cache.")
    paper = "Efficient Streaming Language Models with Attention Sinks (Xiao et al., ICLR 2024)"

    window: int = param(0, "most recent tokens always kept (the rest of the budget is recent anyway)", min=0)
    positions: str = param("cache", "RoPE positions of cached keys: inside the cache (the paper) or in the text",
                           choices=("cache", "original"))

    store = DenseStore  # every head keeps the same positions

    def build(self, model, forward=None):
        cache = super().build(model, forward)
        if self.positions == "cache":
            cache.state["inv_freq"] = inverse_frequencies(model.hf)
        return cache

    def score(self, layer, call, result) -> torch.Tensor:
        return layer.positions().float()  # newer is better

    def attended(self, layer, call):
        held = layer.store.slot_positions()  # None while slot i holds position i: nothing to move
        if self.positions == "original" or held is None:
            return call.key, call.value
        valid = layer.valid(call)  # what this call's queries see: no holes, hidden slots or later rows
        place = valid.long().cumsum(-1) - 1  # each slot's place in the cache
        newest = (valid.sum(-1, keepdim=True) - 1) - layer.newest(call)  # the newest token: place - position
        delta = torch.where(valid, place - held - newest, 0)  # < 0: evictions moved the key closer
        return rotate(call.key, delta[None], layer.cache.state["inv_freq"]), call.value
