"""The paged KV cache: block tables, slots and the transformers ``Cache`` contract.

Data path of one forward pass (see ``attention.py`` for the hooks that drive it):

1. transformers' mask builder calls ``cache.get_mask_sizes`` and then our mask function, which
   calls :meth:`PagedCache.begin_forward` with the 2D padding mask. That allocates blocks for the
   new tokens (pads are never stored), schedules copy-on-write of shared tail blocks, and builds
   the per-forward metadata (:class:`PagedForward`: block table, seq_lens, query positions, slot
   mapping) ONCE, as int32 tensors on the device.
2. every attention layer calls ``cache.update(k, v, layer_idx)``: the layer's pending block copies
   run (one launch, only when a row copies a shared tail), and the new K/V are handed to the
   attention call that follows and returned unchanged.
3. the attention function stores the new K/V by slot mapping and reads the layer's whole context
   straight from its pool through the block table: for decode, one kernel launch does both.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers.cache_utils import Cache

from .block_pool import BlockPool, OutOfBlocksError

_MEMORY_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
DEFAULT_BLOCK_SIZE = 16  # tokens per KV block


def parse_memory(value: int | float | str, name: str = "max_memory") -> int:
    """Bytes from a number or a string such as ``"2GiB"``, ``"512 MB"``; ``name`` is the argument
    named in the error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"hf_paged: {name} must be a positive, finite number of bytes, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _MEMORY_UNITS:
        raise ValueError(
            f"hf_paged: cannot read {name}={value!r}; use bytes (a positive int) or a string such as "
            f"'2GiB', '1500MB'."
        )
    size = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"hf_paged: {name} must be a positive number of bytes, got {value!r}")
    return size


def check_count(value, name: str, minimum: int = 1) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes), else a ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"hf_paged: {name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    return int(value)


class CacheStateError(RuntimeError):
    """The cache's rows cannot serve this forward (see the message for why; ``reset()`` clears them)."""


class MaskOffset(int):
    """The ``kv_offset`` (always 0) that :meth:`PagedCache.get_mask_sizes` returns, carrying the
    cache to our mask function.

    transformers' mask builders call ``cache.get_mask_sizes`` and pass the offset it returns
    straight to the mask function registered for the attention implementation, which is not
    given the cache itself. The handle lives exactly as long as that one call's arguments: nothing
    outlives it (another model's mask function, an exception) to be picked up by a later forward.
    Any other mask function sees a plain 0.
    """

    paged_cache: PagedCache

    def __new__(cls, cache: PagedCache):
        offset = super().__new__(cls, 0)
        offset.paged_cache = cache
        return offset


def cache_from_mask_offset(kv_offset) -> PagedCache | None:
    """The PagedCache whose ``get_mask_sizes`` gave ``kv_offset``, else None."""
    return getattr(kv_offset, "paged_cache", None)


@dataclass
class PagedForward:
    """What one forward pass needs to write and read the paged cache, built once per forward.

    It is what the mask function returns, so every attention layer receives it as its
    ``attention_mask``. Tensors live on ``device``; :meth:`on` gives copies for other devices
    (``device_map`` across GPUs), made once per device and forward.
    """

    cache_ref: weakref.ref  # weak: the cache holds this object, a strong ref would make a cycle
    q_len: int
    block_table: torch.Tensor  # int32 [B, max_blocks_per_row]
    seq_lens: torch.Tensor  # int32 [B], stored tokens per row after this forward
    query_pos: torch.Tensor  # int32 [B, Q], stored index of each new token, -1 for pads
    slot_mapping: torch.Tensor  # int32 [B, Q], block * block_size + offset, -1 for pads
    copy_src: torch.Tensor | None  # int64 [N] copy-on-write sources (None: no copies)
    copy_dst: torch.Tensor | None
    max_seq_len: int  # host-side bound on seq_lens (no device sync needed to size kernels)
    new_logical_len: int
    layers_done: set = field(default_factory=set)
    backend: object = None  # the kernels for ``device``, resolved once per forward (not per layer)
    # layer -> (key, value) given to update() and not yet written: the attention function writes
    # them in its own launch (see PagedCache.update). Shared by the per-device copies.
    pending: dict = field(default_factory=dict)
    plans: dict = field(default_factory=dict)  # launch plans of this forward on this device
    # int32 [B*W + B + 2*B*Q]: block_table | seq_lens | query_pos | slot_mapping in one tensor (the
    # four above are views of it), so a CUDA graph's static copy is refreshed with one copy_
    packed_meta: torch.Tensor | None = None
    # host int: the most tokens any row had stored before this forward (0: a prompt forward, whose
    # attention reads every key from this forward's K/V and none from the pool); None: unknown
    max_context_len: int | None = None
    # host bool: some row has a pad after its first token (a query that is not stored): such a
    # forward stores first and reads every key from the pool (no fused store, no own-token path)
    pads_after_start: bool = False
    _per_device: dict = field(default_factory=dict)

    @property
    def cache(self) -> PagedCache:
        return self.cache_ref()

    @property
    def started(self) -> bool:
        return bool(self.layers_done)

    def on(self, device: torch.device) -> PagedForward:
        if self.block_table.device == device:
            return self
        moved = self._per_device.get(device)
        if moved is None:
            def mv(t):
                return None if t is None else t.to(device, non_blocking=True)
            moved = PagedForward(
                self.cache_ref, self.q_len, mv(self.block_table), mv(self.seq_lens), mv(self.query_pos),
                mv(self.slot_mapping), mv(self.copy_src), mv(self.copy_dst), self.max_seq_len,
                self.new_logical_len, self.layers_done, _backend_for(device), self.pending,
                max_context_len=self.max_context_len, pads_after_start=self.pads_after_start,
            )
            self._per_device[device] = moved
        return moved


