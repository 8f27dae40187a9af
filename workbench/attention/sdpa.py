"""`sdpa`: torch scaled_dot_product_attention through transformers' own SDPA path (the HF default).

transformers' SDPA path drops learned attention sinks (`s_aux`, GPT-OSS, whose config declares no SDPA support),
so a call that carries them is refused with an error naming the variants that honour them. Logit softcapping
(Gemma 2), which torch SDPA lacks, runs through the dense torch reference instead (exact, not fused)."""

from __future__ import annotations

from dataclasses import dataclass

from transformers.integrations.sdpa_attention import sdpa_attention_forward

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.errors import UnsupportedError


@dataclass
class SDPA(AttentionVariant):
    name = "sdpa"
    any_mask = True  # attends exactly where call.mask allows
    summary = "Dense attention with torch SDPA (fused, weights never materialized); the transformers default."
    paper = "FlashAttention (Dao et al., NeurIPS 2022) via torch.nn.functional.scaled_dot_product_attention"

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        if reference.has_sinks(call):
            raise UnsupportedError(f"attention 'sdpa' cannot honour the learned attention sinks (s_aux) this model "
                                   f"({type(call.module).__name__}) passes: transformers' SDPA path drops them. "
                                   "Use attention='eager' or 'flash' (dense reference with sinks where the kernel "
                                   "has none)")
        if call.kwargs.get("softcap"):  # torch SDPA has no logit softcapping (Gemma 2): the dense reference has
            output, statistics = reference.dense_attention(call, want)
            return AttentionResult(output, **statistics)
        output, _ = sdpa_attention_forward(call.module, call.query, call.key, call.value, call.mask,
                                           scaling=call.scaling, **call.kwargs)
        if not want:
            return AttentionResult(output)
        # SDPA does not expose its weights: the statistics come from a dense recomputation of the same
        # attention (same mask, same scaling), chunked over query rows so memory stays linear in length.
        _, statistics = reference.dense_attention(call, want, with_output=False)
        return AttentionResult(output, **statistics)
