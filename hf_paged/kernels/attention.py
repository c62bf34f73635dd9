"""Triton paged attention: decode (one query token, optional split-KV) and multi-token.

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
    out                    : [B, Q, num_q_heads, head_dim]
    split partials         : fp32 acc [B, Hq, S, D], max / sum-exp [B, Hq, S] (log2 domain)

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


import torch
import triton
import triton.language as tl

from . import cdiv, check_device, context_lens, next_pow2
from .reference import check_local_attention
from .store import store_kv

try:  # Triton >= 3.4: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None

LOG2E = tl.constexpr(1.4426950408889634)
_NEG_INF = tl.constexpr(float("-inf"))

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


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
    q, m_i, l_i, acc, start, pos, kv_end,
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
):
    """One online-softmax step over cached KV positions [start, start + BLOCK_N), read from the
    pool through the block table; keys at or past kv_end (<= seq_len) are masked."""
    n = start + tl.arange(0, BLOCK_N)
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
def _decode_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr,
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
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

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
    lo = (kv_begin // BLOCK_N) * BLOCK_N
    hi = kv_end
    if SPLIT:
        # tokens_per_split is a multiple of BLOCK_N; the last split runs to the end so a
        # too-small host max_seq_len hint only costs balance, never correctness.
        lo = tl.maximum(lo, split * tokens_per_split)
        if split < tl.num_programs(2) - 1:
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
            q, m_i, l_i, acc, start, pos_rows, hi,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_SIZE, True, HEAD_DIM == BLOCK_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
        )

    if FUSED_STORE:
        if split == tl.num_programs(2) - 1:
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
def _merge_splits_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, query_pos_ptr, sinks_ptr,
    num_splits,
    stride_qpos_b,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    USE_SINKS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
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
                q, m_i, l_i, acc, start, pos, cache_end,
                key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                scale, softcap, local_size,
                BLOCK_N, BLOCK_SIZE, False, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
            )
    # Diagonal / window- or chunk-edge / context-edge tiles.
    for start in range(masked_start, cache_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, pos, cache_end,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, local_size,
            BLOCK_N, BLOCK_SIZE, True, EVEN_D, USE_WINDOW, CHUNKED, USE_SOFTCAP, DOT_PRECISION,
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


# ----------------------------------------------------------------------------- host side

# Fixed launch configs (no autotuning: no first-call benchmarking, no sync), keyed on
# padded head_dim and dtype width. Tuned for H100/H200; values are (BLOCK_N, warps, stages)
# for decode and (BLOCK_M, BLOCK_N, warps, stages) for multi-token.
def _decode_config(block_d: int, elem_bytes: int) -> tuple[int, int, int]:
    # H200 bf16 D=128: BLOCK_N 64 / 4 warps / 3 stages reads K/V at 97-99% of copy
    # bandwidth (BLOCK_N 32: 83-89%, 128: 91-94%, 8 warps: 67-85%).
    if block_d <= 128:
        return (64, 4, 3) if elem_bytes <= 2 else (32, 4, 3)
    return (32, 4, 3) if elem_bytes <= 2 else (16, 4, 2)


def _multi_token_config(block_d: int, elem_bytes: int, kind: str = "pool") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the multi-token kernel; kind is what it reads:
    "pool" (every key from the pool), "prompt" (every key from this forward's K/V) or "both"."""
    if elem_bytes > 2:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return (128, 64, 4, 3)
    if block_d <= 128:
        # H200, Llama-8B 8 x 2k causal (BENCH_SWEEP=prefill, docs/performance.md), time / SDPA's:
        # prompt: m128/n64/w4/s2 1.21x (98 KB of shared memory: two CTAs per SM overlap one's
        #   softmax with the other's MMAs), m256/n64/w8/s3 1.31x, m128/n128/w8/s3 1.31x;
        # both (the pool phase compiled in): m128/n64/w4/s2 1.39x but spills in its pool loop,
        #   m256/n64/w16/s3 1.40x;
        # pool: m256/n64/w8/s3 1.45x (best), m256/n64/w16 1.45x, m128/n128/w8 1.61x.
        return {"prompt": (128, 64, 4, 2), "both": (256, 64, 16, 3)}.get(kind, (256, 64, 8, 3))
    return (64, 32, 8, 2)


_DEVICE_PROPERTIES: dict[int, object] = {}


