"""Attention-derived token scores shared by eviction policies, computed in torch from the layer's attention call
(the fused kernel will provide some of them directly). All are per KV head, GQA-aware: the query heads of a
group are summed, and RoPE is already in the cached keys and the queries."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from workbench.attention import reference


def window_rows(call, last: int) -> torch.Tensor:
    """(heads, rows, keys) float32: the softmax attention rows of the call's last `last` queries (fewer if the pass
    is shorter), per query head."""
    q_len = call.query.shape[2]
    return torch.softmax(reference.scores(call, slice(max(0, q_len - last), q_len)), dim=-1)[0]


def window_attention(call, last: int) -> torch.Tensor:
    """(kv_heads, keys): attention the last `last` queries paid to each key, summed over those queries and the
    group's query heads (SnapKV's observation-window vote; TOVA with last=1)."""
    return reference.group_key_mass(window_rows(call, last)[None], call.groups)[0]


def pooled(scores: torch.Tensor, kernel: int, kind: str = "max") -> torch.Tensor:
    """Max- or average-pool non-negative scores along keys (odd kernel, same length, zero padding), so the
    neighbours of important tokens are kept too."""
    if kernel <= 1:
        return scores
    pool = F.max_pool1d if kind == "max" else F.avg_pool1d
    return pool(scores[:, None, :], kernel_size=kernel, stride=1, padding=kernel // 2)[:, 0, :]
