"""Shared machinery of the masking attention variants (sliding window, sinks, MInference patterns, PBS, top-k).

A masking variant only says which keys each query may see, as a `Sparsity`; `MaskedVariant.attend` does the
rest. On a GPU with Triton the pattern goes to the fused kernel (`workbench.kernels.flash_attention`) in the
kernel's own terms (window, sinks, a tile mask whose False tiles are never loaded, a token mask), so sparse
variants run inside the kernel's tiling. Elsewhere the same pattern becomes one dense bool mask for the plain
torch reference. `kept_mask(call)` gives that dense mask to anyone who asks (the fidelity metric "attention
recall" measures the dense attention mass on it).

Terms. Keys are the slots the cache holds, in the order it holds them (token positions when it keeps
everything). Query i of Q is the key slot K - Q + i. With a cache slot mask (`call.mask`, evicting caches)
"window" and "sinks" count the keys the query may see, newest and oldest, not raw slot distances; with no mask
the two agree. Tiles are `block_size` query rows x `block_size` key slots, both counted from 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from workbench.attention import reference
from workbench.attention.base import STATISTICS, AttentionCall, AttentionResult, AttentionVariant
from workbench.errors import ParameterError
from workbench.kernels.dispatch import use_triton
from workbench.kernels.flash_attention import HEAD_DIMS, flash_attention


@dataclass
class Sparsity:
    """Which keys each query may see, on top of causality and the cache's slot mask (all terms are ANDed).

    window     -- > 0: only the `window` newest visible keys (the query itself included) ... or the sinks
    sinks      -- ... the `sinks` oldest visible keys (with window > 0 only)
    block_mask -- bool (batch|1, heads, ceil(Q/block_size), ceil(K/block_size)); True = the tile may be seen
    block_size -- tile edge for block_mask
    mask       -- bool broadcastable to (batch, heads, Q, K): a token-level restriction
    order      -- long (batch, kv_heads or heads, K) or None: a permutation of the key slots (PBS), one per KV head
                  (shared by its query heads) or one per query head. The keys are then
                  offered twice: permuted (padded to whole tiles), followed by the keys in slot order, and
                  block_mask has 2 * ceil(K/block_size) key-tile columns - the permuted copy's, then the slot
                  order's. A query sees a key through either copy; the kernel loads only the chosen tiles.
    """

    window: int = 0
    sinks: int = 0
    block_mask: torch.Tensor | None = None
    block_size: int = 64
    mask: torch.Tensor | None = None
    order: torch.Tensor | None = None


class MaskedVariant(AttentionVariant):
    """Base of variants that are dense softmax attention under a sparsity pattern; subclasses implement
    `sparsity(call)` only."""

    def sparsity(self, call: AttentionCall) -> Sparsity:
        raise NotImplementedError

    def call_sparsity(self, call: AttentionCall) -> Sparsity:
        """`sparsity(call)`, worked out once per call (attend and kept_mask share it)."""
        return self._once(call, "sparsity", self.sparsity)

    def kept_mask(self, call: AttentionCall) -> torch.Tensor:
        """Bool (batch|1, 1|heads, Q, K): the keys each query may see under this variant."""
        return self._once(call, "kept_mask", lambda c: dense_mask(c, self.call_sparsity(c)))

    def _once(self, call: AttentionCall, name: str, compute):
        owner, value = call.memo.get(name, (None, None))
        if owner is not self:  # a call may meet several variants (tests, comparisons): keep the latest one's
            value = compute(call)
            call.memo[name] = (self, value)
        return value

    def attend(self, call: AttentionCall, want: frozenset[str]) -> AttentionResult:
        want = frozenset(want) & frozenset(STATISTICS)
        fused = _fused_kernel(call)
        if fused is None:
            output, statistics = reference.dense_attention(masked(call, self.kept_mask(call)), want)
            return AttentionResult(output, **statistics)
        return _attend_fused(fused, call, self.call_sparsity(call), want, self.kept_mask)


# -- the dense mask --------------------------------------------------------------------------------------------
def query_slots(call: AttentionCall) -> torch.Tensor:
    """Long (Q,): the key slot of each query."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    return torch.arange(k_len - q_len, k_len, device=call.query.device)


def recent(seen: torch.Tensor, window: int, sinks: int = 0) -> torch.Tensor:
    """Of the visible keys `seen` (bool (..., K)), the `window` newest and the `sinks` oldest of each row."""
    rank = seen.cumsum(-1, dtype=torch.int32) - 1  # rank of each slot among the row's visible keys, oldest = 0
    count = seen.sum(-1, keepdim=True, dtype=torch.int32)
    return seen & ((rank >= count - window) | (rank < sinks))


