"""`fp8`: keep every token, keys and values stored as float8 (e4m3 by default, e5m2 as an option).

vLLM's fp8 KV cache (`kv_cache_dtype="fp8"` / "fp8_e5m2"; docs: features/quantization/quantized_kvcache): a code
is fp8(x / scale) saturated to the format's finite range and read back as code * scale; by default one per-tensor
k_scale and v_scale per attention layer, both 1.0 when no calibrated scales are given. Attention reads the cache,
the pass's own new tokens included (vLLM V1's attention reads keys and values from the fp8 cache).
Storage: workbench.cache.fp8_store.Fp8Store (float8 buffers, float32 scales).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.fp8_store import FORMATS, SCALINGS, Fp8Store
from workbench.cache.base import CachePolicy
from workbench.cache.kvcache import KVCache
from workbench.errors import ParameterError
from workbench.registry import param


@dataclass
class Fp8(CachePolicy):
    name = "fp8"
    summary = ("Keep every token, keys and values stored as float8 (e4m3 or e5m2) with per-tensor scales "
               "(vLLM's fp8 KV cache; default scales 1.0) or dynamic per-token-per-head scales.")
    paper = "no paper: vLLM's fp8 KV cache (kv_cache_dtype='fp8' / 'fp8_e5m2', per-tensor k_scale / v_scale)"
    departs = ("the fp8 cache is decoded into the model's dtype every step and read by the ordinary attention "
               "(vLLM's kernels read the codes and apply the scales inside attention, and FlashAttention-3 also "
               "quantizes the queries): memory is saved between steps, not bandwidth; vLLM's on-the-fly scale "
               "calibration (calculate_kv_scales) and per-head calibrated scales are not offered: give k_scale / "
               "v_scale from a calibration instead; scaling='token_head' (a dynamic scale per token and KV head, "
               "amax / fp8 max, float32, like vLLM's per-token dynamic activation quantization) is not part of "
               "vLLM's fp8 cache and costs 8 bytes per token and head more")
    store = Fp8Store
    needs_bridge = False  # nothing to evict: works in any forward, with or without workbench's attention

    format: str = param("e4m3", "float8 format: e4m3 (torch.float8_e4m3fn, vLLM's 'fp8') or e5m2",
                        choices=tuple(FORMATS))
    scaling: str = param("tensor", "tensor: fixed per-layer k_scale / v_scale (vLLM); token_head: a dynamic "
                         "scale per token and KV head", choices=SCALINGS)
    k_scale: float = param(1.0, "per-tensor key scale (vLLM's default 1.0); scaling='tensor' only")
    v_scale: float = param(1.0, "per-tensor value scale (vLLM's default 1.0); scaling='tensor' only")

    def validate(self) -> None:
        for name in ("k_scale", "v_scale"):
            value = getattr(self, name)
            if not value > 0 or value == float("inf"):
                raise ParameterError(f"cache 'fp8' parameter '{name}' is {value!r}; it must be a positive finite "
                                     "number")
            if self.scaling != "tensor" and value != 1.0:
                raise ParameterError(f"cache 'fp8' parameter '{name}' applies to scaling='tensor' only; "
                                     f"scaling='{self.scaling}' computes its scales from each token")

    def build(self, model, forward=None) -> KVCache:
        device = model.device
        try:  # float8 support varies with the torch build and the device: check with a tiny cast there
            torch.ones(2, device=device).to(FORMATS[self.format]).float()
        except (RuntimeError, TypeError) as error:
            raise ParameterError(f"cache 'fp8': torch {torch.__version__} cannot store "
                                 f"{FORMATS[self.format]} on {device} ({error}); try format='e5m2' or another "
                                 "device") from None
        return KVCache(model.config, self, self.new_store)

    def new_store(self) -> Fp8Store:
        return Fp8Store(FORMATS[self.format], self.scaling, self.k_scale, self.v_scale)
