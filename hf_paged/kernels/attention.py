"""Triton paged attention, the host side: argument checks and launch planning of the kernels in
``attention_kernels.py`` (layout and design are described there).

``paged_attention`` works out a launch once (checks, tile configuration, split-KV, buffers) and
keeps it in the caller's ``plans`` dict, so that the other layers of a forward, which have the
same shapes, pay one kernel launch of host work each.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import context_lens, tuning  # tuning read at each plan: benchmarks sweep its configs
from .arith import cdiv, next_pow2
from .attention_kernels import _cascade_decode_kernel, _decode_kernel, _merge_splits_kernel, _multi_token_kernel
from . import cascade as cascade_plan  # MAX_CHUNK_ROWS read at each plan (tests change it)
from .checks import check_attention_args, check_device, check_local_attention, check_pool_addresses
from .store import store_kv


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
    cascade=None,
    num_shared_splits: int | None = None,
    pool_addresses: torch.Tensor | None = None,
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
    cascade: a :class:`~hf_paged.kernels.cascade.CascadeBatch` (decode only, ignored for Q > 1):
    the chunks of rows that share leading blocks read them once per chunk (shared-prefix decode).
    num_kv_splits / block_n / block_m / num_shared_splits: keyword-only overrides of the launch
    config (tests and benchmarks); by default they come from the fixed config table.
    pool_addresses: optional int64 [2] on the device, ``(key_cache.data_ptr(),
    value_cache.data_ptr())``: the decode kernels read the pools' addresses from it, and
    key_cache / value_cache give only their dtype, shape and strides. A CUDA graph that captured
    the launch then stays valid when the pools are reallocated with the same strides, once this
    tensor holds the new addresses. The multi-token path (never captured) reads key_cache /
    value_cache.
    """
    launch = None
    if plans is not None:
        key = (query.shape, query.stride(), query.dtype, query.device, key_cache.shape, key_cache.stride(),
               key_cache.dtype, value_cache.stride(), scale, sliding_window, softcap, sinks is None,
               None if out is None else (out.shape, out.stride()),
               None if new_key is None else (new_key.stride(), new_value.stride()),
               num_kv_splits, block_n, block_m, max_context_len == 0, chunk_size, cascade is None, num_shared_splits,
               pool_addresses is None)
        launch = plans.get(key)
    if launch is None:
        extra = tuple(t for t in (sinks, new_key, new_value, slot_mapping, pool_addresses) if t is not None)
        check_device(query, key_cache, value_cache, block_table, seq_lens, query_pos, *extra)
        check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks, softcap,
                             new_key, new_value, slot_mapping)
        check_local_attention(sliding_window, chunk_size)
        check_pool_addresses(pool_addresses)
        common = _Common.of(query, key_cache, block_table, seq_lens, query_pos, scale, sliding_window, chunk_size,
                            softcap, sinks, out)
        if common.batch == 0 or query.shape[2] == 0:
            launch = common.empty_launch
        elif query.shape[2] == 1 and cascade is not None:
            launch = _plan_cascade_decode(common, query, key_cache, value_cache, cascade, new_key, new_value,
                                          slot_mapping, num_kv_splits, num_shared_splits)
        elif query.shape[2] == 1:
            launch = _plan_decode(common, query, key_cache, value_cache, max_seq_len, new_key, new_value,
                                  slot_mapping, num_kv_splits, block_n)
        else:
            launch = _plan_multi_token(common, query, key_cache, value_cache, max_context_len, new_key, new_value,
                                       slot_mapping, block_n, block_m)
        if plans is not None:
            plans[key] = launch
    return launch(query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses)


