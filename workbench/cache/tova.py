"""`tova`: evict the token the current query attends to least.

As in the paper: the latest query's attention, averaged over all query heads of the layer, ranks the tokens, and
the layer keeps one token set for all its heads; no sinks or window are protected. It compresses the prompt with
the prompt's last query and then evicts one token per decoding step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.scoring import window_attention
from workbench.cache.storage import DenseStore
from workbench.registry import param


@dataclass
class TOVA(EvictionPolicy):
    name = "tova"
    summary = ("Token Omission Via Attention: keep the tokens the latest query attends to most (mean over the "
               "layer's heads, one token set per layer).")
    paper = "Transformers are Multi-State RNNs (Oren et al., 2024)"

    sinks: int = param(0, "first tokens always kept", min=0)
    window: int = param(0, "most recent tokens always kept", min=0)

    store = DenseStore  # one token set per layer: every head keeps the same positions

    def score(self, layer, call, result) -> torch.Tensor:
        per_head = window_attention(call, last=1) / call.groups  # (kv_heads, keys): each group's mean
        return per_head.mean(0, keepdim=True).expand_as(per_head)
