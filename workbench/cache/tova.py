"""`tova`: evict the token the current query attends to least."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.eviction import EvictionPolicy
from workbench.cache.scoring import window_attention
from workbench.registry import param


@dataclass
class TOVA(EvictionPolicy):
    name = "tova"
    summary = "Token Omission Via Attention: keep the tokens the latest query attends to most (head-group mean)."
    paper = "Transformers are Multi-State RNNs (Oren et al., 2024)"

    sinks: int = param(0, "first tokens always kept", min=0)
    window: int = param(0, "most recent tokens always kept", min=0)

    def score(self, layer, call, result) -> torch.Tensor:
        return window_attention(call, last=1)
