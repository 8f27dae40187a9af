"""Packed quantized stores: a layer's keys and values quantized (workbench.kernels.quantization), the newest tokens
kept in full precision as a residual. A store for policies that keep every token (`kivi`, `int_per_token`).

Each side (keys, values) is a `QuantizedSide`: the first `quantized` tokens as packed codes with their scales and
zeros, then `held` residual tokens in the model's dtype, all in preallocated buffers that grow with some slack
(workbench.cache.storage.slack) and give memory back when a flush or a crop frees much of the residual. Its flush
rule says when residual tokens are quantized:
    "chunk"  when the residual reaches R tokens, all R are quantized (KIVI's keys, in groups of G tokens; HF's
             QuantizedCache and lmdeploy for both sides)
    "fifo"   the residual keeps the newest R; older ones are quantized (KIVI's values)

Transactions. Only committed tokens are ever quantized: `append` puts new tokens in the residual, and `settle()`
(the cache layer calls it once the tokens it holds are final: right after a non-provisional pass's update, whose
attention therefore reads its own tokens in full precision, as in KIVI's and HF's code, and at commit) applies
the flush rule as if the tokens had come one at a time. A provisional tail lives in the residual, so `crop`
(rollback) only shortens the residual and restores the store exactly. Cropping committed, quantized tokens
(transformers' crop of a cache whose policy never acts on attention, e.g. assisted generation under
model.generate) is lossy: the kept tokens of a cut key group return to the residual dequantized.

Reading. `view()` dequantizes the quantized part and appends the residual (a fresh tensor in the model's dtype,
as HF's QuantizedCache hands attention every step); `packed()` gives the codes, scales, zeros and residual in
the layout kernels/packed_decode.py reads, for a kernel that attends over the codes directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.kernels.quantization import bits_per_element, check, dequantize, quantize
from workbench.cache.ordered_store import OrderedStore
from workbench.cache.quant_error import MeasuresQuantError, RunningError
from workbench.cache.storage import slack
from workbench.errors import ParameterError

FLUSHES = ("chunk", "fifo")


class QuantizedSide:
    """Keys or values of one layer: `quantized` packed tokens followed by `held` full-precision residual tokens."""

    def __init__(self, layout: str, bits: int, group: int, residual: int, flush: str,
                 scale_dtype: torch.dtype = torch.float16):
        check(bits, group, layout)
        if flush not in FLUSHES:
            raise ParameterError(f"flush must be one of {', '.join(FLUSHES)}; got {flush!r}")
        if layout == "per_channel" and (flush != "chunk" or residual < group or residual % group):
            raise ParameterError(f"per_channel quantization flushes whole groups: it needs the chunk rule and a "
                                 f"residual that is a positive multiple of the group ({group}); got {flush}, "
                                 f"{residual}")
        self.layout, self.bits, self.group, self.residual, self.flush = layout, bits, group, residual, flush
        self.scale_dtype = scale_dtype
        self.codes = self.scale = self.zero = None  # (kv_heads, capacity, D * bits // 8) uint8; scale/zero per layout
        self.rows: torch.Tensor | None = None  # the residual buffer (kv_heads, capacity, D), the model's dtype
        self.quantized = 0  # tokens held as codes (the oldest)
        self.first, self.held = 0, 0  # the residual is rows[:, first:first + held]
        self.error = RunningError()  # what quantizing costs, while measuring (QuantizedStore.measure_error)

    @property
    def tokens(self) -> int:
        return self.quantized + self.held

    @property
    def device(self) -> torch.device | None:
        return None if self.rows is None else self.rows.device

    def _groups(self, tokens: int) -> int:
        """Scale/zero rows covering `tokens` quantized tokens."""
        return tokens // self.group if self.layout == "per_channel" else tokens

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        """New tokens x (kv_heads, n, D) after the others, into the residual."""
        n = x.shape[1]
        if self.rows is None:
            self.rows = x.new_empty((x.shape[0], n, x.shape[2]))  # the first pass (a prompt) gets exactly its size
        elif self.first + self.held + n > self.rows.shape[1]:
            needed = self.held + n
            self._move_residual(needed if needed <= self.rows.shape[1] else needed + slack(needed))
        self.rows[:, self.first + self.held:self.first + self.held + n] = x
        self.held += n

    def flushable(self) -> int:
        """Residual tokens the flush rule quantizes now, as if the tokens had come one at a time."""
        if self.flush == "fifo":
            return max(0, self.held - self.residual)
        if self.residual == 0:
            return self.held
        return self.held // self.residual * self.residual

    def settle(self) -> None:
        """Every token held is final: quantize what the flush rule says, and give back spare residual memory
        (and, when measuring, add what quantizing cost to the running error)."""
        count = self.flushable()
        if count:
            x = self.rows[:, self.first:self.first + count]
            codes, scale, zero = quantize(x, self.bits, self.group, self.layout, self.scale_dtype)
            self._reserve(self.quantized + count, x)
            q, g = self.quantized, self._groups(self.quantized)
            self.codes[:, q:q + count] = codes
            self.scale[:, g:g + scale.shape[1]] = scale
            self.zero[:, g:g + zero.shape[1]] = zero
            if self.error.measure:
                self.error.add(x, dequantize(codes, scale, zero, self.bits, self.group, self.layout))
            self.quantized += count
            self.first, self.held = (self.first + count, self.held - count) if self.held > count else (0, 0)
        self._fit_residual()

    def crop(self, tokens: int) -> None:
        """Keep the first `tokens` tokens. Exact while they are all quantized ones plus part of the residual;
        below the quantized count (committed tokens only) the kept tokens of a cut group return to the residual
        dequantized."""
        if tokens >= self.quantized:
            self.held = tokens - self.quantized
        else:
            keep = tokens if self.layout == "per_token" else tokens // self.group * self.group
            restored = self.dequantized(keep, keep + self.group)[:, :tokens - keep] if tokens > keep else None
            self.quantized, self.first, self.held = keep, 0, tokens - keep
            if restored is not None:
                self.rows[:, :restored.shape[1]] = restored
        self._fit_residual()

    def keep_residual(self, index: torch.Tensor) -> None:
        """Keep the residual tokens at `index` (long, ascending offsets into the residual), in order."""
        kept = self.rows[:, self.first:self.first + self.held].index_select(1, index)
        self.first, self.held = 0, kept.shape[1]
        self.rows[:, :self.held] = kept

    def _reserve(self, tokens: int, like: torch.Tensor) -> None:
        """Code/scale buffers for at least `tokens` quantized tokens (the held ones copied over)."""
        capacity = 0 if self.codes is None else self.codes.shape[1]
        if tokens <= capacity:
            return
        size = tokens if self.codes is None else tokens + slack(tokens)
        if self.layout == "per_channel":
            size = -(-size // self.group) * self.group
        heads, dim = like.shape[0], like.shape[2]
        per_group = dim if self.layout == "per_channel" else dim // self.group
        codes = torch.zeros((heads, size, dim * self.bits // 8), dtype=torch.uint8, device=like.device)
        scale = torch.zeros((heads, self._groups(size), per_group), dtype=self.scale_dtype, device=like.device)
        zero = torch.zeros_like(scale)
        if self.codes is not None:
            q, g = self.quantized, self._groups(self.quantized)
            codes[:, :q], scale[:, :g], zero[:, :g] = self.codes[:, :q], self.scale[:, :g], self.zero[:, :g]
        self.codes, self.scale, self.zero = codes, scale, zero

    def _move_residual(self, capacity: int) -> None:
        """The residual at the start of a buffer of `capacity` tokens (a new one when the size changes)."""
        held = self.rows[:, self.first:self.first + self.held]
        if capacity != self.rows.shape[1]:
            rows = self.rows.new_empty((self.rows.shape[0], capacity, self.rows.shape[2]))
            rows[:, :self.held] = held
            self.rows = rows
        elif self.first:
            self.rows[:, :self.held] = held.clone()
        self.first = 0

    def _fit_residual(self) -> None:
        """After a flush or a crop: a residual buffer much larger than what it holds and the residual R needs
        (a prompt, a long provisional tail) gives the memory back."""
        if self.rows is None:
            return
        want = max(self.held, self.residual)
        if self.rows.shape[1] > want + 2 * slack(want):
            self._move_residual(want + slack(want))
        elif self.held == 0:
            self.first = 0

    # -- reading ----------------------------------------------------------------------------------------------
    def quantized_part(self, tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scale, zero) of the first `tokens` quantized tokens (default: all), views into the buffers."""
        tokens = self.quantized if tokens is None else tokens
        if self.codes is None:  # nothing quantized yet: empty tensors of the layout's shapes
            heads, _, dim = self.rows.shape
            per_group = dim if self.layout == "per_channel" else dim // self.group
            codes = torch.empty((heads, 0, dim * self.bits // 8), dtype=torch.uint8, device=self.rows.device)
            scale = torch.empty((heads, 0, per_group), dtype=self.scale_dtype, device=self.rows.device)
            return codes, scale, scale.clone()
        g = self._groups(tokens)
        return self.codes[:, :tokens], self.scale[:, :g], self.zero[:, :g]

    def dequantized(self, start: int, end: int) -> torch.Tensor:
        """x_hat of quantized tokens [start, end) (start a multiple of the group for per_channel), model dtype."""
        end = min(end, self.quantized)
        if end <= start:
            return self.rows[:, :0]
        if self.layout == "per_channel":
            codes = self.codes[:, start:-(-end // self.group) * self.group]
            groups = slice(start // self.group, -(-end // self.group))
        else:
            codes, groups = self.codes[:, start:end], slice(start, end)
        x_hat = dequantize(codes, self.scale[:, groups], self.zero[:, groups], self.bits, self.group, self.layout,
                           self.rows.dtype)
        return x_hat[:, :end - start]

    def residual_part(self) -> torch.Tensor:
        return self.rows[:, self.first:self.first + self.held]

    def view(self) -> torch.Tensor:
        """Every token (kv_heads, tokens, D) in the model's dtype: dequantized, then the residual (a fresh tensor)."""
        return torch.cat([self.dequantized(0, self.quantized), self.residual_part()], dim=1)

    def nbytes_by_component(self) -> dict[str, int]:
        def size(t):
            return 0 if t is None else t.numel() * t.element_size()
        return {"codes": size(self.codes), "scales": size(self.scale), "zeros": size(self.zero),
                "residual": size(self.rows)}

    def bits_per_element(self) -> float:
        return bits_per_element(self.bits, self.group, self.scale_dtype)


@dataclass
class PackedLayer:
    """One layer in the packed decode kernel's input layout (kernels/packed_decode.py): both sides quantized over
    the same first T tokens, then residual_keys / residual_values (kv_heads, R, D) in the model's dtype."""

    keys: object  # workbench.kernels.packed_decode.PackedKV
    values: object
    residual_keys: torch.Tensor
    residual_values: torch.Tensor

    def dense(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, kv_heads, T + R, D) in the residual's dtype: what `QuantizedStore.view()` gives."""
        dtype = self.residual_keys.dtype
        return (torch.cat([self.keys.dequantize().to(dtype), self.residual_keys], 1)[None],
                torch.cat([self.values.dequantize().to(dtype), self.residual_values], 1)[None])


class QuantizedStore(MeasuresQuantError, OrderedStore):
    """A layer's keys and values, every token kept in order (slot i holds position i), quantized per side."""

    kind = "a quantized store"

    def meters(self) -> list[tuple[RunningError, RunningError]]:
        return [(self.keys.error, self.values.error)]

    def packed(self) -> PackedLayer:
        """The layer as the packed decode kernel reads it: both sides quantized over the same first T tokens
        (the most both hold, whole key groups); what one side quantized beyond T is handed over dequantized at
        the head of its residual, so attention over this equals attention over `view()`."""
        from workbench.kernels.packed_decode import PackedKV

        tokens = min(side.quantized for side in self.sides)
        for side in self.sides:
            if side.layout == "per_channel":
                tokens = tokens // side.group * side.group
        out = []
        for side in self.sides:
            codes, scale, zero = side.quantized_part(tokens)
            residual = torch.cat([side.dequantized(tokens, side.quantized), side.residual_part()], dim=1)
            out.append((PackedKV(codes, scale, zero, side.layout, side.bits, side.group), residual))
        return PackedLayer(out[0][0], out[1][0], out[0][1], out[1][1])

    def bits_per_element(self) -> float:
        """Bits one quantized key or value element costs (its code and its share of scale and zero), from the
        arithmetic; the residual is extra (see `bits_per_element_held`)."""
        return sum(side.bits_per_element() for side in self.sides) / 2

    def bits_per_element_held(self) -> float:
        """Bits per key/value element held, measured: every byte the store occupies (residual and capacity slack
        included) over the elements of the tokens it holds."""
        elements = sum(side.tokens * side.rows.shape[0] * side.rows.shape[2] for side in self.sides
                       if side.rows is not None)
        return 8 * self.nbytes() / elements if elements else 0.0


class KiviStore(QuantizedStore):
    """KIVI (Liu et al., ICML 2024): keys per channel over groups of G tokens, flushed R at a time when their
    residual reaches R; values per token over groups of G channels, the newest R kept in full precision."""

    def __init__(self, bits: int = 2, group: int = 32, residual: int = 128, scale_dtype=torch.float16):
        super().__init__(QuantizedSide("per_channel", bits, group, residual, "chunk", scale_dtype),
                         QuantizedSide("per_token", bits, group, residual, "fifo", scale_dtype))


class PerTokenStore(QuantizedStore):
    """HF QuantizedCache / lmdeploy: keys and values per token over groups of G channels, both flushed R at a
    time when the residual reaches R."""

    def __init__(self, bits: int = 4, group: int = 64, residual: int = 128, scale_dtype=torch.float16):
        super().__init__(QuantizedSide("per_token", bits, group, residual, "chunk", scale_dtype),
                         QuantizedSide("per_token", bits, group, residual, "chunk", scale_dtype))