class PagedLayer:
    """One layer of a :class:`PagedCache`, as transformers' ``Cache.layers[i]`` contract has it.

    The layer's K/V live in the cache's block pools (``pools``); ``keys`` / ``values`` give them
    as a DynamicCache would hold them, ``[rows, kv_heads, padded length, head_dim]`` with zeros at
    pad positions, gathered through the block tables at each read (a copy: for inspection and
    tests, not for a forward pass).
    """

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, cache: PagedCache, layer_idx: int):
        self._cache = weakref.ref(cache)  # the cache holds its layers
        self.layer_idx = layer_idx

    @property
    def pools(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self._cache().layer_pools(self.layer_idx)

    @property
    def is_initialized(self) -> bool:
        return self.pools[0] is not None

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


class PagedCache(Cache):
    """KV cache kept in fixed-size blocks (PagedAttention).

    Stores, per layer, a pool of K and V blocks ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    one block table per row (shared by all layers) maps each row's token ``i`` to block
    ``table[i // block_size]``, offset ``i % block_size``. Pad tokens of left-padded batches are
    never stored; rows that share a prefix (beams, ``num_return_sequences`` copies) share blocks,
    copy-on-write. Memory grows a block at a time as sequences grow.

    Use it through ``attn_implementation="paged"`` (``generate`` then creates one), or pass
    ``past_key_values=PagedCache(config=model.config, block_size=..., max_memory="4GiB")`` to
    choose the block size or cap the memory. ``memory_stats()`` reports what is held and used.

    Args:
        config: the model config (needed only to turn ``max_memory`` into a number of blocks).
        block_size: tokens per block (a multiple of 16 for the Triton kernels).
        max_blocks: cap on the number of blocks in the pool.
        max_memory: cap on the pool's bytes over all layers (int or e.g. ``"4GiB"``).
        share_prefixes: prefill duplicated prompts once and store identical full prompt blocks once.
        max_prefill_tokens: generate's prefill runs the prompts, sorted by length, in groups of at
            most this many (padded) tokens, each group trimmed to its own longest prompt: the
            activations stop growing with the batch and less padding is computed. ``None``: one
            prefill forward for the whole batch, as stock transformers does.
    """

    def __init__(
        self,
        config=None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_blocks: int | None = None,
        max_memory: int | str | None = None,
        share_prefixes: bool = True,
        max_prefill_tokens: int | None = 8192,
    ):
        super().__init__(layers=[])
        block_size = check_count(block_size, "block_size")
        max_blocks = check_count(max_blocks, "max_blocks")
        max_prefill_tokens = check_count(max_prefill_tokens, "max_prefill_tokens")
        if max_blocks is not None and max_memory is not None:
            raise ValueError("hf_paged: pass max_blocks or max_memory, not both")
        self.config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        self._config_given = config is not None  # else the config of the model it serves (until reset)
        self.block_size = block_size
        self.max_memory = parse_memory(max_memory) if max_memory is not None else None
        self.share_prefixes = share_prefixes
        self.max_prefill_tokens = max_prefill_tokens
        self.pool = BlockPool(max_blocks=max_blocks)
        self.key_cache: list[torch.Tensor | None] = []
        self.value_cache: list[torch.Tensor | None] = []
        self.block_tables: list[list[int]] = []
        self.seq_lens: list[int] = []  # tokens stored per row
        self.pad_lens: list[int] = []  # left pads per row (logical positions never stored)
        # per row, pads after its first token (multi-turn batches): (logical position, count) runs
        self.inner_pads: list[list[tuple[int, int]]] = []
        self._logical_len = 0  # padded length, as a DynamicCache would count it
        self._forward: PagedForward | None = None
        self._prefill_tokens: torch.Tensor | None = None  # token ids of the next prefill, for hashing
        self._group_rows: list[int] | None = None  # rows of the prefill group being run (see generation.py)
        self._pools_version = 0  # bumped whenever a layer's pool tensors are (re)allocated
        self.max_row_blocks: int | None = None  # bound on any row's table length (reserve_for_generation)
        self._graph_state = None  # CUDA graphs of the decode step (see graphs.py), tied to these pools
        self._seq_length_tensor: torch.Tensor | None = None  # get_seq_length() while a graph is captured
        self._model_config = None  # weakref to the config of the model whose K/V the rows hold
        self._layers_per_forward = 0  # layers a complete forward updates (known after the first one)
        self.interrupted: str | None = None  # why the rows are unusable (an exception mid-generate)
        self.forwards = 0  # forwards begun (generate tells from it whether a failed call changed the rows)

    # ================================================================ transformers contract
    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._seq_length_tensor is not None:  # inside a captured decode step: a device tensor
            return self._seq_length_tensor
        return self._logical_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older signature: cache_position
            query_length = query_length.shape[0]
        past = self._logical_len
        if self._forward is not None and not self._forward.started and self._forward.q_len == query_length:
            past = self._forward.new_logical_len - query_length
        return past + query_length, MaskOffset(self)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._logical_len

    @property
    def batch_size(self) -> int:
        return len(self.block_tables) if self.block_tables else -1

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_initialized(self) -> bool:
        return bool(self.block_tables)

    @property
    def is_croppable(self) -> bool:
        return True

    @property
    def is_sliding(self) -> list[bool]:
        return [False] * len(self.key_cache)

    @property
    def is_linear(self) -> list[bool]:
        return [False] * len(self.key_cache)

    @property
    def is_dummy(self) -> list[bool]:
        return [False] * len(self.key_cache)

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (
            f"PagedCache(rows={len(self.block_tables)}, block_size={self.block_size}, "
            f"blocks_used={self.pool.num_used}/{self.pool.num_blocks}, layers={len(self.key_cache)})"
        )

    def activate_past_recording(self):
        pass  # every token is kept: crop can always roll back

    def is_recording_past(self, layer_idx: int) -> bool:
        return True

    # ---------------------------------------------------------------- update
    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Take the new K/V of one layer and return them unchanged.

        They are written to the layer's pool (pads skipped) by the attention function that comes
        next, inside its own kernel launch for decode: one launch per layer rather than two, which
        is most of the paged path's host time per step. Should anything read or change the cache
        before that (a new forward, a row operation), the write happens then instead. Nothing is
        concatenated: attention reads the whole context through the block table.
        """
        fwd = self._forward
        if fwd is None or layer_idx in fwd.layers_done:
            raise RuntimeError(
                "hf_paged: PagedCache.update was called with no paged metadata for this forward. The "
                "model must build its attention mask through transformers' masking utilities with "
                "attn_implementation='paged' (a precomputed 4D attention_mask is not supported), and "
                "PagedCache must be used with attn_implementation='paged'."
            )
        if not fwd.layers_done:  # the forward is happening: commit its logical length
            self._logical_len = fwd.new_logical_len
        fwd.layers_done.add(layer_idx)
        if key_states.shape[0] != fwd.block_table.shape[0] or key_states.shape[2] != fwd.q_len:
            raise ValueError(
                f"hf_paged: layer {layer_idx} gave K/V of shape {tuple(key_states.shape)} but this forward "
                f"has {fwd.block_table.shape[0]} rows of {fwd.q_len} tokens"
            )
        k_pool, v_pool = self._ensure_layer_pools(layer_idx, key_states, value_states)
        meta = fwd.on(key_states.device)
        if meta.copy_src is not None:  # copy-on-write before anything writes the copied blocks
            with device_guard(key_states.device):
                meta.backend.copy_blocks(k_pool, v_pool, meta.copy_src, meta.copy_dst)
        fwd.pending[layer_idx] = (key_states, value_states)
        return key_states, value_states

    def _flush_pending(self) -> None:
        """Write the K/V that update() took and no attention call wrote (see update)."""
        fwd = self._forward
        if fwd is None or not fwd.pending:
            return
        for layer_idx, (key, value) in list(fwd.pending.items()):
            meta = fwd.on(key.device)
            k_pool, v_pool = self.layer_pools(layer_idx)
            with device_guard(key.device):
                meta.backend.store_kv(key, value, k_pool, v_pool, meta.slot_mapping)
        fwd.pending.clear()

    def _end_forward(self) -> None:
        self._flush_pending()
        self._forward = None

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def dense_layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer ``layer_idx``'s K/V as a DynamicCache holds them: ``[rows, kv_heads, padded
        length, dim]``, each stored token at its logical position, zeros at pads (a copy)."""
        k_pool, v_pool = self.layer_pools(layer_idx)
        if k_pool is None:
            return None, None
        self._flush_pending()
        bs, width = self.block_size, self._logical_len
        rows, cols, slots = [], [], []
        for b, (table, n) in enumerate(zip(self.block_tables, self.seq_lens)):
            stored = np.ones(width, dtype=bool)
            stored[: self.pad_lens[b]] = False
            for at, count in self.inner_pads[b]:
                stored[at:at + count] = False
            positions = np.flatnonzero(stored)[:n]
            index = np.arange(len(positions))
            rows.append(np.full(len(positions), b))
            cols.append(positions)
            slots.append(np.asarray(table, dtype=np.int64)[index // bs] * bs + index % bs)
        out = []
        for pool in (k_pool, v_pool):
            dense = pool.new_zeros((len(self.block_tables), width) + tuple(pool.shape[2:]))
            if rows:
                flat = pool.reshape((-1,) + tuple(pool.shape[2:]))
                idx = [torch.from_numpy(np.concatenate(a)).to(pool.device) for a in (rows, cols, slots)]
                dense[idx[0], idx[1]] = flat[idx[2]]
            out.append(dense.transpose(1, 2))
        return out[0], out[1]

    def _ensure_layer_pools(self, layer_idx, key_states, value_states):
        """This layer's K/V pools, created on the K/V's device at its first update and enlarged
        when the block pool grew."""
        while len(self.key_cache) <= layer_idx:
            self.layers.append(PagedLayer(self, len(self.key_cache)))
            self.key_cache.append(None)
            self.value_cache.append(None)
        k_pool = self.key_cache[layer_idx]
        need = self.pool.num_blocks
        if k_pool is None:
            _, h, _, d = key_states.shape
            dv = value_states.shape[-1]
            self._check_layer_against_cap(layer_idx, h, d, dv)
            shape = (need, self.block_size, h, d)
            self.key_cache[layer_idx] = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
            self.value_cache[layer_idx] = torch.empty(
                shape[:3] + (dv,), dtype=value_states.dtype, device=value_states.device
            )
            self._pools_version += 1
        else:
            if key_states.dtype != k_pool.dtype:
                raise TypeError(
                    f"hf_paged: layer {layer_idx} gave K/V in {key_states.dtype} but its cache holds "
                    f"{k_pool.dtype}; one PagedCache serves one dtype: make a new PagedCache for another dtype."
                )
            if k_pool.shape[0] < need:
                self._enlarge_layer_pools(layer_idx, need)
        return self.key_cache[layer_idx], self.value_cache[layer_idx]

    def _check_layer_against_cap(self, layer_idx: int, kv_heads: int, key_dim: int, value_dim: int) -> None:
        """max_memory became a number of blocks through the config's K/V shape: a layer that
        stores another shape would take the pool past the cap."""
        if self.max_memory is None or self.pool.max_blocks is None or self._bytes_per_token():
            return
        shape = config_kv_shape(self.config)
        if shape is not None and layer_idx < shape[0] and (kv_heads, key_dim, value_dim) == shape[1:]:
            return
        raise ValueError(
            f"hf_paged: max_memory was turned into {self.pool.max_blocks} blocks from the config's K/V shape "
            f"(layers, KV heads, key dim, value dim) = {shape}, but layer {layer_idx} stores {kv_heads} heads x "
            f"{key_dim}/{value_dim} dims: the pool would exceed the cap. Pass max_blocks instead of max_memory."
        )

    def _enlarge_layer_pools(self, layer_idx: int, need: int) -> None:
        """The pool grew: enlarge this layer's tensors, keeping the stored blocks."""
        for pools in (self.key_cache, self.value_cache):
            old = pools[layer_idx]
            new = torch.empty((need,) + tuple(old.shape[1:]), dtype=old.dtype, device=old.device)
            new[: old.shape[0]].copy_(old)
            pools[layer_idx] = new
        self._pools_version += 1

    def grow_layer_pools(self) -> None:
        """Enlarge every existing layer's tensors to the block pool's size now (rather than at
        each layer's next update)."""
        need = self.pool.num_blocks
        for layer_idx, k_pool in enumerate(self.key_cache):
            if k_pool is not None and k_pool.shape[0] < need:
                self._enlarge_layer_pools(layer_idx, need)

    # ---------------------------------------------------------------- begin_forward
    def begin_forward(
        self,
        attention_mask: torch.Tensor | None,
        q_len: int,
        batch_size: int,
        device: torch.device,
        dtype: torch.dtype | None = None,
        table_width: int | None = None,
        config=None,
    ) -> PagedForward:
        """Allocate blocks for this forward's new tokens and build its metadata (once per forward).

        ``table_width``: pad the block table to at least this many columns (CUDA graphs keep one
        width for many steps; columns past a row's blocks are never read). ``config``: the config
        of the model running the forward (checked against the model whose K/V the rows hold).
        """
        fwd = self._forward
        if fwd is not None and not fwd.started and fwd.q_len == q_len and fwd.block_table.shape[0] == batch_size:
            return fwd  # a second mask (e.g. sliding-window layers) of the same forward

        backend = _backend_for(device)  # first: a backend that cannot run here fails before any allocation
        self._check_usable(config)
        self.forwards += 1
        self._flush_pending()  # the previous forward's K/V, if its attention did not write them
        rows = self._forward_rows(batch_size)
        self._resolve_memory_cap(dtype)

        bs = self.block_size
        tables = [self.block_tables[r] for r in rows]  # the same list objects: edits land in the cache
        seq_before = np.asarray([self.seq_lens[r] for r in rows], dtype=np.int64)
        real = self._real_new_tokens(attention_mask, q_len, batch_size, seq_before)
        n_new = real.sum(axis=1).astype(np.int64)
        # a row's stored index for each new token: its real tokens get the next indices; a pad
        # after the row's first token gets the index of the last real token before it (the keys
        # stock's query at that pad sees); a pad before it, -1 (it sees nothing)
        rank = seq_before[:, None] + np.cumsum(real, axis=1) - 1
        query_pos = np.where(real | (rank >= 0), rank, -1)
        started_here = (seq_before == 0) & real.any(axis=1)
        lead = np.where(seq_before == 0, np.where(real.any(axis=1), real.argmax(axis=1), q_len), 0)
        pads_after_start = ~real & (query_pos >= 0)

        # --- allocation (all or nothing) -------------------------------------------------
        seq_after = seq_before + n_new
        blocks_after = -(-seq_after // bs)
        need_per_row = [int(blocks_after[b]) - len(tables[b]) for b in range(batch_size)]
        # Copy-on-write: rows about to write into a shared, partially filled tail block. Of k such
        # writers of a block with r references, min(k, r - 1) copy it; the last one writes in place.
        cow_rows = [
            b for b in range(batch_size)
            if n_new[b] > 0 and seq_before[b] % bs != 0 and self.pool.ref_count(tables[b][-1]) > 1
        ]
        writers: dict[int, int] = {}
        for b in cow_rows:
            writers[tables[b][-1]] = writers.get(tables[b][-1], 0) + 1
        n_copies = sum(min(k, self.pool.ref_count(blk) - 1) for blk, k in writers.items())
        reuse, row_hashes = self._plan_prefix_reuse(real, started_here, q_len)
        total = sum(need_per_row) + n_copies - sum(len(r) for r in reuse.values())
        try:
            fresh = self.pool.allocate(total)
        except OutOfBlocksError as e:
            raise OutOfBlocksError(
                e.needed, e.available, e.max_blocks,
                hint=f"(block_size={bs}; rows={batch_size}; longest row would hold {int(seq_after.max())} tokens)",
            ) from None
        fresh.reverse()
        copies: list[tuple[int, int]] = []
        for b in cow_rows:
            table = tables[b]
            src = table[-1]
            if self.pool.ref_count(src) == 1:
                continue  # the other sharers copied it away: this row now owns it
            dst = fresh.pop()
            table[-1] = dst
            copies.append((src, dst))
            self.pool.decref([src])  # after allocate: a freed src is never handed out as a dst
        skip_until = np.zeros(batch_size, dtype=np.int64)  # stored index below which a row reuses blocks
        for b in range(batch_size):
            table = tables[b]
            for ref in reuse.get(b, ()):
                blk = ref if isinstance(ref, int) else tables[ref[0]][ref[1]]
                self.pool.incref([blk])
                table.append(blk)
            skip_until[b] = len(table) * bs if b in reuse else 0
            table.extend(fresh.pop() for _ in range(int(blocks_after[b]) - len(table)))
        assert not fresh
        for b, hashes in row_hashes.items():
            for i, h in enumerate(hashes):
                if tables[b][i] not in self.pool.block_hash:
                    self.pool.register_hash(tables[b][i], h)
        for b, r in enumerate(rows):
            self.pad_lens[r] += int(lead[b])
            if pads_after_start[b].any():
                runs = self.inner_pads[r]
                for j in np.flatnonzero(pads_after_start[b]):
                    at = self._logical_len + int(j)
                    if runs and sum(runs[-1]) == at:
                        runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                    else:
                        runs.append((at, 1))
            self.seq_lens[r] = int(seq_after[b])

        # --- metadata, vectorised (no per-token Python loops) ------------------------------
        max_blocks = max(1, max(len(t) for t in tables), table_width or 0)
        block_table = np.zeros((batch_size, max_blocks), dtype=np.int32)
        for b, table in enumerate(tables):
            block_table[b, : len(table)] = table
        safe_pos = np.maximum(query_pos, 0)
        blk = np.take_along_axis(block_table, safe_pos // bs, axis=1).astype(np.int64)
        slot = blk * bs + safe_pos % bs
        slot = np.where(real & (query_pos >= skip_until[:, None]), slot, -1)
        n_copies = len(copies)
        packed = np.concatenate([
            block_table.ravel(), seq_after.astype(np.int32), query_pos.astype(np.int32).ravel(),
            slot.astype(np.int32).ravel(), np.asarray([c[0] for c in copies] + [c[1] for c in copies], np.int32),
        ])
        host = torch.from_numpy(packed)
        if device.type == "cuda":
            dev = host.pin_memory().to(device, non_blocking=True)
        else:
            dev = host.to(device)
        n_meta = batch_size * (max_blocks + 1 + 2 * q_len)
        bt, sl, qp, sm = split_metadata(dev[:n_meta], batch_size, max_blocks, q_len)
        src = dev[n_meta:n_meta + n_copies].long() if n_copies else None
        dst = dev[n_meta + n_copies:].long() if n_copies else None
        self._forward = PagedForward(
            cache_ref=weakref.ref(self), q_len=q_len, block_table=bt, seq_lens=sl, query_pos=qp, slot_mapping=sm,
            copy_src=src, copy_dst=dst, max_seq_len=max(1, int(seq_after.max())),
            new_logical_len=self._logical_len + q_len, backend=backend, packed_meta=dev[:n_meta],
            max_context_len=int(seq_before.max()) if batch_size else 0,
            pads_after_start=bool(pads_after_start.any()),
        )
        return self._forward

    def _check_usable(self, config) -> None:
        """Refuse rows left unusable (an exception mid-generate, a forward cut short, another
        model's K/V); bind a fresh cache to the model of its first forward."""
        if self.interrupted is not None:
            raise CacheStateError(
                f"hf_paged: this PagedCache was left mid-generation by an exception ({self.interrupted}); its rows "
                f"are incomplete. Call cache.reset() before reusing it."
            )
        fwd = self._forward
        if fwd is not None and fwd.started and self._layers_per_forward and \
                len(fwd.layers_done) < self._layers_per_forward:
            raise CacheStateError(
                f"hf_paged: the previous forward on this PagedCache stopped after {len(fwd.layers_done)} of "
                f"{self._layers_per_forward} layers (an exception?); its rows are incomplete. Call cache.reset() "
                f"before reusing it."
            )
        if fwd is not None and fwd.started:
            self._layers_per_forward = max(self._layers_per_forward, len(fwd.layers_done))
        if config is None:
            return
        config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        bound = self._model_config() if self._model_config is not None else None
        if bound is config:
            return
        if self._model_config is not None and self.block_tables:
            raise CacheStateError(
                "hf_paged: this PagedCache holds the K/V of another model; call cache.reset() before using it "
                "with this one, or give each model its own PagedCache."
            )
        shape = config_kv_shape(config)
        if self.config is not None and self.config is not config and shape is not None and \
                config_kv_shape(self.config) != shape:
            raise ValueError(
                f"hf_paged: this PagedCache was built from a config with (layers, KV heads, key dim, value dim) = "
                f"{config_kv_shape(self.config)} but the model using it has {shape}. Build it with "
                f"PagedCache(config=model.config, ...)."
            )
        if self.key_cache and shape is not None and any(
                k is not None and (k.shape[2], k.shape[3]) != shape[1:3] for k in self.key_cache):
            # reset() kept the tensors of a model of another shape: they cannot serve this one
            self.key_cache, self.value_cache, self.layers = [], [], []
            self._pools_version += 1
            if self.max_memory is not None:
                self.pool = BlockPool()
        self.config = config
        self._model_config = weakref.ref(config)

    def _forward_rows(self, batch_size: int) -> list[int]:
        """The cache rows this forward's batch rows are (all rows, or a prefill group's rows)."""
        if self._group_rows is not None:
            if batch_size != len(self._group_rows):
                raise ValueError(
                    f"hf_paged: a prefill group of {len(self._group_rows)} rows got a batch of {batch_size}"
                )
            return self._group_rows
        if not self.block_tables:
            self._add_rows(batch_size)
        elif batch_size != len(self.block_tables):
            raise ValueError(
                f"hf_paged: this forward has batch size {batch_size} but the cache holds "
                f"{len(self.block_tables)} rows (call cache.reset() before reusing it for another batch)"
            )
        return list(range(batch_size))

    def _add_rows(self, n: int) -> None:
        self.block_tables.extend([] for _ in range(n))
        self.seq_lens.extend([0] * n)
        self.pad_lens.extend([0] * n)
        self.inner_pads.extend([] for _ in range(n))

    def _real_new_tokens(self, attention_mask, q_len, batch_size, seq_before) -> np.ndarray:
        """bool [B, Q]: which of this forward's tokens are real (stored), from the 2D mask."""
        # A decode step (one new token for rows that all hold tokens) is never padded by generate:
        # reading the mask on the GPU at every step would cost a host-device synchronisation.
        # Prompts, continued multi-turn batches and multi-token steps are read.
        must_read = attention_mask is not None and (
            attention_mask.device.type == "cpu" or q_len > 1 or bool((seq_before == 0).any())
        )
        if not must_read:
            return np.ones((batch_size, q_len), dtype=bool)
        real = attention_mask[:, -q_len:].to("cpu", torch.bool).numpy()
        if real.shape != (batch_size, q_len):
            raise ValueError(
                f"hf_paged: attention_mask of shape {tuple(attention_mask.shape)} does not cover "
                f"{batch_size} rows x {q_len} new tokens"
            )
        return real

    # ---------------------------------------------------------------- prefix sharing
    def set_prefill_tokens(self, input_ids: torch.Tensor | None) -> None:
        """Token ids of the next forward's new tokens ``[B, Q]``, so that identical full prompt
        blocks (same tokens from the row's first token on) are stored once."""
        self._prefill_tokens = input_ids

    def _plan_prefix_reuse(self, real, started_here, q_len):
        """Which full prompt blocks of rows that start in this forward already exist.

        Returns ``reuse`` (row -> leading blocks to reference: a block id from the pool, or
        ``(row, i)`` for block ``i`` of an earlier row of this forward, not yet allocated) and
        ``row_hashes`` (row -> chained hashes of its full blocks, registered once allocated).
        Hashes chain over the tokens from the row's first real token, so a hit means the same
        tokens at the same positions: the same K/V.
        """
        tokens, self._prefill_tokens = self._prefill_tokens, None
        if not self.share_prefixes or tokens is None or tuple(tokens.shape) != (len(real), q_len):
            return {}, {}
        tokens = tokens.to("cpu").numpy()
        bs = self.block_size
        reuse: dict[int, list] = {}
        row_hashes: dict[int, list[bytes]] = {}
        first_seen: dict[bytes, tuple[int, int]] = {}  # hash -> (row, block index) in this forward
        for b in range(len(real)):
            if not started_here[b]:
                continue
            row = tokens[b][real[b]].astype(np.int64)
            hashes, h = [], b""
            for i in range(len(row) // bs):
                # 128-bit digest chained over the prefix: collisions are out of reach, and every
                # process (tensor-parallel ranks) computes the same value
                h = hashlib.blake2b(h + row[i * bs:(i + 1) * bs].tobytes(), digest_size=16).digest()
                hashes.append(h)
            refs: list = []
            for h in hashes:
                hit = self.pool.lookup_hash(h)
                if hit is None:
                    hit = first_seen.get(h)
                if hit is None:
                    break
                refs.append(hit)
            for i in range(len(refs), len(hashes)):
                first_seen.setdefault(hashes[i], (b, i))
            if refs:
                reuse[b] = refs
            row_hashes[b] = hashes
        return reuse, row_hashes

    def reserve_for_generation(self, prompt_lengths: list[int], copies: list[int], max_new_tokens: int) -> None:
        """Size the pool for a ``generate`` call: an upper bound of what it can use.

        ``prompt_lengths[d]`` is the real length of distinct prompt ``d`` (stored once) and
        ``copies[d]`` how many rows (beams, samples) continue it. A row then owns at most the
        blocks of its new tokens (the last generated token is never fed back) plus, when its prompt
        is shared, a copy of the prompt's partial tail. generate calls this with
        ``max_new_tokens=0`` before the prefill (so the prefill's activations do not sit on top of
        the decode's reservation) and with the real value after it.
        """
        bs = self.block_size
        total = 0
        if max_new_tokens > 0:
            self.max_row_blocks = max((-(-(length + max_new_tokens - 1) // bs) for length in prompt_lengths),
                                      default=None)
        for length, n in zip(prompt_lengths, copies):
            total += -(-length // bs)
            if max_new_tokens > 0:
                shared_prefix = -(-length // bs) if n == 1 else length // bs
                total += n * (-(-(length + max_new_tokens - 1) // bs) - shared_prefix)
        self.pool.reserve(total)

    # ---------------------------------------------------------------- row operations
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``. Tables move, K/V do not."""
        idx = beam_idx.tolist() if isinstance(beam_idx, torch.Tensor) else list(beam_idx)
        self._select_rows(idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        idx = indices.tolist() if isinstance(indices, torch.Tensor) else list(indices)
        self._select_rows(idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._select_rows([i for i in range(len(self.block_tables)) for _ in range(repeats)])

    def _select_rows(self, idx: list[int]) -> None:
        if not self.block_tables:
            return
        self._end_forward()
        old = self.block_tables
        if any(i < 0 or i >= len(old) for i in idx):
            raise IndexError(f"hf_paged: row index out of range for a cache of {len(old)} rows: {idx}")
        # A row that stays itself (beam search: most beams at most steps) keeps its table and its
        # references; only the rows that change pay for ref counting (increfs before decrefs, so
        # no block is freed on the way).
        kept = [i < len(old) and src == i for i, src in enumerate(idx)]
        new = [old[i] if keep else list(old[src]) for i, (src, keep) in enumerate(zip(idx, kept))]
        for t, keep in zip(new, kept):
            if not keep:
                self.pool.incref(t)
        for i, t in enumerate(old):
            if not (i < len(kept) and kept[i]):
                self.pool.decref(t)
        self.block_tables = new
        self.seq_lens = [self.seq_lens[i] for i in idx]
        self.pad_lens = [self.pad_lens[i] for i in idx]
        self.inner_pads = [list(self.inner_pads[i]) for i in idx]

    def fork_rows(self, idx: list[int]) -> None:
        """Public alias of row selection with repetition: rows share blocks copy-on-write."""
        self._select_rows(idx)

    def crop(self, max_length: int) -> None:
        """Drop the last ``-max_length`` positions when negative (transformers >= 5.23 calls
        ``crop(-n)``, and ``crop(0)`` as a no-op); keep the first ``max_length`` when positive (the
        older convention). Blocks no longer referenced return to the pool."""
        max_length = int(max_length)  # transformers 5.17's assisted decoding passes a tensor
        if max_length == 0:
            return
        if max_length < 0:
            max_length = max(0, self._logical_len + max_length)
        if max_length >= self._logical_len:
            return
        self._end_forward()
        bs = self.block_size
        for b, table in enumerate(self.block_tables):
            # stored tokens among the first max_length logical positions: all but the pads there
            runs = [(at, min(n, max_length - at)) for at, n in self.inner_pads[b] if at < max_length]
            self.inner_pads[b] = runs
            unstored = min(self.pad_lens[b], max_length) + sum(n for _, n in runs)
            keep_tokens = max(0, min(self.seq_lens[b], max_length - unstored))
            keep_blocks = -(-keep_tokens // bs)
            dropped = table[keep_blocks:]
            del table[keep_blocks:]
            self.pool.decref(dropped)
            if keep_tokens % bs and self.pool.ref_count(table[-1]) == 1:
                self.pool.forget_hash(table[-1])  # it becomes partial and will be written again
            self.seq_lens[b] = keep_tokens
            self.pad_lens[b] = min(self.pad_lens[b], max_length)
        self._logical_len = max_length

    def reset(self) -> None:
        """Forget every row; blocks return to the pool (its tensors stay allocated for reuse)."""
        self._forward = None  # its unwritten K/V belonged to rows that are gone
        self.max_row_blocks = None
        self.pool.reset()
        self.block_tables, self.seq_lens, self.pad_lens, self.inner_pads = [], [], [], []
        self._logical_len = 0
        self._model_config = None
        if not self._config_given:
            self.config = None
        self._layers_per_forward = 0
        self.interrupted = None
        self._prefill_tokens = None
        self._group_rows = None

    # ---------------------------------------------------------------- memory
    def _bytes_per_token(self) -> int:
        """K+V bytes of one token over all layers (from the pools, else from the config)."""
        if self.key_cache and all(k is not None for k in self.key_cache):
            return sum(
                (k[0, 0].numel() * k.element_size() + v[0, 0].numel() * v.element_size())
                for k, v in zip(self.key_cache, self.value_cache)
            )
        return 0

    def _resolve_memory_cap(self, dtype: torch.dtype | None) -> None:
        if self.max_memory is None or self.pool.max_blocks is not None:
            return
        per_token = self._bytes_per_token() or _config_bytes_per_token(self.config, dtype)
        if not per_token:
            raise ValueError(
                "hf_paged: max_memory needs the model config to size a block: pass "
                "PagedCache(config=model.config, max_memory=...) or use max_blocks."
            )
        max_blocks = self.max_memory // (per_token * self.block_size)
        if max_blocks < 1:
            raise ValueError(
                f"hf_paged: max_memory={self.max_memory} bytes is less than one block "
                f"({per_token * self.block_size} bytes at block_size={self.block_size})"
            )
        self.pool.max_blocks = max_blocks

    def memory_stats(self) -> dict:
        """What the cache holds and uses, and what a DynamicCache would hold for the same rows.

        Keys: ``block_size``, ``blocks_total`` (held by the pool), ``blocks_used`` (distinct blocks
        referenced by some row), ``blocks_shared`` (referenced more than once), ``rows``,
        ``tokens_logical`` (sum of the rows' non-pad lengths), ``tokens_stored`` (distinct stored
        token slots), ``tokens_dense`` (rows x padded length: a DynamicCache's tokens),
        ``bytes_per_token``, ``bytes_reserved`` (pool tensors), ``bytes_used``, ``bytes_dense``,
        ``saving`` (bytes_dense / bytes_used).
        """
        bs = self.block_size
        filled: dict[int, int] = {}
        for table, n in zip(self.block_tables, self.seq_lens):
            for i, blk in enumerate(table):
                filled[blk] = max(filled.get(blk, 0), min(bs, n - i * bs))
        per_token = self._bytes_per_token()
        reserved = sum(
            k.numel() * k.element_size() + v.numel() * v.element_size()
            for k, v in zip(self.key_cache, self.value_cache) if k is not None
        )
        blocks_used = len(filled)
        rows = len(self.block_tables)
        bytes_used = blocks_used * bs * per_token
        bytes_dense = rows * self._logical_len * per_token
        return {
            "block_size": bs,
            "blocks_total": self.pool.num_blocks,
            "blocks_used": blocks_used,
            "blocks_shared": sum(1 for b in filled if self.pool.ref_count(b) > 1),
            "rows": rows,
            "tokens_logical": int(sum(self.seq_lens)),
            "tokens_stored": int(sum(filled.values())),
            "tokens_dense": rows * self._logical_len,
            "bytes_per_token": per_token,
            "bytes_reserved": reserved,
            "bytes_used": bytes_used,
            "bytes_dense": bytes_dense,
            "saving": (bytes_dense / bytes_used) if bytes_used else 0.0,
        }


def split_metadata(packed: torch.Tensor, batch: int, width: int, q_len: int):
    """Views ``(block_table [B, W], seq_lens [B], query_pos [B, Q], slot_mapping [B, Q])`` of a
    forward's packed int32 metadata (the layout begin_forward writes, one host-to-device copy)."""
    a = batch * width
    b = a + batch
    c = b + batch * q_len
    return (packed[:a].view(batch, width), packed[a:b], packed[b:c].view(batch, q_len),
            packed[c:c + batch * q_len].view(batch, q_len))


def config_kv_shape(config) -> tuple[int, int, int, int] | None:
    """``(layers, kv_heads, key_dim, value_dim)`` of the K/V a model with this config stores per
    token, or None when the config does not say."""
    if config is None:
        return None
    try:
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        if getattr(config, "kv_lora_rank", None):
            # multi-head latent attention (DeepSeek-V2/V3): one head of two compressed latents
            return layers, 1, config.kv_lora_rank, config.qk_rope_head_dim
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers -= getattr(config, "num_kv_shared_layers", 0) or 0  # layers reading another's K/V (Gemma3n)
    except (AttributeError, TypeError):
        return None
    return layers, kv_heads, head_dim, head_dim


def _config_bytes_per_token(config, dtype) -> int:
    shape = config_kv_shape(config)
    if shape is None:
        return 0
    layers, kv_heads, key_dim, value_dim = shape
    dtype = dtype or getattr(config, "dtype", None) or torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return layers * kv_heads * (key_dim + value_dim) * torch.empty((), dtype=dtype).element_size()


def cache_of(generate_output):
    """The cache a ``generate(..., return_dict_in_generate=True)`` output holds: ``cache`` from
    transformers 5.2x, ``past_key_values`` before (reading the old name on 5.2x would warn)."""
    if "cache" in generate_output:
        return generate_output["cache"]
    return getattr(generate_output, "past_key_values", None)


_BACKENDS: dict = {}


def device_guard(device: torch.device):
    """Make ``device`` the current CUDA device while launching kernels on its tensors.

    Triton launches on the *current* device, not on its arguments' device: under
    ``device_map`` a layer on ``cuda:1`` must not launch on ``cuda:0``.
    """
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def backend_name(device: torch.device) -> str:
    """The kernels' backend for tensors on ``device``: Triton on CUDA, the PyTorch reference
    elsewhere, unless ``HF_PAGED_BACKEND`` forces one (read at each call, so tests can switch it)."""
    import os

    return os.environ.get("HF_PAGED_BACKEND") or ("triton" if device.type == "cuda" else "torch")


def _backend_for(device: torch.device):
    """The kernels for tensors on ``device`` (see :func:`backend_name`)."""
    from .kernels import get_backend

    name = backend_name(device)
    backend = _BACKENDS.get((name, device.type))
    if backend is None:
        backend = _BACKENDS[(name, device.type)] = get_backend(name)
    return backend
