"""`eager`: the model's own eager attention (materializes the weights), the exact HF eager computation."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant


@dataclass
class Eager(AttentionVariant):
    name = "eager"
    any_mask = True  # attends exactly where call.mask allows
    summary = "Dense attention that materializes the full weight matrix (the model's own eager code)."
    paper = "Attention Is All You Need (Vaswani et al., NeurIPS 2017) - dense reference"

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        eager = getattr(sys.modules.get(type(call.module).__module__), "eager_attention_forward", None)
        if eager is None:  # a model without a module-level eager function: same math in plain torch
            output, statistics = reference.dense_attention(call, want)
            return AttentionResult(output, **statistics)
        output, weights = eager(call.module, call.query, call.key, call.value, _additive(call),
                                scaling=call.scaling, **call.kwargs)
        weights = weights.float()
        entropy = None
        if "entropy" in want:
            entropy = reference.row_entropy(weights)
            if reference.has_sinks(call):  # the sink's share, 1 - what the keys got, is part of the distribution
                entropy = entropy + torch.special.entr((1 - weights.sum(-1)).clamp_min(0))
        return AttentionResult(output, entropy=entropy,
                               probs=weights if "probs" in want else None,
                               key_mass=reference.group_key_mass(weights, call.groups) if "key_mass" in want else None)


def _additive(call: AttentionCall) -> torch.Tensor:
    """HF eager code adds a float mask to the scores: 0 where allowed, the dtype's minimum elsewhere."""
    allowed = reference.allowed(call)
    blocked = torch.finfo(call.query.dtype).min
    return torch.zeros(allowed.shape, dtype=call.query.dtype, device=call.query.device).masked_fill(~allowed, blocked)
