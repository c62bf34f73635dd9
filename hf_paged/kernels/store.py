"""Triton kernel writing new K/V tokens into the paged cache.

Memory layout:
    key, value             : [B, num_kv_heads, Q, head_dim], any strides (transformers'
                             [batch, heads, seq, dim], usually a transposed view); value's
                             head_dim may differ from key's (latent attention caches two widths)
    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim], any strides
    slot_mapping           : int32/int64 [B, Q]; slot = block_id * block_size + offset,
                             a negative slot is a pad token and is not written
    pool_addresses         : int64 [2] (optional): key_cache's and value_cache's addresses, read
                             on the device (a CUDA graph holds this tensor's, not the pools')
One program copies BLOCK_T tokens x BLOCK_HD elements of the flattened (head, dim) row,
for K and V, so both reads and writes are wide rows rather than one program per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arith import cdiv, next_pow2
from .attention_kernels import _pool_base
from .checks import check_device, check_pool_addresses


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    pool_addresses_ptr,
    slot_mapping_ptr,
    num_tokens,  # B * Q
    tokens_per_row,  # Q
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_kcb, stride_kct, stride_kch, stride_kcd,
    stride_vcb, stride_vct, stride_vch, stride_vcd,
    stride_sb, stride_st,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    POOL_ADDRESSES: tl.constexpr = False,
):
    if POOL_ADDRESSES:
        key_cache_ptr = _pool_base(pool_addresses_ptr, 0, key_cache_ptr)
        value_cache_ptr = _pool_base(pool_addresses_ptr, 1, value_cache_ptr)
    token = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_mask = token < num_tokens
    row = (token // tokens_per_row).to(tl.int64)
    pos = (token % tokens_per_row).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + row * stride_sb + pos * stride_st, mask=token_mask, other=-1).to(tl.int64)
    write = token_mask & (slot >= 0)
    block_id = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE

    # (head, dim) flattened so a token's row is one contiguous run when strides allow;
    # HEAD_DIM is constexpr so the div/mod are shifts (or cheap magic multiplies).
    hd = tl.program_id(1) * BLOCK_HD + tl.arange(0, BLOCK_HD)
    hd_mask = hd < NUM_HEADS * HEAD_DIM
    head = hd // HEAD_DIM
    dim = hd % HEAD_DIM
    mask = write[:, None] & hd_mask[None, :]

    src_k = row * stride_kb + pos * stride_kt
    src_v = row * stride_vb + pos * stride_vt
    dst_k = block_id * stride_kcb + offset * stride_kct
    dst_v = block_id * stride_vcb + offset * stride_vct

    k = tl.load(key_ptr + src_k[:, None] + (head * stride_kh + dim * stride_kd)[None, :], mask=mask)
    tl.store(
        key_cache_ptr + dst_k[:, None] + (head * stride_kch + dim * stride_kcd)[None, :],
        k.to(key_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    if HEAD_DIM_V != HEAD_DIM:  # V's (head, dim) run has its own length (compiled out otherwise)
        head = hd // HEAD_DIM_V
        dim = hd % HEAD_DIM_V
        mask = write[:, None] & (hd < NUM_HEADS * HEAD_DIM_V)[None, :]
    v = tl.load(value_ptr + src_v[:, None] + (head * stride_vh + dim * stride_vd)[None, :], mask=mask)
    tl.store(
        value_cache_ptr + dst_v[:, None] + (head * stride_vch + dim * stride_vcd)[None, :],
        v.to(value_cache_ptr.dtype.element_ty),
        mask=mask,
    )


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    pool_addresses: torch.Tensor | None = None,
) -> None:
    """Write key/value [B, H_kv, Q, D] into the paged caches at slot_mapping [B, Q]
    (``pool_addresses``: see the module's layout)."""
    check_device(key, value, key_cache, value_cache, slot_mapping,
                 *(() if pool_addresses is None else (pool_addresses,)))
    check_pool_addresses(pool_addresses)
    if key.dim() != 4 or value.dim() != 4 or value.shape[:3] != key.shape[:3]:
        raise ValueError(f"key/value must be [B, num_kv_heads, Q, head_dim] (head_dim may differ), got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    batch, num_heads, tokens_per_row, head_dim = key.shape
    head_dim_v = value.shape[3]
    _, block_size, cache_heads, cache_dim = key_cache.shape
    if value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    if (cache_heads, cache_dim, value_cache.shape[3]) != (num_heads, head_dim, head_dim_v):
        raise ValueError(
            f"key/value have {num_heads} heads x {head_dim}/{head_dim_v} dims but the cache holds "
            f"{cache_heads} x {cache_dim}/{value_cache.shape[3]}"
        )
    if tuple(slot_mapping.shape) != (batch, tokens_per_row):
        raise ValueError(f"slot_mapping must be [B, Q] = {(batch, tokens_per_row)}, got {tuple(slot_mapping.shape)}")
    num_tokens = batch * tokens_per_row
    if num_tokens == 0:
        return

    row_elems = num_heads * max(head_dim, head_dim_v)
    block_hd = min(next_pow2(row_elems), 4096)
    # ~8K elements per program: enough bytes in flight per SM without a huge grid.
    block_t = max(1, min(64, 8192 // block_hd))
    grid = (cdiv(num_tokens, block_t), cdiv(row_elems, block_hd))
    _store_kv_kernel[grid](
        key, value, key_cache, value_cache, slot_mapping if pool_addresses is None else pool_addresses, slot_mapping,
        num_tokens, tokens_per_row,
        *key.stride(), *value.stride(),
        *key_cache.stride(), *value_cache.stride(),
        *slot_mapping.stride(),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_SIZE=block_size,
        BLOCK_T=block_t,
        BLOCK_HD=block_hd,
        POOL_ADDRESSES=pool_addresses is not None,
        num_warps=4,
    )
