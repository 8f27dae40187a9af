"""`capacity`: per-expert capacity with overflow dropping (GShard / Switch Transformer)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.registry import param
from workbench.routers.base import Router, RouterCall, Routing


@dataclass
class Capacity(Router):
    """Expert capacity: within one forward pass each expert takes at most
    C = ceil(capacity_factor * tokens * k / experts) token assignments; assignments beyond it are dropped (the
    token skips that expert, as in Switch Transformer, whose residual connection carries it on). Tokens claim
    capacity in order, their first-choice experts before their second (GShard's priority by rank). A decode pass
    has one token, so capacity only bites in the prefill and in multi-token passes."""

    name = "capacity"
    summary = "Cap the tokens each expert takes per pass; overflowing assignments are dropped."
    paper = ("GShard (Lepikhin et al., ICLR 2021); Switch Transformers (Fedus et al., JMLR 2022): expert capacity "
             "and token dropping")
    departs = "applied at inference to a model trained without it; capacity per forward pass"

    capacity_factor: float = param(1.0, "capacity as a multiple of an even share of the pass's assignments",
                                   min=0.0)

    def route(self, call: RouterCall) -> Routing:
        index = call.native.index.clone()
        tokens, k = index.shape
        capacity = math.ceil(self.capacity_factor * tokens * k / call.num_experts)
        used = torch.zeros(call.num_experts, dtype=torch.long)
        for rank in range(k):  # first choices claim capacity before second choices
            for token in range(tokens):
                expert = int(index[token, rank])
                if used[expert] < capacity:
                    used[expert] += 1
                else:
                    index[token, rank] = -1
        weights = call.native.weights.masked_fill(index < 0, 0)
        return Routing(call.native.logits, weights, index)
