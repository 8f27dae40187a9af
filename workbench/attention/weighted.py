"""The common loop of variants that change the attention function itself rather than the keys it sees
(softmax-free heads, temperature-scaled rows): scores in row chunks, the variant's weights, output and statistics.
Memory stays O(chunk x keys) as in the dense reference."""

from __future__ import annotations

from typing import Callable

import torch

from workbench.attention import reference
from workbench.attention.base import STATISTICS, AttentionCall, AttentionResult

# weigh(scores, rows) -> (weights, distribution): scores are float32 (batch, heads, rows, K), scaled, -inf where
# the query may not look; `weights` multiply the values; `distribution` (rows summing to 1) is what the
# statistics describe (the weights themselves when they are a softmax).
Weigh = Callable[[torch.Tensor, slice], "tuple[torch.Tensor, torch.Tensor]"]


def weighted_attention(call: AttentionCall, want: frozenset[str], weigh: Weigh) -> AttentionResult:
    output, statistics = reference.dense_attention(call, frozenset(want) & frozenset(STATISTICS), weigh=weigh)
    return AttentionResult(output, **statistics)
