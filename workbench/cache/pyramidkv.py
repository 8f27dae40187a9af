"""`pyramidkv`: SnapKV's vote with budgets that shrink with depth (a pyramid)."""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.snapkv import SnapKV
from workbench.registry import param


@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = ("SnapKV scoring with per-layer budgets decreasing linearly with depth; the average over layers is "
               "the budget.")
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024)"

    beta: float = param(20.0, "pyramid steepness: the top layer keeps about (budget - window) / beta", min=1.0)

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int]:
        if prompt_length <= base or num_layers == 1:  # as in PyramidKV: a prompt within budget stays whole
            return [base] * num_layers
        spare = max(base - self.window, 0)
        low = spare / self.beta
        high = 2 * spare - low
        return [self.window + round(high - (high - low) * i / (num_layers - 1)) for i in range(num_layers)]
