"""Argument checks of the kernels, and where the Triton kernels can run (host code, no Triton
import: the interpreter check looks at kernels already built)."""

from __future__ import annotations

import os

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

CPU_ERROR = (
    "the Triton backend got CPU tensors but the Triton interpreter is not enabled: set "
    "TRITON_INTERPRET=1 (before triton / hf_paged.kernels' Triton modules are imported) to run "
    "the Triton kernels on CPU, or use HF_PAGED_BACKEND=torch for the PyTorch backend"
)


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks Triton to interpret kernels (read from os.environ)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def kernels_interpreted() -> bool:
    # Ground truth once the Triton modules exist: were the kernels built as interpreted
    # functions? (The env var may have been set after the import, too late.)
    from .store import _store_kv_kernel

    return type(_store_kv_kernel).__name__ == "InterpretedFunction"


def interpreter_usable() -> bool:
    """True when the Triton kernels run on the CPU in this process: TRITON_INTERPRET is set and
    the kernels were built interpreted (the tests' CPU device for the Triton path)."""
    if not interpreter_enabled():
        return False
    try:
        return kernels_interpreted()
    except ImportError:  # no triton
        return False


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when Triton kernels are asked to run where they cannot."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not (interpreter_enabled() and kernels_interpreted()):
            raise RuntimeError(CPU_ERROR)
        return
    raise RuntimeError(f"the Triton backend does not support device {device}; use HF_PAGED_BACKEND=torch")


def check_local_attention(sliding_window: int | None, chunk_size: int | None) -> None:
    """ValueError unless at most one of a sliding window and an attention chunk is given, >= 1."""
    if sliding_window is not None and chunk_size is not None:
        raise ValueError(f"sliding_window ({sliding_window}) and chunk_size ({chunk_size}) cannot be combined: "
                         "a layer attends within a window or within a chunk")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1 or None, got {sliding_window}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")


def check_pool_addresses(pool_addresses) -> None:
    """``pool_addresses``: None, or the int64 [2] device tensor of the K and V pools' addresses."""
    if pool_addresses is not None and (pool_addresses.dtype != torch.int64 or tuple(pool_addresses.shape) != (2,)
                                       or not pool_addresses.is_contiguous()):
        raise ValueError(f"pool_addresses must be a contiguous int64 [2] tensor (the K and V pools' data_ptr()), "
                         f"got {pool_addresses.dtype} {list(pool_addresses.shape)}")


def check_attention_args(query, key_cache, value_cache, block_table, seq_lens, query_pos, sinks, softcap,
                         new_key, new_value, slot_mapping) -> None:
    """The Triton attention's shapes, dtypes and options (see attention.py for the layout)."""
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
        raise ValueError(f"head_dim {head_dim} is not supported by the Triton paged attention: head_dim must be "
                         f"<= {MAX_HEAD_DIM} (e.g. 64, 80, 96, 128, 256)")
    if block_size % 16 != 0:
        raise ValueError(f"block_size {block_size} is not supported by the Triton paged attention: it must be a "
                         f"multiple of 16 (e.g. 16, 32)")
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
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")
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
