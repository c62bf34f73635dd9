"""One layer of the paged cache as transformers' ``Cache.layers[i]`` contract has it, and the
layer's K/V laid out as a DynamicCache would hold them (for code that reads a layer directly)."""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .block_table import BlockTables
from .layer_pools import LayerPools


class PagedLayer:
    """One layer of a :class:`PagedCache`, as transformers' ``Cache.layers[i]`` contract has it.

    Its K/V live in the cache's pools; ``keys`` / ``values`` give them as a DynamicCache would
    hold them, ``[rows, kv_heads, padded length, head_dim]`` with zeros at pad positions, gathered
    through the block tables at each read (a copy: for inspection and tests, not for a forward).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache, layer_idx: int):
        self._cache = weakref.ref(cache)  # the cache holds its layers
        self.layer_idx = layer_idx

    @property
    def is_initialized(self) -> bool:
        return self._cache().pools.has(self.layer_idx)

    def get_seq_length(self) -> int:
        return self._cache().get_seq_length()

    @property
    def keys(self) -> torch.Tensor | None:
        return self._cache().dense_layer(self.layer_idx)[0]

    @property
    def values(self) -> torch.Tensor | None:
        return self._cache().dense_layer(self.layer_idx)[1]

    def __repr__(self) -> str:
        return f"PagedLayer({self.layer_idx})"


def dense_kv(pools: LayerPools, tables: BlockTables, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Layer ``layer_idx``'s K/V as a DynamicCache holds them: ``[rows, kv_heads, padded length,
    dim]``, each stored token at its logical position, zeros at pads and at tokens a sliding-window
    layer has released (a copy)."""
    if not pools.has(layer_idx):
        return None, None
    bs = tables.block_size
    rows, cols, slots = [], [], []
    for b, table in enumerate(tables.tables):
        positions = tables.stored_positions(b)
        index = np.arange(len(positions))
        blocks = np.asarray(table, dtype=np.int64)[index // bs]
        kept = blocks >= 0  # a sliding-window layer's released blocks: zeros, like pads
        rows.append(np.full(int(kept.sum()), b))
        cols.append(positions[kept])
        slots.append((blocks * bs + index % bs)[kept])
    out = []
    for pool in pools.get(layer_idx):
        dense = pool.new_zeros((tables.num_rows, tables.logical_len) + tuple(pool.shape[2:]))
        if rows:
            flat = pool.reshape((-1,) + tuple(pool.shape[2:]))
            idx = [torch.from_numpy(np.concatenate(a)).to(pool.device) for a in (rows, cols, slots)]
            dense[idx[0], idx[1]] = flat[idx[2]]
        out.append(dense.transpose(1, 2))
    return out[0], out[1]
