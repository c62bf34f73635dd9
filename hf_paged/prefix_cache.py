"""A prefix cache that outlives ``generate`` calls: the block pool and the layers' K/V tensors,
lent to the :class:`~hf_paged.cache.PagedCache` of each call.

    prefix = hf_paged.PrefixCache(max_memory="8GiB")
    model.generate(**batch1, prefix_cache=prefix)   # computes the shared preamble once
    model.generate(**batch2, prefix_cache=prefix)   # finds it in the pool: prefills only the rest

The data path stays one way: the prefix cache owns a :class:`~hf_paged.block_pool.BlockPool`
and a :class:`~hf_paged.layer_pools.LayerPools`; a ``PagedCache`` built over it keeps its own
block tables over that pool. When the ``PagedCache`` lets its rows go (at the end of a
``generate`` that created it, ``reset()``, or when it is garbage-collected), its blocks return to
the pool; the full prompt blocks keep their hash there (least recently freed evicted first), so a
later call whose prompt hashes to them takes them without running the model.

Hashes are keyed on the model (``model_key``): its identity, dtype, the addresses and in-place
version counters of its parameters and the state of its adapters, so that another model, a cast,
new weights loaded with ``load_state_dict`` or another adapter never hit the blocks of the first.
"""

from __future__ import annotations

import hashlib
import os
import sys

import torch

from .block_pool import BlockPool
from .layer_pools import LayerPools
from .memory import check_count, parse_memory

DEFAULT_BLOCK_SIZE = 16
# A call that needs more blocks than are free doubles the pool (up to the cap) rather than adding
# what it lacks: the pool serves many calls, and each reallocation of its tensors also costs the
# CUDA graphs of the decode step kept over them (graphs.py: about 0.1 s for an 8B model).
# Fourfold was tried (H200, prefix_bench.py's data set): one capture fewer per pass, 0.1 s of 6.1 s,
# for a peak 3 GB higher (the pool reached its 8 GiB cap, where doubling stopped at 5.5 GB).
RESERVE_GROWTH = 2.0


class PrefixCache:
    """Blocks of prompt K/V kept across ``generate`` calls, within a cap.

    Args:
        max_memory: cap on the K/V tensors, in bytes over all layers (int or e.g. ``"8GiB"``);
            the calls that borrow the pool allocate their own rows in it too.
        max_blocks: the cap in blocks instead.
        block_size: tokens per block (a multiple of 16 for the Triton kernels).
    """

    def __init__(self, max_memory: int | str | None = None, max_blocks: int | None = None,
                 block_size: int = DEFAULT_BLOCK_SIZE):
        if (max_memory is None) == (max_blocks is None):
            raise ValueError("hf_paged: PrefixCache needs a cap: pass max_memory (e.g. '8GiB') or max_blocks, "
                             "not both")
        self.block_size = check_count(block_size, "block_size")
        self.max_memory = parse_memory(max_memory) if max_memory is not None else None
        self.pool = _growing_pool(check_count(max_blocks, "max_blocks"))
        self.pools = LayerPools(self.block_size)
        # sliding-window layers' pools, by window (they release blocks out of the window: no cap)
        self.window_pools: dict[int, BlockPool] = {}
        # (window, windowed layer indices) of the models using it: a layer's tensors belong to one
        # pool, so every model must split its layers alike (None: no model yet)
        self.layer_split: tuple | None = None
        # CUDA graphs of the decode step over these pools, replayed by later calls (graphs.py)
        self.graph_store = None

    def window_pool(self, window: int) -> BlockPool:
        """The block pool of the sliding-window layers of that window (created on first use)."""
        pool = self.window_pools.get(window)
        if pool is None:
            pool = self.window_pools[window] = _growing_pool()
        return pool

    def __repr__(self) -> str:
        return (f"PrefixCache(block_size={self.block_size}, blocks={self.pool.num_blocks}, "
                f"held={self.pool.num_used}, cached={self.pool.num_cached}, max_blocks={self.pool.max_blocks})")

    def attach(self, model) -> PrefixCache:
        """Every later ``model.generate`` that is given no cache uses this prefix cache (as with
        ``generate(..., prefix_cache=self)``); returns self. :meth:`detach` undoes it."""
        model.__dict__["_hf_paged_prefix_cache"] = self
        return self

    @staticmethod
    def detach(model) -> None:
        model.__dict__.pop("_hf_paged_prefix_cache", None)

    @staticmethod
    def attached(model) -> PrefixCache | None:
        return getattr(model, "__dict__", {}).get("_hf_paged_prefix_cache")

    def stats(self) -> dict:
        """``blocks_total`` (in the pool), ``blocks_held`` (referenced by some live cache's rows),
        ``blocks_cached`` (free, findable by content), ``evictions`` (cached blocks handed out for
        other content), ``max_blocks`` (the cap, once known), ``bytes_reserved`` (the tensors); with
        sliding-window layers, ``window_blocks_total`` / ``_held`` / ``_cached`` (their own pool)."""
        return {"blocks_total": self.pool.num_blocks, "blocks_held": self.pool.num_used,
                "blocks_cached": self.pool.num_cached, "evictions": self.pool.evictions,
                "max_blocks": self.pool.max_blocks, "bytes_reserved": self.pools.bytes_reserved(),
                **({"window_blocks_total": sum(p.num_blocks for p in self.window_pools.values()),
                    "window_blocks_held": sum(p.num_used for p in self.window_pools.values()),
                    "window_blocks_cached": sum(p.num_cached for p in self.window_pools.values())}
                   if self.window_pools else {})}

    def clear(self) -> None:
        """Forget every cached block and free the tensors (no live cache may hold rows in it)."""
        if self.pool.num_used or any(p.num_used for p in self.window_pools.values()):
            raise RuntimeError(f"hf_paged: PrefixCache.clear() while {self.pool.num_used} block(s) are held by a "
                               f"live PagedCache; reset() or drop that cache first")
        # in place: the caches built over this prefix cache keep the same objects
        _growing_pool(self.pool.max_blocks if self.max_memory is None else None, into=self.pool)
        for pool in self.window_pools.values():
            _growing_pool(into=pool)
        self.pools.clear()
        self.layer_split = None
        self.graph_store = None  # its graphs address the freed tensors


