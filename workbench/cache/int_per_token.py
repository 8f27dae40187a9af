"""`int_per_token`: keys and values quantized per token over groups of G channels, a full-precision residual.

The common baseline layout of HF transformers' QuantizedCache (quanto backend, axis 0: groups of `q_group_size`
consecutive channels of one token; defaults nbits=4, q_group_size=64, residual_length=128) and of lmdeploy's
int8/int4 KV cache (one scale/zero per token and head: G = head_dim). Asymmetric min/max quantization. The
residual of full-precision tokens grows until it holds R, then all of it is quantized (HF's rule), on both sides.
Storage: workbench.cache.quantized_store.PerTokenStore (packed uint8 codes, float16 scales and zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.quantized import QuantizedPolicy
from workbench.cache.quantized_store import PerTokenStore
from workbench.registry import param


@dataclass
class IntPerToken(QuantizedPolicy):
    name = "int_per_token"
    summary = ("Keep every token, quantized per token over groups of G channels (keys and values, as HF's "
               "QuantizedCache and lmdeploy), the newest tokens in full precision until R of them are flushed.")
    paper = "no paper: the layout of HF transformers' QuantizedCache (quanto backend) and lmdeploy's KV int8/int4"
    departs = ("HF quantizes the whole prompt at the prefill and, at every flush, re-quantizes the whole "
               "dequantized cache; here each token is quantized once, in flushes of R, and a prompt of L tokens "
               "leaves L mod R in the residual, so the state is the same whether tokens come in one pass or one at "
               "a time; min/max scales like quanto's MaxOptimizer, stored in float16; 8 bits allowed (quanto: 2 or "
               "4); the whole cache is dequantized every step for the ordinary attention (as HF does), except that with "
               "attention='flash' decoding passes read the packed codes (kernels/packed_decode.py); a "
               "verify/rollout tail stays in full precision until commit")
    store = PerTokenStore

    bits: int = param(4, "bits per code (HF's nbits)", choices=(2, 4, 8))
    group: int = param(64, "G: channels per group (HF's q_group_size; the head dimension: lmdeploy)", min=1)
    residual: int = param(128, "R: full-precision tokens held before a flush (HF's residual_length; 0: none)", min=0)

    def new_store(self) -> PerTokenStore:
        return PerTokenStore(self.bits, self.group, self.residual)
