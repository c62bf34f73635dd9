"""Paged KV-cache kernels: a plain-PyTorch backend and a Triton backend, behind one interface.

Memory layout (both backends): key_cache / value_cache are
[num_blocks, block_size, num_kv_heads, head_dim] (any strides; V's head_dim may differ from
K's); see reference.py for every argument's layout.

    backend = get_backend()            # or backend_for(device): "torch" | "triton"
    backend.store_kv(key, value, key_cache, value_cache, slot_mapping, pool_addresses=None)
    out = backend.attend(query, key_cache, value_cache, batch, LayerAttention(scale, ...),
                         new_key=..., new_value=..., plans=..., pool_addresses=None)

``pool_addresses`` (int64 [2] on the device, the pools' ``data_ptr()``): the Triton decode and
store kernels then read the pools' addresses from it, so that a CUDA graph of the launch survives
the pools' reallocation (``hf_paged.layer_pools``); the PyTorch reference ignores it.
    backend.copy_blocks(key_cache, value_cache, src, dst)
    out = backend.rms_norm(x, weight, eps)   # Llama's RMSNorm formula (reference.rms_norm)

``batch`` is any object with the batch's ``block_table``, ``seq_lens``, ``query_pos``,
``slot_mapping``, ``max_seq_len`` and ``max_context_len`` (:class:`BatchMetadata`); each backend's
``paged_attention`` function takes them one by one (the form the kernel tests use).

The Triton modules are imported lazily: Triton decides at decoration time whether a kernel is
compiled or interpreted (TRITON_INTERPRET=1), so they must not be imported before the caller had
a chance to set that variable. No transformers import here: pure functions over tensors.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from . import reference
from .arith import cdiv, next_pow2
from .checks import CPU_ERROR, interpreter_enabled

__all__ = [
    "BACKENDS",
    "Backend",
    "BatchMetadata",
    "LayerAttention",
    "available_backends",
    "backend_for",
    "backend_name",
    "cdiv",
    "context_lens",
    "device_guard",
    "get_backend",
    "interpreter_enabled",
    "next_pow2",
    "reference",
]

BACKENDS = ("torch", "triton")
ENV_VAR = "HF_PAGED_BACKEND"


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


class BatchMetadata(Protocol):
    """One forward's batch as the kernels read it (see reference.py for the layouts)."""

    block_table: torch.Tensor  # int32 [B, W]
    seq_lens: torch.Tensor  # int32 [B]
    query_pos: torch.Tensor  # int32 [B, Q]
    slot_mapping: torch.Tensor  # int32 [B, Q]
    max_seq_len: int  # host bound on seq_lens
    max_context_len: int | None  # host bound on the tokens rows held before the forward (0: a prompt)
    cascade: object | None  # optional; decode: a cascade.CascadeBatch (shared prefixes read once per group)


@dataclass(frozen=True)
class LayerAttention:
    """How one layer attends: its scale and the optional rules the kernels implement."""

    scale: float
    sliding_window: int | None = None
    chunk_size: int | None = None  # Llama 4's chunked attention (not with a window)
    softcap: float | None = None
    sinks: torch.Tensor | None = None  # [num_q_heads] logits that join each softmax's denominator


@dataclass(frozen=True)
class Backend:
    """The kernels of one backend: ``store_kv``, ``copy_blocks``, ``paged_attention`` and
    ``rms_norm`` are its functions over tensors; :meth:`attend` is the typed call the cache's
    attention makes."""

    name: str
    store_kv: Callable
    copy_blocks: Callable
    paged_attention: Callable
    rms_norm: Callable

    def attend(self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: BatchMetadata,
               layer: LayerAttention, *, new_key: torch.Tensor | None = None, new_value: torch.Tensor | None = None,
               plans: dict | None = None, pool_addresses: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of ``query`` [B, Hq, Q, D] over the pool, ``[B, Q, Hq, Dv]``. With
        ``new_key`` / ``new_value`` (this forward's K/V) they are written at the batch's slot
        mapping first (inside the launch for decode). ``pool_addresses``: int64 [2] on the device,
        the pools' addresses, which the Triton decode kernels read there (a captured graph then
        survives the pools' reallocation)."""
        return self.paged_attention(
            query, key_cache, value_cache, batch.block_table, batch.seq_lens, batch.query_pos, layer.scale,
            layer.sliding_window, layer.softcap, layer.sinks, None, batch.max_seq_len, new_key, new_value,
            None if new_key is None else batch.slot_mapping, plans=plans, max_context_len=batch.max_context_len,
            chunk_size=layer.chunk_size, cascade=getattr(batch, "cascade", None), pool_addresses=pool_addresses,
        )


_TORCH_BACKEND = Backend("torch", reference.store_kv, reference.copy_blocks, reference.paged_attention,
                         reference.rms_norm)
_TRITON_BACKEND: Backend | None = None


def _triton_backend() -> Backend:
    global _TRITON_BACKEND
    if _TRITON_BACKEND is None:
        try:
            attention = importlib.import_module(".attention", __name__)
            store = importlib.import_module(".store", __name__)
            copy = importlib.import_module(".copy", __name__)
            norm = importlib.import_module(".norm", __name__)
        except ImportError as exc:  # triton missing or broken
            raise RuntimeError(f"the Triton backend needs a working triton install ({exc}); use "
                               f"{ENV_VAR}=torch") from exc
        def rms_norm(x, weight, eps):
            # shapes the kernel does not take (a strided last dim, a row wider than MAX_WIDTH)
            # get the reference: the same numbers, in PyTorch's kernels
            if norm.supports(x, weight):
                return norm.rms_norm(x, weight, eps)
            return reference.rms_norm(x, weight, eps)

        _TRITON_BACKEND = Backend("triton", store.store_kv, copy.copy_blocks, attention.paged_attention, rms_norm)
    return _TRITON_BACKEND


def backend_name(device: torch.device | None = None) -> str:
    """The backend for tensors on ``device``: ``HF_PAGED_BACKEND`` when set (read at each call, so
    tests can switch it), else Triton on CUDA and the PyTorch reference elsewhere (without a
    device: Triton where CUDA is available)."""
    name = os.environ.get(ENV_VAR)
    if name:
        return name.strip().lower()
    on_cuda = device.type == "cuda" if device is not None else torch.cuda.is_available()
    return "triton" if on_cuda else "torch"


def get_backend(name: str | None = None) -> Backend:
    """One backend by name ("torch" | "triton"), or the default one (:func:`backend_name`).
    The Triton backend also checks each call's tensor device: CPU tensors need TRITON_INTERPRET=1."""
    key = str(name).strip().lower() if name is not None else backend_name()
    if key == "torch":
        return _TORCH_BACKEND
    if key == "triton":
        if not torch.cuda.is_available() and not interpreter_enabled():
            raise RuntimeError(CPU_ERROR)
        return _triton_backend()
    raise ValueError(f"unknown hf_paged kernel backend {name or key!r}; valid backends: {', '.join(BACKENDS)}")


def backend_for(device: torch.device) -> Backend:
    """The backend for tensors on ``device`` (see :func:`backend_name`)."""
    return get_backend(backend_name(device))


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


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device while launching kernels on its tensors.

    Triton launches on the *current* device, not on its arguments' device: under
    ``device_map`` a layer on ``cuda:1`` must not launch on ``cuda:0``.
    """
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
