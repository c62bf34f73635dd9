"""Triton paged attention: decode (one query token, optional split-KV) and multi-token.

Memory layout:
    query                  : [B, num_q_heads, Q, head_dim], any strides (transformers' layout)
    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim], any strides
    block_table            : int32 [B, max_blocks_per_row]; stored token p of row b is at
                             (block_table[b, p // block_size], p % block_size)
    seq_lens               : int32 [B], tokens stored per row (this forward's included)
    query_pos              : int32 [B, Q], stored index of each query token, < 0 = pad
    out                    : [B, Q, num_q_heads, head_dim]
    split partials         : fp32 acc [B, Hq, S, D], max / sum-exp [B, Hq, S] (log2 domain)

The query heads of one kv head are packed into the rows of a tile (decode: the group,
padded to >= 16 rows; multi-token: tokens x group), so every K/V tile is loaded once per
kv head and feeds a real tl.dot. A KV tile is BLOCK_N consecutive stored positions; each
position looks its block up in the block table, so BLOCK_N is independent of block_size.
Softmax is online in fp32, in the exp2 domain (scores pre-multiplied by log2(e)).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from . import check_device, next_pow2

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
def _load_kv_tile(
    cache_ptr, block_table_row_ptr, stride_bt_n,
    n, n_mask, kv_head, dims, dim_mask,
    stride_b, stride_t, stride_h, stride_d,
    BLOCK_SIZE: tl.constexpr,
    MASK_N: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    # One block-table lookup per position. Masked positions load 0, never the recycled
    # garbage beyond seq_lens (may be NaN, and 0 * NaN = NaN). Interior tiles (MASK_N
    # False) are known to lie inside seq_lens and skip the predicate work.
    if MASK_N:
        block_id = tl.load(block_table_row_ptr + (n // BLOCK_SIZE) * stride_bt_n, mask=n_mask, other=0)
    else:
        block_id = tl.load(block_table_row_ptr + (n // BLOCK_SIZE) * stride_bt_n)
    row = block_id.to(tl.int64) * stride_b + (n % BLOCK_SIZE) * stride_t + kv_head * stride_h
    ptrs = cache_ptr + row[:, None] + dims[None, :] * stride_d
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
def _attend_tile(
    q, m_i, l_i, acc, start, pos, kv_end,
    key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    scale, softcap, sliding_window,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    MASKED: tl.constexpr,
    EVEN_D: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over KV positions [start, start + BLOCK_N).

    Rows are query rows with stored positions pos [M]; keys n are visible when
    n <= pos, n < kv_end (kv_end <= seq_len) and, with a window, n > pos - window.
    MASKED=False is for interior tiles where every row sees every key: no predicates,
    and no -inf guards (every score is finite there).
    """
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    k = _load_kv_tile(key_cache_ptr, block_table_row, stride_bt_n, n, n_mask, kv_head, dims, dim_mask,
                      stride_kb, stride_kt, stride_kh, stride_kd, BLOCK_SIZE, MASKED, EVEN_D)
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
            valid = valid & (n[None, :] > pos[:, None] - sliding_window)
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
    v = _load_kv_tile(value_cache_ptr, block_table_row, stride_bt_n, n, n_mask, kv_head, dims, dim_mask,
                      stride_vb, stride_vt, stride_vh, stride_vd, BLOCK_SIZE, MASKED, EVEN_D)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
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
    scale, softcap, sliding_window,
    tokens_per_split,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b,
    stride_ob, stride_oh, stride_od,
    stride_pb, stride_ph, stride_ps, stride_pd,
    stride_mb, stride_mh, stride_ms,
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
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    pos = tl.load(query_pos_ptr + b * stride_qpos_b).to(tl.int32)
    # Causal: keys 0..pos; pos < 0 (pad query) gives an empty range.
    kv_end = tl.minimum(seq_len, pos + 1)
    kv_begin = 0
    if USE_WINDOW:
        kv_begin = tl.maximum(pos - sliding_window + 1, 0)
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
    # window test (n > pos - window) is n >= kv_begin.
    pos_rows = tl.full([BLOCK_G], 0, tl.int32) + pos
    for start in range(lo, hi, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, pos_rows, hi,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, sliding_window,
            BLOCK_N, BLOCK_SIZE, True, HEAD_DIM == BLOCK_D, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION,
        )

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
def _multi_token_kernel(
    out_ptr,
    query_ptr, key_cache_ptr, value_cache_ptr,
    block_table_ptr, seq_lens_ptr, query_pos_ptr, sinks_ptr,
    scale, softcap, sliding_window,
    num_queries,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    stride_bt_b, stride_bt_n,
    stride_qpos_b, stride_qpos_t,
    stride_ob, stride_ot, stride_oh, stride_od,
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
    DOT_PRECISION: tl.constexpr,
):
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

    pos = tl.load(query_pos_ptr + b * stride_qpos_b + token * stride_qpos_t, mask=row_mask, other=-1).to(tl.int32)
    q = tl.load(
        query_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :] * stride_qd,
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    ).to(key_cache_ptr.dtype.element_ty)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)

    # KV range of the whole tile: fully masked tiles (past the causal frontier of the
    # last real query, or before the window of the first) are never visited. Pad rows
    # (pos = -1, e.g. left padding) do not widen it.
    kv_end = tl.minimum(seq_len, tl.max(pos, 0) + 1)
    # First real query position (seq_len when the tile is all pads: no overflow, and
    # every range below is then empty or non-negative).
    first_pos = tl.min(tl.where(pos >= 0, pos, seq_len), 0)

    m_i = tl.full([BLOCK_M], _NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    block_table_row = block_table_ptr + b * stride_bt_b

    if USE_WINDOW:
        lo = tl.maximum(first_pos - sliding_window + 1, 0)
        masked_start = (lo // BLOCK_N) * BLOCK_N
    else:
        # Interior tiles: every key is <= the first real query's position, so all rows
        # (pad rows too: their output is zeroed at the end) see all of it, unmasked.
        masked_start = (tl.minimum(first_pos + 1, kv_end) // BLOCK_N) * BLOCK_N
        for start in range(0, masked_start, BLOCK_N):
            m_i, l_i, acc = _attend_tile(
                q, m_i, l_i, acc, start, pos, kv_end,
                key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
                stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
                scale, softcap, sliding_window,
                BLOCK_N, BLOCK_SIZE, False, HEAD_DIM == BLOCK_D, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION,
            )
    # Diagonal / window-edge / seq_len-edge tiles.
    for start in range(masked_start, kv_end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(
            q, m_i, l_i, acc, start, pos, kv_end,
            key_cache_ptr, value_cache_ptr, block_table_row, stride_bt_n, kv_head, dims, dim_mask,
            stride_kb, stride_kt, stride_kh, stride_kd, stride_vb, stride_vt, stride_vh, stride_vd,
            scale, softcap, sliding_window,
            BLOCK_N, BLOCK_SIZE, True, HEAD_DIM == BLOCK_D, USE_WINDOW, USE_SOFTCAP, DOT_PRECISION,
        )

    o = _finish_rows(acc, m_i, l_i, pos, sinks_ptr, head, row_mask, USE_SINKS)
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


def _multi_token_config(block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    if elem_bytes > 2:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return (128, 64, 4, 3)
    if block_d <= 128:
        # H200, Llama-8B 8 x 2k causal sweep: m256/n64/w8/s3 1.47x SDPA's time (best),
        # m256/n64/w16 1.48x, m128/n32/w4/s4 1.58x, m128/n128/w8 1.63x, m128/n64/w8 1.73x.
        return (256, 64, 8, 3)
    return (64, 32, 8, 2)


_SM_COUNT: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but still exercises the split path when asked
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Split-KV factor from host-side shapes only (never reads device tensors).

    Splits only when the (row, kv head) programs cannot fill the GPU (fewer than ~2 per
    SM) and each split would still get a useful run of >= 4 KV tiles.
    """
    programs = batch * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    # Power-of-two split counts measured best on H200 (8 x 32k: 16 splits 87% of copy
    # bandwidth, 9 splits 78%: uneven waves).
    want = next_pow2(triton.cdiv(4 * num_sms, max(programs, 1)))
    by_length = max_context // (4 * block_n)
    splits = max(1, min(want, by_length, 128))
    return 1 << (splits.bit_length() - 1)


def _check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks):
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
    *,
    num_kv_splits: int | None = None,
    block_n: int | None = None,
    block_m: int | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over the paged cache; returns [B, Q, Hq, D].

    max_seq_len: optional host int >= max(seq_lens), only used to size split-KV.
    num_kv_splits / block_n / block_m: keyword-only overrides of the launch config
    (tests and benchmarks); by default they come from the fixed config table.
    """
    check_device(query, key_cache, value_cache, block_table, seq_lens, query_pos, *(() if sinks is None else (sinks,)))
    _check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks)
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")

    batch, num_q_heads, num_queries, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_q_heads // num_kv_heads
    if out is None:
        out = torch.empty(batch, num_queries, num_q_heads, head_dim, dtype=query.dtype, device=query.device)
    elif tuple(out.shape) != (batch, num_queries, num_q_heads, head_dim):
        raise ValueError(f"out must be [B, Q, Hq, D] = {(batch, num_queries, num_q_heads, head_dim)}, got {tuple(out.shape)}")
    if batch == 0 or num_queries == 0:
        return out

    block_d = max(16, next_pow2(head_dim))
    elem_bytes = key_cache.element_size()
    # fp32 must not silently drop to tf32 on the tensor cores; 16-bit inputs ignore it.
    dot_precision = "ieee" if key_cache.dtype == torch.float32 else None
    flags = dict(
        USE_WINDOW=sliding_window is not None,
        USE_SOFTCAP=softcap is not None,
        USE_SINKS=sinks is not None,
        DOT_PRECISION=dot_precision,
    )
    sinks_arg = sinks if sinks is not None else query  # never read when USE_SINKS=False
    scalars = (float(scale), float(softcap or 1.0), int(sliding_window or 0))

    if num_queries == 1:
        cfg_n, num_warps, num_stages = _decode_config(block_d, elem_bytes)
        block_n = block_n or cfg_n
        block_g = max(16, next_pow2(group))
        if max_seq_len is None:
            max_seq_len = block_table.shape[1] * block_size
        if num_kv_splits is None:
            num_splits = choose_num_splits(batch, num_kv_heads, max_seq_len, block_n, _num_sms(query.device))
        else:
            num_splits = max(1, int(num_kv_splits))
        tokens_per_split = triton.cdiv(triton.cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
        out_bqhd = out[:, 0]  # [B, Hq, D] view
        common = (
            query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks_arg,
            *scalars, tokens_per_split,
            query.stride(0), query.stride(1), query.stride(3),
            *key_cache.stride(), *value_cache.stride(),
            *block_table.stride(),
            query_pos.stride(0),
            *out_bqhd.stride(),
        )
        meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
                    BLOCK_SIZE=block_size, num_warps=num_warps, num_stages=num_stages, **flags)
        if num_splits == 1:
            _decode_kernel[(batch, num_kv_heads, 1)](
                out_bqhd, out_bqhd, out_bqhd, out_bqhd,  # partial buffers unused
                *common, 0, 0, 0, 0, 0, 0, 0, SPLIT=False, **meta,
            )
            return out
        part_acc = torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
        part_max = torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=query.device)
        part_sum = torch.empty_like(part_max)
        _decode_kernel[(batch, num_kv_heads, num_splits)](
            out_bqhd, part_acc, part_max, part_sum,
            *common, *part_acc.stride(), *part_max.stride(), SPLIT=True, **meta,
        )
        _merge_splits_kernel[(batch, num_q_heads)](
            out_bqhd, part_acc, part_max, part_sum, query_pos, sinks_arg,
            num_splits,
            query_pos.stride(0),
            *out_bqhd.stride(),
            *part_acc.stride(), *part_max.stride(),
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, next_pow2(num_splits)),
            USE_SINKS=sinks is not None, num_warps=4,
        )
        return out

    cfg_m, cfg_n, num_warps, num_stages = _multi_token_config(block_d, elem_bytes)
    block_n = block_n or cfg_n
    block_m = block_m or cfg_m
    # Short verify steps (a few draft tokens): shrink the tile to what is there.
    block_m = max(16, min(block_m, next_pow2(num_queries * group)))
    block_m = max(block_m, next_pow2(group))  # a tile holds at least one whole group
    block_q = block_m // group
    grid = (triton.cdiv(num_queries, block_q), num_kv_heads, batch)
    _multi_token_kernel[grid](
        out, query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks_arg,
        *scalars, num_queries,
        *query.stride(), *key_cache.stride(), *value_cache.stride(),
        *block_table.stride(), *query_pos.stride(), *out.stride(),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=block_d,
        BLOCK_N=block_n, BLOCK_SIZE=block_size, num_warps=num_warps, num_stages=num_stages, **flags,
    )
    return out
