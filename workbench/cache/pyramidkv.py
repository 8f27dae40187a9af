"""`pyramidkv`: SnapKV's vote with budgets that shrink with depth (a pyramid).

Budgets as in PyramidKV's code, from the pool P = budget - window of prompt tokens a layer keeps besides its window:
the bottom layer keeps about 2P - P / beta, the top P / beta (integer steps between), so the layers average about
the budget; the bottom is capped at the prompt (the top then gets what the cap frees). A prompt shorter than
the budget stays whole, and one shorter than 2P gets the uniform SnapKV budget (the code's middle case).
Scoring and pooling are SnapKV's (see workbench.cache.snapkv; PyramidKV's code defaults to average pooling of
width 5 too).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.snapkv import SnapKV
from workbench.registry import param


@dataclass
class PyramidKV(SnapKV):
    name = "pyramidkv"
    summary = ("SnapKV scoring with per-layer budgets decreasing linearly with depth; the average over layers is "
               "about the budget.")
    paper = "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling (Cai et al., 2024)"
    departs = ("SnapKV's scoring with GQA votes summed per KV group and max pooling of width 7 (PyramidKV's code: "
               "repeated KV heads, avg pooling of width 5)")

    beta: float = param(20.0, "pyramid steepness: the top layer keeps about (budget - window) / beta", min=1.0)

    def layer_budgets(self, base: int, num_layers: int, prompt_length: int) -> list[int]:
        pool = base - self.window
        if prompt_length < 2 * pool or num_layers == 1 or pool <= 0:  # short prompts: SnapKV's uniform budget
            return [base] * num_layers
        low = int(pool // self.beta)
        high = 2 * pool - low
        if high >= prompt_length - self.window:  # the bottom layer cannot keep more than the prompt
            high = prompt_length - self.window
            low = 2 * pool - high
        step = (high - low) // (num_layers - 1)
        return [self.window + high - layer * step for layer in range(num_layers)]
