"""Asymmetric min/max quantization of keys and values into the packed layout: the one quantizer of the workbench.

Written once here, beside the kernel that reads its output (kernels/packed_decode.py, whose `quantize_reference`
and `PackedKV.dequantize` call it), and used by the quantized stores (workbench.cache.quantized_store).

Per group of values (bits in {2, 4, 8}):
    scale = (max - min) / (2**bits - 1),  zero = min      (stored in float16 by default, then used as stored)
    code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)   (scale 0: code 0, so x_hat = zero)
    x_hat = code * scale + zero

Groupings of x (kv_heads, T, D):
    "per_channel"  KIVI's keys: each group of G consecutive tokens gets one scale/zero per channel;
                   scale, zero (kv_heads, T // G, D); T % G == 0.
    "per_token"    KIVI's values, and keys and values in HF's QuantizedCache / lmdeploy: each token gets one
                   scale/zero per group of G consecutive channels; scale, zero (kv_heads, T, D // G); D % G == 0.
Codes are packed along the head dimension into uint8, P = 8 // bits channels per byte: byte b of a token holds
channels b * P .. b * P + P - 1, channel c at bit offset (c % P) * bits, lowest bits first; codes
(kv_heads, T, D * bits // 8). This is the layout kernels/packed_decode.py (`PackedKV`) reads.
"""

from __future__ import annotations

import torch

from workbench.errors import ParameterError

BITS = (2, 4, 8)
LAYOUTS = ("per_channel", "per_token")


def check(bits: int, group: int, layout: str) -> None:
    if bits not in BITS:
        raise ParameterError(f"bits must be one of {', '.join(map(str, BITS))}; got {bits!r}")
    if layout not in LAYOUTS:
        raise ParameterError(f"layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if not isinstance(group, int) or group < 1:
        raise ParameterError(f"group must be a positive int; got {group!r}")


def pack(code: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (..., D) in [0, 2**bits) -> uint8 (..., D * bits // 8), lowest bits first."""
    per_byte = 8 // bits
    if code.shape[-1] % per_byte:
        raise ParameterError(f"the head dimension ({code.shape[-1]}) must be a multiple of {per_byte} to pack "
                         f"{bits}-bit codes into bytes")
    if per_byte == 1:
        return code.to(torch.uint8)
    grouped = code.to(torch.int32).view(*code.shape[:-1], code.shape[-1] // per_byte, per_byte)
    shifts = torch.arange(per_byte, device=code.device, dtype=torch.int32) * bits
    return (grouped << shifts).sum(-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., B) -> integer codes (..., B * 8 // bits) as uint8, the inverse of `pack`."""
    per_byte = 8 // bits
    if per_byte == 1:
        return packed
    shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
    codes = (packed[..., None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def _grouped(x: torch.Tensor, group: int, layout: str) -> torch.Tensor:
    """x (kv_heads, T, D) seen with its groups on axis 2 (per_channel: (h, T // G, G, D)) or the last axis
    (per_token: (h, T, D // G, G))."""
    heads, tokens, dim = x.shape
    if layout == "per_channel":
        if tokens % group:
            raise ParameterError(f"per_channel quantization needs a multiple of group ({group}) tokens; got {tokens}")
        return x.reshape(heads, tokens // group, group, dim)
    if dim % group:
        raise ParameterError(f"per_token group ({group}) must divide the head dimension ({dim})")
    return x.reshape(heads, tokens, dim // group, group)


def quantize(x: torch.Tensor, bits: int, group: int, layout: str,
             scale_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (kv_heads, T, D) -> (codes uint8 (kv_heads, T, D * bits // 8), scale, zero) in the layout's shapes."""
    check(bits, group, layout)
    grouped = _grouped(x.float(), group, layout)
    axis = 2 if layout == "per_channel" else 3
    low, high = grouped.amin(axis, keepdim=True), grouped.amax(axis, keepdim=True)
    levels = (1 << bits) - 1
    scale, zero = ((high - low) / levels).to(scale_dtype), low.to(scale_dtype)
    step, offset = scale.float(), zero.float()  # codes are computed against what is stored
    code = torch.where(step == 0, 0.0, (grouped - offset) / torch.where(step == 0, 1.0, step))
    code = code.round_().clamp_(0, levels).to(torch.uint8).reshape(x.shape)
    return pack(code, bits), scale.squeeze(axis), zero.squeeze(axis)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, layout: str,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x_hat (kv_heads, T, D) in `dtype` from what `quantize` returned."""
    code = _grouped(unpack(codes, bits).float(), group, layout)
    axis = 2 if layout == "per_channel" else 3
    x_hat = code * scale.float().unsqueeze(axis) + zero.float().unsqueeze(axis)
    return x_hat.reshape(codes.shape[0], codes.shape[1], codes.shape[2] * 8 // bits).to(dtype)


def bits_per_element(bits: int, group: int, scale_dtype: torch.dtype = torch.float16) -> float:
    """What one quantized element costs: its code plus its share of the group's scale and zero
    (KIVI-2, G = 32, float16 scale and zero: 2 + 2 * 16 / 32 = 3 bits)."""
    return bits + 2 * torch.finfo(scale_dtype).bits / group