def _growing_pool(max_blocks: int | None = None, into: BlockPool | None = None) -> BlockPool:
    """A pool that grows by ``RESERVE_GROWTH`` (a new one, or ``into`` emptied in place: the caches
    built over a prefix cache keep the same object)."""
    if into is None:
        return BlockPool(max_blocks=max_blocks, reserve_growth=RESERVE_GROWTH)
    into.__init__(max_blocks=max_blocks, reserve_growth=RESERVE_GROWTH)
    return into


def model_key(model) -> bytes:
    """16 bytes that differ between models, dtypes, weights and adapter states (the salt of the
    prefix hashes in a shared pool).

    A random tag kept on the model object (ids and addresses are reused after a model is freed),
    the dtype, every parameter's address and in-place version counter (``load_state_dict``,
    ``.to()``, optimiser steps change them), and each adapter layer's active, merged and disabled
    adapters (PEFT). Weights written through ``.data`` bypass the version counter: call
    ``PrefixCache.clear()`` after doing that.

    Adapter layers exist only once ``peft`` is imported (transformers' ``load_adapter`` and
    ``PeftModel`` import it): before that the module walk, most of this function's time on a
    large model (about 2 ms per ``generate`` call for 420 modules), is skipped.
    """
    tag = model.__dict__.get("_hf_paged_model_tag")
    if tag is None:
        tag = model.__dict__["_hf_paged_model_tag"] = os.urandom(16)
    h = hashlib.blake2b(tag, digest_size=16)
    h.update(str(getattr(model, "dtype", None)).encode())
    for p in model.parameters():
        h.update(p.data_ptr().to_bytes(8, "little", signed=False))
        h.update(p._version.to_bytes(8, "little") if not torch.is_inference(p) else b"inference")
    for name, module in model.named_modules() if "peft" in sys.modules else ():
        state = [getattr(module, a, None) for a in ("active_adapters", "merged_adapters", "disable_adapters")]
        state = [None if callable(s) else s for s in state]  # a model's own methods of those names
        if any(s is not None for s in state):
            h.update(repr((name, state)).encode())
    return h.digest()
