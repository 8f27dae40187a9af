"""The Triton programs behind kernels/flash_attention.py (launched from there; read that file first).

FlashAttention-2 (Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning", 2023):
each program owns a tile of query rows, streams key/value tiles through an online softmax and never writes the
attention matrix. Two additions for the workbench:

- Entropy in the same pass. Besides the running max m and S = sum exp(s - m) we keep T = sum exp(s - m) (s - m);
  then entropy = log S - T / S (the identity of softmax_entropy.py, shifted by m for accuracy).
- Rows are "packed": row r of a tile is query r // P of query head (group start + r % P). P = 1 is the usual
  one-head tile (prefill). P = G packs the G query heads of a KV group into one tile so decoding reads each K/V
  tile once per group, and split-K (Flash-Decoding, Dao et al. 2023) spreads long key ranges over programs whose
  partial (m, S, T, acc) are merged by `_combine_kernel`.

Scores are kept in log2 units (s2 = q.k * scaling * log2 e) so the exponentials are exp2; statistics are
converted back to nats when stored. Key tiles wholly outside the causal / sink+window band are never visited,
nor are tiles whose block_mask bit is off: with a block_mask the launcher lists, per row tile, the key tiles
it needs, and the program walks that list (their K/V are never loaded). Interior tiles skip element masks.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # jit code reads globals only as constexpr
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _row_map(r, pack, groups, kvh, head_pack):
    """Packed row r -> (query index, query head)."""
    return r // pack, kvh * groups + head_pack * pack + r % pack


@triton.jit
def _allowed(ok, keys, pos, n_k, window, sinks, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """AND the geometric rules into `ok` (rows x keys): in range, causal, sink+window."""
    ok = ok & (keys < n_k)[None, :]
    if CAUSAL:
        ok = ok & (keys[None, :] <= pos[:, None])
    if WINDOW:
        ok = ok & ((keys[None, :] > pos[:, None] - window) | (keys[None, :] < sinks))
    return ok


@triton.jit
def _block_bits(BlockMask, bm_base, sbh, sbm, sbn, head, qi, row_ok, n0, block_size):
    """This key tile's block_mask bit for each row (rows of a packed tile may belong to different heads)."""
    ptrs = BlockMask + bm_base + head * sbh + (qi // block_size) * sbm + (n0 // block_size) * sbn
    return tl.load(ptrs, mask=row_ok, other=0).to(tl.int32)


@triton.jit
def _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn, bits,
                 n0, pos, row_ok, n_k, scale2, window, sinks,
                 HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                 HAS_MASK: tl.constexpr, ROW_BITS: tl.constexpr, ENTROPY: tl.constexpr,
                 MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """One key tile into the online state (acc, m, l, t) of the rows; MASKED=False for interior tiles.
    With ROW_BITS, `bits` says per row whether its block_mask bit for this tile is on."""
    neg_inf = float("-inf")
    keys = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k_ptrs = K + k_base + keys[:, None] * skn + d[None, :]
    v_ptrs = V + v_base + keys[:, None] * svn + d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=(keys < n_k)[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
    if MASKED:
        ok = _allowed(row_ok[:, None], keys, pos, n_k, window, sinks, CAUSAL, WINDOW)
        if HAS_MASK:
            ok = ok & (tl.load(Mask + mask_rows[:, None] + keys[None, :] * smn, mask=ok, other=0) != 0)
        if ROW_BITS:
            ok = ok & bits[:, None]
        s = tl.where(ok, s, neg_inf)
    m_new = tl.maximum(m, tl.max(s, 1))
    m_safe = tl.where(m_new == neg_inf, 0.0, m_new)  # a row with nothing allowed yet stays empty, never NaN
    alpha = tl.exp2(m - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    if ENTROPY:
        # T is kept relative to the running max: moving the old terms to the new max adds S * (m - m_new)
        ps = p * (s - m_safe[:, None])
        if MASKED:
            ps = tl.where(ok, ps, 0.0)
        t = alpha * (t + l * tl.where(m == neg_inf, 0.0, m - m_safe)) + tl.sum(ps, 1)
    l = l * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=(keys < n_k)[:, None], other=0.0)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l, t


@triton.jit
def _store_rows(Out, Lse, Ent, acc, m, l, t, b, head, qi, row_ok, sob, som, soh, n_heads, n_q,
                HEAD_DIM: tl.constexpr, STORE_LSE: tl.constexpr, ENTROPY: tl.constexpr):
    """Normalize and write the finished rows: output (B, Q, H, D), lse and entropy (B, H, Q) in nats."""
    d = tl.arange(0, HEAD_DIM)
    empty = l == 0.0  # no allowed key: output 0, lse -inf, entropy 0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    rows = b.to(tl.int64) * sob + qi.to(tl.int64) * som + head.to(tl.int64) * soh
    o_ptrs = Out + rows[:, None] + d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    stat = (b * n_heads + head).to(tl.int64) * n_q + qi
    if STORE_LSE:
        tl.store(Lse + stat, tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * LN2), mask=row_ok)
    if ENTROPY:
        entropy = tl.maximum((tl.log2(l_safe) - t / l_safe) * LN2, 0.0)
        tl.store(Ent + stat, tl.where(empty, 0.0, entropy), mask=row_ok)


@triton.jit
def _forward_kernel(Q, K, V, Out, Lse, Ent, Mask, BlockMask, TileCounts, TileLists, PartAcc, PartM, PartL, PartT,
                    sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, som, soh,
                    smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                    n_q, n_k, n_heads, n_kv, groups, pack, scale2, window, sinks, block_size, tiles_per_split,
                    list_len,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                    TILE_LIST: tl.constexpr, ROW_BITS: tl.constexpr, FULL_TILES: tl.constexpr,
                    ENTROPY: tl.constexpr, STORE_LSE: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (row tiles, key splits, batch x kv heads x head packs). Without SPLIT it writes finished rows;
    with SPLIT each program covers `tiles_per_split` of the live key tiles and writes its partial state.

    Live key tiles come from the causal / sink+window band (bounds computed here), or, with a block_mask
    (TILE_LIST), from a list the launcher made of the tiles any row of this tile needs: a plain loop over
    that list keeps the loads pipelined, where a per-tile `if` would not."""
    pid_r = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_h = tl.program_id(2)
    packs = groups // pack
    b = pid_h // (n_kv * packs)
    kvh = (pid_h // packs) % n_kv
    head_pack = pid_h % packs
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < pack * n_q
    qi, head = _row_map(r, pack, groups, kvh, head_pack)
    offset = n_k - n_q  # queries are the last n_q tokens
    pos = offset + qi
    d = tl.arange(0, HEAD_DIM)
    # 64-bit row offsets: a dense (B, H, Q, K) mask passes 2**31 elements at 8k tokens
    q_rows = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqm
    q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
    k_base = b.to(tl.int64) * skb + kvh.to(tl.int64) * skh
    v_base = b.to(tl.int64) * svb + kvh.to(tl.int64) * svh
    mask_rows = b.to(tl.int64) * smb + head.to(tl.int64) * smh + qi.to(tl.int64) * smm
    bm_base = b.to(tl.int64) * sbb

    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    v0 = pid_s * tiles_per_split  # this split takes live tiles [v0, v1)
    v1 = v0 + tiles_per_split
    if TILE_LIST:
        listed = pid_h * tl.num_programs(0) + pid_r
        for v in range(v0, tl.minimum(v1, tl.load(TileCounts + listed))):
            n0 = tl.load(TileLists + listed.to(tl.int64) * list_len + v) * BLOCK_N
            bits = row_ok
            if ROW_BITS:  # rows of a packed tile may belong to heads or query blocks whose bit is off
                bits = _block_bits(BlockMask, bm_base, sbh, sbm, sbn, head, qi, row_ok, n0, block_size) != 0
            acc, m, l, t = _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn,
                                        bits, n0, pos, row_ok, n_k, scale2, window, sinks, HEAD_DIM,
                                        BLOCK_N, CAUSAL, WINDOW, HAS_MASK, ROW_BITS, ENTROPY, True, PRECISION)
    else:
        # Positions of this tile's first and last query decide which key tiles can matter at all.
        p_min = offset + (pid_r * BLOCK_M) // pack
        p_max = offset + (tl.minimum(pid_r * BLOCK_M + BLOCK_M, pack * n_q) - 1) // pack
        hi = n_k
        if CAUSAL:
            hi = tl.minimum(tl.maximum(p_max + 1, 0), n_k)
        lo = 0
        n_sink = 0
        if WINDOW:
            lo = tl.minimum(tl.maximum(p_min - window + 1, 0), hi)
        t_lo = lo // BLOCK_N
        t_hi = (hi + BLOCK_N - 1) // BLOCK_N
        if WINDOW:
            n_sink = tl.minimum((sinks + BLOCK_N - 1) // BLOCK_N, t_lo)  # sink tiles before the window band
        # Interior tiles every row may see in full need no per-element mask.
        if FULL_TILES:
            lo_all = 0
            if WINDOW:
                lo_all = tl.maximum(p_max - window + 1, 0)
            hi_all = n_k
            if CAUSAL:
                hi_all = tl.minimum(tl.maximum(p_min + 1, 0), n_k)
            f_lo = (lo_all + BLOCK_N - 1) // BLOCK_N
            f_hi = hi_all // BLOCK_N
        else:
            f_lo = t_hi
            f_hi = t_hi
        # Live tiles in order: sink tiles [0, n_sink), then the band [t_lo, t_hi), of which [f0, f1) interior.
        w0 = t_lo + tl.maximum(v0 - n_sink, 0)
        w1 = tl.minimum(t_lo + tl.maximum(v1 - n_sink, 0), t_hi)
        f0 = tl.minimum(tl.maximum(f_lo, w0), w1)
        f1 = tl.minimum(tl.maximum(f_hi, f0), w1)
        for tile in range(tl.minimum(v0, n_sink), tl.minimum(v1, n_sink)):
            acc, m, l, t = _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn,
                                        row_ok, tile * BLOCK_N, pos, row_ok, n_k, scale2, window, sinks,
                                        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, HAS_MASK, False, ENTROPY, True, PRECISION)
        for tile in range(w0, f0):
            acc, m, l, t = _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn,
                                        row_ok, tile * BLOCK_N, pos, row_ok, n_k, scale2, window, sinks,
                                        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, HAS_MASK, False, ENTROPY, True, PRECISION)
        for tile in range(f0, f1):
            acc, m, l, t = _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn,
                                        row_ok, tile * BLOCK_N, pos, row_ok, n_k, scale2, window, sinks,
                                        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, HAS_MASK, False, ENTROPY, False,
                                        PRECISION)
        for tile in range(f1, w1):
            acc, m, l, t = _tile_update(acc, m, l, t, q, K, V, k_base, v_base, skn, svn, Mask, mask_rows, smn,
                                        row_ok, tile * BLOCK_N, pos, row_ok, n_k, scale2, window, sinks,
                                        HEAD_DIM, BLOCK_N, CAUSAL, WINDOW, HAS_MASK, False, ENTROPY, True, PRECISION)

    if SPLIT:
        part = (pid_h * tl.num_programs(0) + pid_r) * tl.num_programs(1) + pid_s
        rows = part.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(PartAcc + rows[:, None] * HEAD_DIM + d[None, :], acc)
        tl.store(PartM + rows, m)
        tl.store(PartL + rows, l)
        if ENTROPY:
            tl.store(PartT + rows, t)
    else:
        _store_rows(Out, Lse, Ent, acc, m, l, t, b, head, qi, row_ok, sob, som, soh, n_heads, n_q,
                    HEAD_DIM, STORE_LSE, ENTROPY)


@triton.jit
def _combine_kernel(PartAcc, PartM, PartL, PartT, Out, Lse, Ent, sob, som, soh,
                    n_q, n_heads, n_kv, groups, pack, n_splits,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, ENTROPY: tl.constexpr,
                    STORE_LSE: tl.constexpr):
    """Grid (row tiles, batch x kv heads x head packs): merge the key splits' partial states of a row tile."""
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    neg_inf = float("-inf")
    packs = groups // pack
    b = pid_h // (n_kv * packs)
    kvh = (pid_h // packs) % n_kv
    r = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = r < pack * n_q
    qi, head = _row_map(r, pack, groups, kvh, pid_h % packs)
    d = tl.arange(0, HEAD_DIM)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    m = tl.full([BLOCK_M], neg_inf, tl.float32)
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    first = (pid_h * tl.num_programs(0) + pid_r) * n_splits
    for split in range(0, n_splits):
        rows = (first + split).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        m_s = tl.load(PartM + rows)
        l_s = tl.load(PartL + rows)
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        a_old = tl.exp2(m - m_safe)
        a_s = tl.exp2(m_s - m_safe)
        if ENTROPY:
            t_s = tl.load(PartT + rows)
            t = (a_old * (t + l * tl.where(m == neg_inf, 0.0, m - m_safe))
                 + a_s * (t_s + l_s * tl.where(m_s == neg_inf, 0.0, m_s - m_safe)))
        l = a_old * l + a_s * l_s
        acc = acc * a_old[:, None] + tl.load(PartAcc + rows[:, None] * HEAD_DIM + d[None, :]) * a_s[:, None]
        m = m_new
    _store_rows(Out, Lse, Ent, acc, m, l, t, b, head, qi, row_ok, sob, som, soh, n_heads, n_q,
                HEAD_DIM, STORE_LSE, ENTROPY)


@triton.jit
def _key_mass_kernel(Q, K, Lse, Mask, BlockMask, KeyMass,
                     sqb, sqh, sqm, skb, skh, skn, smb, smh, smm, smn, sbb, sbh, sbm, sbn,
                     n_q, n_k, n_heads, n_kv, groups, scale2, window, sinks, block_size,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_MASK: tl.constexpr,
                     HAS_BLOCK_MASK: tl.constexpr, PRECISION: tl.constexpr):
    """Grid (key tiles, batch x kv heads). Second pass: with the final LSE, p = exp(s - lse) is exact, and each
    program sums it for its key tile over every query row of the KV group (rows packed query-major, r = i*G + g),
    so each key_mass entry has exactly one writer and no atomics are needed."""
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    b = pid_h // n_kv
    kvh = pid_h % n_kv
    n0 = pid_n * BLOCK_N
    keys = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    k = tl.load(K + b.to(tl.int64) * skb + kvh.to(tl.int64) * skh + keys[:, None] * skn + d[None, :],
                mask=(keys < n_k)[:, None], other=0.0)
    offset = n_k - n_q
    # Which queries can see this key tile: causal needs pos >= n0; a window needs pos < last key + window
    # (unless the tile holds sink keys, which every later query sees).
    i_lo = 0
    if CAUSAL:
        i_lo = tl.minimum(tl.maximum(n0 - offset, 0), n_q)
    i_hi = n_q
    if WINDOW:
        last = tl.minimum(n0 + BLOCK_N, n_k) - 1
        i_hi = tl.where(n0 < sinks, n_q, tl.minimum(tl.maximum(last + window - offset, i_lo), n_q))
    mass = tl.zeros([BLOCK_N], tl.float32)
    for row_tile in range((i_lo * groups) // BLOCK_M, (i_hi * groups + BLOCK_M - 1) // BLOCK_M):
        r = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = r < groups * n_q
        qi, head = _row_map(r, groups, groups, kvh, 0)
        live = 1
        if HAS_BLOCK_MASK:
            bits = _block_bits(BlockMask, b.to(tl.int64) * sbb, sbh, sbm, sbn, head, qi, row_ok, n0, block_size)
            row_ok = row_ok & (bits != 0)
            live = tl.max(bits, 0)
        if live > 0:
            q_rows = b.to(tl.int64) * sqb + head.to(tl.int64) * sqh + qi.to(tl.int64) * sqm
            q = tl.load(Q + q_rows[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale2
            ok = _allowed(row_ok[:, None], keys, offset + qi, n_k, window, sinks, CAUSAL, WINDOW)
            if HAS_MASK:
                mask_rows = b.to(tl.int64) * smb + head.to(tl.int64) * smh + qi.to(tl.int64) * smm
                ok = ok & (tl.load(Mask + mask_rows[:, None] + keys[None, :] * smn, mask=ok, other=0) != 0)
            lse2 = tl.load(Lse + (b * n_heads + head).to(tl.int64) * n_q + qi, mask=row_ok,
                           other=float("-inf")) * LOG2E
            ok = ok & (lse2 > float("-inf"))[:, None]  # empty rows give nothing
            p = tl.where(ok, tl.exp2(s - tl.where(ok, lse2[:, None], 0.0)), 0.0)
            mass += tl.sum(p, 0)
    tl.store(KeyMass + pid_h.to(tl.int64) * n_k + keys, mass, mask=keys < n_k)
