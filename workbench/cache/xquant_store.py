"""XQuant's store (Tomar et al., 2025): one layer's quantized layer input X (or a latent of it), from which keys and
values are rematerialized with the layer's own projections every time attention reads the cache.

What a layer holds, every token in order (slot i holds position i):
  "x"    form (MHA: X is no wider than K plus V): one stream, the post-norm layer input X (tokens, hidden);
         K = RoPE(k_norm(X W_k^T + b_k)), V = X W_v^T + b_v.
  "svd"  form (GQA: X is wider than K plus V): two latent streams X U_k and X U_v (tokens, r each, r = kv_heads *
         head_dim), U from the offline SVD W_k^T = U_k S_k B_k^T (and W_v^T likewise);
         K = RoPE(k_norm((X U_k)(S_k B_k^T) + b_k)), V = (X U_v)(S_v B_v^T) + b_v.
Each stream is a `QuantizedSide` (workbench.cache.quantized_store: packed codes, float16 scales and zeros, the one
quantizer kernels/quantization.py) of one pseudo-head (1, tokens, width): the key-like stream (X, X U_k) per
channel over groups of G tokens, the value-like one (X U_v) per token over groups of G channels; both keep their
newest tokens (fewer than R, flushed R at a time) in full precision, in the model's dtype. Nothing else is held:
no key or value buffer. `nbytes` is the bytes of those codes, scales, zeros and residual rows.

Where X comes from: workbench.cache.xquant installs a forward pre-hook on every attention module that hands its
`hidden_states` (already through input_layernorm) to the layer's store (`stage`) just before the module projects
them and calls the cache's `update`; `append` then quantizes X's stream(s), never the keys it is handed. A pass
whose X was not seen (a replayed prefill hands recorded keys and values only) recovers the streams from the keys
and values themselves (un-rotated, bias removed, times the pseudo-inverse of the up-projection: exact up to
rounding, since the projections have full rank); for a model with k_norm that is impossible and is refused.

Transactions as in the other quantized stores: `append` puts tokens in the residual, `settle()` quantizes committed
ones only, `crop` of a provisional tail shortens the residual (exact).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workbench.cache.ordered_store import OrderedStore
from workbench.cache.quantized_store import QuantizedSide
from workbench.cache.rope import rotate
from workbench.errors import WorkbenchError


@dataclass
class Rematerializer:
    """One layer's way back from the stored streams to keys and values (float32 matrices on the model's device).

    up_k, up_v   -- (width, kv_heads * head_dim): "x": W_k^T, W_v^T; "svd": S_k B_k^T, S_v B_v^T
    down_k/down_v-- (hidden, width) taking X to the streams ("svd": U_k, U_v); None in the "x" form
    """

    form: str
    up_k: torch.Tensor
    up_v: torch.Tensor
    down_k: torch.Tensor | None
    down_v: torch.Tensor | None
    bias_k: torch.Tensor | None
    bias_v: torch.Tensor | None
    k_norm: object  # the attention module's k_norm (Qwen3, Gemma 3) or None
    kv_heads: int
    head_dim: int
    inv_freq: torch.Tensor
    scaling: float

    def streams(self, x: torch.Tensor) -> list[torch.Tensor]:
        """X (tokens, hidden) -> the stream(s) to store, each (tokens, width), float32."""
        x = x.float()
        if self.form == "x":
            return [x]
        return [x @ self.down_k, x @ self.down_v]

    def keys(self, stream: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Key stream (tokens, width) -> keys (kv_heads, tokens, head_dim), float32, rotated for `positions`."""
        k = stream.float() @ self.up_k
        if self.bias_k is not None:
            k = k + self.bias_k
        k = k.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)
        if self.k_norm is not None:
            k = self.k_norm(k).float()
        return self.rope(k, positions)

    def values(self, stream: torch.Tensor) -> torch.Tensor:
        v = stream.float() @ self.up_v
        if self.bias_v is not None:
            v = v + self.bias_v
        return v.view(-1, self.kv_heads, self.head_dim).transpose(0, 1)

    def rope(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """transformers' rotate_half RoPE at `positions`, its attention_scaling on the rotated dims."""
        rotated = rotate(k, positions.expand(k.shape[0], -1), self.inv_freq)
        if self.scaling != 1.0:
            dims = 2 * self.inv_freq.shape[0]
            rotated = torch.cat([rotated[..., :dims] * self.scaling, rotated[..., dims:]], dim=-1)
        return rotated

    def recover(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> list[torch.Tensor]:
        """The streams of tokens whose X was not seen, from their keys and values (kv_heads, n, head_dim)."""
        if self.k_norm is not None:
            raise WorkbenchError("cache 'xquant' did not see this pass's layer input X, and the model's k_norm "
                                 "cannot be inverted to recover it from the keys: run the model's own attention "
                                 "modules (a workbench session or model.generate) over this cache")
        positions = torch.arange(start, start + keys.shape[1], device=keys.device)
        k = rotate(keys.float() / self.scaling, -positions.expand(keys.shape[0], -1), self.inv_freq)
        k = k.transpose(0, 1).reshape(keys.shape[1], -1)
        v = values.float().transpose(0, 1).reshape(values.shape[1], -1)
        if self.bias_k is not None:
            k, v = k - self.bias_k, v - self.bias_v
        if self.form == "x":
            return [torch.linalg.lstsq(self.up_k.T, k.T).solution.T]
        return [k @ torch.linalg.pinv(self.up_k), v @ torch.linalg.pinv(self.up_v)]


class XQuantStore(OrderedStore):
    """A layer's quantized X stream(s); keys and values are rematerialized from them on every read."""

    kind = "an XQuant store"

    def __init__(self, remat: Rematerializer, bits: int, group: int, residual: int,
                 scale_dtype: torch.dtype = torch.float16):
        layouts = ("per_channel",) if remat.form == "x" else ("per_channel", "per_token")
        self.streams = [QuantizedSide(layout, bits, group, residual, "chunk", scale_dtype) for layout in layouts]
        super().__init__(self.streams[0], self.streams[-1])
        self.remat, self.bits, self.group = remat, bits, group
        self.staged: torch.Tensor | None = None  # this pass's X (tokens, hidden), from the attention pre-hook
        self.seen = 0  # tokens whose streams came from X itself (the rest were recovered from keys and values)

    @property
    def sides(self) -> tuple:
        return tuple(self.streams)

    def stage(self, x: torch.Tensor) -> None:
        """The layer input X (tokens, hidden) of the pass under way (the attention pre-hook calls this)."""
        self.staged = x

    def append(self, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if start != self.slots:
            raise WorkbenchError(f"{self.kind} keeps every token in order: tokens at position {start} cannot "
                                 f"follow its {self.slots}")
        n, x, self.staged = keys.shape[1], self.staged, None
        if x is not None and x.shape[0] == n:
            streams = self.remat.streams(x)
            self.seen += n
        else:
            streams = self.remat.recover(keys, values, start)
        for side, stream in zip(self.streams, streams):
            side.append(stream.to(keys.dtype)[None])
        self.lengths = [self.streams[0].tokens] * keys.shape[0]
        self.dtype = keys.dtype

    def view(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (1, kv_heads, tokens, head_dim) in the model's dtype, rematerialized (a fresh tensor)."""
        with torch.no_grad():  # k_norm's weights need no graph
            streams = [side.view()[0] for side in self.streams]
            positions = torch.arange(streams[0].shape[0], device=streams[0].device)
            keys = self.remat.keys(streams[0], positions)
            values = self.remat.values(streams[-1])
        return keys.to(self.dtype)[None], values.to(self.dtype)[None]

    def all_positions(self) -> torch.Tensor:
        device = self.streams[0].device
        return torch.arange(self.slots, device=device).repeat(max(self.num_heads, 1), 1)

    def bits_per_element(self) -> float:
        """Bits one quantized stream element costs (code plus its share of scale and zero), from the arithmetic."""
        return self.streams[0].bits_per_element()
