"""Mixed-precision stores: what a policy lets go is kept at low precision instead of being freed (`mikv`,
`zipcache`).

`MixedPrecisionStore` is a `RaggedStore` (the full-precision tier: its slots, positions, extras and lengths are
exactly what the policy manages, so an eviction policy runs on it unchanged) plus one or more `QuantizedPool`s.
Where a ragged store would free an entry (`keep`, `keep_slots`, or a hole `CacheLayer.drop` makes), this store
moves it, with its position, into a pool as packed low-bit codes (workbench.kernels.quantization, per token,
uint8 codes packed along the head dimension, float16 scale and zero per group of channels). A named per-slot
statistic (`route`, e.g. zipcache's "salient") picks the pool; otherwise the first pool takes it.

Low-bit codes per token follow ZipCache's channel-separable token-wise scheme (MiKV's outlier-aware balancer,
simplified): each pool divides every channel by a balancer s_c = sqrt(max_t |x_tc|) (per KV head and side, float16,
computed once from the tokens the store holds when the pool first receives some, then frozen) before quantizing
per token over groups of `group` channels, and multiplies it back when dequantizing.

Attention reads both tiers: `attended(layer, call, key, value)` (the policy's `attended` hook) appends the pools'
dequantized keys and values after the full-precision slots and widens the call's mask over them (every pooled
token is committed, so every query may see it). Inside a provisional tail, slots a tentative eviction hid are
shown to the later rows at low precision (quantized on the fly, as they will be once committed), so each row sees
what one-by-one decoding would. `managed(layer, call, result)` gives the policy the call and statistics of its
own slots only. Pools change only outside a provisional tail (tentative evictions only hide slots), so rollback
restores both tiers exactly.

Bytes (`nbytes`, `nbytes_by_component`) are the tensors' sizes: the full-precision buffers (capacity included)
and each pool's codes, scales, zeros, balancers and int32 positions.
"""

from __future__ import annotations

import dataclasses

import torch

from workbench.attention.base import AttentionResult
from workbench.cache.quant_error import MeasuresQuantError, RunningError
from workbench.cache.storage import RaggedStore, slack
from workbench.errors import ParameterError, WorkbenchError
from workbench.kernels.quantization import check, dequantize, quantize

SIDES = ("keys", "values")


