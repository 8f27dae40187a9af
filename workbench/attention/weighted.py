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
    want = frozenset(want) & frozenset(STATISTICS)
    value = call.value.float().repeat_interleave(call.groups, dim=1)
    outputs, entropy, probs, key_mass = [], [], [], None
    for start in range(0, call.query.shape[2], reference.ROW_CHUNK):
        rows = slice(start, min(start + reference.ROW_CHUNK, call.query.shape[2]))
        weights, distribution = weigh(reference.scores(call, rows), rows)
        outputs.append(torch.matmul(weights, value))
        if "entropy" in want:
            entropy.append(reference.row_entropy(distribution))
        if "probs" in want:
            probs.append(distribution)
        if "key_mass" in want:
            mass = reference.group_key_mass(distribution, call.groups)
            key_mass = mass if key_mass is None else key_mass + mass
    output = torch.cat(outputs, dim=2).transpose(1, 2).to(call.query.dtype)
    return AttentionResult(output, entropy=torch.cat(entropy, dim=2) if entropy else None,
                           probs=torch.cat(probs, dim=2) if probs else None, key_mass=key_mass)