def _cuda_properties(device: torch.device):
    """torch.cuda.get_device_properties, read once per device (it costs microseconds per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_PROPERTIES:
        _DEVICE_PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _DEVICE_PROPERTIES[index]


# Whether the multi-token kernel reads this forward's K/V by TMA (tensor descriptors): None =
# where the GPU has it (compute capability >= 9.0, a Triton with tensor descriptors). Tests set
# True / False to run either path (the interpreter runs both).
NEW_KV_TMA: bool | None = None


def _new_kv_tma(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if NEW_KV_TMA is not None:
        return NEW_KV_TMA
    return device.type == "cuda" and _cuda_properties(device).major >= 9


def _tma_compatible(t: torch.Tensor) -> bool:
    # What a TMA descriptor needs: unit last stride, other strides and the base 16-byte aligned.
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * size % 16 == 0 for st in t.stride()[:-1]))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but still exercises the split path when asked
    return _cuda_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Split-KV factor from host-side shapes only (never reads device tensors).

    Splits only when the (row, kv head) programs cannot give every SM one (two programs fit
    on an SM at once, so up to 2 x SMs still run in one wave) and each split would still get
    a useful run of >= 4 KV tiles. Not splitting also saves the merge launch, which matters
    for the per-step host time of mid-sized batches (32 rows x 8 kv heads on 132 SMs).
    """
    programs = batch * num_kv_heads
    if programs >= num_sms:
        return 1
    # Power-of-two split counts measured best on H200 (8 x 32k: 16 splits 87% of copy
    # bandwidth, 9 splits 78%: uneven waves).
    want = next_pow2(cdiv(4 * num_sms, max(programs, 1)))
    by_length = max_context // (4 * block_n)
    splits = max(1, min(want, by_length, 128))
    return 1 << (splits.bit_length() - 1)


