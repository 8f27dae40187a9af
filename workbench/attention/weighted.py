"""The common loop of variants that change the attention function itself rather than the keys it sees
(softmax-free heads, temperature-scaled rows): scores in row chunks, the variant's weights, output and statistics.
Memory stays O(chunk x keys) as in the dense reference."""

from __future__ import annotations

from typing import Callable

import torch

from workbench.attention import reference
from workbench.attention.base import STATISTICS, AttentionCall, AttentionResult
from workbench.errors import UnsupportedError

# weigh(scores, rows) -> (weights, distribution): scores are float32 (batch, heads, rows, K), scaled, -inf where
# the query may not look; `weights` multiply the values; `distribution` (rows summing to 1) is what the
# statistics describe (the weights themselves when they are a softmax).
Weigh = Callable[[torch.Tensor, slice], "tuple[torch.Tensor, torch.Tensor]"]


def weighted_attention(call: AttentionCall, want: frozenset[str], weigh: Weigh, name: str) -> AttentionResult:
    """Attention with the variant's own weights; `name` (the variant's) is for the error below."""
    if reference.has_sinks(call):  # a learned sink is one more softmax column: a changed function has no such column
        raise UnsupportedError(f"attention '{name}' changes the attention function and cannot honour the learned "
                               "attention sinks (s_aux) this model passes; use a softmax variant (eager, flash or a "
                               "sparse one)")
    output, statistics = reference.dense_attention(call, frozenset(want) & frozenset(STATISTICS), weigh=weigh)
    return AttentionResult(output, **statistics)
