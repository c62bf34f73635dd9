"""Triton paged attention, the device code: decode (one query token, optional split-KV) and
multi-token kernels. Launch planning and argument checks are host code, in ``attention.py``.

Memory layout:
    query                  : [B, num_q_heads, Q, head_dim], any strides (transformers' layout)
    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim], any strides
    block_table            : int32 [B, max_blocks_per_row]; stored token p of row b is at
                             (block_table[b, p // block_size], p % block_size)
    seq_lens               : int32 [B], tokens stored per row (this forward's included)
    query_pos              : int32 [B, Q], stored index of each query token, < 0 = pad
    new_key, new_value     : [B, num_kv_heads, Q, head_dim], any strides (optional): this forward's
                             K/V, written at slot_mapping [B, Q] (< 0 = not written); decode
                             does the write in the same launch; multi-token stores first, then
                             reads a row's own tokens from these tensors (TMA on sm90+) and only
                             its cached context from the pool
    pool_addresses         : int64 [2] (optional, decode): the addresses of key_cache and
                             value_cache, read on the device (POOL_ADDRESSES); key_cache /
                             value_cache then give only dtype and strides, so a CUDA graph that
                             captured the launch keeps working when the pools are reallocated
                             (the tensor is updated, not the graph)
    out                    : [B, Q, num_q_heads, head_dim]
    split partials         : fp32 acc [B, Hq, S, D], max / sum-exp [B, Hq, S] (log2 domain)
    cascade (decode)       : int32 chunks [C, 3] = (shared tokens, first member, members), members [B],
                             own_start [B] (kernels/cascade.py); partial slots [0, S_own) are the
                             rows' own parts, [S_own, S_own + S_shared) their chunk's shared prefix

The query heads of one kv head are packed into the rows of a tile (decode: the group,
padded to >= 16 rows; multi-token: tokens x group), so every K/V tile is loaded once per
kv head and feeds a real tl.dot. A KV tile is BLOCK_N consecutive stored positions; each
position looks its block up in the block table, so BLOCK_N is independent of block_size.
Softmax is online in fp32, in the exp2 domain (scores pre-multiplied by log2(e)).

Local attention (USE_WINDOW): a query at stored position p sees keys n <= p with n at or past a
lower bound, _first_visible_key: p - W + 1 for a sliding window of W, or p - p % C with
CHUNKED (Llama 4's chunked attention: only the keys of p's own chunk of C positions). One
integer argument, local_size, carries W or C. Both bounds are non-decreasing in p, so the
first visible key of a tile's first query bounds the whole tile.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
_NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _softcap(s, softcap):
    # softcap * tanh(s / softcap), with tanh written through exp so it lowers everywhere
    # (and in the interpreter); exp overflow to inf still gives tanh = +-1.
    x = s / softcap
    return softcap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _first_visible_key(pos, local_size, CHUNKED: tl.constexpr):
    # The first key position a query at stored position pos may see under local attention: the
    # start of pos's chunk of C = local_size positions, or W - 1 positions back for a window of
    # W = local_size. Both are non-decreasing in pos, so a tile or a row range can take the
    # bound of its first query for all of its rows. (Pad rows, pos < 0, see no key anyway:
    # n <= pos fails first.)
    if CHUNKED:
        return pos - pos % local_size
    else:
        return pos - local_size + 1


@triton.jit
def _pool_base(pool_addresses_ptr, index, like_ptr):
    # The pool's address as the device holds it (pool_addresses), typed as like_ptr; the
    # allocator's blocks are 16-byte aligned, and saying so keeps the K/V loads vectorised.
    return tl.multiple_of(tl.load(pool_addresses_ptr + index).to(tl.pointer_type(like_ptr.dtype.element_ty)), 16)


# True when Triton built this module's kernels for its CPU interpreter (TRITON_INTERPRET=1 at
# import). The interpreter keeps bfloat16 tensors as raw uint16 bit patterns and its tl.dot runs
# np.matmul on those bits (garbage, ~1e8; triton-lang/triton#11584), so when interpreting, the
# tl.dot operands are upcast to fp32 first (fp16 / fp32 results are unchanged: numpy accumulates
# in fp32 either way). A constexpr global: on the GPU it is False and the branch compiles out.
_INTERPRETED = tl.constexpr(type(_softcap).__name__ == "InterpretedFunction")


@triton.jit
def _load_kv_rows(
    row_ptr, dims, n_mask, dim_mask, stride_d,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # Masked positions load 0, never the recycled garbage beyond seq_lens (may be NaN, and
    # 0 * NaN = NaN). Interior tiles (MASK_N False) are known to lie inside seq_lens and
    # skip the predicate work.
    ptrs = row_ptr[:, None] + dims[None, :] * stride_d
    if MASK_N:
        if EVEN_D:
            tile = tl.load(ptrs, mask=n_mask[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=n_mask[:, None] & dim_mask[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=dim_mask[None, :], other=0.0)
    return tile


@triton.jit
def _softmax_step(
    q, k, m_i, l_i, n, n_mask, pos, scale, softcap, local_size,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Scores of q [M, D] against one K tile [BLOCK_N, D] at stored positions n, folded into the
    online softmax; returns (m_new, l_i, p, alpha) for the caller's V update.

    Rows are query rows with stored positions pos [M]; a key n is visible when n_mask (it
    lies in the tile's valid range), n <= pos and, with a window, n > pos - window (with
    CHUNKED, n >= pos - pos % chunk: the same chunk).
    MASKED=False is for interior tiles where every row sees every key: no predicates,
    and no -inf guards (every score is finite there).
    """
    if _INTERPRETED:  # bf16 tl.dot is wrong in the interpreter: see _INTERPRETED
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    if USE_SOFTCAP:
        s = _softcap(s * scale, softcap) * LOG2E
        qk_scale = 1.0
    else:
        # Raw scores stay unscaled; the scale is folded into the exp2 argument (one FMA).
        qk_scale = scale * LOG2E
    if MASKED:
        valid = (n[None, :] <= pos[:, None]) & n_mask[None, :]
        if USE_WINDOW:
            if CHUNKED:
                valid = valid & (n[None, :] >= _first_visible_key(pos, local_size, True)[:, None])
            else:
                # n >= _first_visible_key, written as it always was (the window kernels' code
                # stays the same: p - W + 1 would be one more add)
                valid = valid & (n[None, :] > pos[:, None] - local_size)
        s = tl.where(valid, s, _NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        # A row with no visible key yet keeps m = -inf; avoid (-inf) - (-inf) = NaN.
        m_new_safe = tl.where(m_new == _NEG_INF, 0.0, m_new)
    else:
        m_new_safe = m_new
    p = tl.exp2(s * qk_scale - m_new_safe[:, None])
    alpha = tl.exp2(m_i - m_new_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    return m_new, l_i, p, alpha


@triton.jit
def _attend_tile(
    q, m_i, l_i, acc, start, pos, kv_lo, kv_end,
    key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    scale, softcap, local_size,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    MASK_LO: tl.constexpr,
):
    """One online-softmax step over cached KV positions [start, start + BLOCK_N), read from the
    pool through the block table; keys at or past kv_end (<= seq_len) are masked, and with MASK_LO
    keys before kv_lo too (a cascade row's own part starts after its shared prefix)."""
    n = start + tl.arange(0, BLOCK_N)
    if MASK_LO:
        n_mask = (n >= kv_lo) & (n < kv_end)
    else:
        n_mask = n < kv_end
    # One block-table lookup per position, shared by the K and the V load.
    if MASKED:
        block_id = tl.load(block_table_row + (n // BLOCK_SIZE) * stride_bt_n, mask=n_mask, other=0)
    else:
        block_id = tl.load(block_table_row + (n // BLOCK_SIZE) * stride_bt_n)
    block_id = block_id.to(tl.int64)
    offset = n % BLOCK_SIZE
    k = _load_kv_rows(key_cache_ptr + block_id * stride_kb + offset * stride_kt + kv_head * stride_kh,
                      dims, n_mask, dim_mask, stride_kd, MASKED, EVEN_D)
    m_new, l_i, p, alpha = _softmax_step(q, k, m_i, l_i, n, n_mask, pos, scale, softcap, local_size,
                                         MASKED, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION)
    v = _load_kv_rows(value_cache_ptr + block_id * stride_vb + offset * stride_vt + kv_head * stride_vh,
                      dims, n_mask, dim_mask, stride_vd, MASKED, EVEN_D)
    if _INTERPRETED:  # p rounded to V's dtype as on the GPU, then both operands upcast
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _load_new_rows(
    src, b, kv_head, start, t, dims, dim_mask, num_queries,
    stride_b, stride_h, stride_t, stride_d,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
):
    # [BLOCK_N, BLOCK_D] rows t of this forward's K or V [B, Hkv, Q, D]. TMA: src is a tensor
    # descriptor with block [1, 1, BLOCK_N, BLOCK_D]; rows past Q and columns past D read 0.
    if TMA:
        tile = src.load([b.to(tl.int32), kv_head, start, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        tile = _load_kv_rows(src + b * stride_b + kv_head * stride_h + t * stride_t, dims,
                             (t >= 0) & (t < num_queries), dim_mask, stride_d, MASKED, EVEN_D)
    return tile


@triton.jit
def _attend_new_tile(
    q, m_i, l_i, acc, start, pos, kv_lo, kv_end, new_base,
    new_key, new_value, b, kv_head, dims, dim_mask, num_queries,
    stride_nkb, stride_nkh, stride_nkt, stride_nkd,
    stride_nvb, stride_nvh, stride_nvt, stride_nvd,
    scale, softcap, local_size,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    TMA: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over this forward's tokens t in [start, start + BLOCK_N), read
    from new_key/new_value (contiguous rows: no block-table lookups, TMA where possible). Token t
    is stored at position new_base + t; keys outside [kv_lo, kv_end) are masked. Callers start
    tiles at the row's first real token, so a tile never holds a pad's K/V (which may be anything:
    0 * NaN = NaN); rows past Q read as 0."""
    t = start + tl.arange(0, BLOCK_N)
    n = new_base + t
    n_mask = (n >= kv_lo) & (n < kv_end)
    k = _load_new_rows(new_key, b, kv_head, start, t, dims, dim_mask, num_queries,
                       stride_nkb, stride_nkh, stride_nkt, stride_nkd, BLOCK_N, BLOCK_D, MASKED, EVEN_D, TMA)
    m_new, l_i, p, alpha = _softmax_step(q, k, m_i, l_i, n, n_mask, pos, scale, softcap, local_size,
                                         MASKED, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION)
    v = _load_new_rows(new_value, b, kv_head, start, t, dims, dim_mask, num_queries,
                       stride_nvb, stride_nvh, stride_nvt, stride_nvd, BLOCK_N, BLOCK_D, MASKED, EVEN_D, TMA)
    if _INTERPRETED:  # p rounded to V's dtype as on the GPU, then both operands upcast
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _fold_in_token(q, k, v, m_i, l_i, acc, scale, softcap, USE_SOFTCAP: tl.constexpr):
    """One more key (k, v: [D]) for every row of q [M, D]: an online-softmax step of width 1
    (elementwise, in fp32; a tl.dot needs >= 16 columns)."""
    s = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1)
    if USE_SOFTCAP:
        s = _softcap(s * scale, softcap) * LOG2E
    else:
        s = s * (scale * LOG2E)
    m_new = tl.maximum(m_i, s)  # s is finite, so m_new is too
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new)
    l_i = l_i * alpha + p
    acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)[None, :]
    return m_new, l_i, acc


@triton.jit
def _finish_rows(acc, m_i, l_i, pos, sinks_ptr, head, row_mask, USE_SINKS: tl.constexpr):
    """Normalised output rows of an online softmax (log2 domain). A sink joins the denominator
    only (softmax over [scores, sink]); rows with no visible key or a pad query (pos < 0) give 0."""
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_mask, other=0.0).to(tl.float32) * LOG2E
        m_fin = tl.maximum(m_i, sink)
        rescale = tl.exp2(m_i - m_fin)
        l_i = l_i * rescale + tl.exp2(sink - m_fin)
        acc = acc * rescale[:, None]
    keep = (l_i > 0.0) & (pos >= 0)
    o = acc / tl.where(keep, l_i, 1.0)[:, None]
    return tl.where(keep[:, None], o, 0.0)


@triton.jit
def _decode_program(
    b, kv_head, split, num_splits,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
    block_table_ptr, seq_lens_ptr, query_pos_ptr, sinks_ptr,
    new_key_ptr, new_value_ptr, slot_mapping_ptr, own_start_ptr,
    scale, softcap, local_size,
    tokens_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    stride_nkb, stride_nkh, stride_nkd,
    stride_nvb, stride_nvh, stride_nvd,
    stride_slot_b,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED_STORE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr = False,
    CASCADE: tl.constexpr = False,
    POOL_ADDRESSES: tl.constexpr = False,
):
    # One (row b, kv head, split) of num_splits: the body of _decode_kernel and of the cascade
    # kernel's own-part programs.
    # CASCADE: the row's keys before own_start[b] (its shared prefix) are read by
    # _shared_prefix_program; this program reads [own_start, pos] and always writes partials
    # (SPLIT), the splits cutting the row's own range, for the merge.
    if POOL_ADDRESSES:
        key_cache_ptr = _pool_base(pool_addresses_ptr, 0, key_cache_ptr)
        value_cache_ptr = _pool_base(pool_addresses_ptr, 1, value_cache_ptr)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    pos = tl.load(query_pos_ptr + b * stride_qpos_b).to(tl.int32)
    # Causal: keys 0..pos; pos < 0 (pad query) gives an empty range. With FUSED_STORE the
    # query's own token (position pos) is not read from the cache but taken from new_key /
    # new_value, folded in last, and written to the cache by the last split: one launch per
    # layer instead of a store launch and an attention launch, and no read-after-write.
    if FUSED_STORE:
        kv_end = tl.minimum(seq_len, pos)
    else:
        kv_end = tl.minimum(seq_len, pos + 1)
    kv_begin = 0
    if USE_WINDOW:  # (a pad query, pos < 0, reads nothing: hi <= 0)
        kv_begin = tl.maximum(_first_visible_key(pos, local_size, CHUNKED), 0)
    own = 0
    if CASCADE:
        own = tl.load(own_start_ptr + b).to(tl.int32)
        kv_begin = tl.maximum(kv_begin, own)
    lo = (kv_begin // BLOCK_N) * BLOCK_N
    hi = kv_end
    if CASCADE:
        # Splits of the row's own range (short next to the shared prefix), sized here per row:
        # a captured graph keeps no host bound on it.
        per_split = ((tl.maximum(hi - lo, 1) + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N
        base = lo
        lo = base + split * per_split * BLOCK_N
        if split < num_splits - 1:
            hi = tl.minimum(hi, lo + per_split * BLOCK_N)
    elif SPLIT:
        # tokens_per_split is a multiple of BLOCK_N; the last split runs to the end so a
        # too-small host max_seq_len hint only costs balance, never correctness.
        lo = tl.maximum(lo, split * tokens_per_split)
        if split < num_splits - 1:
            hi = tl.minimum(hi, (split + 1) * tokens_per_split)

    g = tl.arange(0, BLOCK_G)
    head_mask = g < GROUP
    head = kv_head * GROUP + g
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    q = tl.load(
        query_ptr + b * stride_qb + head[:, None] * stride_qh + dims[None, :] * stride_qd,
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(key_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_G], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    block_table_row = block_table_ptr + b * stride_bt_b
    # All rows share the query position; n <= pos holds since hi <= pos + 1, and the
    # window / chunk test is n >= kv_begin.
    pos_rows = tl.full([BLOCK_G], 0, tl.int32) + pos
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, pos_rows, own, hi,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_SIZE, True, HEAD_DIM == BLOCK_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION, CASCADE,
        )

    if FUSED_STORE:
        if split == num_splits - 1:
            nk = tl.load(new_key_ptr + b * stride_nkb + kv_head * stride_nkh + dims * stride_nkd,
                         mask=dim_mask, other=0.0).to(key_cache_ptr.dtype.element_ty)
            nv = tl.load(new_value_ptr + b * stride_nvb + kv_head * stride_nvh + dims * stride_nvd,
                         mask=dim_mask, other=0.0).to(value_cache_ptr.dtype.element_ty)
            slot = tl.load(slot_mapping_ptr + b * stride_slot_b).to(tl.int64)
            if slot >= 0:  # a negative slot is a pad: not stored
                blk = slot // BLOCK_SIZE
                off = slot % BLOCK_SIZE
                tl.store(key_cache_ptr + blk * stride_kb + off * stride_kt + kv_head * stride_kh + dims * stride_kd,
                         nk, mask=dim_mask)
                tl.store(value_cache_ptr + blk * stride_vb + off * stride_vt + kv_head * stride_vh + dims * stride_vd,
                         nv, mask=dim_mask)
            if pos >= 0:  # the query sees its own token (always inside its window or chunk)
                m_i, l_i, acc = _fold_in_token(q, nk, nv, m_i, l_i, acc, scale, softcap, USE_SOFTCAP)

    if SPLIT:
        # Unnormalised partials; the merge kernel rescales them to a common max.
        pa = part_acc_ptr + b * stride_pb + head[:, None] * stride_ph + split * stride_ps + dims[None, :] * stride_pd
        tl.store(pa, acc, mask=head_mask[:, None] & dim_mask[None, :])
        pm = b * stride_mb + head * stride_mh + split * stride_ms
        tl.store(part_max_ptr + pm, m_i, mask=head_mask)
        tl.store(part_sum_ptr + pm, l_i, mask=head_mask)
    else:
        o = _finish_rows(acc, m_i, l_i, pos, sinks_ptr, head, head_mask, USE_SINKS)
        tl.store(
            out_ptr + b * stride_ob + head[:, None] * stride_oh + dims[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=head_mask[:, None] & dim_mask[None, :],
        )


@triton.jit
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
    block_table_ptr, seq_lens_ptr, query_pos_ptr, sinks_ptr,
    new_key_ptr, new_value_ptr, slot_mapping_ptr,
    scale, softcap, local_size,
    tokens_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    stride_nkb, stride_nkh, stride_nkd,
    stride_nvb, stride_nvh, stride_nvd,
    stride_slot_b,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    SPLIT: tl.constexpr,
    FUSED_STORE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr = False,
    POOL_ADDRESSES: tl.constexpr = False,
):
    # One program per (row, kv head, split): see _decode_program (no CASCADE: own_start unread).
    _decode_program(
        tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
        out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, query_ptr, key_cache_ptr, value_cache_ptr,
        pool_addresses_ptr, block_table_ptr, seq_lens_ptr, query_pos_ptr, sinks_ptr, new_key_ptr,
        new_value_ptr, slot_mapping_ptr, seq_lens_ptr, scale, softcap, local_size, tokens_per_split,
        stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt,
        stride_vh, stride_vd, stride_bt_b, stride_bt_n, stride_qpos_b, stride_ob, stride_oh, stride_od,
        stride_pb, stride_ph, stride_ps, stride_pd, stride_mb, stride_mh, stride_ms, stride_nkb, stride_nkh,
        stride_nkd, stride_nvb, stride_nvh, stride_nvd, stride_slot_b, GROUP, HEAD_DIM, BLOCK_G, BLOCK_D,
        BLOCK_N, BLOCK_SIZE, USE_WINDOW, USE_SOFTCAP, USE_SINKS, SPLIT, FUSED_STORE, DOT_PRECISION, CHUNKED,
        False, POOL_ADDRESSES,
    )


@triton.jit
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, query_pos_ptr, sinks_ptr, own_start_ptr,
    num_splits, num_shared_splits,
    stride_qpos_b,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_SINKS: tl.constexpr,
    CASCADE: tl.constexpr = False,
):
    # Partial slots [0, num_splits) are the decode kernel's; with CASCADE the next
    # num_shared_splits are the shared-prefix programs', written only for rows in a chunk
    # (own_start > 0): other rows' shared slots hold stale data and are not read.
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    if CASCADE:
        in_chunk = tl.load(own_start_ptr + b) > 0
        split_mask = splits < num_splits + tl.where(in_chunk, num_shared_splits, 0)
    else:
        split_mask = splits < num_splits
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM

    pm = b * stride_mb + head * stride_mh + splits * stride_ms
    m = tl.load(part_max_ptr + pm, mask=split_mask, other=_NEG_INF)
    l = tl.load(part_sum_ptr + pm, mask=split_mask, other=0.0)
    m_max = tl.max(m, 0)
    if USE_SINKS:
        sink = tl.load(sinks_ptr + head).to(tl.float32) * LOG2E
        m_max = tl.maximum(m_max, sink)
    m_safe = tl.where(m_max == _NEG_INF, 0.0, m_max)
    weight = tl.exp2(m - m_safe)  # empty splits have m = -inf -> weight 0
    denom = tl.sum(weight * l, 0)
    if USE_SINKS:
        denom += tl.exp2(sink - m_safe)
    acc = tl.load(
        part_acc_ptr + b * stride_pb + head * stride_ph + splits[:, None] * stride_ps + dims[None, :] * stride_pd,
        mask=split_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    o = tl.sum(acc * weight[:, None], 0)
    pos = tl.load(query_pos_ptr + b * stride_qpos_b)
    keep = (denom > 0.0) & (pos >= 0)
    o = tl.where(keep, o / tl.where(keep, denom, 1.0), 0.0)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + dims * stride_od, o.to(out_ptr.dtype.element_ty), mask=dim_mask)


@triton.jit
def _shared_prefix_program(
    slot, sub, kv_head, split, num_splits,
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
    block_table_ptr, query_pos_ptr, chunks_ptr, members_ptr,
    scale, softcap, local_size,
    first_slot,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    POOL_ADDRESSES: tl.constexpr = False,
):
    if POOL_ADDRESSES:  # (see _decode_program)
        key_cache_ptr = _pool_base(pool_addresses_ptr, 0, key_cache_ptr)
        value_cache_ptr = _pool_base(pool_addresses_ptr, 1, value_cache_ptr)
    # Cascade decode, the shared part: one program per (chunk slot, subtile, kv head, split).
    # A chunk (kernels/cascade.py) is rows whose first S stored tokens sit in the same blocks;
    # tile row r = (member sub * ROWS + r // GROUP, head r % GROUP of this kv head), so one K/V
    # tile of the prefix, read through the first member's block table, feeds the query heads of
    # up to ROWS rows in one tl.dot. Writes each row's unnormalised partial (acc, max, sum-exp:
    # log2 domain) at slot first_slot + split, after the decode kernel's own-part slots.
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    shared_len = tl.load(chunks_ptr + slot * 3).to(tl.int32)
    first = tl.load(chunks_ptr + slot * 3 + 1)
    count = tl.load(chunks_ptr + slot * 3 + 2)
    if (shared_len > 0) & (sub * ROWS < count):  # unused slots (S = 0) and subtiles do nothing
        r = tl.arange(0, BLOCK_M)
        member = sub * ROWS + r // GROUP
        row_mask = (r < ROWS * GROUP) & (member < count)
        b = tl.load(members_ptr + first + member, mask=row_mask, other=0).to(tl.int64)
        head = kv_head * GROUP + r % GROUP
        dims = tl.arange(0, BLOCK_D)
        dim_mask = dims < HEAD_DIM
        pos = tl.load(query_pos_ptr + b * stride_qpos_b, mask=row_mask, other=-1).to(tl.int32)
        q = tl.load(
            query_ptr + b[:, None] * stride_qb + head[:, None] * stride_qh + dims[None, :] * stride_qd,
            mask=row_mask[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(key_cache_ptr.dtype.element_ty)
        leader = tl.load(members_ptr + first).to(tl.int64)
        block_table_row = block_table_ptr + leader * stride_bt_b

        lo = 0
        if USE_WINDOW:  # from the first visible key of the chunk's earliest query
            first_pos = tl.min(tl.where(row_mask, pos, shared_len), 0)
            lo = (tl.maximum(_first_visible_key(first_pos, local_size, CHUNKED), 0) // BLOCK_N) * BLOCK_N
        per_split = ((tl.maximum(shared_len - lo, 1) + num_splits - 1) // num_splits + BLOCK_N - 1) // BLOCK_N
        lo = lo + split * per_split * BLOCK_N
        hi = shared_len
        if split < num_splits - 1:
            hi = tl.minimum(hi, lo + per_split * BLOCK_N)

        m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        masked_start = lo
        if not USE_WINDOW:
            # Whole tiles below S: every member sees every key (S <= each query position).
            masked_start = tl.maximum(lo, tl.minimum(hi, (shared_len // BLOCK_N) * BLOCK_N))
            for start in range(lo, masked_start, BLOCK_N):
                m_i, l_i, acc = _attend_tile(
                    q, m_i, l_i, acc, start, pos, 0, shared_len,
                    key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
                    stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                    scale, softcap, local_size,
                    BLOCK_N, BLOCK_SIZE, False, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION, False,
                )
        # The prefix's partial last tile, and with a window every tile (masked per row).
        for start in range(masked_start, hi, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start, pos, 0, shared_len,
                key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                scale, softcap, local_size,
                BLOCK_N, BLOCK_SIZE, True, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION, False,
            )
        ps = first_slot + split
        tl.store(part_acc_ptr + b[:, None] * stride_pb + head[:, None] * stride_ph + ps * stride_ps
                 + dims[None, :] * stride_pd, acc, mask=row_mask[:, None] & dim_mask[None, :])
        pm = b * stride_mb + head * stride_mh + ps * stride_ms
        tl.store(part_max_ptr + pm, m_i, mask=row_mask)
        tl.store(part_sum_ptr + pm, l_i, mask=row_mask)


@triton.jit
def _cascade_decode_kernel(
    part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
    block_table_ptr, seq_lens_ptr, query_pos_ptr, chunks_ptr, members_ptr, own_start_ptr,
    new_key_ptr, new_value_ptr, slot_mapping_ptr,
    scale, softcap, local_size,
    num_kv_heads, own_splits, shared_splits, num_shared_programs,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    stride_nkb, stride_nkh, stride_nkd,
    stride_nvb, stride_nvh, stride_nvd,
    stride_slot_b,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROWS: tl.constexpr,
    SUBTILES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SHARED_BLOCK_N: tl.constexpr,
    OWN_BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    FUSED_STORE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    POOL_ADDRESSES: tl.constexpr = False,
):
    # Cascade decode, both partial parts in one launch (the merge follows as its own launch): a
    # 1-D grid whose first num_shared_programs programs are the shared prefixes' (chunk slot x
    # subtile, kv head, split), split fastest, and the rest the rows' own parts (row, kv head,
    # split), split fastest. The longer shared-prefix programs come first, so they start in the
    # first wave; one launch per layer fewer than running the two parts as two kernels.
    pid = tl.program_id(0)
    if pid < num_shared_programs:
        split = pid % shared_splits
        kv_head = (pid // shared_splits) % num_kv_heads
        tile = pid // (shared_splits * num_kv_heads)
        _shared_prefix_program(
            tile // SUBTILES, tile % SUBTILES, kv_head, split, shared_splits,
            part_acc_ptr, part_max_ptr, part_sum_ptr, query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
            block_table_ptr, query_pos_ptr, chunks_ptr, members_ptr, scale, softcap, local_size, own_splits,
            stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
            stride_vb, stride_vt, stride_vh, stride_vd, stride_bt_b, stride_bt_n, stride_qpos_b,
            stride_pb, stride_ph, stride_ps, stride_pd, stride_mb, stride_mh, stride_ms,
            GROUP, HEAD_DIM, ROWS, BLOCK_M, BLOCK_D, SHARED_BLOCK_N, BLOCK_SIZE, USE_WINDOW, CHUNKED, USE_SOFTCAP,
            DOT_PRECISION, POOL_ADDRESSES,
        )
    else:
        own = pid - num_shared_programs
        split = own % own_splits
        kv_head = (own // own_splits) % num_kv_heads
        b = (own // (own_splits * num_kv_heads)).to(tl.int64)
        # out and sinks are read only without SPLIT (the merge applies the sinks)
        _decode_program(
            b, kv_head, split, own_splits,
            part_acc_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
            query_ptr, key_cache_ptr, value_cache_ptr, pool_addresses_ptr,
            block_table_ptr, seq_lens_ptr, query_pos_ptr, query_ptr,
            new_key_ptr, new_value_ptr, slot_mapping_ptr, own_start_ptr,
            scale, softcap, local_size, 0,
            stride_qb, stride_qh, stride_qd, stride_kb, stride_kt, stride_kh, stride_kd,
            stride_vb, stride_vt, stride_vh, stride_vd, stride_bt_b, stride_bt_n, stride_qpos_b,
            0, 0, 0,
            stride_pb, stride_ph, stride_ps, stride_pd, stride_mb, stride_mh, stride_ms,
            stride_nkb, stride_nkh, stride_nkd, stride_nvb, stride_nvh, stride_nvd, stride_slot_b,
            GROUP, HEAD_DIM, BLOCK_G, BLOCK_D, OWN_BLOCK_N, BLOCK_SIZE, USE_WINDOW, USE_SOFTCAP, False, True,
            FUSED_STORE, DOT_PRECISION, CHUNKED, True, POOL_ADDRESSES,
        )


@triton.jit
def _attend_context(
    q, m_i, l_i, acc, pos, first_pos, cache_end,
    key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    scale, softcap, local_size,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Keys at positions [0, cache_end) (the cached context), from the pool."""
    if USE_WINDOW:
        # Every row's first visible key is at or past the first real query's (non-decreasing).
        lo = tl.maximum(_first_visible_key(first_pos, local_size, CHUNKED), 0)
        masked_start = (lo // BLOCK_N) * BLOCK_N
    else:
        # Interior tiles: every key is <= the first real query's position, so all rows
        # (pad rows too: their output is zeroed at the end) see all of it, unmasked.
        masked_start = (tl.minimum(first_pos + 1, cache_end) // BLOCK_N) * BLOCK_N
        for start in range(0, masked_start, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start, pos, 0, cache_end,
                key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                scale, softcap, local_size,
                BLOCK_N, BLOCK_SIZE, False, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION, False,
            )
    # Diagonal / window- or chunk-edge / context-edge tiles.
    for start in range(masked_start, cache_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, pos, 0, cache_end,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_SIZE, True, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION, False,
        )
    return m_i, l_i, acc


@triton.jit
def _attend_own_tokens(
    q, m_i, l_i, acc, pos, first_pos, ctx_len, kv_end, new_base,
    new_key, new_value, b, kv_head, dims, dim_mask, num_queries,
    stride_nkb, stride_nkh, stride_nkt, stride_nkd,
    stride_nvb, stride_nvh, stride_nvt, stride_nvd,
    scale, softcap, local_size,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    EVEN_D: tl.constexpr,
    NEW_TMA: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CHUNKED: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Keys at positions [ctx_len, kv_end): this forward's tokens, from new_key/new_value.

    Token t is at position new_base + t; the row's real tokens are t >= pads. Tiles start at
    pads + k * BLOCK_N (TMA and pointer loads take any start), so no tile holds a pad."""
    pads = ctx_len - new_base
    t_end = kv_end - new_base
    if USE_WINDOW:
        t_lo = tl.maximum(_first_visible_key(first_pos, local_size, CHUNKED) - new_base, pads)
        masked_start = pads + ((t_lo - pads) // BLOCK_N) * BLOCK_N
    else:
        # [pads, masked_start): keys every real row sees (<= the first real query), unmasked.
        masked_start = pads + (tl.maximum(tl.minimum(first_pos + 1 - new_base, t_end) - pads, 0)
                               // BLOCK_N) * BLOCK_N
        for start in range(pads, masked_start, BLOCK_N):
            m_i, l_i, acc = _attend_new_tile(
                q, m_i, l_i, acc, start, pos, ctx_len, kv_end, new_base,
                new_key, new_value, b, kv_head, dims, dim_mask, num_queries,
                stride_nkb, stride_nkh, stride_nkt, stride_nkd, stride_nvb, stride_nvh, stride_nvt, stride_nvd,
                scale, softcap, local_size,
                BLOCK_N, BLOCK_D, False, EVEN_D, NEW_TMA, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
            )
    # The causal diagonal / window- or chunk-edge tiles.
    for start in range(masked_start, t_end, BLOCK_N):
        m_i, l_i, acc = _attend_new_tile(
            q, m_i, l_i, acc, start, pos, ctx_len, kv_end, new_base,
            new_key, new_value, b, kv_head, dims, dim_mask, num_queries,
            stride_nkb, stride_nkh, stride_nkt, stride_nkd, stride_nvb, stride_nvh, stride_nvt, stride_nvd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_D, True, EVEN_D, NEW_TMA, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
        )
    return m_i, l_i, acc


@triton.jit
def _multi_token_kernel(
    out_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr,
    block_table_ptr, seq_lens_ptr, query_pos_ptr, sinks_ptr,
    ctx_lens_ptr, new_key, new_value,
    scale, softcap, local_size,
    num_queries,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b, stride_qpos_t,
    stride_ob, stride_ot, stride_oh, stride_od,
    stride_nkb, stride_nkh, stride_nkt, stride_nkd,
    stride_nvb, stride_nvh, stride_nvt, stride_nvd,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_SINKS: tl.constexpr,
    HAS_CONTEXT: tl.constexpr,
    HAS_NEW: tl.constexpr,
    NEW_TMA: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHUNKED: tl.constexpr = False,
):
    # Keys come from two places. Positions below ctx_len (the cached context: a shared prefix,
    # earlier turns) are read from the pool through the block table. With HAS_NEW, this
    # forward's own tokens, at positions [ctx_len, seq_len), are read from new_key/new_value:
    # token t of the row is stored at position seq_len - Q + t (ctx_lens says where that holds),
    # so its rows are contiguous in memory and load without block-table lookups, by TMA on
    # Hopper. The pool holds the same values (the store runs first), so either source is exact.
    # HAS_CONTEXT=False (a prompt forward: no row has a cached context) compiles the pool phase
    # out: its loops would cost the own-token loops registers (spills at BLOCK_M 256).
    # Heaviest (latest) query tiles first: with causal masking they have the most keys.
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    # Tile row r = (query token r // GROUP, head r % GROUP of this kv group).
    r = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + r // GROUP
    row_mask = (r < BLOCK_Q * GROUP) & (token < num_queries)
    head = kv_head * GROUP + r % GROUP
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    pos = tl.load(query_pos_ptr + b * stride_qpos_b + token * stride_qpos_t, mask=row_mask, other=-1).to(tl.int32)
    q = tl.load(
        query_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :] * stride_qd,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(key_cache_ptr.dtype.element_ty)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    if HAS_NEW:
        ctx_len = tl.load(ctx_lens_ptr + b).to(tl.int32)
    else:
        ctx_len = seq_len

    # KV range of the whole tile: fully masked tiles (past the causal frontier of the
    # last real query, or before the window or chunk of the first) are never visited. Pad rows
    # (pos = -1, e.g. left padding) do not widen it; an all-pad tile visits nothing.
    kv_end = tl.minimum(seq_len, tl.max(pos, 0) + 1)
    # First real query position (seq_len when the tile is all pads: no overflow, and
    # every range below is then empty or non-negative).
    first_pos = tl.min(tl.where(pos >= 0, pos, seq_len), 0)

    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if HAS_CONTEXT:
        m_i, l_i, acc = _attend_context(
            q, m_i, l_i, acc, pos, first_pos, tl.minimum(ctx_len, kv_end),
            key_cache_ptr, value_cache_ptr, block_table_ptr + b * stride_bt_b, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_SIZE, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
        )
    if HAS_NEW:
        m_i, l_i, acc = _attend_own_tokens(
            q, m_i, l_i, acc, pos, first_pos, ctx_len, kv_end, seq_len - num_queries,
            new_key, new_value, b, kv_head, dims, dim_mask, num_queries,
            stride_nkb, stride_nkh, stride_nkt, stride_nkd, stride_nvb, stride_nvh, stride_nvt, stride_nvd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_D, EVEN_D, NEW_TMA, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
        )

    o = _finish_rows(acc, m_i, l_i, pos, sinks_ptr, head, row_mask, USE_SINKS)
    if not HAS_CONTEXT:
        # Launched as a prompt forward (no row has a cached context): a row that does after all
        # (a wrong max_context_len) gets NaN, never a quietly wrong number.
        o = tl.where(ctx_len == 0, o, float("nan"))
    tl.store(
        out_ptr + b * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :] * stride_od,
        o.to(out_ptr.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )
