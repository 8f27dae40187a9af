"""`snapkv`: at the prefill, the prompt's last queries vote for the tokens to keep."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import PHASES, EvictionPolicy
from workbench.cache.scoring import pooled, window_attention
from workbench.registry import param


@dataclass
class SnapKV(EvictionPolicy):
    name = "snapkv"
    summary = ("Compress the prompt once: its last `window` queries vote (attention, max-pooled over neighbours) "
               "for the tokens to keep; the window itself is kept.")
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024)"

    sinks: int = param(0, "first tokens always kept", min=0)
    window: int = param(32, "observation window: the last prompt tokens, which vote and are kept", min=0)
    kernel: int = param(7, "pooling width over neighbouring tokens (odd; 1: off)", min=1)
    compress: str = param("prefill", "when to evict (SnapKV compresses the prompt only)", choices=PHASES)

    def score(self, layer, call, result) -> torch.Tensor:
        return pooled(window_attention(call, last=max(1, self.window)), self.kernel | 1)