def recent_keys(call: AttentionCall, window: int, sinks: int = 0) -> torch.Tensor:
    """Bool (batch|1, 1|heads, Q, K): the `window` newest and `sinks` oldest keys each query may see."""
    if call.mask is not None:
        return recent(call.mask, window, sinks)
    slot = query_slots(call)[:, None]
    key = torch.arange(call.key.shape[2], device=slot.device)[None]
    return ((key <= slot) & ((key > slot - window) | (key < sinks)))[None, None]  # ranks are slots here


def expand_tiles(block_mask: torch.Tensor, block_size: int, q_len: int, k_len: int) -> torch.Tensor:
    """Tile mask (..., ceil(Q/bs), ceil(K/bs)) -> token mask (..., Q, K)."""
    rows = block_mask.repeat_interleave(block_size, dim=-2)[..., :q_len, :]
    return rows.repeat_interleave(block_size, dim=-1)[..., :k_len]


def covering_tiles(mask: torch.Tensor, block_size: int) -> torch.Tensor:
    """Token mask (..., Q, K) -> tile mask: True where a tile holds at least one True."""
    q_len, k_len = mask.shape[-2:]
    pad_q, pad_k = -q_len % block_size, -k_len % block_size
    padded = torch.nn.functional.pad(mask, (0, pad_k, 0, pad_q))
    tiles = padded.view(*mask.shape[:-2], (q_len + pad_q) // block_size, block_size,
                        (k_len + pad_k) // block_size, block_size)
    return tiles.any(-1).any(-2)


def by_query_head(order: torch.Tensor, heads: int) -> torch.Tensor:
    """Key order per KV head (batch, kv_heads, K) or already per query head -> per query head (batch, heads, K)."""
    return order if order.shape[1] == heads else order.repeat_interleave(heads // order.shape[1], dim=1)


def permute_keys(mask: torch.Tensor, order: torch.Tensor, heads: int) -> torch.Tensor:
    """Mask (..., Q, K) in slot order -> the same mask in `order` (column j is slot order[j])."""
    index = by_query_head(order, heads)[:, :, None, :]
    index = index.expand(index.shape[0], index.shape[1], mask.shape[-2], index.shape[-1])
    return mask.expand(index.shape[0], index.shape[1], -1, -1).gather(-1, index)


def unpermute_keys(mask: torch.Tensor, order: torch.Tensor, heads: int) -> torch.Tensor:
    """Mask (..., Q, K) in `order` -> the same mask in slot order."""
    index = by_query_head(order, heads)[:, :, None, :]
    index = index.expand(index.shape[0], index.shape[1], mask.shape[-2], index.shape[-1])
    source = mask.expand(index.shape)
    return torch.empty_like(source).scatter_(-1, index, source)


def dense_mask(call: AttentionCall, sparsity: Sparsity) -> torch.Tensor:
    """Bool (batch|1, 1|heads, Q, K) in slot order: causality (or the cache's slot mask) AND the pattern."""
    q_len, k_len = call.query.shape[2], call.key.shape[2]
    keep = recent_keys(call, sparsity.window, sparsity.sinks) if sparsity.window > 0 else reference.allowed(call)
    pattern = None
    if sparsity.block_mask is not None:
        tiles = sparsity.block_mask
        if sparsity.order is None:
            pattern = expand_tiles(tiles, sparsity.block_size, q_len, k_len)
        else:
            permuted, in_order = tiles.chunk(2, dim=-1)
            pattern = expand_tiles(in_order, sparsity.block_size, q_len, k_len) | unpermute_keys(
                expand_tiles(permuted, sparsity.block_size, q_len, k_len), sparsity.order, call.query.shape[1])
    if sparsity.mask is not None:
        pattern = sparsity.mask if pattern is None else pattern & sparsity.mask
    return keep if pattern is None else keep & pattern


def masked(call: AttentionCall, mask: torch.Tensor) -> AttentionCall:
    """A copy of the call whose slot mask is `mask`."""
    return dataclasses.replace(call, mask=mask)


# -- the fused kernel path -------------------------------------------------------------------------------------
def _fused_kernel(call: AttentionCall):
    """workbench.kernels.flash_attention for this call, or None where the torch reference must run (CPU,
    no Triton, soft-capped scores, learned attention sinks or a head size the kernel does not implement)."""
    if call.kwargs.get("softcap") or reference.has_sinks(call) or call.query.shape[-1] not in HEAD_DIMS:
        return None
    return flash_attention if use_triton(call.query, "flash_attention") else None


def kernel_arguments(call: AttentionCall, sparsity: Sparsity) -> dict:
    """The sparsity in the kernel's terms: native window/sinks where they mean the same thing as here (no slot
    mask), else one token mask plus the tiles it covers; with a permutation, the doubled keys (see Sparsity)."""
    if sparsity.order is not None:
        return _permuted_arguments(call, sparsity)
    if call.mask is None:
        block_mask = sparsity.block_mask
        if block_mask is None and sparsity.mask is not None:
            block_mask = covering_tiles(sparsity.mask, sparsity.block_size)
        return dict(key=call.key, value=call.value, causal=True, window=sparsity.window, sinks=sparsity.sinks,
                    block_mask=_per_head(block_mask, call), block_size=sparsity.block_size, mask=sparsity.mask)
    mask = dense_mask(call, dataclasses.replace(sparsity, block_mask=None))
    block_mask = covering_tiles(mask, sparsity.block_size)
    if sparsity.block_mask is not None:
        block_mask = block_mask & sparsity.block_mask
    return dict(key=call.key, value=call.value, causal=True, window=0, sinks=0,
                block_mask=_per_head(block_mask, call), block_size=sparsity.block_size, mask=mask)


def _permuted_arguments(call: AttentionCall, sparsity: Sparsity) -> dict:
    """Keys [permuted copy padded to whole tiles | slot order]. With Q <= K every permuted key lies before
    every query in the kernel's causal sense, and slot-order key j is visible exactly when it is causally, so
    the kernel's own causality stays right; a token mask is needed only for a window or a cache slot mask."""
    k_len, bs = call.key.shape[2], sparsity.block_size
    pad = -k_len % bs
    key, value = call.key, call.value
    if sparsity.order.shape[1] != key.shape[1]:  # one order per query head: each query head gets its own keys
        key, value = (x.repeat_interleave(call.groups, dim=1) for x in (key, value))
    index = sparsity.order[..., None].expand(-1, -1, -1, key.shape[-1])

    def doubled(x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.nn.functional.pad(x.gather(2, index), (0, 0, 0, pad)), x], dim=2)

    tiles = k_len // bs + (pad > 0)
    mask = None
    padding_loaded = pad > 0 and bool(sparsity.block_mask[..., tiles - 1].any())  # zero keys must not count
    if call.mask is not None or sparsity.window > 0 or sparsity.mask is not None or padding_loaded:
        keep = dense_mask(call, dataclasses.replace(sparsity, block_mask=None, order=None))
        permuted = torch.nn.functional.pad(permute_keys(keep, sparsity.order, call.query.shape[1]), (0, pad))
        mask = torch.cat([permuted, keep.expand_as(permuted[..., :k_len])], dim=-1)
    return dict(key=doubled(key), value=doubled(value), causal=True, window=0, sinks=0,
                block_mask=_per_head(sparsity.block_mask, call), block_size=bs, mask=mask)


def _per_head(block_mask: torch.Tensor | None, call: AttentionCall) -> torch.Tensor | None:
    """The kernel takes one tile mask per query head."""
    if block_mask is None:
        return None
    return block_mask.expand(-1, call.query.shape[1], -1, -1)


def _attend_fused(flash_attention, call: AttentionCall, sparsity: Sparsity, want: frozenset[str], kept_mask):
    args = kernel_arguments(call, sparsity)
    out = flash_attention(call.query, args.pop("key"), args.pop("value"), scaling=call.scaling, **args,
                          entropy="entropy" in want, key_mass="key_mass" in want)
    key_mass = out.key_mass if "key_mass" in want else None
    if key_mass is not None and sparsity.order is not None:  # both copies of a key add up to its mass
        k_len, kv_heads = call.key.shape[2], call.key.shape[1]
        key_mass = key_mass[..., -k_len:].scatter_add(-1, sparsity.order, key_mass[..., :k_len])
        key_mass = key_mass.unflatten(1, (kv_heads, -1)).sum(2)  # keys copied per query head: back to KV heads
    probs = None
    if "probs" in want:  # rows are only materialized for the heads the observer keeps
        probs = reference.head_rows(masked(call, kept_mask(call)), call.probs_heads)
    return AttentionResult(out.output, entropy=out.entropy if "entropy" in want else None, probs=probs,
                           key_mass=key_mass)


# -- estimates several patterns share --------------------------------------------------------------------------
def last_query_probs(call: AttentionCall, last_q: int) -> torch.Tensor:
    """Float32 dense attention rows (batch, heads, L, K) of the last L = min(last_q, Q) queries: what
    MInference and PBS estimate their patterns from (in decoding, the single query)."""
    q_len = call.query.shape[2]
    rows = slice(q_len - min(last_q, q_len), q_len)
    s = reference.by_group(call.query[:, :, rows].float(), call.key.float().transpose(-1, -2)) * call.scaling
    return torch.softmax(s.masked_fill(~reference.allowed(call, rows), float("-inf")), dim=-1)


def tile_queries(call: AttentionCall, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Long (Q tiles,) first and last key slot of the queries in each query tile."""
    slots = query_slots(call)
    first = slots[::block_size]
    last = slots[block_size - 1::block_size]
    if last.shape[0] < first.shape[0]:
        last = torch.cat([last, slots[-1:]])
    return first, last


def key_tiles(call: AttentionCall, block_size: int) -> torch.Tensor:
    """Long (K tiles,) first key slot of each key tile."""
    return torch.arange(0, call.key.shape[2], block_size, device=call.query.device)


def diagonal_tiles(call: AttentionCall, block_size: int) -> torch.Tensor:
    """Bool (Q tiles, K tiles): key tiles holding the slot of one of the tile's queries (never skipped, so
    every query keeps its own key)."""
    first, last = tile_queries(call, block_size)
    start = key_tiles(call, block_size)
    return (start[None] + block_size > first[:, None]) & (start[None] <= last[:, None])


def causal_tiles(call: AttentionCall, block_size: int) -> torch.Tensor:
    """Bool (Q tiles, K tiles): key tiles that hold a key at or before one of the tile's queries."""
    _, last = tile_queries(call, block_size)
    return key_tiles(call, block_size)[None] <= last[:, None]


def pooled_tile_scores(call: AttentionCall, block_size: int, key: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 (batch, heads, Q tiles, K tiles): mean query of each query tile . mean key of each key tile,
    scaled; the cheap block-importance estimate of MInference's block-sparse pattern. `key` overrides
    call.key (e.g. keys in a permuted order, per KV head or per query head)."""
    key_means = _tile_means((call.key if key is None else key).float(), block_size)
    if key_means.shape[1] != call.query.shape[1]:  # keys per KV head: every query head of the group uses them
        key_means = key_means.repeat_interleave(call.groups, dim=1)
    return torch.matmul(_tile_means(call.query.float(), block_size), key_means.transpose(-1, -2)) * call.scaling


def _tile_means(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """(batch, heads, n, dim) -> (batch, heads, ceil(n/bs), dim): the mean of each tile's rows."""
    n = x.shape[2]
    pad = -n % block_size
    sums = torch.nn.functional.pad(x, (0, 0, 0, pad)).unflatten(2, (-1, block_size)).sum(3)
    counts = torch.full((sums.shape[2],), float(block_size), device=x.device)
    counts[-1] = block_size - pad
    return sums / counts[:, None]


def top_tiles(scores: torch.Tensor, eligible: torch.Tensor | None, top_k: int) -> torch.Tensor:
    """Bool like `scores` (..., n): the `top_k` highest-scoring eligible entries of each row (fewer when fewer
    are eligible; every entry is eligible when `eligible` is None). Used for tiles, pages, keys and lines."""
    k = min(top_k, scores.shape[-1])
    ranked = (scores if eligible is None else scores.masked_fill(~eligible, float("-inf"))).topk(k, dim=-1).indices
    chosen = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device).scatter_(-1, ranked, True)
    return chosen if eligible is None else chosen & eligible


def mass_tiles(scores: torch.Tensor, eligible: torch.Tensor, threshold: float) -> torch.Tensor:
    """Bool like `scores` (..., n): per row, the fewest highest-scoring eligible entries whose softmax share (the
    softmax over the row's eligible entries) reaches `threshold` - PBS's cumulative-mass block selection. Rows
    with nothing eligible choose nothing."""
    probs = torch.softmax(scores.masked_fill(~eligible, float("-inf")), dim=-1).nan_to_num(0.0)
    ranked, order = probs.sort(dim=-1, descending=True)
    better = ranked.cumsum(-1) - ranked  # the mass of the entries ranked above each one
    chosen = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device).scatter_(-1, order, better < threshold)
    return chosen & eligible


def check_block_size(component, block_size: int, name: str = "block_size") -> None:
    """Tiles must be powers of two >= 16 (what the fused kernel's tiling accepts)."""
    if block_size < 16 or block_size & (block_size - 1):
        raise ParameterError(f"{component.family} '{component.name}' parameter '{name}' is {block_size}; it must "
                             "be a power of two >= 16 (16, 32, 64, 128, ...)")
