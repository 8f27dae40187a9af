"""`Fp8Store`: a dense store whose key and value buffers are float8 (the `fp8` cache policy, workbench.cache.fp8).

Encoding follows vLLM's fp8 KV cache (csrc/quantization/fp8 `scaled_convert`, docs features/quantization/
quantized_kvcache): a stored code is fp8(x / scale) saturated to the format's finite range, read back as
float(code) * scale in the model's dtype. Scales:
    "tensor"      one float32 k_scale and one v_scale per layer, fixed (vLLM's default: 1.0, or given ones)
    "token_head"  a dynamic float32 scale per token and KV head, amax over the head dimension / the format's max
                  (vLLM's per-token dynamic fp8 quantization of activations, applied here to the cache; the min
                  scale 1 / (max * 512) is vLLM's too). Not what vLLM's fp8 cache does by default.

Tokens are encoded as they are appended. The encoding of a token depends on that token alone (a fixed scale, or
its own scale), so appending is deterministic and order-independent: a token gets the same codes whether it came
in a prompt, a decode step or a verify pass, and `crop` (rollback) only drops slots, exactly as a dense store
does. Per-token scales live in the store's per-slot `extras` ("k_scale", "v_scale"), so keep, crop, growth and
transaction snapshots keep them aligned with their slots for free.
"""

from __future__ import annotations

import torch

from workbench.cache.quant_error import MeasuresQuantError, RunningError
from workbench.cache.storage import DenseStore
from workbench.errors import WorkbenchError

FORMATS = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
SCALINGS = ("tensor", "token_head")


def encode(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp8 codes of x / scale, saturated to the finite range (vLLM: __NV_SATFINITE); computed in float32."""
    top = torch.finfo(dtype).max
    return (x.float() / scale).clamp_(-top, top).to(dtype)


def decode(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale).to(dtype)


def token_scale(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 (kv_heads, n): a dynamic scale per token and head, amax / max, at least vLLM's 1 / (max * 512)."""
    top = torch.finfo(dtype).max
    return (x.abs().amax(-1).float() / top).clamp_min_(1.0 / (top * 512))


class Fp8Store(MeasuresQuantError, DenseStore):
    """Keys and values of one layer as float8 codes with their scales; `view()` decodes into the model's dtype."""

    def __init__(self, fp8: torch.dtype = torch.float8_e4m3fn, scaling: str = "tensor", k_scale: float = 1.0,
                 v_scale: float = 1.0):
        super().__init__()
        if scaling not in SCALINGS:
            raise WorkbenchError(f"fp8 scaling must be one of {', '.join(SCALINGS)}; got {scaling!r}")
        self.fp8, self.scaling = fp8, scaling
        self.scales = torch.tensor([k_scale, v_scale], dtype=torch.float32)  # per-tensor (unused for token_head)
        self.dtype: torch.dtype | None = None  # the model's dtype, from the first append
        self.errors = (RunningError(), RunningError())  # keys, values: while measuring (every token appended)

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if self.dtype is None:
            self.dtype, self.scales = keys.dtype, self.scales.to(keys.device)
        if self.scaling == "tensor":
            k_scale, v_scale = self.scales[0], self.scales[1]
        else:
            k_scale, v_scale = token_scale(keys, self.fp8)[..., None], token_scale(values, self.fp8)[..., None]
        codes = encode(keys, k_scale, self.fp8), encode(values, v_scale, self.fp8)
        if self.measure_error:
            for error, x, code, scale in zip(self.errors, (keys, values), codes, (k_scale, v_scale)):
                error.add(x, decode(code, scale, self.dtype))
        super().append(*codes, start)
        if self.scaling == "tensor":
            return
        # the new tokens are each head's last n slots (a dense store appends in lockstep)
        n, end = keys.shape[1], self.slots
        self.extra("k_scale", 1.0)[:, end - n:end] = k_scale[..., 0]
        self.extra("v_scale", 1.0)[:, end - n:end] = v_scale[..., 0]

    def meters(self) -> list[tuple[RunningError, RunningError]]:
        return [self.errors]

    def merge(self, *args) -> None:
        raise WorkbenchError("an fp8 store does not merge entries (its policy keeps every token)")

    def codes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The float8 codes (kv_heads, slots, head_dim) of keys and values, views into the buffers."""
        span = self.slots
        return self.keys[:, :span], self.values[:, :span]

    def token_scales(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """float32 (kv_heads, slots) per-token scales of keys and values; None under per-tensor scaling."""
        if self.scaling == "tensor":
            return None
        return self.extra("k_scale", 1.0), self.extra("v_scale", 1.0)

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, kv_heads, slots, head_dim) in the model's dtype, decoded (a fresh tensor)."""
        keys, values = self.codes()
        if self.scaling == "tensor":
            k_scale, v_scale = self.scales[0], self.scales[1]
        else:
            k_scale, v_scale = (s[..., None] for s in self.token_scales())
        return decode(keys, k_scale, self.dtype)[None], decode(values, v_scale, self.dtype)[None]

    def nbytes_by_component(self) -> dict[str, int]:
        """The float8 buffers and the scales (capacity included: what the memory really costs)."""
        if self.keys is None:
            return {"fp8": 0, "scales": 0}
        codes = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        if self.scaling == "tensor":
            scales = self.scales.numel() * self.scales.element_size()
        else:
            scales = sum(self.extras[name].numel() * self.extras[name].element_size() for name in ("k_scale", "v_scale"))
        return {"fp8": codes, "scales": scales}

    def nbytes(self) -> int:
        return sum(self.nbytes_by_component().values())
