"""Triton kernel copying whole cache blocks (copy-on-write / prefix forking).

Memory layout:
    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim], any strides
    src, dst               : int32/int64 [N] block ids; block src[i] is copied to dst[i]
One launch moves K and V for all N pairs; each program copies BLOCK elements of one
block, indexing the flattened (token, head, dim) volume so any strides work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arith import cdiv, next_pow2
from .checks import check_device


@triton.jit
def _copy_blocks_kernel(
    key_cache_ptr,
    value_cache_ptr,
    src_ptr,
    dst_ptr,
    stride_kb, stride_kt, stride_kh, stride_kd,
    stride_vb, stride_vt, stride_vh, stride_vd,
    BLOCK_SIZE: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pair = tl.program_id(0)
    src_block = tl.load(src_ptr + pair).to(tl.int64)
    dst_block = tl.load(dst_ptr + pair).to(tl.int64)
    elem = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = elem < BLOCK_SIZE * NUM_HEADS * HEAD_DIM
    # Shapes are constexpr, so these div/mods compile to shifts / multiplies and the
    # compiler still sees contiguous runs of HEAD_DIM for vectorised access.
    token = elem // (NUM_HEADS * HEAD_DIM)
    head = (elem // HEAD_DIM) % NUM_HEADS
    dim = elem % HEAD_DIM
    k_off = token * stride_kt + head * stride_kh + dim * stride_kd
    k = tl.load(key_cache_ptr + src_block * stride_kb + k_off, mask=mask)
    tl.store(key_cache_ptr + dst_block * stride_kb + k_off, k, mask=mask)
    if HEAD_DIM_V != HEAD_DIM:  # V's block has its own volume (compiled out otherwise)
        mask = elem < BLOCK_SIZE * NUM_HEADS * HEAD_DIM_V
        token = elem // (NUM_HEADS * HEAD_DIM_V)
        head = (elem // HEAD_DIM_V) % NUM_HEADS
        dim = elem % HEAD_DIM_V
    v_off = token * stride_vt + head * stride_vh + dim * stride_vd
    v = tl.load(value_cache_ptr + src_block * stride_vb + v_off, mask=mask)
    tl.store(value_cache_ptr + dst_block * stride_vb + v_off, v, mask=mask)


def copy_blocks(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (dst must not overlap src)."""
    if src.numel() == 0:
        return
    check_device(key_cache, value_cache, src, dst)
    if src.shape != dst.shape or src.dim() != 1:
        raise ValueError(f"src and dst must be 1-D of one length, got {tuple(src.shape)} and {tuple(dst.shape)}")
    if value_cache.shape[:3] != key_cache.shape[:3]:
        raise ValueError(f"key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} differ")
    _, block_size, num_heads, head_dim = key_cache.shape
    head_dim_v = value_cache.shape[3]
    block_elems = block_size * num_heads * max(head_dim, head_dim_v)
    block = min(4096, next_pow2(block_elems))
    grid = (src.numel(), cdiv(block_elems, block))
    _copy_blocks_kernel[grid](
        key_cache, value_cache, src, dst,
        *key_cache.stride(), *value_cache.stride(),
        BLOCK_SIZE=block_size,
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK=block,
        num_warps=4,
    )