class QuantizedPool:
    """Tokens of one layer at one precision: per KV head any number, in any order, with their positions."""

    def __init__(self, bits: int, group: int, balance: bool = True, scale_dtype: torch.dtype = torch.float16):
        check(bits, group, "per_token")
        self.bits, self.group, self.balance, self.scale_dtype = bits, group, balance, scale_dtype
        self.codes: dict[str, torch.Tensor] = {}  # side -> (kv_heads, capacity, D * bits // 8) uint8
        self.scale: dict[str, torch.Tensor] = {}  # side -> (kv_heads, capacity, D // group)
        self.zero: dict[str, torch.Tensor] = {}
        self.balancer: dict[str, torch.Tensor] = {}  # side -> (kv_heads, 1, D); empty until the first tokens
        self.positions: torch.Tensor | None = None  # (kv_heads, capacity) int32, -1 beyond each head's length
        self.lengths: list[int] = []
        self.errors = {side: RunningError() for side in SIDES}  # what quantizing into this pool costs, measuring

    @property
    def tokens(self) -> int:
        return max(self.lengths, default=0)

    def balancers(self, keys: torch.Tensor, values: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per side (kv_heads, 1, D): the stored balancer, or one computed from the valid rows of keys/values
        (kv_heads, n, D) when there is none yet (not stored: see `add`)."""
        if self.balancer or not self.balance:
            return self.balancer
        out = {}
        for side, x in zip(SIDES, (keys, values)):
            peak = x.float().abs().masked_fill(~valid[..., None], 0).amax(1, keepdim=True)
            out[side] = torch.where(peak > 0, peak.sqrt(), 1.0).clamp_min(1e-3).to(self.scale_dtype)
        return out

    def encode(self, x: torch.Tensor, side: str, balancer: dict) -> tuple[torch.Tensor, ...]:
        if balancer:
            x = x.float() / balancer[side].float()
        return quantize(x, self.bits, self.group, "per_token", self.scale_dtype)

    def decode(self, codes, scale, zero, side: str, balancer: dict, dtype: torch.dtype) -> torch.Tensor:
        x = dequantize(codes, scale, zero, self.bits, self.group, "per_token")
        return (x * balancer[side].float() if balancer else x).to(dtype)

    def roundtrip(self, keys: torch.Tensor, values: torch.Tensor, balancer: dict) -> tuple[torch.Tensor, ...]:
        """keys/values (kv_heads, n, D) as this pool would hold them (quantized and dequantized)."""
        return tuple(self.decode(*self.encode(x, side, balancer), side, balancer, x.dtype)
                     for side, x in zip(SIDES, (keys, values)))

    def add(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, counts: list[int],
            balancer: dict) -> None:
        """Quantize and keep, per head h, the first counts[h] rows of keys/values (kv_heads, m, D) at positions
        (kv_heads, m); `balancer` from `balancers` (stored now if the pool had none)."""
        heads = keys.shape[0]
        if not self.lengths:
            self.lengths = [0] * heads
        if not self.balancer and self.balance:
            self.balancer = {side: b.clone() for side, b in balancer.items()}
        self._reserve(max(n + c for n, c in zip(self.lengths, counts)), keys)
        encoded = {side: self.encode(x, side, self.balancer) for side, x in zip(SIDES, (keys, values))}
        if self.errors["keys"].measure:
            counted = torch.tensor(counts, device=keys.device)[:, None]
            rows = torch.arange(keys.shape[1], device=keys.device)[None] < counted  # each head's first counts[h]
            for side, x in zip(SIDES, (keys, values)):
                self.errors[side].add(x, self.decode(*encoded[side], side, self.balancer, torch.float32), rows)
        for h, count in enumerate(counts):  # few KV heads: a loop is the readable scatter
            at = self.lengths[h]
            for side, (codes, scale, zero) in encoded.items():
                self.codes[side][h, at:at + count] = codes[h, :count]
                self.scale[side][h, at:at + count] = scale[h, :count]
                self.zero[side][h, at:at + count] = zero[h, :count]
            self.positions[h, at:at + count] = positions[h, :count].to(torch.int32)
            self.lengths[h] = at + count

    def _reserve(self, tokens: int, like: torch.Tensor) -> None:
        capacity = 0 if self.positions is None else self.positions.shape[1]
        if tokens <= capacity:
            return
        size = tokens if self.positions is None else tokens + slack(tokens)
        heads, dim = like.shape[0], like.shape[2]
        old = (self.codes, self.scale, self.zero, self.positions)
        shapes = {"codes": (heads, size, dim * self.bits // 8), "scale": (heads, size, dim // self.group)}
        self.codes = {s: torch.zeros(shapes["codes"], dtype=torch.uint8, device=like.device) for s in SIDES}
        self.scale = {s: torch.zeros(shapes["scale"], dtype=self.scale_dtype, device=like.device) for s in SIDES}
        self.zero = {s: torch.zeros(shapes["scale"], dtype=self.scale_dtype, device=like.device) for s in SIDES}
        self.positions = torch.full((heads, size), -1, dtype=torch.int32, device=like.device)
        if old[3] is not None:
            for new, previous in zip((self.codes, self.scale, self.zero), old[:3]):
                for side in SIDES:
                    new[side][:, :capacity] = previous[side]
            self.positions[:, :capacity] = old[3]

    def view(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, values (kv_heads, tokens, D) dequantized in `dtype`, positions long (kv_heads, tokens), -1 pad)."""
        n = self.tokens
        keys, values = (self.decode(self.codes[s][:, :n], self.scale[s][:, :n], self.zero[s][:, :n], s,
                                    self.balancer, dtype) for s in SIDES)
        return keys, values, self.positions[:, :n].long()

    def nbytes_by_component(self) -> dict[str, int]:
        def size(tensors):
            return sum(t.numel() * t.element_size() for t in tensors)
        return {"codes": size(self.codes.values()), "scales": size(self.scale.values()),
                "zeros": size(self.zero.values()), "balancers": size(self.balancer.values()),
                "positions": 0 if self.positions is None else size([self.positions])}


class MixedPrecisionStore(MeasuresQuantError, RaggedStore):
    """A ragged full-precision tier (what the policy manages) whose dropped entries go to quantized pools."""

    def __init__(self, pools: dict[str, QuantizedPool], route: str | None = None, full: str = "high"):
        """pools -- name -> pool, in routing order; route -- a bool/long per-slot extra whose value is the index of
        the pool a dropped slot goes to (None: the first pool); full -- the full-precision tier's name in
        `nbytes_by_component`."""
        super().__init__()
        if not pools:
            raise ParameterError("a mixed-precision store needs at least one quantized pool")
        self.pools, self.route, self.full = dict(pools), route, full
        self.shadow: torch.Tensor | None = None  # positions as this store last left them: finds CacheLayer's holes

    # -- the full-precision tier: a RaggedStore whose freed entries are moved, not lost ---------------------------
    def append(self, keys, values, start) -> None:
        self.absorb_holes()
        super().append(keys, values, start)
        self._refresh()

    def keep_slots(self, index: torch.Tensor, lengths: list[int]) -> None:
        self.absorb_holes()
        span = self.slots
        counts = torch.tensor(lengths, device=index.device)[:, None]
        real = torch.arange(index.shape[1], device=index.device)[None] < counts  # index's padding is not kept
        kept = torch.zeros((self.num_heads, span), dtype=torch.bool, device=index.device).scatter_(1, index, real)
        self._demote(~kept & (self.shadow[:, :span] >= 0))
        super().keep_slots(index, lengths)
        self._refresh()

    def crop(self, position: int, lengths: list[int]) -> None:
        self.absorb_holes()
        super().crop(position, lengths)
        self._refresh()

    def meters(self) -> list[tuple[RunningError, RunningError]]:
        """The pools' (keys, values) meters: the error of what was moved to low precision (the full-precision tier
        has none)."""
        return [(pool.errors["keys"], pool.errors["values"]) for pool in self.pools.values()]

    def merge(self, *args) -> None:
        raise WorkbenchError("a mixed-precision store does not merge entries (its policies move them to a pool)")

    def absorb_holes(self) -> None:
        """Move the entries of slots CacheLayer.drop freed in place (position set to -1) into a pool."""
        if self.shadow is None:
            return
        span = self.slots
        holes = (self.shadow[:, :span] >= 0) & (self.positions[:, :span] < 0)
        if bool(holes.any()):
            self._demote(holes)
            self.shadow[:, :span].masked_fill_(holes, -1)

    def _refresh(self) -> None:
        self.shadow = self.positions.clone()

    def _demote(self, moving: torch.Tensor) -> None:
        """Quantize the entries of the slots marked in `moving` (kv_heads, slots) into their pools."""
        if not bool(moving.any()):
            return
        span = self.slots
        held = self.shadow[:, :span] >= 0
        route = self.extras.get(self.route) if self.route else None
        which = torch.zeros_like(moving, dtype=torch.long) if route is None else route[:, :span].long()
        for i, pool in enumerate(self.pools.values()):
            mask = moving & (which == i)
            counts = mask.sum(1).tolist()
            if not any(counts):
                continue
            order = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :max(counts)]  # moving first
            rows = [buffer[:, :span].gather(1, order[..., None].expand(-1, -1, buffer.shape[-1]))
                    for buffer in (self.keys, self.values)]
            balancer = pool.balancers(self.keys[:, :span], self.values[:, :span], held)
            pool.add(*rows, self.shadow[:, :span].gather(1, order), counts, balancer)

    # -- reading -------------------------------------------------------------------------------------------------
    def pooled(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every pool's tokens, pool after pool: keys, values (kv_heads, n, D) in `dtype`, positions (kv_heads, n)."""
        parts = [pool.view(dtype) for pool in self.pools.values() if pool.tokens]
        if not parts:
            empty = self.keys[:, :0].to(dtype)
            return empty, empty, self.positions[:, :0]
        return tuple(torch.cat(tensors, dim=1) for tensors in zip(*parts))

    def pooled_tokens(self) -> int:
        return sum(pool.tokens for pool in self.pools.values())

    def roundtrip_hidden(self, key: torch.Tensor, value: torch.Tensor, hidden: torch.Tensor):
        """key/value (kv_heads, slots, D) with the `hidden` slots replaced by what the first pool would hold."""
        pool = next(iter(self.pools.values()))
        balancer = pool.balancers(key, value, self.positions[:, :key.shape[1]] >= 0)
        low_keys, low_values = pool.roundtrip(key, value, balancer)
        return torch.where(hidden[..., None], low_keys, key), torch.where(hidden[..., None], low_values, value)

    def slot_positions(self) -> torch.Tensor | None:
        """Positions of the attention layout: the full-precision slots, then the pools' tokens."""
        if not self.pooled_tokens():
            return super().slot_positions()
        return torch.cat([self.all_positions(), self.pooled(self.keys.dtype)[2]], dim=1)

    def nbytes_by_component(self) -> dict[str, int]:
        parts = {self.full: super().nbytes()}
        for name, pool in self.pools.items():
            parts.update({f"{name}_{part}": size for part, size in pool.nbytes_by_component().items()})
        return parts

    def nbytes(self) -> int:
        return sum(self.nbytes_by_component().values())


# -- what the policies' hooks do with the two tiers ----------------------------------------------------------------
def attended(layer, call, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The keys and values the call reads over both tiers (full-precision slots, then the pools), widening
    `call.mask` to match; what the policy itself handed attention is kept in call.memo for `managed`."""
    store: MixedPrecisionStore = layer.store
    hidden = layer.hidden()
    pooled = store.pooled_tokens()
    if not pooled and hidden is None:
        return key, value
    call.memo["managed"] = (key, value, call.mask)
    groups, queries = call.groups, call.num_queries
    mask = call.mask
    if mask is None:  # plain causal over the slots: write it out, it is about to be widened
        positions = store.all_positions()
        mask = ((positions >= 0)[:, None] & (positions[:, None] <= call.positions()[None, :, None]))
        mask = mask.repeat_interleave(groups, 0)[None]
    elif mask.shape[1] == 1:
        mask = mask.expand(-1, call.query.shape[1], -1, -1)
    if hidden is not None:  # hidden by an earlier row of this provisional pass: seen at low precision
        low = store.roundtrip_hidden(key[0], value[0], hidden)
        key, value = low[0][None], low[1][None]
        mask = mask | hidden.repeat_interleave(groups, 0)[None, :, None, :]
    if pooled:  # committed, older than every query: visible to all of them
        low_keys, low_values, positions = store.pooled(key.dtype)
        seen = (positions >= 0).repeat_interleave(groups, 0)[None, :, None, :].expand(-1, -1, queries, -1)
        mask = torch.cat([mask, seen], dim=-1)
        key, value = torch.cat([key, low_keys[None]], dim=2), torch.cat([value, low_values[None]], dim=2)
    call.mask = mask
    return key, value


def managed(layer, call, result):
    """The call and result as the policy would have had them without the pools: its own keys, values and mask,
    statistics over its own slots (hidden ones zeroed)."""
    saved = call.memo.get("managed")
    if saved is None:
        return call, result
    slots = saved[0].shape[2]
    key_mass = result.key_mass
    if key_mass is not None:
        key_mass = key_mass[..., :slots]
        hidden = layer.hidden()
        if hidden is not None:
            key_mass = key_mass.masked_fill(hidden[None], 0.0)
    probs = None if result.probs is None else result.probs[..., :slots]
    call = dataclasses.replace(call, key=saved[0], value=saved[1], mask=saved[2], memo={})
    return call, AttentionResult(result.output, result.entropy, probs, key_mass)


def head_dim(model) -> int:
    text = model.config.get_text_config(decoder=True)
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def token_bytes(model, bits: float | None = None, group: int | None = None, scale_bits: int = 16,
                position_bytes: int = 0) -> float:
    """Bytes one token's key and value cost in one layer and KV head: at `bits` per element (None: the model's
    dtype) plus, with `group`, a scale and a zero per group of channels, and `position_bytes` of bookkeeping."""
    dim = head_dim(model)
    bits = torch.finfo(model.dtype).bits if bits is None else bits
    per_side = dim * bits / 8 + (2 * (dim // group) * scale_bits / 8 if group else 0)
    return 2 * per_side + position_bytes


def tokens_for_bytes(model, nbytes: int, bits: float | None = None, group: int | None = None) -> int:
    """The token budget per layer and KV head (an eviction policy's `budget`) that `nbytes` of cache hold, every
    layer alike, at `bits` per element (None: the model's dtype; with `group`, scales and zeros counted)."""
    per_layer_head = nbytes / (model.num_layers * model.num_kv_heads)
    return int(per_layer_head // token_bytes(model, bits, group))
