"""`snapkv`: at the prefill, the prompt's last queries vote for the tokens to keep.

As in SnapKV's code: the last `window` queries' attention (softmax over all keys) is summed over those queries,
the window's own columns are removed, the votes over the prefix are pooled so that the neighbours of an
important token are kept with it, and the best prefix tokens plus the window are kept.

Pooling: the default is max pooling of width 7, the setting of the paper's LongBench experiments; SnapKV's code
defaults to average pooling of width 5 (`pooling="avg", kernel=5`). With GQA the votes of a KV group's query
heads are summed (one token set per KV head, as kvpress does); SnapKV's code repeats the KV heads instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import PHASES, EvictionPolicy
from workbench.cache.scoring import pooled, window_attention
from workbench.registry import param


@dataclass
class SnapKV(EvictionPolicy):
    name = "snapkv"
    summary = ("Compress the prompt once: its last `window` queries vote (attention, pooled over neighbours, "
               "over the prefix) for the tokens to keep; the window itself is kept.")
    paper = "SnapKV: LLM Knows What You are Looking for Before Generation (Li et al., NeurIPS 2024)"
    departs = ("with GQA the votes of a KV group's query heads are summed (SnapKV's code repeats the KV heads); "
               "max pooling of width 7 (the paper's LongBench setting) where the code's class defaults to avg, 5")

    sinks: int = param(0, "first tokens always kept", min=0)
    window: int = param(32, "observation window: the last prompt tokens, which vote and are kept", min=0)
    kernel: int = param(7, "pooling width over neighbouring tokens (odd; 1: off)", min=1)
    pooling: str = param("max", "how votes are pooled over neighbours (SnapKV's code: avg)", choices=("max", "avg"))
    compress: str = param("prefill", "when to evict (SnapKV compresses the prompt only)", choices=PHASES)

    def score(self, layer, call, result) -> torch.Tensor:
        votes = window_attention(call, last=max(1, self.window))
        in_window = layer.positions() > layer.newest(call) - self.window
        return pooled(votes.masked_fill(in_window, 0.0), self.kernel | 1, self.pooling)  # prefix columns only
