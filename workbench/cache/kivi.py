"""`kivi`: 2-bit (or 4-bit) keys per channel and values per token, the newest tokens in full precision.

KIVI (Liu et al., ICML 2024), following its code (jy-yuan/KIVI, models/llama_kivi.py):
  keys    quantized per channel over groups of G tokens. The residual of full-precision keys grows until it
          holds R tokens, then all R are quantized at once (R / G groups) and it starts empty again; a prompt of
          L tokens leaves L mod R keys in full precision.
  values  quantized per token over groups of G channels: the newest R stay in full precision (a FIFO: each new
          token pushes the oldest residual value into the quantized part); a prompt leaves min(L, R).
  Every pass's attention reads its own new tokens in full precision (the prompt's attention is full precision);
  they are quantized after it. With attention="flash", decoding passes read the packed codes through
  kernels/packed_decode.py (the bridge hands the variant `store.packed()`); otherwise a dequantized view. Asymmetric min/max quantization; paper defaults G = 32, R = 128 (R a multiple of
  G, as the code asserts), 2 bits (KIVI-2; 4 bits: KIVI-4).
Storage: workbench.cache.quantized_store.KiviStore (packed uint8 codes, float16 scales and zeros).
"""

from __future__ import annotations

from dataclasses import dataclass

from workbench.cache.quantized import QuantizedPolicy
from workbench.cache.quantized_store import KiviStore
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class KIVI(QuantizedPolicy):
    name = "kivi"
    summary = ("Keep every token, quantized: keys per channel over groups of G tokens, values per token over groups "
               "of G channels, the newest tokens in full precision (keys flushed R at a time, values a FIFO of R).")
    paper = "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache (Liu et al., ICML 2024)"
    departs = ("with attention='flash' decoding passes read the packed codes (kernels/packed_decode.py: Triton on a "
               "GPU, one fused split-K pass instead of KIVI's GEMV + softmax + GEMV; its torch reference, which "
               "dequantizes, on CPU); other attention variants, the prefill and append passes read a dequantized "
               "view of the whole cache (as HF QuantizedCache does): memory saved between steps, not bandwidth; "
               "codes are packed into uint8 along the head dimension on both sides "
               "(KIVI: int32 words, keys packed along tokens); scales and zeros are stored in float16 and codes are "
               "computed against the stored values; a constant group decodes to its minimum (KIVI divides by zero); "
               "8 bits are allowed as well (not in the paper); a verify/rollout tail is kept in full precision until "
               "commit, which then flushes as one-by-one decoding would have")
    store = KiviStore

    bits: int = param(2, "bits per code (the paper: 2 or 4; 8 is offered for checks)", choices=(2, 4, 8))
    group: int = param(32, "G: tokens per key group, channels per value group", min=1)
    residual: int = param(128, "R: newest tokens kept in full precision (a multiple of G)", min=1)

    def validate(self) -> None:
        if self.residual < self.group:
            raise ParameterError(f"cache 'kivi' residual R={self.residual} is smaller than the group G={self.group}: "
                                 f"R must be a multiple of G, at least {self.group}")
        if self.residual % self.group:
            below, above = self.residual // self.group * self.group, -(-self.residual // self.group) * self.group
            raise ParameterError(f"cache 'kivi' residual R={self.residual} is not a multiple of the group "
                                 f"G={self.group} (keys are flushed R at a time in groups of G); e.g. {below} or "
                                 f"{above}")

    def new_store(self) -> KiviStore:
        return KiviStore(self.bits, self.group, self.residual)
