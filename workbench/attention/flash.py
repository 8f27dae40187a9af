"""`flash`: fused flash attention that reports its own statistics (entropy, key mass) from the same pass.

On a GPU the layer runs the Triton kernel of workbench.kernels.flash_attention: the output, each row's entropy
from the online softmax, and a second pass for the attention each key received, all without materializing the
attention matrix. On CPU the same function runs its torch reference (chunked, dense). Over a packed quantized cache
(kivi, int_per_token) decoding passes read the codes through kernels/packed_decode.py instead. Options the kernel lacks
(soft-capping, learned attention sinks `s_aux`) run the dense torch reference instead, which honours them, with a
one-time warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

from workbench.attention import reference
from workbench.attention.base import AttentionCall, AttentionResult, AttentionVariant
from workbench.kernels.flash_attention import check_head_dim, flash_attention
from workbench.kernels.packed_decode import packed_decode

_warned: set[str] = set()


@dataclass
class Flash(AttentionVariant):
    name = "flash"
    any_mask = True  # attends exactly where call.mask allows
    reads_packed = True  # over a kivi / int_per_token cache, decoding reads the packed codes (attend_packed)
    summary = ("Fused flash attention (Triton on GPU) that computes row entropy and per-key attention mass in the "
               "same kernel instead of recomputing dense weights.")
    paper = ("FlashAttention-2 (Dao, ICLR 2024) with online entropy and a key-mass pass; decoding split-K as in "
             "Flash-Decoding (Dao et al., 2023)")

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        check_head_dim(call.query.shape[-1])  # the same clear error on CPU as on the GPU
        unsupported = _unsupported(call.kwargs)
        if unsupported:  # never silently wrong: the dense reference honours every option
            if unsupported not in _warned:
                _warned.add(unsupported)
                warnings.warn(f"flash attention does not support {unsupported}: running dense reference "
                              "attention instead (slower)", RuntimeWarning, stacklevel=2)
            output, statistics = reference.dense_attention(call, want)
            if "probs" in want and call.probs_heads is not None:
                statistics["probs"] = statistics["probs"][:, list(call.probs_heads)]
            return AttentionResult(output, **statistics)
        # call.mask already holds causality (and any per-KV-head cache slots); None means plain causal.
        result = flash_attention(call.query, call.key, call.value, scaling=call.scaling,
                                 causal=call.mask is None, mask=call.mask,
                                 entropy="entropy" in want, key_mass="key_mass" in want)
        probs = None
        if "probs" in want:  # only the heads someone keeps, recomputed densely: memory stays linear elsewhere
            probs = reference.head_rows(call, call.probs_heads)
        return AttentionResult(result.output, entropy=result.entropy, probs=probs, key_mass=result.key_mass)

    def serves_packed(self, call: AttentionCall) -> bool:
        return _unsupported(call.kwargs) is None and call.kwargs.get("sliding_window") is None

    def attend_packed(self, call: AttentionCall, packed, want: frozenset[str]) -> AttentionResult:
        """A decoding pass over a packed quantized cache (kivi, int_per_token): the packed decode kernel reads the
        2/4/8-bit codes and the full-precision residual (Triton on a GPU; its torch reference, which dequantizes,
        on CPU). The same statistics as `attend`, from the same pass."""
        result = packed_decode(call.query[0], packed.keys, packed.values, packed.residual_keys,
                               packed.residual_values, scaling=call.scaling, entropy="entropy" in want,
                               key_mass="key_mass" in want)  # query (heads, q_len, D)
        entropy = None if result.entropy is None else result.entropy[None]
        key_mass = None if result.key_mass is None else result.key_mass[None]
        return AttentionResult(result.output.transpose(0, 1)[None], entropy=entropy, key_mass=key_mass)


def _unsupported(kwargs: dict) -> str | None:
    """The first option transformers passed that the kernel cannot honour, named for the warning."""
    if kwargs.get("softcap"):
        return "logit softcapping (softcap)"
    if (kwargs.get("dropout") or 0.0) > 0:
        return "attention dropout"
    if kwargs.get("s_aux") is not None:
        return "learned attention sinks (s_aux)"
    return None
