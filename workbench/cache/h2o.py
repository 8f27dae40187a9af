"""`h2o`: heavy hitters (accumulated attention) plus recent tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.registry import param


@dataclass
class H2O(EvictionPolicy):
    name = "h2o"
    summary = "Keep the heavy hitters (most attention received, summed over all steps) and a recent window."
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023)"

    window: int = param(32, "most recent tokens always kept", min=0)
    needs: ClassVar[frozenset[str]] = frozenset({"key_mass"})

    def observe(self, state, call, result) -> None:
        mass = result.key_mass[0]  # (kv_heads, keys): this pass's attention per key, padded slots at the end
        held = state.layer.held()
        if state.head_scores is None:
            state.head_scores = [mass.new_zeros(0) for _ in held]
        for head, n in enumerate(held):
            previous = state.head_scores[head]
            grown = torch.cat([previous, previous.new_zeros(n - previous.shape[0])])
            state.head_scores[head] = grown + mass[head, :n]

    def score(self, state, head, call, result) -> torch.Tensor:
        return state.head_scores[head]
