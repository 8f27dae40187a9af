"""`h2o`: heavy hitters (accumulated attention) plus recent tokens.

As in the paper and its code, the budget is split equally: half the tokens are the most recent, half the heavy
hitters (the most attention received, summed over every query so far), and no sinks are kept. `window` fixes the
recent share instead. With GQA the attention a token receives is summed over the query heads of its KV group
(the paper's models have one KV head per query head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.registry import param


@dataclass
class H2O(EvictionPolicy):
    name = "h2o"
    summary = ("Keep the heavy hitters (most attention received, summed over all steps) and the recent tokens, "
               "half of the budget each.")
    paper = "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs (Zhang et al., NeurIPS 2023)"
    departs = "with GQA the attention a token receives is summed over its KV group's query heads"

    sinks: int = param(0, "first tokens always kept (H2O keeps none)", min=0)
    window: int | None = param(None, "most recent tokens always kept; None: half the budget (as H2O)", min=0)
    needs: ClassVar[frozenset[str]] = frozenset({"key_mass"})

    def recent(self, budget: int) -> int:
        return budget // 2 if self.window is None else self.window

    def observe(self, layer, call, result) -> None:
        received = layer.extra("attention")  # per slot: attention received so far, summed over query heads
        received += result.key_mass[0].float()

    def score(self, layer, call, result) -> torch.Tensor:
        return layer.extra("attention")
