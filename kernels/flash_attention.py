"""Fused flash attention with statistics: the attention output, and in the same pass the log-sum-exp and the
Shannon entropy of every attention row; a second pass gives the attention mass each key received (what H2O-style
caches accumulate). FlashAttention-2 (Dao, 2023) tiling; decoding uses split-K (Flash-Decoding, Dao et al. 2023)
with the query heads of a KV group packed into one tile. The Triton programs are in flash_attention_tiles.py.

Inputs are what transformers passes an attention function: q (B, H, Q, D), k and v (B, KVH, K, D), H a multiple
of KVH (query head h reads kv head h // (H // KVH)). Query i sits at position K - Q + i. Key j is allowed for
query i when all of these hold:
    causal      j <= K - Q + i                                       (if causal)
    window      j > (K - Q + i) - window  or  j < sinks             (if window > 0: StreamingLLM sinks + window;
                                                                      sinks need a window)
    block_mask  block_mask[b, h, i // block_size, j // block_size]   (tiles switched off are never loaded)
    mask        mask[b, h, i, j]                                     (dense bool, broadcast to (B, H, Q, K))
A row with no allowed key gets output 0, lse -inf, entropy 0, and adds nothing to key_mass.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from workbench.errors import ParameterError
from workbench.kernels.dispatch import HAS_TRITON, use_triton

if HAS_TRITON:
    import triton

    from workbench.kernels.flash_attention_tiles import _combine_kernel, _forward_kernel, _key_mass_kernel

HEAD_DIMS = (64, 128)  # what the kernel supports
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PACKED_ROWS = 64  # at most this many (query x group head) rows: the decode layout, K/V read once per group
REFERENCE_ELEMENTS = 1 << 24  # score elements per chunk of query rows in the reference (64 MiB of float32)


@dataclass
class FlashOutput:
    output: torch.Tensor  # (B, Q, H, D) in q's dtype (the layout transformers wants back)
    lse: torch.Tensor | None = None  # (B, H, Q) float32 log-sum-exp of the scaled scores (-inf: empty row)
    entropy: torch.Tensor | None = None  # (B, H, Q) float32 entropy (nats) of each attention row (0: empty row)
    key_mass: torch.Tensor | None = None  # (B, KVH, K) float32 attention per key, summed over queries and group


def flash_attention(q, k, v, *, scaling: float, causal: bool = True, window: int = 0, sinks: int = 0,
                    block_mask: torch.Tensor | None = None, block_size: int = 64, mask: torch.Tensor | None = None,
                    lse: bool = False, entropy: bool = False, key_mass: bool = False) -> FlashOutput:
    """Attention with the statistics asked for: the Triton kernel on CUDA, the torch reference elsewhere."""
    options = dict(scaling=scaling, causal=causal, window=window, sinks=sinks, block_mask=block_mask,
                   block_size=block_size, mask=mask, lse=lse, entropy=entropy, key_mass=key_mass)
    if use_triton(q, "flash_attention"):
        return flash_attention_triton(q, k, v, **options)
    return flash_attention_reference(q, k, v, **options)


# -- input checks ---------------------------------------------------------------------------------------------

def check_inputs(q, k, v, *, window, sinks, block_mask, block_size, mask) -> None:
    """Raise ParameterError naming what is wrong and what is allowed."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ParameterError("q must be (batch, heads, q_len, head_dim) and k, v (batch, kv_heads, k_len, head_dim); "
                             f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    batch, heads, q_len, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != batch or k.shape[3] != head_dim:
        raise ParameterError(f"k and v must both be (batch={batch}, kv_heads, k_len, head_dim={head_dim}); "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
    kv_heads, k_len = k.shape[1], k.shape[2]
    if kv_heads == 0 or heads % kv_heads:
        raise ParameterError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ParameterError("q, k and v must share one dtype of float16, bfloat16, float32; "
                             f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ParameterError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if window < 0:
        raise ParameterError(f"window must be >= 0 (0 = no window); got {window}")
    if sinks < 0:
        raise ParameterError(f"sinks must be >= 0; got {sinks}")
    if sinks and not window:
        raise ParameterError(f"sinks={sinks} needs window > 0 (sink tokens are kept beside a sliding window)")
    if window and sinks > window:
        raise ParameterError(f"sinks ({sinks}) must not exceed window ({window})")
    if block_size < 16 or block_size & (block_size - 1):
        raise ParameterError(f"block_size must be a power of two >= 16; got {block_size}")
    if block_mask is not None:
        expected = (heads, -(-q_len // block_size), -(-k_len // block_size))
        if (block_mask.dtype != torch.bool or block_mask.dim() != 4 or block_mask.shape[0] not in (1, batch)
                or tuple(block_mask.shape[1:]) != expected):
            batches = "1" if batch == 1 else f"{batch} or 1"
            raise ParameterError(f"block_mask must be a bool tensor of shape (batch or 1, heads, "
                                 f"ceil(q_len / block_size), ceil(k_len / block_size)) = ({batches}, "
                                 f"{', '.join(map(str, expected))}); got {block_mask.dtype} "
                                 f"{tuple(block_mask.shape)}")
        if block_mask.device != q.device:
            raise ParameterError(f"block_mask must be on {q.device}; got {block_mask.device}")
    if mask is not None:
        full = (batch, heads, q_len, k_len)
        try:
            fits = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, full) == full
        except RuntimeError:
            fits = False
        if mask.dtype != torch.bool or not fits:
            raise ParameterError(f"mask must be a bool tensor broadcastable to (batch, heads, q_len, k_len) = "
                                 f"{full}; got {mask.dtype} {tuple(mask.shape)}")
        if mask.device != q.device:
            raise ParameterError(f"mask must be on {q.device}; got {mask.device}")


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ParameterError(f"head_dim {head_dim} is not supported by the flash kernel "
                             f"(supported: {', '.join(map(str, HEAD_DIMS))})")


# -- reference ------------------------------------------------------------------------------------------------

def allowed_keys(rows: slice, shape: tuple[int, int, int, int], *, causal: bool, window: int, sinks: int,
                 block_mask, block_size: int, mask, device) -> torch.Tensor:
    """Bool, broadcastable to (B, H, len(rows), K) for shape = (B, H, Q, K): which keys these query rows may
    attend to."""
    q_len, k_len = shape[2], shape[3]
    queries = torch.arange(rows.start, rows.stop, device=device)
    position = (queries + k_len - q_len)[:, None]
    keys = torch.arange(k_len, device=device)[None, :]
    ok = torch.ones(len(queries), k_len, dtype=torch.bool, device=device)
    if causal:
        ok &= keys <= position
    if window:
        ok &= (keys > position - window) | (keys < sinks)
    ok = ok[None, None]
    if block_mask is not None:
        ok = ok & block_mask[:, :, queries // block_size][..., keys[0] // block_size]
    if mask is not None:
        ok = ok & torch.broadcast_to(mask, shape)[:, :, rows]
    return ok


def flash_attention_reference(q, k, v, *, scaling: float, causal: bool = True, window: int = 0, sinks: int = 0,
                              block_mask: torch.Tensor | None = None, block_size: int = 64,
                              mask: torch.Tensor | None = None, lse: bool = False, entropy: bool = False,
                              key_mass: bool = False) -> FlashOutput:
    """The same function in plain torch, float32 and dense, chunked over query rows (memory O(chunk x K))."""
    check_inputs(q, k, v, window=window, sinks=sinks, block_mask=block_mask, block_size=block_size, mask=mask)
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    keys = k.float()[:, :, None]  # (B, KVH, 1, K, D): broadcast over the group instead of repeating K and V
    values = v.float()[:, :, None]
    output = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=q.device)
    row_lse = torch.empty(batch, heads, q_len, dtype=torch.float32, device=q.device)
    row_entropy = torch.empty_like(row_lse)
    mass = torch.zeros(batch, kv_heads, k_len, dtype=torch.float32, device=q.device)
    chunk = max(1, REFERENCE_ELEMENTS // max(1, batch * heads * k_len))
    for start in range(0, q_len, chunk):
        rows = slice(start, min(start + chunk, q_len))
        n = rows.stop - rows.start
        query = q[:, :, rows].float().reshape(batch, kv_heads, groups, n, head_dim)
        scores = torch.matmul(query, keys.transpose(-1, -2)).view(batch, heads, n, k_len) * scaling
        ok = allowed_keys(rows, (batch, heads, q_len, k_len), causal=causal, window=window, sinks=sinks,
                          block_mask=block_mask, block_size=block_size, mask=mask, device=q.device)
        scores = scores.masked_fill(~ok, float("-inf"))
        chunk_lse = torch.logsumexp(scores, dim=-1)  # -inf exactly for rows with no allowed key
        probs = torch.exp(scores - chunk_lse.masked_fill(chunk_lse == float("-inf"), 0.0)[..., None])
        out = torch.matmul(probs.view(batch, kv_heads, groups, n, k_len), values).view(batch, heads, n, head_dim)
        output[:, rows] = out.transpose(1, 2).to(q.dtype)
        row_lse[:, :, rows] = chunk_lse
        if entropy:
            row_entropy[:, :, rows] = torch.special.entr(probs).sum(-1)
        if key_mass:
            mass += probs.sum(dim=2).view(batch, kv_heads, groups, k_len).sum(dim=2)
    return FlashOutput(output, row_lse if lse else None, row_entropy if entropy else None,
                       mass if key_mass else None)


# -- kernel launch --------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    pack: int  # query heads per tile: 1 (prefill) or the whole KV group G (decode: K/V read once per group)
    block_m: int
    block_n: int
    row_tiles: int
    head_programs: int  # batch x kv heads x (G / pack)
    num_warps: int
    num_stages: int
    splits: int = 1  # programs sharing one row tile's key range (split-K)
    tiles_per_split: int = 1 << 30


def _plan(batch, heads, kv_heads, q_len, head_dim, block_size, has_block_mask, block_m, block_n) -> _Plan:
    """Tile shapes: prefill gets one-head 128 x 64 tiles; few query rows (decode) get the group's heads packed
    into one tile. With a block_mask a tile must lie inside one block, so its bit holds for all of it."""
    groups = heads // kv_heads
    decode = q_len * groups <= PACKED_ROWS
    pack = groups if decode else 1
    if decode:
        bm, bn, warps, stages = max(16, triton.next_power_of_2(q_len * groups)), 64, 4, 3
    else:
        bm, bn, warps, stages = 128, 64, 4 if head_dim == 64 else 8, 3
    if has_block_mask:
        bn = min(bn, block_size)
        bm = bm if pack > 1 else min(bm, block_size)
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if value is not None and (value < 16 or value & (value - 1) or (has_block_mask and value > block_size)):
            raise ParameterError(f"{name} must be a power of two >= 16 (and <= block_size with a block_mask); "
                                 f"got {value}")
    bm, bn = block_m or bm, block_n or bn
    warps = min(warps, 4 if bm < 128 else 8)  # small tiles (small blocks, overrides) get 4 warps
    return _Plan(pack, bm, bn, -(-pack * q_len // bm), batch * kv_heads * (groups // pack), warps, stages)


def _split(plan: _Plan, live_tiles: int, device, num_splits: int | None) -> None:
    """Split-K: when the row tiles alone leave SMs idle (decode), spread each one's live key tiles over
    programs (at least 4 tiles each) whose partial states the combine kernel merges."""
    if num_splits is None:
        programs = plan.row_tiles * plan.head_programs
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = 1 if programs >= sms else min(-(-2 * sms // programs), max(1, live_tiles // 4))
    num_splits = max(1, min(num_splits, live_tiles))
    plan.tiles_per_split = -(-live_tiles // num_splits)
    plan.splits = -(-live_tiles // plan.tiles_per_split)
    if plan.splits == 1:
        plan.tiles_per_split = 1 << 30  # everything: the in-kernel bounds decide


def _band_tiles(plan: _Plan, k_len: int, window: int, sinks: int) -> int:
    """At most this many key tiles are live for one row tile (the sink tiles and the window band)."""
    tiles = -(-k_len // plan.block_n)
    if window:
        span = -(-plan.block_m // plan.pack) + 1  # queries in one row tile
        tiles = min(tiles, -(-sinks // plan.block_n) + -(-(window + span) // plan.block_n) + 1)
    return tiles


def _tile_lists(plan: _Plan, blocks: torch.Tensor, q_len, k_len, heads, kv_heads, causal, window, sinks,
                block_size) -> tuple[torch.Tensor, torch.Tensor]:
    """For a block_mask: per (head program, row tile), the key tiles any of its rows needs (block bit on and
    inside the causal / sink+window band), as counts (programs, row tiles) and the tile indices in order."""
    groups, pack, bm, bn = heads // kv_heads, plan.pack, plan.block_m, plan.block_n
    device = blocks.device
    # representative rows: one per row tile when a tile is one head inside one query block, else every row
    rows = torch.arange(plan.row_tiles, device=device) * bm if pack == 1 else \
        torch.arange(plan.row_tiles * bm, device=device)
    valid = rows < pack * q_len
    query = (rows // pack).clamp(max=q_len - 1)
    head = (torch.arange(kv_heads, device=device)[:, None, None] * groups
            + torch.arange(groups // pack, device=device)[None, :, None] * pack + (rows % pack)[None, None, :])
    key_tiles = torch.arange(-(-k_len // bn), device=device)
    bits = blocks.bool()[:, head, (query // block_size)[None, None, :]][..., key_tiles * bn // block_size]
    bits = bits & valid[:, None]  # (B, KVH, G / pack, rows, key tiles)
    if pack > 1:
        bits = bits.view(*bits.shape[:3], plan.row_tiles, bm, -1).any(dim=-2)
    first = torch.arange(plan.row_tiles, device=device) * bm
    p_min = k_len - q_len + first // pack
    p_max = k_len - q_len + ((first + bm).clamp(max=pack * q_len) - 1) // pack
    start = key_tiles * bn
    last = (start + bn).clamp(max=k_len) - 1
    band = torch.ones(plan.row_tiles, len(key_tiles), dtype=torch.bool, device=device)
    if causal:
        band &= start[None, :] <= p_max[:, None]
    if window:
        band &= (last[None, :] > p_min[:, None] - window) | (start[None, :] < sinks)
    live = (bits & band).reshape(plan.head_programs, plan.row_tiles, len(key_tiles))
    counts = live.sum(-1, dtype=torch.int32)
    order = torch.sort((~live).to(torch.int8), dim=-1, stable=True).indices  # live tiles first, in key order
    return counts.contiguous(), order.to(torch.int32).contiguous()


def _as_bytes(t: torch.Tensor | None, shape) -> tuple[torch.Tensor | None, tuple[int, ...]]:
    """A bool tensor broadcast to `shape` as uint8 (zero strides where broadcast), or (None, zeros)."""
    if t is None:
        return None, (0, 0, 0, 0)
    t = torch.broadcast_to(t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)), shape).view(torch.uint8)
    return t, t.stride()


def flash_attention_triton(q, k, v, *, scaling: float, causal: bool = True, window: int = 0, sinks: int = 0,
                           block_mask: torch.Tensor | None = None, block_size: int = 64,
                           mask: torch.Tensor | None = None, lse: bool = False, entropy: bool = False,
                           key_mass: bool = False, num_splits: int | None = None, block_m: int | None = None,
                           block_n: int | None = None) -> FlashOutput:
    """Always the Triton kernel. num_splits / block_m / block_n override the tiling (tests, tuning)."""
    check_inputs(q, k, v, window=window, sinks=sinks, block_mask=block_mask, block_size=block_size, mask=mask)
    check_head_dim(q.shape[-1])
    if not HAS_TRITON:
        raise RuntimeError("flash_attention_triton needs Triton (pip install triton)")
    batch, heads, q_len, head_dim = q.shape
    kv_heads, k_len = k.shape[1], k.shape[2]
    groups = heads // kv_heads
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    device = q.device
    f32 = dict(dtype=torch.float32, device=device)
    if q_len == 0 or k_len == 0 or batch == 0:  # nothing to attend to: every row is empty
        return FlashOutput(torch.zeros(batch, q_len, heads, head_dim, dtype=q.dtype, device=device),
                           torch.full((batch, heads, q_len), float("-inf"), **f32) if lse else None,
                           torch.zeros(batch, heads, q_len, **f32) if entropy else None,
                           torch.zeros(batch, kv_heads, k_len, **f32) if key_mass else None)
    # the kernels write every element (empty rows included), so nothing needs filling first
    output = torch.empty(batch, q_len, heads, head_dim, dtype=q.dtype, device=device)
    need_lse = lse or key_mass
    row_lse = torch.empty(batch, heads, q_len, **f32) if need_lse else None
    row_entropy = torch.empty(batch, heads, q_len, **f32) if entropy else None
    mass = torch.empty(batch, kv_heads, k_len, **f32) if key_mass else None

    dense, dense_strides = _as_bytes(mask, (batch, heads, q_len, k_len))
    blocks, block_strides = _as_bytes(block_mask, None if block_mask is None else
                                      (batch, heads, *block_mask.shape[2:]))
    plan = _plan(batch, heads, kv_heads, q_len, head_dim, block_size, block_mask is not None, block_m, block_n)
    if blocks is not None:
        counts, lists = _tile_lists(plan, blocks, q_len, k_len, heads, kv_heads, causal, window, sinks, block_size)
        live_tiles = lists.shape[-1]
        if num_splits is None and plan.row_tiles * plan.head_programs < 64:  # worth a sync to split well
            live_tiles = max(1, int(counts.max()))
        _split(plan, live_tiles, device, num_splits)
    else:
        counts = lists = output  # unused
        _split(plan, _band_tiles(plan, k_len, window, sinks), device, num_splits)
    scale2 = float(scaling) * math.log2(math.e)  # the kernels work in log2 units (exp2)
    common = dict(HEAD_DIM=head_dim, CAUSAL=bool(causal), WINDOW=window > 0, HAS_MASK=mask is not None,
                  PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    split = plan.splits > 1
    if split:
        parts = plan.head_programs * plan.row_tiles * plan.splits * plan.block_m
        part_acc = torch.empty(parts, head_dim, **f32)
        part_m, part_l, part_t = (torch.empty(parts, **f32) for _ in range(3))
    else:
        part_acc = part_m = part_l = part_t = output  # unused
    anything = q  # a valid pointer for arguments a specialization never reads
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _forward_kernel[(plan.row_tiles, plan.splits, plan.head_programs)](
            q, k, v, output, row_lse if need_lse else anything, row_entropy if entropy else anything,
            dense if dense is not None else anything, blocks if blocks is not None else anything,
            counts, lists, part_acc, part_m, part_l, part_t,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *output.stride()[:3], *dense_strides, *block_strides,
            q_len, k_len, heads, kv_heads, groups, plan.pack, scale2, window, sinks, block_size,
            plan.tiles_per_split, lists.shape[-1] if blocks is not None else 0,
            BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, TILE_LIST=blocks is not None,
            ROW_BITS=blocks is not None and plan.pack > 1, FULL_TILES=mask is None, ENTROPY=entropy,
            STORE_LSE=need_lse, SPLIT=split, num_warps=plan.num_warps, num_stages=plan.num_stages, **common)
        if split:
            _combine_kernel[(plan.row_tiles, plan.head_programs)](
                part_acc, part_m, part_l, part_t, output, row_lse if need_lse else anything,
                row_entropy if entropy else anything, *output.stride()[:3], q_len, heads, kv_heads, groups,
                plan.pack, plan.splits, HEAD_DIM=head_dim, BLOCK_M=plan.block_m, ENTROPY=entropy,
                STORE_LSE=need_lse, num_warps=4)
        if key_mass:
            rows = max(16, min(64, triton.next_power_of_2(groups * q_len)))
            block_n = plan.block_n if block_mask is not None else 64
            _key_mass_kernel[(triton.cdiv(k_len, block_n), batch * kv_heads)](
                q, k, row_lse, dense if dense is not None else anything, blocks if blocks is not None else anything,
                mass, *q.stride()[:3], *k.stride()[:3], *dense_strides, *block_strides,
                q_len, k_len, heads, kv_heads, groups, scale2, window, sinks, block_size,
                BLOCK_M=rows, BLOCK_N=block_n, HAS_BLOCK_MASK=blocks is not None, num_warps=4, **common)
    return FlashOutput(output, row_lse if lse else None, row_entropy, mass)


def flops(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, causal: bool = True) -> float:
    """Matmul flops of the forward pass (4 B H Q K D, about halved under a causal mask), for benchmarks."""
    if causal:  # query i sees K - Q + i + 1 keys
        pairs = q_len * (k_len - q_len) + q_len * (q_len + 1) / 2
    else:
        pairs = q_len * k_len
    return 4.0 * batch * heads * pairs * head_dim


__all__ = ["FlashOutput", "flash_attention", "flash_attention_triton", "flash_attention_reference",
           "check_inputs", "check_head_dim", "allowed_keys", "flops", "HEAD_DIMS"]