@dataclass(frozen=True)
class _Common:
    """What both kernels' launches share: shapes, flags, scalars, the output's strides."""

    batch: int
    num_q_heads: int
    num_kv_heads: int
    group: int
    head_dim: int
    block_size: int
    block_d: int
    out_shape: tuple
    out_strides: tuple  # as launched: ours is contiguous, a caller's has its strides in the plan key
    dtype: torch.dtype
    device: torch.device
    flags: dict
    scalars: tuple
    fixed_tensors: tuple  # block_table, seq_lens, query_pos

    @classmethod
    def of(cls, query, key_cache, block_table, seq_lens, query_pos, scale, sliding_window, chunk_size, softcap,
           sinks, out) -> _Common:
        batch, num_q_heads, num_queries, head_dim = query.shape
        _, block_size, num_kv_heads, _ = key_cache.shape
        out_shape = (batch, num_queries, num_q_heads, head_dim)
        if out is not None and tuple(out.shape) != out_shape:
            raise ValueError(f"out must be [B, Q, Hq, D] = {out_shape}, got {tuple(out.shape)}")
        return cls(
            batch=batch, num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, group=num_q_heads // num_kv_heads,
            head_dim=head_dim, block_size=block_size, block_d=max(16, next_pow2(head_dim)), out_shape=out_shape,
            out_strides=out.stride() if out is not None else (
                num_queries * num_q_heads * head_dim, num_q_heads * head_dim, head_dim, 1),
            dtype=query.dtype, device=query.device,
            # A chunk is a variant of the window (another first visible key): USE_WINDOW, and
            # CHUNKED says which; local_size carries W or C. fp32 must not silently drop to tf32
            # on the tensor cores; 16-bit inputs ignore the precision.
            flags=dict(USE_WINDOW=sliding_window is not None or chunk_size is not None, CHUNKED=chunk_size is not None,
                       USE_SOFTCAP=softcap is not None, USE_SINKS=sinks is not None,
                       DOT_PRECISION="ieee" if key_cache.dtype == torch.float32 else None),
            scalars=(float(scale), float(softcap or 1.0), int(sliding_window or chunk_size or 0)),
            fixed_tensors=(block_table, seq_lens, query_pos),
        )

    def new_out(self, out):
        return torch.empty(self.out_shape, dtype=self.dtype, device=self.device) if out is None else out

    def empty_launch(self, query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses):
        return self.new_out(out)


def _plan_decode(c: _Common, query, key_cache, value_cache, max_seq_len, new_key, new_value, slot_mapping,
                 num_kv_splits, block_n):
    """One query token per row: one program per (row, KV head[, split]); with new K/V the store
    happens inside the launch."""
    cfg_n, num_warps, num_stages = tuning.decode_config(c.block_d, key_cache.element_size())
    block_n = block_n or cfg_n
    block_table, _, query_pos = c.fixed_tensors
    if max_seq_len is None:
        max_seq_len = block_table.shape[1] * c.block_size
    if num_kv_splits is None:
        num_splits = tuning.choose_num_splits(c.batch, c.num_kv_heads, max_seq_len, block_n, tuning.num_sms(c.device))
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
        c.out_strides[0], c.out_strides[2], c.out_strides[3],
    )
    new_strides = (
        (new_key.stride(0), new_key.stride(1), new_key.stride(3),
         new_value.stride(0), new_value.stride(1), new_value.stride(3), slot_mapping.stride(0))
        if fused else (0,) * 7
    )
    meta = dict(GROUP=c.group, HEAD_DIM=c.head_dim, BLOCK_G=max(16, next_pow2(c.group)), BLOCK_D=c.block_d,
                BLOCK_N=block_n, BLOCK_SIZE=c.block_size, num_warps=num_warps, num_stages=num_stages,
                SPLIT=num_splits > 1, FUSED_STORE=fused, **c.flags)
    if num_splits == 1:
        grid = (c.batch, c.num_kv_heads, 1)

        def launch(query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses):
            out = c.new_out(out)
            _decode_kernel[grid](
                out, out, out, out,  # partial buffers unused
                query, key_cache, value_cache, slot if pool_addresses is None else pool_addresses,
                *c.fixed_tensors,
                query if sinks is None else sinks,
                query if new_key is None else new_key, query if new_value is None else new_value, slot,
                *c.scalars, tokens_per_split, *strides, 0, 0, 0, 0, 0, 0, 0, *new_strides,
                POOL_ADDRESSES=pool_addresses is not None, **meta,
            )
            return out
        return launch

    # Split-KV partials: one buffer per plan, reused layer after layer (stream order keeps
    # a layer's merge ahead of the next layer's decode).
    part_acc = torch.empty(c.batch, c.num_q_heads, num_splits, c.head_dim, dtype=torch.float32, device=c.device)
    part_max = torch.empty(c.batch, c.num_q_heads, num_splits, dtype=torch.float32, device=c.device)
    part_sum = torch.empty_like(part_max)
    grid = (c.batch, c.num_kv_heads, num_splits)
    part_strides = (*part_acc.stride(), *part_max.stride())
    merge_args = (num_splits, 0, query_pos.stride(0), c.out_strides[0], c.out_strides[2], c.out_strides[3],
                  *part_strides)
    merge_meta = dict(HEAD_DIM=c.head_dim, BLOCK_D=c.block_d, BLOCK_S=max(2, next_pow2(num_splits)),
                      USE_SINKS=c.flags["USE_SINKS"], num_warps=4)

    def launch_split(query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses):
        out = c.new_out(out)
        sinks_arg = query if sinks is None else sinks
        _decode_kernel[grid](
            out, part_acc, part_max, part_sum,
            query, key_cache, value_cache, slot if pool_addresses is None else pool_addresses,
            *c.fixed_tensors, sinks_arg,
            query if new_key is None else new_key, query if new_value is None else new_value, slot,
            *c.scalars, tokens_per_split, *strides, *part_strides, *new_strides,
            POOL_ADDRESSES=pool_addresses is not None, **meta,
        )
        _merge_splits_kernel[(c.batch, c.num_q_heads)](
            out, part_acc, part_max, part_sum, query_pos, sinks_arg, query_pos, *merge_args, **merge_meta,
        )
        return out
    return launch_split


