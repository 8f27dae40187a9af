"""KVQuant's packed store (Hooper et al., NeurIPS 2024; reference code SqueezeAILab/KVQuant, quant/kvquant/
simquant_module_quantizer.py): one layer's keys and values, every token kept in order (slot i holds position i).

  keys    un-rotated to before RoPE (the cache receives post-RoPE keys; slot i was rotated for position i), then
          normalized per channel by offline-calibrated thresholds: zero = (upper + lower) / 2, range = (upper -
          lower) / 2, so the calibration's inner 99% of each channel maps into [-1, 1]. A key entry outside its
          channel's [lower, upper] is an outlier (the reference's static `get_outliers`).
  values  normalized per token, online: the top and bottom outliers / 2 of the token's entries (all KV heads
          together: one row of v_proj's output, as the reference) are outliers; with them replaced by the token's
          median, max and min give the token's zero and range (`quant_fn_nuq_recon`, dynamic).
  codes   each normalized entry rounded to the nearest of the layer's 2**bits levels (a codebook per layer and side,
          fitted by k-means on calibration data: workbench.cache.kvquant), packed `bits` bits per entry into uint8
          along the head dimension (3 bits: 8 codes in 3 bytes).
  sparse  outliers kept exactly, in the model's dtype (keys pre-RoPE), with an int32 index token * (H * D) + h * D
          + d each: a COO list sorted by token (the paper's CSR/CSC without the row pointers).
  sink    the first token (position 0) kept whole, in the model's dtype (attention-sink aware: --first_few_fp16 1).
Reading (`view`) dequantizes everything, rotates keys back to their positions and appends the residual: a fresh
tensor in the model's dtype every step, as workbench's other quantized stores (memory saved, not bandwidth).

Transactions (workbench.cache.kvcache): `append` puts tokens in a residual in the model's dtype; `settle()` (the
tokens are committed) quantizes all of them, so between passes the residual is empty and only a provisional
tail lives there. KVQuant quantizes on the fly, inside the pass; here a pass's own attention reads its own new
tokens unquantized (KIVI's and HF's order), later passes read them quantized. Every token is quantized on its own
(keys' thresholds are fixed, values' are per token), so settling at once equals settling one by one, and cropping
committed tokens is exact too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from workbench.cache.ordered_store import OrderedStore
from workbench.cache.quant_error import MeasuresQuantError, RunningError
from workbench.cache.rope import rotate
from workbench.cache.storage import slack
from workbench.errors import ParameterError, WorkbenchError

SCALE_DTYPE = torch.float16  # zeros, ranges and codebooks, as the reference's .half()
INDEX_DTYPE = torch.int32


@dataclass
class LayerCalibration:
    """What KVQuant fits offline for one layer: per-channel key thresholds (as zero and range, (kv_heads, D)) and a
    codebook of 2**bits normalized levels per side (ascending)."""

    key_zero: torch.Tensor
    key_range: torch.Tensor
    key_levels: torch.Tensor
    value_levels: torch.Tensor


# -- codes ------------------------------------------------------------------------------------------------------
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (..., D) in [0, 2**bits) -> uint8 (..., D * bits // 8): code c occupies bits c * bits .. c * bits +
    bits - 1 of the row (little-endian within bytes): every 8 codes make one word of `bits` bytes."""
    if codes.shape[-1] % 8:
        raise ParameterError(f"codes are packed 8 at a time: a head dimension of {codes.shape[-1]} is not a "
                             "multiple of 8")
    groups = codes.long().reshape(*codes.shape[:-1], -1, 8)
    word = (groups << (bits * torch.arange(8, device=codes.device))).sum(-1, keepdim=True)  # (..., D / 8, 1)
    packed = (word >> (8 * torch.arange(bits, device=codes.device))) & 255  # (..., D / 8, bits)
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], -1)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (..., B) -> long codes (..., B * 8 // bits), the inverse of `pack_codes`."""
    groups = packed.reshape(*packed.shape[:-1], -1, bits).int()
    word = (groups << (8 * torch.arange(bits, device=packed.device, dtype=torch.int32))).sum(-1, keepdim=True)
    codes = (word >> (bits * torch.arange(8, device=packed.device, dtype=torch.int32))) & (2 ** bits - 1)
    return codes.reshape(*packed.shape[:-1], -1).long()


def nearest_level(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Long codes: the index of the nearest of the ascending `levels` (a tie goes to the lower level)."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x, midpoints.to(x.dtype))


def _reserve(buffer: torch.Tensor | None, used: int, needed: int, make) -> torch.Tensor:
    """`buffer` with room for `needed` tokens (`make(size)` builds one; the first `used` copied): exactly sized the
    first time (a prompt), with slack when it grows. Tokens run along dim 1 of 3-D buffers, dim 0 of 1-D ones."""
    def along(t):
        return 1 if t.dim() == 3 else 0
    if buffer is not None and needed <= buffer.shape[along(buffer)]:
        return buffer
    fresh = make(needed if buffer is None else needed + slack(needed))
    if used:
        fresh.narrow(along(fresh), 0, used).copy_(buffer.narrow(along(buffer), 0, used))
    return fresh


def _size(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class KVQuantSide:
    """Keys (`per_channel`: static thresholds, un-rotated before RoPE when `inv_freq` is given) or values
    (`per_token`: online thresholds) of one layer: the sink, `quantized - 1` coded tokens with their sparse
    outliers, then `held` residual tokens."""

    def __init__(self, layout: str, bits: int, levels: torch.Tensor, outliers: float, first_token: bool = True,
                 zero: torch.Tensor | None = None, range_: torch.Tensor | None = None,
                 inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0):
        if layout not in ("per_channel", "per_token"):
            raise ParameterError(f"layout must be per_channel (keys) or per_token (values); got {layout!r}")
        if levels.numel() != 2 ** bits:
            raise ParameterError(f"a {bits}-bit codebook has {2 ** bits} levels; got {levels.numel()}")
        if layout == "per_channel" and (zero is None or range_ is None):
            raise ParameterError("per-channel (key) quantization needs the calibrated zero and range")
        self.layout, self.bits, self.outliers, self.first_token = layout, bits, outliers, first_token
        self.levels = levels.to(SCALE_DTYPE)
        self.zero = None if zero is None else zero.to(SCALE_DTYPE)  # keys: (kv_heads, D)
        self.range = None if range_ is None else range_.to(SCALE_DTYPE)
        self.inv_freq, self.rope_scaling = inv_freq, rope_scaling
        self.codes: torch.Tensor | None = None  # (kv_heads, capacity, D * bits // 8) uint8
        self.token_zero = self.token_range = None  # values: (capacity,) per token
        self.sparse_index: torch.Tensor | None = None  # (capacity,) int32, ascending
        self.sparse_value: torch.Tensor | None = None  # (capacity,) the model's dtype
        self.nnz = 0
        self.sink: torch.Tensor | None = None  # (kv_heads, 1, D): position 0, exact
        self.rows: torch.Tensor | None = None  # the residual (kv_heads, held, D), unsettled tokens only
        self.quantized = 0  # settled tokens (the sink included)
        self._byte_levels: torch.Tensor | None = None  # codes -> levels table per byte (3 bits: per 12 bits)
        self.shape: tuple[int, int, torch.dtype, torch.device] | None = None  # kv_heads, D, dtype, device
        self.error = RunningError()  # what quantizing costs, while measuring (KVCache.measure_quant_error)

    @property
    def held(self) -> int:
        return 0 if self.rows is None else self.rows.shape[1]

    @property
    def tokens(self) -> int:
        return self.quantized + self.held

    @property
    def device(self) -> torch.device | None:
        return None if self.shape is None else self.shape[3]

    @property
    def coded(self) -> int:
        """Tokens held as codes: the settled ones but the sink."""
        return max(0, self.quantized - (1 if self.sink is not None else 0))

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """New tokens x (kv_heads, n, D) after the others, into the residual."""
        if self.shape is None:
            self.shape = (x.shape[0], x.shape[2], x.dtype, x.device)
        self.rows = x.clone() if self.rows is None else torch.cat([self.rows, x], dim=1)

    def settle(self) -> None:
        """Every token held is committed: quantize the residual."""
        if not self.held:
            return
        x, start = self.rows, self.quantized
        self.rows = None
        if start == 0 and self.first_token:
            self.sink, x, start = x[:, :1].clone(), x[:, 1:], 1
        if not x.shape[1]:
            self.quantized = start
            return
        heads, dim, dtype, device = self.shape
        if self.layout == "per_channel":
            x = self._unrotate(x, start)
            codes, outlier = self._quantize_keys(x)
        else:
            codes, outlier = self._quantize_values(x)
        if self.error.measure:  # pre-RoPE keys: the rotation keeps each token's norm and error
            self.error.add(x, self._reconstructed(x, codes, outlier))
        n, coded = x.shape[1], self.coded
        self.codes = _reserve(self.codes, coded, coded + n, lambda size: torch.zeros(
            (heads, size, dim * self.bits // 8), dtype=torch.uint8, device=device))
        self.codes[:, coded:coded + n] = pack_codes(codes, self.bits)
        # sparse entries in token order: index token * (H * D) + h * D + d
        rows = outlier.transpose(0, 1)  # (n, kv_heads, D)
        where = rows.reshape(-1).nonzero().squeeze(1)
        index = (where + start * heads * dim).to(INDEX_DTYPE)
        if index.numel() and int(index[-1]) != (int(where[-1]) + start * heads * dim):
            raise WorkbenchError("KVQuant's int32 outlier indices overflowed: too many tokens for this store")
        count = index.numel()
        self.sparse_index = _reserve(self.sparse_index, self.nnz, self.nnz + count, lambda size: torch.zeros(
            size, dtype=INDEX_DTYPE, device=device))
        self.sparse_value = _reserve(self.sparse_value, self.nnz, self.nnz + count, lambda size: torch.zeros(
            size, dtype=dtype, device=device))
        self.sparse_index[self.nnz:self.nnz + count] = index
        self.sparse_value[self.nnz:self.nnz + count] = x.transpose(0, 1).reshape(-1)[where].to(dtype)
        self.nnz += count
        self.quantized = start + n

    def _quantize_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (kv_heads, n, D) pre-RoPE -> codes (kv_heads, n, D) and the outlier mask (outside [lower, upper])."""
        zero, span = self.zero.float()[:, None], self.range.float()[:, None]
        normalized = (x.float() - zero) / span
        outlier = (x.float() > zero + span) | (x.float() < zero - span)
        return nearest_level(torch.nan_to_num(normalized, 0.0, 0.0, 0.0), self.levels.float()), outlier

    def _quantize_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (kv_heads, n, D) -> codes and outlier mask; each token's zero and range are stored."""
        heads, n, dim = x.shape
        w = x.float().transpose(0, 1).reshape(n, heads * dim)  # a token's values across its KV heads
        outlier = outlier_mask(w, self.outliers)
        median = w.median(dim=1, keepdim=True).values
        inner = torch.where(outlier, median, w)
        high, low = inner.amax(1), inner.amin(1)
        zero, span = ((high + low) / 2).to(SCALE_DTYPE), ((high - low) / 2).to(SCALE_DTYPE)
        coded, device = self.coded, x.device
        self.token_zero = _reserve(self.token_zero, coded, coded + n, lambda s: torch.zeros(
            s, dtype=SCALE_DTYPE, device=device))
        self.token_range = _reserve(self.token_range, coded, coded + n, lambda s: torch.zeros(
            s, dtype=SCALE_DTYPE, device=device))
        self.token_zero[coded:coded + n], self.token_range[coded:coded + n] = zero, span
        normalized = torch.nan_to_num((w - zero.float()[:, None]) / span.float()[:, None], 0.0, 0.0, 0.0)
        codes = nearest_level(normalized, self.levels.float())
        back = lambda t: t.reshape(n, heads, dim).transpose(0, 1)  # noqa: E731
        return back(codes), back(outlier)

    def _reconstructed(self, x: torch.Tensor, codes: torch.Tensor, outlier: torch.Tensor) -> torch.Tensor:
        """What the tokens x (kv_heads, n, D) being settled will decode to (as `decoded`, before any rotation)."""
        levels = self.levels.float()[codes]
        if self.layout == "per_channel":
            x_hat = torch.addcmul(self.zero.float()[:, None], levels, self.range.float()[:, None])
        else:  # this settle's per-token zero and range were just stored at the coded tokens' end
            coded, n = self.coded, x.shape[1]
            zero, span = self.token_zero[coded:coded + n].float(), self.token_range[coded:coded + n].float()
            x_hat = torch.addcmul(zero[None, :, None], levels, span[None, :, None])
        return torch.where(outlier, x.to(self.shape[2]).float(), x_hat)

    def _unrotate(self, x: torch.Tensor, start: int) -> torch.Tensor:
        """Post-RoPE keys at positions start.. -> pre-RoPE (float32)."""
        if self.inv_freq is None:
            return x.float()
        positions = torch.arange(start, start + x.shape[1], device=x.device)
        return rotate(x.float(), -positions, self.inv_freq) / self.rope_scaling

    def crop(self, tokens: int) -> None:
        """Keep the first `tokens` tokens (exact: every token is quantized on its own)."""
        if tokens >= self.quantized:
            self.rows = self.rows[:, :tokens - self.quantized].clone() if self.rows is not None and \
                tokens - self.quantized else None
            return
        self.rows = None
        if tokens == 0:
            self.sink = None
        self.quantized = tokens
        heads, dim = self.shape[:2]
        if self.nnz:
            self.nnz = int(torch.searchsorted(self.sparse_index[:self.nnz],
                                              torch.tensor(tokens * heads * dim, dtype=INDEX_DTYPE,
                                                           device=self.sparse_index.device)))

    def keep_residual(self, index: torch.Tensor) -> None:
        """Keep the residual tokens at `index` (long, ascending offsets into the residual), in order."""
        if self.rows is not None:
            self.rows = self.rows.index_select(1, index) if index.numel() else None

    # -- reading ----------------------------------------------------------------------------------------------
    def normalized(self, coded: int) -> torch.Tensor:
        """The codebook levels of the first `coded` code rows, float32 (kv_heads, coded, D)."""
        packed = self.codes[:, :coded]
        if 8 % self.bits == 0:  # whole codes per byte: one gather through a byte -> levels table
            if self._byte_levels is None:
                byte = torch.arange(256, device=packed.device)[:, None]
                shifts = self.bits * torch.arange(8 // self.bits, device=packed.device)
                codes = (byte >> shifts) & (2 ** self.bits - 1)
                self._byte_levels = self.levels.float().to(packed.device)[codes]  # (256, 8 // bits)
            return self._byte_levels[packed.long()].reshape(packed.shape[0], coded, -1)
        if self.bits == 3:  # 8 codes in 3 bytes: two 12-bit halves of 4 codes, each through a 4096-entry table
            if self._byte_levels is None:
                half = torch.arange(4096, device=packed.device)[:, None]
                codes = (half >> (3 * torch.arange(4, device=packed.device))) & 7
                self._byte_levels = self.levels.float().to(packed.device)[codes]  # (4096, 4)
            words = packed.reshape(packed.shape[0], coded, -1, 3).int()
            low = words[..., 0] | ((words[..., 1] & 15) << 8)
            high = (words[..., 1] >> 4) | (words[..., 2] << 4)
            table = self._byte_levels
            return torch.stack([table[low.long()], table[high.long()]], dim=-2).reshape(packed.shape[0], coded, -1)
        return self.levels.float()[unpack_codes(packed, self.bits)]

    def decoded(self) -> torch.Tensor:
        """The coded tokens (kv_heads, coded, D), float32: levels scaled back, outliers exact, keys rotated back to
        their positions."""
        heads, dim, _, device = self.shape
        coded, start = self.coded, self.quantized - self.coded
        x = self.normalized(coded)
        if self.layout == "per_channel":
            x = torch.addcmul(self.zero.float()[:, None], x, self.range.float()[:, None])
        else:
            x = torch.addcmul(self.token_zero[:coded].float()[None, :, None], x,
                              self.token_range[:coded].float()[None, :, None])
        if self.nnz:  # outliers back, exactly: index token * (H * D) + h * D + d -> offset in (H, coded, D)
            index = self.sparse_index[:self.nnz].long() - start * heads * dim
            token, channel = index // (heads * dim), index % (heads * dim)
            where = (channel // dim) * coded * dim + token * dim + channel % dim
            x.view(-1)[where] = self.sparse_value[:self.nnz].float()
        if self.layout == "per_channel" and self.inv_freq is not None:
            x = rotate(x if self.rope_scaling == 1 else x * self.rope_scaling,
                       torch.arange(start, start + coded, device=device), self.inv_freq)
        return x

    def view(self) -> torch.Tensor:
        """Every token (kv_heads, tokens, D) in the model's dtype, a fresh tensor: the sink, the coded tokens
        dequantized, then the residual."""
        heads, dim, dtype, device = self.shape
        out = torch.empty((heads, self.tokens, dim), dtype=dtype, device=device)
        start = self.quantized - self.coded
        if start:
            out[:, :1] = self.sink
        if self.coded:
            out[:, start:self.quantized] = self.decoded()
        if self.held:
            out[:, self.quantized:] = self.rows
        return out

    def nbytes_by_component(self) -> dict[str, int]:
        """Bytes each part occupies (buffer capacity included)."""
        scales = _size(self.zero) + _size(self.range) + _size(self.token_zero) + _size(self.token_range)
        return {"codes": _size(self.codes), "scales": scales, "codebook": _size(self.levels),
                "outlier_values": _size(self.sparse_value), "outlier_indices": _size(self.sparse_index),
                "sink": _size(self.sink), "residual": _size(self.rows)}

    def used_bytes(self) -> int:
        """Bytes of what the settled tokens need (no capacity slack, no residual)."""
        heads, dim = self.shape[:2] if self.shape else (0, 0)
        coded = self.coded
        scales = _size(self.zero) + _size(self.range) + 2 * coded * SCALE_DTYPE.itemsize * (self.zero is None)
        value_size = self.sparse_value.element_size() if self.sparse_value is not None else 0
        return (heads * coded * dim * self.bits // 8 + scales + _size(self.levels) + _size(self.sink)
                + self.nnz * (value_size + INDEX_DTYPE.itemsize))


def outlier_mask(w: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bool, like w (rows, n): the ceil((n - 1) * fraction / 2) largest and as many smallest entries of each row
    (what the reference's torch.quantile thresholds at 1 - fraction / 2 and fraction / 2 select for distinct
    values)."""
    k = math.ceil((w.shape[-1] - 1) * fraction / 2 - 1e-9) if fraction > 0 else 0
    mask = torch.zeros_like(w, dtype=torch.bool)
    if k:
        mask.scatter_(-1, w.topk(k, dim=-1).indices, True)
        mask.scatter_(-1, w.topk(k, dim=-1, largest=False).indices, True)
    return mask


class KVQuantStore(MeasuresQuantError, OrderedStore):
    """A layer's keys and values, every token kept in order (slot i holds position i), as KVQuant quantizes them."""

    kind = "a KVQuant store"

    def __init__(self, calibration: LayerCalibration, bits: int = 3, outliers: float = 0.01,
                 first_token: bool = True, inv_freq: torch.Tensor | None = None, rope_scaling: float = 1.0):
        super().__init__(KVQuantSide("per_channel", bits, calibration.key_levels, outliers, first_token,
                                     calibration.key_zero, calibration.key_range, inv_freq, rope_scaling),
                         KVQuantSide("per_token", bits, calibration.value_levels, outliers, first_token))
        self.bits = bits

    def meters(self) -> list[tuple[RunningError, RunningError]]:
        return [(self.keys.error, self.values.error)]

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if keys.shape[0] != self.keys.zero.shape[0] or keys.shape[2] != self.keys.zero.shape[1]:
            raise WorkbenchError(f"keys of shape {tuple(keys.shape)} do not match the calibration's "
                                 f"{tuple(self.keys.zero.shape)} (kv_heads, head_dim)")
        super().append(keys, values, start)

    def bits_per_element(self) -> float:
        """Bits one settled key/value element costs, measured: codes, per-token scales, sparse outliers, the sink
        and the layer's thresholds and codebooks, over the settled elements (no capacity slack, no residual)."""
        elements = sum(side.quantized * side.shape[0] * side.shape[1] for side in self.sides if side.shape)
        return 8 * sum(side.used_bytes() for side in self.sides) / elements if elements else 0.0

    def bits_per_element_held(self) -> float:
        """Every byte the store occupies (residual and slack included) over the elements it holds."""
        elements = sum(side.tokens * side.shape[0] * side.shape[1] for side in self.sides if side.shape)
        return 8 * self.nbytes() / elements if elements else 0.0

    def outlier_fraction(self) -> float:
        """Settled entries kept as sparse outliers (the sink not counted)."""
        coded = sum(side.coded * side.shape[0] * side.shape[1] for side in self.sides if side.shape)
        return sum(side.nnz for side in self.sides) / coded if coded else 0.0
