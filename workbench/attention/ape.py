"""`ape`: APE's attention for queries over contexts encoded in parallel (a temperature and a scaling of their block).

Yang, Chen and Chen, "APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding" (ICLR
2025; reference code Infini-AI-Lab/APE). The keys are [shared prefix, context_1 ... context_m, query so far]; the
contexts were encoded in parallel (each after the prefix, at the same positions:
workbench.run.parallel_encoding). With s the scaled scores q.k / sqrt(d), the context block C is attended with
temperature T and its share scaled by S through a log-sum-exp combination (the reference's formula):
    o_C = softmax(s_C / T) v_C,    lse_C = log sum exp(s_C / T)
    o_R = softmax(s_R) v_R,        lse_R = log sum exp(s_R)          (R: the prefix and the query, causal)
    out = w_C o_C + w_R o_R,       (w_C, w_R) = softmax(S * T * lse_C, lse_R)
so the context block's total weight is (sum exp(s_C / T))^(S T) against sum exp(s_R). T = S = 1 is exact attention
over the union. Defaults T = S = 0.9, the reference's ("preserving over 90% performance on few-shot tasks").

The context block is the slot range the pass names in `call.kwargs["ape_context"]` (start, end); a call without
one (any ordinary pass) is plain dense attention. Dense torch on every device (no fused kernel).

Departs from the reference: its code (ape_*.py, `*_attention_prefill_query`) applies T and S to the block it
builds from the prefix and query keys and attends the contexts causally (bottom-right aligned); this follows the
paper's description, T and S on the contexts, the contexts fully visible to every query and the prefix and query
causal. The two agree for T = S = 1 and for single-token decoding queries up to which block is scaled.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.errors import UnsupportedError
from workbench.registry import param

CONTEXT_KEYWORD = "ape_context"


@dataclass
class APE(AttentionVariant):
    name = "ape"
    summary = "APE: queries attend to parallel-encoded contexts with a temperature T and a scaling S of their block."
    paper = ("APE: Faster and Longer Context-Augmented Generation via Adaptive Parallel Encoding (Yang et al., "
             "ICLR 2025)")
    departs = ("T and S apply to the context block as the paper describes (the reference code scales the block "
               "it builds from the prefix and query keys); dense torch, no fused kernel")

    temperature: float = param(0.9, "attention temperature T of the context block (1: none)", min=0.05, max=10.0)
    scale: float = param(0.9, "scaling factor S of the context block's log-sum-exp (1: none)", min=0.05, max=10.0)

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        block = call.kwargs.get(CONTEXT_KEYWORD)
        if block is None:
            output, statistics = reference.dense_attention(call, want)
            return AttentionResult(output, **statistics)
        if reference.has_sinks(call):
            raise UnsupportedError("attention 'ape' does not combine learned attention sinks (s_aux)")
        start, end = block
        scores = reference.scores(call)  # float32 (batch, heads, q, keys), -inf where masked
        value = call.value.float()
        context = scores[..., start:end] / self.temperature
        rest = torch.cat([scores[..., :start], scores[..., end:]], dim=-1)
        rest_values = torch.cat([value[:, :, :start], value[:, :, end:]], dim=2)
        lse_context, lse_rest = context.logsumexp(-1), rest.logsumexp(-1)
        share = torch.stack([lse_context * self.scale * self.temperature, lse_rest], dim=-1).softmax(-1)
        probs_context = context.softmax(-1) * share[..., :1]
        probs_rest = rest.softmax(-1) * share[..., 1:]
        out = reference.by_group(probs_context, value[:, :, start:end]) + reference.by_group(probs_rest, rest_values)
        statistics = {}
        if want:
            probs = torch.cat([probs_rest[..., :start], probs_context, probs_rest[..., start:]], dim=-1)
            if "probs" in want:
                statistics["probs"] = probs
            if "entropy" in want:
                statistics["entropy"] = reference.row_entropy(probs)
            if "key_mass" in want:
                statistics["key_mass"] = reference.group_key_mass(probs, call.groups)
        return AttentionResult(out.transpose(1, 2).to(call.query.dtype), **statistics)