def _plan_cascade_decode(c: _Common, query, key_cache, value_cache, cascade, new_key, new_value, slot_mapping,
                         num_kv_splits, num_shared_splits):
    """Shared-prefix decode, two launches: one kernel for both partial parts, the chunks' shared
    prefixes (one K/V read per chunk, all members' query heads in one tile) and each row's own part
    (the decode program from own_start, the fused store as usual), then the log-sum-exp merge of
    both (plus the sink). Every launch's grid is fixed by the batch (chunk slots, not chunks), so a
    CUDA graph replays it for any plan."""
    slots = cascade_plan.num_chunk_slots(c.batch)
    for name, t, shape in (("chunks", cascade.chunks, (slots, 3)), ("members", cascade.members, (c.batch,)),
                           ("own_start", cascade.own_start, (c.batch,))):
        if tuple(t.shape) != shape or t.dtype != torch.int32 or t.device != c.device:
            raise ValueError(f"cascade.{name} must be int32 {list(shape)} on {c.device} for a batch of {c.batch} "
                             f"rows, got {t.dtype} {list(t.shape)} on {t.device}")
    block_n, num_warps, num_stages = tuning.decode_config(c.block_d, key_cache.element_size())
    sh_m, sh_n, sh_warps, sh_stages = tuning.shared_prefix_config(c.block_d, key_cache.element_size())
    rows = max(1, sh_m // c.group)  # members per tile
    block_m = max(16, next_pow2(rows * c.group))
    subtiles = cdiv(cascade_plan.MAX_CHUNK_ROWS, rows)
    sms = tuning.num_sms(c.device)
    own_splits = max(1, int(num_kv_splits)) if num_kv_splits else tuning.choose_num_splits(
        c.batch, c.num_kv_heads, cascade.max_own_len, block_n, sms)
    shared_splits = max(1, int(num_shared_splits)) if num_shared_splits else tuning.choose_shared_splits(
        cascade.num_chunks * min(subtiles, cdiv(cascade.max_chunk_rows, rows)), c.num_kv_heads,
        cascade.max_shared_len, sh_n, sms)
    block_table, seq_lens, query_pos = c.fixed_tensors
    fused = new_key is not None
    slot = slot_mapping if fused else query_pos  # never read without FUSED_STORE
    part_acc = torch.empty(c.batch, c.num_q_heads, own_splits + shared_splits, c.head_dim, dtype=torch.float32,
                           device=c.device)
    part_max = torch.empty(c.batch, c.num_q_heads, own_splits + shared_splits, dtype=torch.float32, device=c.device)
    part_sum = torch.empty_like(part_max)
    part_strides = (*part_acc.stride(), *part_max.stride())
    q_strides = (query.stride(0), query.stride(1), query.stride(3))
    kv_strides = (*key_cache.stride(), *value_cache.stride(), *block_table.stride(), query_pos.stride(0))
    new_strides = (
        (new_key.stride(0), new_key.stride(1), new_key.stride(3),
         new_value.stride(0), new_value.stride(1), new_value.stride(3), slot_mapping.stride(0))
        if fused else (0,) * 7
    )
    flags = {k: v for k, v in c.flags.items() if k != "USE_SINKS"}
    # one launch, one warp count and pipeline depth for both parts: the shallower of the two
    # configurations (both 4 warps; bf16 at D = 128 both 3 stages)
    meta = dict(GROUP=c.group, HEAD_DIM=c.head_dim, ROWS=rows, SUBTILES=subtiles, BLOCK_M=block_m,
                BLOCK_G=max(16, next_pow2(c.group)), BLOCK_D=c.block_d, SHARED_BLOCK_N=sh_n, OWN_BLOCK_N=block_n,
                BLOCK_SIZE=c.block_size, FUSED_STORE=fused, num_warps=max(sh_warps, num_warps),
                num_stages=min(sh_stages, num_stages), **flags)
    num_shared_programs = slots * subtiles * c.num_kv_heads * shared_splits
    grid = (num_shared_programs + c.batch * c.num_kv_heads * own_splits,)
    merge_args = (own_splits, shared_splits, query_pos.stride(0), c.out_strides[0], c.out_strides[2],
                  c.out_strides[3], *part_strides)
    merge_meta = dict(HEAD_DIM=c.head_dim, BLOCK_D=c.block_d, BLOCK_S=max(2, next_pow2(own_splits + shared_splits)),
                      USE_SINKS=c.flags["USE_SINKS"], CASCADE=True, num_warps=4)
    chunks, members, own_start = cascade.chunks, cascade.members, cascade.own_start

    def launch_cascade(query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses):
        out = c.new_out(out)
        _cascade_decode_kernel[grid](
            part_acc, part_max, part_sum, query, key_cache, value_cache,
            slot if pool_addresses is None else pool_addresses,  # (never read without POOL_ADDRESSES)
            block_table, seq_lens, query_pos, chunks, members, own_start,
            query if new_key is None else new_key, query if new_value is None else new_value, slot,
            *c.scalars, c.num_kv_heads, own_splits, shared_splits, num_shared_programs,
            *q_strides, *kv_strides, *part_strides, *new_strides, POOL_ADDRESSES=pool_addresses is not None, **meta,
        )
        _merge_splits_kernel[(c.batch, c.num_q_heads)](
            out, part_acc, part_max, part_sum, query_pos, query if sinks is None else sinks, own_start,
            *merge_args, **merge_meta,
        )
        return out
    return launch_cascade


def _plan_multi_token(c: _Common, query, key_cache, value_cache, max_context_len, new_key, new_value, slot_mapping,
                      block_n, block_m):
    """Several query tokens per row: one program per (query tile, KV head, row); with new K/V the
    store runs first and each row's own tokens are read from new_key / new_value."""
    num_queries = query.shape[2]
    block_table, seq_lens, query_pos = c.fixed_tensors
    has_new = new_key is not None
    has_context = not (has_new and max_context_len == 0)
    kind = ("both" if has_context else "prompt") if has_new else "pool"
    cfg_m, cfg_n, num_warps, num_stages = tuning.multi_token_config(c.block_d, key_cache.element_size(), kind)
    block_n = block_n or cfg_n
    block_m = block_m or cfg_m
    # Short verify steps (a few draft tokens): shrink the tile to what is there.
    block_m = max(16, min(block_m, next_pow2(num_queries * c.group)))
    block_m = max(block_m, next_pow2(c.group))  # a tile holds at least one whole group
    block_q = block_m // c.group
    grid = (cdiv(num_queries, block_q), c.num_kv_heads, c.batch)
    strides = (*query.stride(), *key_cache.stride(), *value_cache.stride(), *block_table.stride(),
               *query_pos.stride(), *c.out_strides)
    meta = dict(GROUP=c.group, HEAD_DIM=c.head_dim, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_D=c.block_d,
                BLOCK_N=block_n, BLOCK_SIZE=c.block_size, num_warps=num_warps, num_stages=num_stages, **c.flags)

    # Where each row's own tokens start (on the device, no sync): they are read from new_key/new_value.
    ctx_lens = context_lens(seq_lens, query_pos) if has_new else seq_lens
    new_strides = (*new_key.stride(), *new_value.stride()) if has_new else (0,) * 8
    tma_wanted = has_new and tuning.new_kv_tma(c.device)
    tma_box = [1, 1, block_n, c.block_d]

    def launch_multi(query, key_cache, value_cache, sinks, out, new_key, new_value, pool_addresses):
        out = c.new_out(out)
        new_k = new_v = query  # never read without HAS_NEW
        tma = False
        if new_key is not None:
            # The pool must hold this forward's tokens for later steps; this launch reads them
            # from new_key/new_value (or from the pool, for rows ctx_lens sends there).
            store_kv(new_key, new_value, key_cache, value_cache, slot_mapping)
            new_k, new_v = new_key, new_value
            tma = tma_wanted and tuning.tma_compatible(new_key) and tuning.tma_compatible(new_value)
            if tma:
                new_k = tuning.TensorDescriptor(new_key, list(new_key.shape), list(new_key.stride()), tma_box)
                new_v = tuning.TensorDescriptor(new_value, list(new_value.shape), list(new_value.stride()), tma_box)
        _multi_token_kernel[grid](
            out, query, key_cache, value_cache, *c.fixed_tensors, query if sinks is None else sinks,
            ctx_lens, new_k, new_v, *c.scalars, num_queries, *strides, *new_strides,
            HAS_CONTEXT=has_context, HAS_NEW=has_new, NEW_TMA=tma, **meta,
        )
        return out
    return launch_multi
