"""The tensors behind the block pool: each layer's K and V blocks.

``keys[l]`` / ``values[l]`` are ``[num_blocks, block_size, kv_heads, dim]`` (V's dim may differ
from K's: latent attention caches two widths). A layer's tensors are created on the device and in
the dtype of its first K/V, and enlarged, blocks kept, when the block pool grows.

``addresses[l]`` is an int64 ``[2]`` tensor on the layer's device holding the addresses of
``keys[l]`` and ``values[l]``, updated in place when they are enlarged. The Triton decode kernels
read the pools' addresses from it, so a CUDA graph of a decode step holds this tensor's address,
not the pools': a prefix cache's pools grow between generate calls and the graphs captured before
keep serving (about 0.1 s per capture of an 8B model saved). Hence two counters: ``version``
bumps at every allocation (what holds a pool's address itself must be rebuilt), ``layout_version``
only when a layer's tensors (and its ``addresses``) are created or dropped.
"""

from __future__ import annotations

import torch


class LayerPools:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.keys: list[torch.Tensor | None] = []
        self.values: list[torch.Tensor | None] = []
        self.addresses: list[torch.Tensor | None] = []
        self.version = 0
        self.layout_version = 0

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[layer_idx], self.values[layer_idx]

    def has(self, layer_idx: int) -> bool:
        return layer_idx < len(self.keys) and self.keys[layer_idx] is not None

    def ensure(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor,
               num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer_idx``'s tensors, with room for ``num_blocks`` blocks; ``key_states`` /
        ``value_states`` ``[B, kv_heads, Q, dim]`` give the shape, dtype and device of new ones."""
        while len(self.keys) <= layer_idx:
            self.keys.append(None)
            self.values.append(None)
            self.addresses.append(None)
        k_pool = self.keys[layer_idx]
        if k_pool is None:
            heads = key_states.shape[1]
            # Normal tensors even when made under torch.inference_mode: later calls, which may run
            # outside it, write the pools and update the addresses in place.
            with torch.inference_mode(False):
                for pools, states in ((self.keys, key_states), (self.values, value_states)):
                    pools[layer_idx] = torch.empty((num_blocks, self.block_size, heads, states.shape[3]),
                                                   dtype=states.dtype, device=states.device)
                self.addresses[layer_idx] = self._addresses_of(layer_idx).to(key_states.device)
            self.version += 1
            self.layout_version += 1
        elif key_states.dtype != k_pool.dtype:
            raise TypeError(
                f"hf_paged: layer {layer_idx} gave K/V in {key_states.dtype} but its cache holds {k_pool.dtype}; "
                f"one PagedCache serves one dtype: make a new PagedCache for another dtype."
            )
        elif k_pool.shape[0] < num_blocks:
            self._enlarge(layer_idx, num_blocks)
        return self.keys[layer_idx], self.values[layer_idx]

    def grow(self, num_blocks: int, layers=None) -> None:
        """Enlarge every existing layer's tensors (or those of ``layers``) to ``num_blocks`` blocks
        now (a CUDA graph must not see a reallocation)."""
        for layer_idx, k_pool in enumerate(self.keys):
            if layers is not None and layer_idx not in layers:
                continue
            if k_pool is not None and k_pool.shape[0] < num_blocks:
                self._enlarge(layer_idx, num_blocks)

    def _enlarge(self, layer_idx: int, num_blocks: int) -> None:
        for pools in (self.keys, self.values):
            old = pools[layer_idx]
            with torch.inference_mode(False):  # (see ensure)
                new = torch.empty((num_blocks,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
                new[: old.shape[0]].copy_(old)
            pools[layer_idx] = new
        # in stream order: a graph replayed after this reads the new addresses
        self.addresses[layer_idx].copy_(self._addresses_of(layer_idx))
        self.version += 1

    def _addresses_of(self, layer_idx: int) -> torch.Tensor:
        return torch.tensor([self.keys[layer_idx].data_ptr(), self.values[layer_idx].data_ptr()], dtype=torch.int64)

    def bytes_per_token(self, layers=None) -> int:
        """K+V bytes of one token over all layers, or over ``layers`` (0 until every layer has its
        tensors)."""
        if not self.keys or any(k is None for k in self.keys):
            return 0
        return sum(k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size()
                   for i, (k, v) in enumerate(zip(self.keys, self.values)) if layers is None or i in layers)

    def bytes_reserved(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in zip(self.keys, self.values) if k is not None)

    def head_shapes(self) -> set[tuple[int, int, int]]:
        """The (kv_heads, key dim, value dim) of the layers that have tensors."""
        return {(k.shape[2], k.shape[3], v.shape[3]) for k, v in zip(self.keys, self.values) if k is not None}

    def clear(self) -> None:
        self.keys, self.values, self.addresses = [], [], []
        self.version += 1
        self.layout_version += 1