def _check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks,
                          new_key, new_value, slot_mapping):
    if query.dim() != 4:
        raise ValueError(f"query must be [B, num_q_heads, Q, head_dim], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError(
            "key_cache/value_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
            f"{tuple(key_cache.shape)} and {tuple(value_cache.shape)}"
        )
    batch, num_q_heads, num_queries, head_dim = query.shape
    _, block_size, num_kv_heads, cache_dim = key_cache.shape
    if cache_dim != head_dim:
        raise ValueError(f"query head_dim {head_dim} != cache head_dim {cache_dim}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {head_dim} is not supported by the Triton paged attention: head_dim must be <= {MAX_HEAD_DIM} (e.g. 64, 80, 96, 128, 256)")
    if block_size % 16 != 0:
        raise ValueError(f"block_size {block_size} is not supported by the Triton paged attention: it must be a multiple of 16 (e.g. 16, 32)")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} is not supported: use float16, bfloat16 or float32")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"num_q_heads {num_q_heads} is not a multiple of num_kv_heads {num_kv_heads}")
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be [B={batch}, max_blocks], got {tuple(block_table.shape)}")
    if tuple(seq_lens.shape) != (batch,):
        raise ValueError(f"seq_lens must be [B={batch}], got {tuple(seq_lens.shape)}")
    if tuple(query_pos.shape) != (batch, num_queries):
        raise ValueError(f"query_pos must be [B, Q] = {(batch, num_queries)}, got {tuple(query_pos.shape)}")
    if sinks is not None and tuple(sinks.shape) != (num_q_heads,):
        raise ValueError(f"sinks must be [num_q_heads={num_q_heads}], got {tuple(sinks.shape)}")
    given = (new_key is not None, new_value is not None, slot_mapping is not None)
    if any(given) and not all(given):
        raise ValueError("new_key, new_value and slot_mapping go together: pass all three or none")
    if new_key is not None:
        want = (batch, num_kv_heads, num_queries, head_dim)
        if tuple(new_key.shape) != want or tuple(new_value.shape) != want:
            raise ValueError(f"new_key/new_value must be [B, num_kv_heads, Q, head_dim] = {want}, got "
                             f"{tuple(new_key.shape)} and {tuple(new_value.shape)}")
        if tuple(slot_mapping.shape) != (batch, num_queries):
            raise ValueError(f"slot_mapping must be [B, Q] = {(batch, num_queries)}, got {tuple(slot_mapping.shape)}")


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    new_key: torch.Tensor | None = None,
    new_value: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
    plans: dict | None = None,
    max_context_len: int | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over the paged cache; returns [B, Q, Hq, D].

    chunk_size: chunked attention (Llama 4): a query at position p sees only the keys of its own
    chunk, p // chunk_size == n // chunk_size (and n <= p). Not together with sliding_window.
    max_seq_len: optional host int >= max(seq_lens), only used to size split-KV.
    new_key / new_value [B, Hkv, Q, D] and slot_mapping [B, Q]: this forward's K/V, first stored
    at slot_mapping (negative = not stored) exactly as store_kv does; for decode (Q == 1) the
    store happens inside the attention launch.
    plans: a dict the caller keeps for one forward pass (one block_table, seq_lens, query_pos,
    slot_mapping and max_seq_len): the launch worked out (checked, configured) for the first
    layer is reused by every later layer of the same shapes, so a layer costs one launch of host
    work. Without it every call is checked and configured afresh.
    max_context_len: optional host int >= every row's cached context (its stored tokens before
    this forward's); 0 marks a prompt forward, launched without the pool phase (faster). A row
    that has a context after all gets NaN, never a quietly wrong number.
    num_kv_splits / block_n / block_m: keyword-only overrides of the launch config
    (tests and benchmarks); by default they come from the fixed config table.
    """
    launch = None
    if plans is not None:
        key = (query.shape, query.stride(), query.dtype, query.device, key_cache.shape, key_cache.stride(),
               key_cache.dtype, value_cache.stride(), scale, sliding_window, softcap, sinks is None,
               None if out is None else (out.shape, out.stride()),
               None if new_key is None else (new_key.stride(), new_value.stride()),
               num_kv_splits, block_n, block_m, max_context_len == 0, chunk_size)
        launch = plans.get(key)
    if launch is None:
        launch = _plan(query, key_cache, value_cache, block_table, seq_lens, query_pos, scale, sliding_window,
                       softcap, sinks, out, max_seq_len, new_key, new_value, slot_mapping,
                       num_kv_splits, block_n, block_m, max_context_len, chunk_size)
        if plans is not None:
            plans[key] = launch
    return launch(query, key_cache, value_cache, sinks, out, new_key, new_value)


def _plan(query, key_cache, value_cache, block_table, seq_lens, query_pos, scale, sliding_window, softcap, sinks,
          out, max_seq_len, new_key, new_value, slot_mapping, num_kv_splits, block_n, block_m, max_context_len,
          chunk_size=None):
    """Check the arguments and work out one launch; returns launch(query, key_cache, value_cache,
    sinks, out, new_key, new_value) -> out, valid for tensors of the same shapes, strides, dtypes
    and device with the same block_table, seq_lens, query_pos and slot_mapping."""
    extra = tuple(t for t in (sinks, new_key, new_value, slot_mapping) if t is not None)
    check_device(query, key_cache, value_cache, block_table, seq_lens, query_pos, *extra)
    _check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks,
                          new_key, new_value, slot_mapping)
    check_local_attention(sliding_window, chunk_size)
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")

    batch, num_q_heads, num_queries, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    out_shape = (batch, num_queries, num_q_heads, head_dim)
    if out is not None and tuple(out.shape) != out_shape:
        raise ValueError(f"out must be [B, Q, Hq, D] = {out_shape}, got {tuple(out.shape)}")
    dtype, device = query.dtype, query.device

    def new_out(out):
        return torch.empty(out_shape, dtype=dtype, device=device) if out is None else out

    if batch == 0 or num_queries == 0:
        return lambda query, key_cache, value_cache, sinks, out, new_key, new_value: new_out(out)

    block_d = max(16, next_pow2(head_dim))
    elem_bytes = key_cache.element_size()
    # fp32 must not silently drop to tf32 on the tensor cores; 16-bit inputs ignore it.
    dot_precision = "ieee" if key_cache.dtype == torch.float32 else None
    # A chunk is a variant of the window (another first visible key): USE_WINDOW, and CHUNKED
    # says which; local_size carries W or C.
    flags = dict(
        USE_WINDOW=sliding_window is not None or chunk_size is not None,
        CHUNKED=chunk_size is not None,
        USE_SOFTCAP=softcap is not None,
        USE_SINKS=sinks is not None,
        DOT_PRECISION=dot_precision,
    )
    scalars = (float(scale), float(softcap or 1.0), int(sliding_window or chunk_size or 0))
    # Strides of out as launched: ours is contiguous, a caller's has its strides in the plan key.
    out_strides = out.stride() if out is not None else (
        num_queries * num_q_heads * head_dim, num_q_heads * head_dim, head_dim, 1)
    fixed_tensors = (block_table, seq_lens, query_pos)

    if num_queries == 1:
        cfg_n, num_warps, num_stages = _decode_config(block_d, elem_bytes)
        block_n = block_n or cfg_n
        if max_seq_len is None:
            max_seq_len = block_table.shape[1] * block_size
        if num_kv_splits is None:
            num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, block_n, _num_sms(device))
        else:
            num_splits = max(1, int(num_kv_splits))
        tokens_per_split = cdiv(cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
        fused = new_key is not None
        slot = slot_mapping if fused else query_pos  # never read without FUSED_STORE
        strides = (
            query.stride(0), query.stride(1), query.stride(3),
            *key_cache.stride(), *value_cache.stride(),
            *block_table.stride(),
            query_pos.stride(0),
            out_strides[0], out_strides[2], out_strides[3],
        )
        new_strides = (
            (new_key.stride(0), new_key.stride(1), new_key.stride(3),
             new_value.stride(0), new_value.stride(1), new_value.stride(3), slot_mapping.stride(0))
            if fused else (0,) * 7
        )
        meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_G=max(16, next_pow2(group)), BLOCK_D=block_d,
                    BLOCK_N=block_n, BLOCK_SIZE=block_size, num_warps=num_warps, num_stages=num_stages,
                    SPLIT=num_splits > 1, FUSED_STORE=fused, **flags)
        if num_splits == 1:
            grid = (batch, num_kv_heads, 1)

            def launch(query, key_cache, value_cache, sinks, out, new_key, new_value):
                out = new_out(out)
                _decode_kernel[grid](
                    out, out, out, out,  # partial buffers unused
                    query, key_cache, value_cache, *fixed_tensors,
                    query if sinks is None else sinks,
                    query if new_key is None else new_key, query if new_value is None else new_value, slot,
                    *scalars, tokens_per_split, *strides, 0, 0, 0, 0, 0, 0, 0, *new_strides, **meta,
                )
                return out
            return launch

        # Split-KV partials: one buffer per plan, reused layer after layer (stream order keeps
        # a layer's merge ahead of the next layer's decode).
        part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device)
        part_max = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device)
        part_sum = torch.empty_like(part_max)
        grid = (batch, num_kv_heads, num_splits)
        part_strides = (*part_acc.stride(), *part_max.stride())
        merge_args = (num_splits, query_pos.stride(0), out_strides[0], out_strides[2], out_strides[3], *part_strides)
        merge_meta = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(num_splits)),
                          USE_SINKS=sinks is not None, num_warps=4)

        def launch_split(query, key_cache, value_cache, sinks, out, new_key, new_value):
            out = new_out(out)
            sinks_arg = query if sinks is None else sinks
            _decode_kernel[grid](
                out, part_acc, part_max, part_sum,
                query, key_cache, value_cache, *fixed_tensors, sinks_arg,
                query if new_key is None else new_key, query if new_value is None else new_value, slot,
                *scalars, tokens_per_split, *strides, *part_strides, *new_strides, **meta,
            )
            _merge_splits_kernel[(batch, num_q_heads)](
                out, part_acc, part_max, part_sum, query_pos, sinks_arg, *merge_args, **merge_meta,
            )
            return out
        return launch_split

    has_new = new_key is not None
    has_context = not (has_new and max_context_len == 0)
    kind = ("both" if has_context else "prompt") if has_new else "pool"
    cfg_m, cfg_n, num_warps, num_stages = _multi_token_config(block_d, elem_bytes, kind)
    block_n = block_n or cfg_n
    block_m = block_m or cfg_m
    # Short verify steps (a few draft tokens): shrink the tile to what is there.
    block_m = max(16, min(block_m, next_pow2(num_queries * group)))
    block_m = max(block_m, next_pow2(group))  # a tile holds at least one whole group
    block_q = block_m // group
    grid = (cdiv(num_queries, block_q), num_kv_heads, batch)
    strides = (*query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
               *query_pos.stride(), *out_strides)
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=block_d,
                BLOCK_N=block_n, BLOCK_SIZE=block_size, num_warps=num_warps, num_stages=num_stages, **flags)

    # Where each row's own tokens start (on the device, no sync): they are read from new_key/new_value.
    ctx_lens = context_lens(seq_lens, query_pos) if has_new else seq_lens
    new_strides = (*new_key.stride(), *new_value.stride()) if has_new else (0,) * 8
    tma_wanted = has_new and _new_kv_tma(device)
    tma_box = [1, 1, block_n, block_d]

    def launch_multi(query, key_cache, value_cache, sinks, out, new_key, new_value):
        out = new_out(out)
        new_k = new_v = query  # never read without HAS_NEW
        tma = False
        if new_key is not None:
            # The pool must hold this forward's tokens for later steps; this launch reads them
            # from new_key/new_value (or from the pool, for rows ctx_lens sends there).
            store_kv(new_key, new_value, key_cache, value_cache, slot_mapping)
            new_k, new_v = new_key, new_value
            tma = tma_wanted and _tma_compatible(new_key) and _tma_compatible(new_value)
            if tma:
                new_k = TensorDescriptor(new_key, list(new_key.shape), list(new_key.stride()), tma_box)
                new_v = TensorDescriptor(new_value, list(new_value.shape), list(new_value.stride()), tma_box)
        _multi_token_kernel[grid](
            out, query, key_cache, value_cache, *fixed_tensors, query if sinks is None else sinks,
            ctx_lens, new_k, new_v, *scalars, num_queries, *strides, *new_strides,
            HAS_CONTEXT=has_context, HAS_NEW=has_new, NEW_TMA=tma, **meta,
        )
        return out
    return launch_multi
