"""Decode attention straight from a 2/4-bit packed KV cache: a split-K (Flash-Decoding) Triton kernel that unpacks
and dequantizes the codes in registers, plus a plain-torch reference and the layout both read.

Follows KIVI (Liu et al., "KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache", ICML 2024; code
jy-yuan/KIVI): keys quantized per channel over groups of G tokens, values per token over groups of G channels,
the newest tokens kept in full precision as a residual. The attention itself is Flash-Decoding (Dao, Haziza,
Massa, Sizov, "Flash-Decoding for long-context inference", 2023) as in kernels/flash_attention.py: programs over
(KV head, split of the quantized tokens), the query heads of a KV group packed into one tile of rows, an online
softmax per program, and a log-sum-exp merge of the partial states.

The layout (one layer, batch 1; stores in workbench/cache build a `PackedKV` per side)
-------------------------------------------------------------------------------------
  kv_heads KV heads, head_dim D, query heads H = kv_heads * groups (query head h reads KV head h // groups).
  Asymmetric min/max quantization, bits in {2, 4} (8 also accepted), per group of values:
      scale = (max - min) / (2**bits - 1),  zero = min   (scale 0 when max == min: every value decodes to zero)
      code  = clamp(round((x - zero) / scale), 0, 2**bits - 1)      x_hat = code * scale + zero
  codes  (kv_heads, T, D * bits // 8) uint8, packed along the head dimension: byte b of a token holds channels
         b * P .. b * P + P - 1 with P = 8 // bits, channel c at bit offset (c % P) * bits, lowest bits first
         (4-bit: channel 2b in the low nibble, 2b + 1 in the high nibble).
  layout "per_channel" (KIVI keys): tokens in groups of G; scale, zero (kv_heads, T // G, D); T % G == 0.
         Token n, channel c uses scale[:, n // G, c].
  layout "per_token" (KIVI values; also per-token keys, as HF / lmdeploy-style caches quantize them; G = D is one
         scale and zero per token and head):
         scale, zero (kv_heads, T, D // G); D % G == 0. Token n, channel c uses scale[:, n, c // G].
  scale and zero: float16 or float32 (bfloat16 accepted); the last dim of codes / scale / zero must be
  contiguous, the other strides are free (a store may pass views into a preallocated buffer).
  residual_keys, residual_values (kv_heads, R, D) in the query's dtype, 0 <= R: full-precision tokens that come
  after the T quantized ones in position order (KIVI keeps the newest up to R unquantized).
  query (H, D) for one decode step, or (H, q_len, D) for a few queries (a verify pass): query i sits at position
  T + R - q_len + i and sees keys at positions <= its own (causal over the last q_len tokens).
Keys and values may differ in bits, layout and G; both sides must have the same T.

Differences from KIVI's code (checked against jy-yuan/KIVI quant/new_pack.py and quant/matmul.py):
  - KIVI packs codes into int32 words (32 // bits codes per word, lowest bits first, as here) and packs the keys
    along the token axis of a transposed (B, nh, D, T) key cache with scale/min shaped (B, nh, D, T // G); values
    along D with scale/min (B, nh, T, D // G). Here both sides are uint8 packed along D, token-major, and the
    per-channel key scale is (kv_heads, T // G, D).
  - KIVI computes code = round(clamp((x - min) / scale, 0, max)) (the same codes) and divides by zero when a group
    is constant; here such a group has scale 0 and decodes to its min exactly.
  - KIVI's decode is three steps: a CUDA/Triton GEMV for q.K over the packed keys, softmax in torch over the
    concatenated quantized and residual scores, a GEMV for p.V. Here one fused pass (no score matrix in memory),
    split-K over the quantized tokens, with the residual as one more split.
Departures from the flash kernel: dequantized K / V tiles are cast to the query's dtype before tl.dot (fp16 / bf16
tensor cores; fp32 stays fp32 with ieee dots), so fp16 results differ from the float32 reference by about one
fp16 rounding of x_hat; batch is 1; at most MAX_ROWS = q_len * groups query rows. Codes are loaded as contiguous
byte tiles and unpacked with shifts, masks and tl.interleave into channel order; each scale / zero value a tile
needs is loaded once and broadcast in registers (reshape of a broadcast) where the groups tile BLOCK_N, else
gathered element by element.

Tiling: BLOCK_N = 64 tokens per tile, BLOCK_M = max(16, next power of two of q_len * groups) rows, 4 warps,
3 stages. Split-K as in flash_attention: with fewer KV heads than SMs, the quantized tiles are spread over up to
2 x SMs programs in all, at least 4 tiles each; the residual is one more program per KV head; the flash kernel's
_combine_kernel merges the partial (m, sum, entropy term, acc) by log-sum-exp (no merge when one program per head
suffices). Untuned: chosen by analogy with the flash decode path, not measured.

Statistics are the flash kernel's: lse (log-sum-exp of the scaled scores, nats) and entropy (nats) per query
head and query, from the same pass; key_mass (kv_heads, T + R), the attention each key received summed over the
query heads of its group and the queries, by a second pass that re-reads (and re-dequantizes) the keys with the
final lse. A query with no visible key (only when q_len > T + R) gets output 0, lse -inf, entropy 0.

Dispatch: `packed_decode` runs the kernel for CUDA tensors (when Triton is installed) and, when `interpreting()`
(TRITON_INTERPRET=1, as the tests set it), on CPU tensors through the Triton interpreter; otherwise the reference.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from workbench.errors import ParameterError
from workbench.kernels.dispatch import HAS_TRITON, interpreting, use_triton
from workbench.kernels.quantization import BITS, LAYOUTS, dequantize, quantize

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_ROWS = 128  # q_len * groups query rows in one tile
BLOCK_N = 64  # quantized tokens per tile (a power of two >= 16)


@dataclass
class PackedKV:
    """One side (keys or values) of a packed quantized cache for one layer; see the module docstring."""
    codes: torch.Tensor  # (kv_heads, T, D * bits // 8) uint8
    scale: torch.Tensor  # per_channel: (kv_heads, T // group, D); per_token: (kv_heads, T, D // group)
    zero: torch.Tensor  # same shape as scale (the group minimum)
    layout: str  # "per_channel" | "per_token"
    bits: int  # 2 or 4 (8 also accepted)
    group: int  # G: tokens per group (per_channel) or channels per group (per_token)

    @property
    def kv_heads(self) -> int:
        return self.codes.shape[0]

    @property
    def tokens(self) -> int:
        return self.codes.shape[1]

    @property
    def head_dim(self) -> int:
        return self.codes.shape[2] * 8 // self.bits

    def dequantize(self) -> torch.Tensor:
        """x_hat (kv_heads, T, D) float32."""
        return dequantize(self.codes, self.scale, self.zero, self.bits, self.group, self.layout)


@dataclass
class PackedDecodeOutput:
    output: torch.Tensor  # (H, D), or (H, q_len, D) for a 3-d query, in the query's dtype
    lse: torch.Tensor | None = None  # (H,) or (H, q_len) float32 log-sum-exp of the scaled scores (-inf: empty)
    entropy: torch.Tensor | None = None  # (H,) or (H, q_len) float32 entropy in nats (0: empty row)
    key_mass: torch.Tensor | None = None  # (kv_heads, T + R) float32: quantized tokens first, then the residual


def quantize_reference(x: torch.Tensor, *, layout: str, bits: int, group: int,
                       scale_dtype: torch.dtype = torch.float16) -> PackedKV:
    """x (kv_heads, T, D) -> PackedKV, by the workbench's one quantizer (kernels/quantization.py: scale and zero
    rounded to scale_dtype first, codes computed against the stored values)."""
    if x.dim() != 3:
        raise ParameterError(f"x must be (kv_heads, tokens, head_dim); got {tuple(x.shape)}")
    _check_format(layout, bits, group, x.shape[1], x.shape[2], "x")
    codes, scale, zero = quantize(x, bits, group, layout, scale_dtype)
    return PackedKV(codes, scale, zero, layout, bits, group)


# -- input checks ---------------------------------------------------------------------------------------------

def _check_format(layout, bits, group, tokens, head_dim, name) -> None:
    if layout not in LAYOUTS:
        raise ParameterError(f"{name}: layout must be one of {', '.join(LAYOUTS)}; got {layout!r}")
    if bits not in BITS:
        raise ParameterError(f"{name}: bits must be one of {', '.join(map(str, BITS))}; got {bits}")
    if not isinstance(group, int) or group < 1:
        raise ParameterError(f"{name}: group must be a positive int; got {group!r}")
    if layout == "per_token" and head_dim % group:
        raise ParameterError(f"{name}: per_token group ({group}) must divide head_dim ({head_dim})")
    if layout == "per_channel" and tokens % group:
        raise ParameterError(f"{name}: per_channel quantized tokens ({tokens}) must be a multiple of group ({group})")


def _check_packed(kv: PackedKV, name: str, kv_heads: int, head_dim: int, device) -> None:
    if not isinstance(kv, PackedKV):
        raise ParameterError(f"{name} must be a PackedKV; got {type(kv).__name__}")
    if kv.bits not in BITS:
        raise ParameterError(f"{name}: bits must be one of {', '.join(map(str, BITS))}; got {kv.bits}")
    codes = kv.codes
    expected = (kv_heads, codes.shape[1] if codes.dim() == 3 else "T", head_dim * kv.bits // 8)
    if codes.dtype != torch.uint8 or codes.dim() != 3 or tuple(codes.shape) != expected:
        raise ParameterError(f"{name}.codes must be uint8 (kv_heads={kv_heads}, T, head_dim * bits // 8="
                             f"{expected[2]}); got {codes.dtype} {tuple(codes.shape)}")
    tokens = codes.shape[1]
    _check_format(kv.layout, kv.bits, kv.group, tokens, head_dim, name)
    shape = (kv_heads, tokens // kv.group, head_dim) if kv.layout == "per_channel" else \
        (kv_heads, tokens, head_dim // kv.group)
    for part in ("scale", "zero"):
        t = getattr(kv, part)
        if t.dtype not in SCALE_DTYPES or tuple(t.shape) != shape:
            raise ParameterError(f"{name}.{part} must be float16/float32 {shape} for {kv.layout} with group "
                                 f"{kv.group}; got {t.dtype} {tuple(t.shape)}")
    if not (codes.device == kv.scale.device == kv.zero.device == device):
        raise ParameterError(f"{name}: codes, scale and zero must be on the query's device {device}; got "
                             f"{codes.device}, {kv.scale.device}, {kv.zero.device}")


def check_inputs(query, keys, values, residual_keys, residual_values):
    """Raise ParameterError naming what is wrong; return (query as (H, q_len, D), residual keys, residual values,
    whether the query was 2-d)."""
    if query.dim() not in (2, 3):
        raise ParameterError(f"query must be (heads, head_dim) or (heads, q_len, head_dim); got {tuple(query.shape)}")
    squeeze = query.dim() == 2
    q = query[:, None] if squeeze else query
    heads, _, head_dim = q.shape
    if query.dtype not in DTYPES:
        raise ParameterError(f"query must be float16, bfloat16 or float32; got {query.dtype}")
    if not isinstance(keys, PackedKV) or not isinstance(values, PackedKV):
        raise ParameterError("keys and values must be PackedKV")
    kv_heads = keys.codes.shape[0] if keys.codes.dim() == 3 else 0
    if values.codes.dim() == 3 and values.codes.shape[0] != kv_heads:
        raise ParameterError(f"keys and values must have the same kv heads; got {kv_heads} and "
                             f"{values.codes.shape[0]}")
    if kv_heads == 0 or heads % kv_heads:
        raise ParameterError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")
    _check_packed(keys, "keys", kv_heads, head_dim, query.device)
    _check_packed(values, "values", kv_heads, head_dim, query.device)
    if keys.tokens != values.tokens:
        raise ParameterError(f"keys and values must hold the same quantized tokens; got {keys.tokens} and "
                             f"{values.tokens}")
    empty = q.new_zeros(kv_heads, 0, head_dim)
    residual_keys = empty if residual_keys is None else residual_keys
    residual_values = empty if residual_values is None else residual_values
    for name, t in (("residual_keys", residual_keys), ("residual_values", residual_values)):
        if t.dim() != 3 or t.shape[0] != kv_heads or t.shape[2] != head_dim or t.dtype != query.dtype:
            raise ParameterError(f"{name} must be {query.dtype} (kv_heads={kv_heads}, R, head_dim={head_dim}); "
                                 f"got {t.dtype} {tuple(t.shape)}")
        if t.device != query.device:
            raise ParameterError(f"{name} must be on {query.device}; got {t.device}")
    if residual_keys.shape[1] != residual_values.shape[1]:
        raise ParameterError(f"residual_keys and residual_values must have the same length; got "
                             f"{residual_keys.shape[1]} and {residual_values.shape[1]}")
    return q, residual_keys, residual_values, squeeze


def _finish(output, lse, entropy, mass, squeeze, want_lse, want_entropy, want_mass) -> PackedDecodeOutput:
    if squeeze:
        output = output[:, 0]
        lse = lse[:, 0] if lse is not None else None
        entropy = entropy[:, 0] if entropy is not None else None
    return PackedDecodeOutput(output, lse if want_lse else None, entropy if want_entropy else None,
                              mass if want_mass else None)


# -- reference ------------------------------------------------------------------------------------------------

def packed_decode_reference(query, keys: PackedKV, values: PackedKV, residual_keys=None, residual_values=None, *,
                            scaling: float, lse: bool = False, entropy: bool = False,
                            key_mass: bool = False) -> PackedDecodeOutput:
    """Dequantize, append the residual, dense attention in float32 (GQA by repeat)."""
    q, residual_keys, residual_values, squeeze = check_inputs(query, keys, values, residual_keys, residual_values)
    heads, q_len, _ = q.shape
    kv_heads = keys.kv_heads
    groups = heads // kv_heads
    k = torch.cat([keys.dequantize(), residual_keys.float()], dim=1)  # (KVH, N, D)
    v = torch.cat([values.dequantize(), residual_values.float()], dim=1)
    n = k.shape[1]
    scores = torch.matmul(q.float(), k.repeat_interleave(groups, 0).transpose(1, 2)) * scaling  # (H, Q, N)
    position = torch.arange(q_len, device=q.device)[:, None] + n - q_len
    scores = scores.masked_fill(torch.arange(n, device=q.device)[None, :] > position, float("-inf"))
    row_lse = torch.logsumexp(scores, dim=-1)  # -inf for a row that sees nothing
    probs = torch.exp(scores - row_lse.masked_fill(row_lse == float("-inf"), 0.0)[..., None])
    output = torch.matmul(probs, v.repeat_interleave(groups, 0)).to(query.dtype)
    row_entropy = torch.special.entr(probs).sum(-1) if entropy else None
    mass = probs.sum(1).view(kv_heads, groups, n).sum(1) if key_mass else None
    return _finish(output, row_lse, row_entropy, mass, squeeze, lse, entropy, key_mass)


# -- kernel ---------------------------------------------------------------------------------------------------

if HAS_TRITON:
    import triton
    import triton.language as tl

    from workbench.kernels.flash_attention_tiles import LOG2E, _combine_kernel, _store_rows, _tile_update

    @triton.jit
    def _unpack(byte, BITS: tl.constexpr):
        """(rows, D * BITS // 8) uint8 -> (rows, D) codes in channel order (lowest bits = first channel)."""
        MASK: tl.constexpr = (1 << BITS) - 1
        if BITS == 8:
            code = byte
        elif BITS == 4:
            code = tl.interleave(byte & MASK, byte >> 4)
        else:  # 2 bits: interleave(interleave(c0, c2), interleave(c1, c3)) = c0 c1 c2 c3 per byte
            code = tl.interleave(tl.interleave(byte & MASK, (byte >> 4) & MASK),
                                 tl.interleave((byte >> 2) & MASK, byte >> 6))
        return code

    @triton.jit
    def _group_values(Ptr, base, stride, keys, live, n0, n_tok, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      PER_CHANNEL: tl.constexpr, GROUP: tl.constexpr, EXPAND: tl.constexpr):
        """A scale or zero tensor read for the tile's tokens, as (BLOCK_N, HEAD_DIM) float32 (or (1, HEAD_DIM)
        when one row covers the tile). EXPAND loads each distinct value once and broadcasts it in registers;
        without EXPAND (or when groups do not tile BLOCK_N) every element is gathered (repeated addresses)."""
        d = tl.arange(0, HEAD_DIM)
        if PER_CHANNEL and EXPAND and GROUP % BLOCK_N == 0:
            # the tile lies in one token group; tiles are full since T % G == 0 and G % BLOCK_N == 0
            out = tl.load(Ptr + base + (n0 // GROUP) * stride + d)[None, :].to(tl.float32)
        elif PER_CHANNEL and EXPAND and BLOCK_N % GROUP == 0:
            ROWS: tl.constexpr = BLOCK_N // GROUP
            rows = n0 // GROUP + tl.arange(0, ROWS)
            part = tl.load(Ptr + base + rows[:, None] * stride + d[None, :], mask=(rows * GROUP < n_tok)[:, None],
                           other=0.0).to(tl.float32)
            out = tl.reshape(tl.broadcast_to(part[:, None, :], (ROWS, GROUP, HEAD_DIM)), (BLOCK_N, HEAD_DIM))
        elif PER_CHANNEL:
            out = tl.load(Ptr + base + (keys // GROUP)[:, None] * stride + d[None, :], mask=live[:, None],
                          other=0.0).to(tl.float32)
        elif EXPAND:
            GROUPS: tl.constexpr = HEAD_DIM // GROUP
            g = tl.arange(0, GROUPS)
            part = tl.load(Ptr + base + keys[:, None] * stride + g[None, :], mask=live[:, None],
                           other=0.0).to(tl.float32)
            out = tl.reshape(tl.broadcast_to(part[:, :, None], (BLOCK_N, GROUPS, GROUP)), (BLOCK_N, HEAD_DIM))
        else:
            out = tl.load(Ptr + base + keys[:, None] * stride + (d // GROUP)[None, :], mask=live[:, None],
                          other=0.0).to(tl.float32)
        return out

    @triton.jit
    def _dequantize(Codes, Scale, Zero, c_base, scn, s_base, ssn, z_base, szn, n0, n_tok,
                    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                    GROUP: tl.constexpr, EXPAND: tl.constexpr):
        """x_hat of tokens n0 .. n0 + BLOCK_N - 1 (those >= n_tok read as 0): (BLOCK_N, HEAD_DIM) float32."""
        BYTES: tl.constexpr = HEAD_DIM * BITS // 8
        keys = n0 + tl.arange(0, BLOCK_N)
        live = keys < n_tok
        b = tl.arange(0, BYTES)
        byte = tl.load(Codes + c_base + keys[:, None] * scn + b[None, :], mask=live[:, None], other=0)
        code = _unpack(byte, BITS)
        scale = _group_values(Scale, s_base, ssn, keys, live, n0, n_tok, HEAD_DIM, BLOCK_N, PER_CHANNEL, GROUP,
                              EXPAND)
        zero = _group_values(Zero, z_base, szn, keys, live, n0, n_tok, HEAD_DIM, BLOCK_N, PER_CHANNEL, GROUP,
                             EXPAND)
        return code.to(tl.float32) * scale + zero

    @triton.jit
    def _packed_forward_kernel(Q, KC, KS, KZ, VC, VS, VZ, RK, RV, Out, Lse, Ent, PartAcc, PartM, PartL, PartT,
                               sqh, sqm, skch, skcn, sksh, sksn, skzh, skzn, svch, svcn, svsh, svsn, svzh, svzn,
                               srkh, srkn, srvh, srvn, soh, som,
                               n_q, n_tok, n_res, n_heads, groups, scale2, tiles_per_split, packed_splits,
                               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               K_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr,
                               V_BITS: tl.constexpr, V_PER_CHANNEL: tl.constexpr, V_GROUP: tl.constexpr,
                               PACKED_CAUSAL: tl.constexpr, RES_CAUSAL: tl.constexpr, ENTROPY: tl.constexpr,
                               STORE_LSE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
                               EXPAND: tl.constexpr):
        """Grid (kv heads, packed splits + 1 if there is a residual). Program (h, s < packed_splits) walks
        quantized tiles [s * tiles_per_split, ...); the last program of a head (with a residual) walks the
        residual. Rows are the head's group packed query-major: row r = query r // groups, head r % groups."""
        neg_inf = float("-inf")
        kvh = tl.program_id(0)
        pid_s = tl.program_id(1)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < groups * n_q
        qi = r // groups
        head = kvh * groups + r % groups
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + (head.to(tl.int64) * sqh + qi * sqm)[:, None] + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        m = tl.full([BLOCK_M], neg_inf, tl.float32)
        den = tl.zeros([BLOCK_M], tl.float32)  # sum of exp2(s - m)
        t = tl.zeros([BLOCK_M], tl.float32)
        kvh64 = kvh.to(tl.int64)
        if pid_s < packed_splits:
            pos = n_tok + n_res - n_q + qi  # absolute position of each row's query
            t0 = pid_s * tiles_per_split
            t1 = tl.minimum(t0 + tiles_per_split, tl.cdiv(n_tok, BLOCK_N))
            for tile in range(t0, t1):
                keys = tile * BLOCK_N + tl.arange(0, BLOCK_N)
                live = keys < n_tok
                k = _dequantize(KC, KS, KZ, kvh64 * skch, skcn, kvh64 * sksh, sksn, kvh64 * skzh, skzn,
                                tile * BLOCK_N, n_tok, HEAD_DIM, BLOCK_N, K_BITS, K_PER_CHANNEL, K_GROUP, EXPAND)
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale2
                ok = row_ok[:, None] & live[None, :]
                if PACKED_CAUSAL:
                    ok = ok & (keys[None, :] <= pos[:, None])
                s = tl.where(ok, s, neg_inf)
                m_new = tl.maximum(m, tl.max(s, 1))
                m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
                alpha = tl.exp2(m - m_safe)
                p = tl.exp2(s - m_safe[:, None])
                if ENTROPY:
                    ps = tl.where(ok, p * (s - m_safe[:, None]), 0.0)
                    t = alpha * (t + den * tl.where(m == neg_inf, 0.0, m - m_safe)) + tl.sum(ps, 1)
                den = den * alpha + tl.sum(p, 1)
                v = _dequantize(VC, VS, VZ, kvh64 * svch, svcn, kvh64 * svsh, svsn, kvh64 * svzh, svzn,
                                tile * BLOCK_N, n_tok, HEAD_DIM, BLOCK_N, V_BITS, V_PER_CHANNEL, V_GROUP, EXPAND)
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
                m = m_new
        else:
            pos = n_res - n_q + qi  # positions relative to the residual's first token
            for tile in range(tl.cdiv(n_res, BLOCK_N)):
                acc, m, den, t = _tile_update(acc, m, den, t, q, RK, RV, kvh64 * srkh, kvh64 * srvh, srkn,
                                              srvn, Q, r, 0, row_ok, tile * BLOCK_N, pos, row_ok, n_res, scale2,
                                              0, 0, HEAD_DIM, BLOCK_N, RES_CAUSAL, False, False, False, ENTROPY,
                                              True, PRECISION)
        if SPLIT:
            rows = (kvh * tl.num_programs(1) + pid_s).to(tl.int64) * BLOCK_M + r
            tl.store(PartAcc + rows[:, None] * HEAD_DIM + d[None, :], acc)
            tl.store(PartM + rows, m)
            tl.store(PartL + rows, den)
            if ENTROPY:
                tl.store(PartT + rows, t)
        else:
            _store_rows(Out, Lse, Ent, acc, m, den, t, kvh * 0, head, qi, row_ok, 0, som, soh, n_heads, n_q,
                        HEAD_DIM, STORE_LSE, ENTROPY)

    @triton.jit
    def _packed_key_mass_kernel(Q, KC, KS, KZ, RK, Lse, KeyMass, sqh, sqm, skch, skcn, sksh, sksn, skzh, skzn,
                                srkh, srkn, n_q, n_tok, n_res, n_heads, groups, scale2, packed_tiles,
                                HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                K_BITS: tl.constexpr, K_PER_CHANNEL: tl.constexpr, K_GROUP: tl.constexpr,
                                CAUSAL: tl.constexpr, PRECISION: tl.constexpr, EXPAND: tl.constexpr):
        """Grid (quantized tiles + residual tiles, kv heads). Second pass: with the final lse, p = exp(s - lse)
        is exact; each program sums it over all rows of its group for one key tile (one writer per entry)."""
        pid_n = tl.program_id(0)
        kvh = tl.program_id(1)
        kvh64 = kvh.to(tl.int64)
        r = tl.arange(0, BLOCK_M)
        row_ok = r < groups * n_q
        qi = r // groups
        head = kvh * groups + r % groups
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + (head.to(tl.int64) * sqh + qi * sqm)[:, None] + d[None, :], mask=row_ok[:, None],
                    other=0.0)
        if pid_n < packed_tiles:
            keys = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            live = keys < n_tok
            k = _dequantize(KC, KS, KZ, kvh64 * skch, skcn, kvh64 * sksh, sksn, kvh64 * skzh, skzn,
                            pid_n * BLOCK_N, n_tok, HEAD_DIM, BLOCK_N, K_BITS, K_PER_CHANNEL, K_GROUP,
                            EXPAND).to(q.dtype)
            kpos = keys
        else:
            rk = (pid_n - packed_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
            live = rk < n_res
            k = tl.load(RK + kvh64 * srkh + rk[:, None] * srkn + d[None, :], mask=live[:, None], other=0.0)
            kpos = n_tok + rk
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
        ok = row_ok[:, None] & live[None, :]
        if CAUSAL:
            ok = ok & (kpos[None, :] <= (n_tok + n_res - n_q + qi)[:, None])
        lse2 = tl.load(Lse + head.to(tl.int64) * n_q + qi, mask=row_ok, other=float("-inf")) * LOG2E
        ok = ok & (lse2 > float("-inf"))[:, None]
        p = tl.where(ok, tl.exp2(s - tl.where(ok, lse2[:, None], 0.0)), 0.0)
        tl.store(KeyMass + kvh64 * (n_tok + n_res) + kpos, tl.sum(p, 0), mask=live)


def _stride2(t: torch.Tensor) -> tuple[int, int]:
    return t.stride(0), t.stride(1)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.numel() == 0 else t.contiguous()


def _splits(kv_heads: int, tiles: int, device, num_splits: int | None) -> tuple[int, int]:
    """(packed splits, tiles per split): with fewer KV heads than SMs, spread the quantized tiles over up to
    2 x SMs programs in all, at least 4 tiles each (flash_attention's split-K rule)."""
    if tiles == 0:
        return 0, 1
    if num_splits is None:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        num_splits = 1 if kv_heads >= sms else min(-(-2 * sms // kv_heads), max(1, tiles // 4))
    num_splits = max(1, min(int(num_splits), tiles))
    per_split = -(-tiles // num_splits)
    return -(-tiles // per_split), per_split


def packed_decode_triton(query, keys: PackedKV, values: PackedKV, residual_keys=None, residual_values=None, *,
                         scaling: float, lse: bool = False, entropy: bool = False, key_mass: bool = False,
                         num_splits: int | None = None, block_n: int | None = None,
                         expand_scales: bool = True) -> PackedDecodeOutput:
    """Always the Triton kernel. num_splits (splits of the quantized tokens; the residual is one more program per
    KV head) and block_n (tokens per tile) override the tiling (tests, tuning). expand_scales=False gathers every
    scale / zero element of a tile instead of loading each group's value once and broadcasting it in registers
    (reshape of a broadcast): the same results, a fallback should the broadcast compile badly on some GPU."""
    q, residual_keys, residual_values, squeeze = check_inputs(query, keys, values, residual_keys, residual_values)
    if not HAS_TRITON:
        raise RuntimeError("packed_decode_triton needs Triton (pip install triton)")
    heads, q_len, head_dim = q.shape
    kv_heads, groups = keys.kv_heads, heads // keys.kv_heads
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ParameterError(f"head_dim {head_dim} is not supported by the packed decode kernel "
                             "(supported: powers of two 16 .. 256)")
    if q_len * groups > MAX_ROWS:
        raise ParameterError(f"q_len * groups = {q_len} * {groups} exceeds the kernel's {MAX_ROWS} query rows; "
                             "use fewer queries per call")
    bn = block_n or BLOCK_N
    if bn < 16 or bn & (bn - 1):
        raise ParameterError(f"block_n must be a power of two >= 16; got {block_n}")
    device = q.device
    f32 = dict(dtype=torch.float32, device=device)
    n_tok, n_res = keys.tokens, residual_keys.shape[1]
    n_all = n_tok + n_res
    need_lse = lse or key_mass
    if q_len == 0 or n_all == 0:  # nothing to attend to: every row is empty
        return _finish(q.new_zeros(heads, q_len, head_dim), torch.full((heads, q_len), float("-inf"), **f32),
                       torch.zeros(heads, q_len, **f32), torch.zeros(kv_heads, n_all, **f32), squeeze,
                       lse, entropy, key_mass)
    q = _last_dim_contiguous(q)
    kc, ks, kz, vc, vs, vz, rk, rv = (_last_dim_contiguous(t) for t in (
        keys.codes, keys.scale, keys.zero, values.codes, values.scale, values.zero, residual_keys,
        residual_values))
    output = torch.empty(heads, q_len, head_dim, dtype=q.dtype, device=device)
    row_lse = torch.empty(heads, q_len, **f32) if need_lse else None
    row_entropy = torch.empty(heads, q_len, **f32) if entropy else None
    tiles = -(-n_tok // bn)
    packed_splits, per_split = _splits(kv_heads, tiles, device, num_splits)
    parts = packed_splits + (1 if n_res else 0)
    split = parts > 1
    block_m = max(16, triton.next_power_of_2(q_len * groups))
    if split:
        part_acc = torch.empty(kv_heads * parts * block_m, head_dim, **f32)
        part_m, part_l, part_t = (torch.empty(kv_heads * parts * block_m, **f32) for _ in range(3))
    else:
        part_acc = part_m = part_l = part_t = output  # unused
    scale2 = float(scaling) * math.log2(math.e)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    anything = q  # a valid pointer for arguments a specialization never reads
    with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
        _packed_forward_kernel[(kv_heads, parts)](
            q, kc, ks, kz, vc, vs, vz, rk, rv, output, row_lse if need_lse else anything,
            row_entropy if entropy else anything, part_acc, part_m, part_l, part_t,
            q.stride(0), q.stride(1), *_stride2(kc), *_stride2(ks), *_stride2(kz), *_stride2(vc), *_stride2(vs),
            *_stride2(vz), *_stride2(rk), *_stride2(rv), output.stride(0), output.stride(1),
            q_len, n_tok, n_res, heads, groups, scale2, per_split, packed_splits,
            HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=bn,
            K_BITS=keys.bits, K_PER_CHANNEL=keys.layout == "per_channel", K_GROUP=keys.group,
            V_BITS=values.bits, V_PER_CHANNEL=values.layout == "per_channel", V_GROUP=values.group,
            PACKED_CAUSAL=q_len > n_res + 1, RES_CAUSAL=q_len > 1, ENTROPY=entropy, STORE_LSE=need_lse,
            SPLIT=split, PRECISION=precision, EXPAND=bool(expand_scales), num_warps=4, num_stages=3)
        if split:
            _combine_kernel[(1, kv_heads)](
                part_acc, part_m, part_l, part_t, output, row_lse if need_lse else anything,
                row_entropy if entropy else anything, 0, output.stride(1), output.stride(0),
                q_len, heads, kv_heads, groups, groups, parts, HEAD_DIM=head_dim, BLOCK_M=block_m,
                ENTROPY=entropy, STORE_LSE=need_lse, num_warps=4)
        mass = None
        if key_mass:
            mass = torch.empty(kv_heads, n_all, **f32)
            _packed_key_mass_kernel[(tiles + -(-n_res // bn), kv_heads)](
                q, kc, ks, kz, rk, row_lse, mass, q.stride(0), q.stride(1), *_stride2(kc), *_stride2(ks),
                *_stride2(kz), *_stride2(rk), q_len, n_tok, n_res, heads, groups, scale2, tiles,
                HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=bn, K_BITS=keys.bits,
                K_PER_CHANNEL=keys.layout == "per_channel", K_GROUP=keys.group, CAUSAL=q_len > 1,
                PRECISION=precision, EXPAND=bool(expand_scales), num_warps=4)
    return _finish(output, row_lse, row_entropy, mass, squeeze, lse, entropy, key_mass)


def packed_decode(query, keys: PackedKV, values: PackedKV, residual_keys=None, residual_values=None, *,
                  scaling: float, lse: bool = False, entropy: bool = False,
                  key_mass: bool = False) -> PackedDecodeOutput:
    """Decode attention over a packed quantized cache: the Triton kernel on CUDA (and on CPU under
    TRITON_INTERPRET=1), the torch reference elsewhere."""
    options = dict(scaling=scaling, lse=lse, entropy=entropy, key_mass=key_mass)
    if use_triton(query, "packed_decode") or (HAS_TRITON and interpreting()):
        return packed_decode_triton(query, keys, values, residual_keys, residual_values, **options)
    return packed_decode_reference(query, keys, values, residual_keys, residual_values, **options)


__all__ = ["PackedKV", "PackedDecodeOutput", "packed_decode", "packed_decode_reference", "packed_decode_triton",
           "quantize_reference", "check_inputs", "LAYOUTS", "BITS"]
