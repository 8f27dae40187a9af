"""`sdpa`: torch scaled_dot_product_attention through transformers' own SDPA path (the HF default)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant


@dataclass
class SDPA(AttentionVariant):
    name = "sdpa"
    summary = "Dense attention with torch SDPA (fused, weights never materialized); the transformers default."
    paper = "FlashAttention (Dao et al., NeurIPS 2022) via torch.nn.functional.scaled_dot_product_attention"

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        output, _ = sdpa_attention_forward(call.module, call.query, call.key, call.value, call.mask,
                                           scaling=call.scaling, **call.kwargs)
        if not want:
            return AttentionResult(output)
        # SDPA does not expose its weights: the statistics come from a dense recomputation of the same
        # attention (same mask, same scaling), chunked over query rows so memory stays linear in length.
        _, statistics = reference.dense_attention(call, want, with_output=False)
        return AttentionResult(output, **statistics)
