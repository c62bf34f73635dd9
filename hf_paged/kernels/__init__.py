"""Paged KV-cache kernels: a plain-PyTorch backend and a Triton backend.

Memory layout (both backends): key_cache / value_cache are
[num_blocks, block_size, num_kv_heads, head_dim] (any strides); see reference.py.

    backend = get_backend()            # "torch" | "triton", see get_backend
    backend.store_kv(key, value, key_cache, value_cache, slot_mapping)
    out = backend.paged_attention(query, key_cache, value_cache, block_table, seq_lens,
                                  query_pos, scale, sliding_window, softcap, sinks, out,
                                  max_seq_len, new_key, new_value, slot_mapping,
                                  chunk_size=None)  # Llama 4 chunked attention
    backend.copy_blocks(key_cache, value_cache, src, dst)

The Triton modules (store, attention, copy) are imported lazily: Triton decides at
decoration time whether a kernel is compiled or interpreted (TRITON_INTERPRET=1), so they
must not be imported before the caller had a chance to set that variable.
No transformers import here: these are pure functions over tensors.
"""

from __future__ import annotations

import importlib
import os
import types

import torch

from . import reference
from .reference import check_local_attention

__all__ = [
    "BACKENDS",
    "available_backends",
    "check_local_attention",
    "context_lens",
    "copy_blocks",
    "get_backend",
    "interpreter_enabled",
    "paged_attention",
    "reference",
    "store_kv",
]

BACKENDS = ("torch", "triton")
_ENV_VAR = "HF_PAGED_BACKEND"
_TRUE = ("1", "true", "on", "yes")

_CPU_ERROR = (
    "the Triton backend got CPU tensors but the Triton interpreter is not enabled: set "
    "TRITON_INTERPRET=1 (before triton / hf_paged.kernels' Triton modules are imported) to run "
    "the Triton kernels on CPU, or use HF_PAGED_BACKEND=torch for the PyTorch backend"
)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of host ints (triton.cdiv costs microseconds per call on newer Triton)."""
    return -(-a // b)


def context_lens(seq_lens: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """int32 [B]: per row, where this forward's own tokens start (device ops, no sync).

    The multi-token kernel reads a row's own tokens from new_key/new_value when the row has the
    layout PagedCache builds: pads first, then the real tokens at consecutive positions ending
    at seq_len - 1 (token t at seq_len - Q + t); that row gets seq_len - (its real tokens). A row
    laid out any other way gets seq_len: all its keys are read from the pool (after the store).
    """
    num_queries = query_pos.shape[1]
    t = torch.arange(num_queries, device=query_pos.device, dtype=torch.int32)
    seq = seq_lens.to(torch.int32)
    real = query_pos >= 0
    n_real = real.sum(1, dtype=torch.int32)
    expected_pos = seq[:, None] - num_queries + t[None, :]
    layout_ok = ((real == (t[None, :] >= num_queries - n_real[:, None]))
                 & (~real | (query_pos.to(torch.int32) == expected_pos))).all(1)
    return torch.where(layout_ok, seq - n_real, seq).contiguous()


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def interpreter_enabled() -> bool:
    """True when TRITON_INTERPRET asks Triton to interpret kernels (read from os.environ)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def _kernels_interpreted() -> bool:
    # Ground truth once the Triton modules exist: were the kernels built as interpreted
    # functions? (The env var may have been set after the import, too late.)
    from .store import _store_kv_kernel

    return type(_store_kv_kernel).__name__ == "InterpretedFunction"


def check_device(*tensors: torch.Tensor) -> None:
    """Raise a clear error when Triton kernels are asked to run where they cannot."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"all tensors must be on one device, got {device} and {t.device}")
    if device.type == "cuda":
        return
    if device.type == "cpu":
        if not (interpreter_enabled() and _kernels_interpreted()):
            raise RuntimeError(_CPU_ERROR)
        return
    raise RuntimeError(f"the Triton backend does not support device {device}; use HF_PAGED_BACKEND=torch")


def _triton_namespace() -> types.SimpleNamespace:
    try:
        attention = importlib.import_module(".attention", __name__)
        store = importlib.import_module(".store", __name__)
        copy = importlib.import_module(".copy", __name__)
    except ImportError as exc:  # triton missing or broken
        raise RuntimeError(f"the Triton backend needs a working triton install ({exc}); use HF_PAGED_BACKEND=torch") from exc
    return types.SimpleNamespace(
        name="triton",
        store_kv=store.store_kv,
        paged_attention=attention.paged_attention,
        copy_blocks=copy.copy_blocks,
    )


_TORCH_BACKEND = types.SimpleNamespace(
    name="torch",
    store_kv=reference.store_kv,
    paged_attention=reference.paged_attention,
    copy_blocks=reference.copy_blocks,
)


def get_backend(name: str | None = None) -> types.SimpleNamespace:
    """Namespace with store_kv / paged_attention / copy_blocks for one backend.

    Resolution: explicit ``name``, else env HF_PAGED_BACKEND (torch|triton), else
    "triton" when CUDA is available, else "torch". The Triton backend also checks each
    call's tensor device: CPU tensors need TRITON_INTERPRET=1.
    """
    if name is None:
        name = os.environ.get(_ENV_VAR) or None
        if name is None:
            name = "triton" if torch.cuda.is_available() else "torch"
    key = str(name).strip().lower()
    if key == "torch":
        return _TORCH_BACKEND
    if key == "triton":
        if not torch.cuda.is_available() and not interpreter_enabled():
            raise RuntimeError(_CPU_ERROR)
        return _triton_namespace()
    raise ValueError(f"unknown hf_paged kernel backend {name!r}; valid backends: {', '.join(BACKENDS)}")


def available_backends() -> list[str]:
    """Backends usable in this process right now (torch always)."""
    names = ["torch"]
    if torch.cuda.is_available() or interpreter_enabled():
        try:
            importlib.import_module("triton")
            names.append("triton")
        except ImportError:
            pass
    return names


def store_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """store_kv of the default backend (see get_backend)."""
    return get_backend().store_kv(key, value, key_cache, value_cache, slot_mapping)


def paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_pos, scale, sliding_window=None,
                    softcap=None, sinks=None, out=None, max_seq_len=None, new_key=None, new_value=None,
                    slot_mapping=None, *, chunk_size=None):
    """paged_attention of the default backend (see get_backend)."""
    return get_backend().paged_attention(query, key_cache, value_cache, block_table, seq_lens, query_pos, scale,
                                         sliding_window, softcap, sinks, out, max_seq_len, new_key, new_value,
                                         slot_mapping, chunk_size=chunk_size)


def copy_blocks(key_cache, value_cache, src, dst) -> None:
    """copy_blocks of the default backend (see get_backend)."""
    return get_backend().copy_blocks(key_cache, value_cache, src, dst)
