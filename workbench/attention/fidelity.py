"""How far a variant's attention is from dense attention over the same keys, layer by layer.

    recall        share of the dense attention mass that falls on the keys the variant let each query see
                  (1.0: nothing that mattered was skipped). Defined for masking variants; NaN for variants that
                  change the attention function itself (softmax-free heads), which have no kept set.
    output_error  relative L2 error of the variant's attention output against the dense output, per head and
                  query: |o_variant - o_dense| / |o_dense|.

Dense here means softmax attention over everything the cache holds for the layer (under the cache's own slot
mask), so the metrics isolate what the attention variant changes. With learned attention sinks (`s_aux`) the
dense softmax has the sink column too, and the sink counts as kept (every variant that runs keeps it). Rows are
processed in chunks, so memory stays linear in the sequence length.
"""

from __future__ import annotations

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionCall


def attention_fidelity(call: AttentionCall, output: torch.Tensor, kept: torch.Tensor | None):
    """(recall, output_error), each float32 (batch, heads, q_len).

    output -- the variant's attention output (batch, q_len, heads, head_dim)
    kept   -- bool broadcastable to (batch, heads, q_len, k_len): the keys each query could see under the
              variant (None: the variant has no kept set, recall is NaN)"""
    value = call.value.float()
    output = output.float().transpose(1, 2)  # (batch, heads, q_len, head_dim)
    recalls, errors = [], []
    for rows in reference.row_chunks(call.query.shape[2]):
        scores, sink = reference.scores(call, rows), reference.sink_logits(call, rows)
        if sink is None:
            probs, sink_share = torch.softmax(scores, dim=-1), 0.0
        else:
            probs, distribution = reference.sink_softmax(scores, sink)
            sink_share = distribution[..., -1]
        dense = reference.by_group(probs, value)
        difference = (output[:, :, rows] - dense).norm(dim=-1)
        errors.append(difference / dense.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny))
        if kept is None:
            recalls.append(torch.full(probs.shape[:-1], float("nan"), device=probs.device))
        else:
            recalls.append((probs * kept[:, :, rows].to(probs.dtype)).sum(-1) + sink_share)
    return torch.cat(recalls, dim=2), torch.cat(errors, dim=2)


def kept_keys(variant, call: AttentionCall) -> torch.Tensor | None:
    """The variant's kept-key mask for this call: its `kept_mask(call)` when it has one; for dense variants
    (no such method) every key the cache lets the query see, i.e. recall 1 by definition."""
    kept_mask = getattr(variant, "kept_mask", None)
    if kept_mask is None:
        return reference.allowed(call)
    return kept_mask(call)
