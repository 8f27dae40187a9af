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

    def observe(self, layer, call, result) -> None:
        received = layer.extra("attention")  # per slot: attention received so far, summed over query heads
        received += result.key_mass[0].float()

    def score(self, layer, call, result) -> torch.Tensor:
        return layer.extra("attention")
