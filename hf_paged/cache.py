"""The paged KV cache: transformers' ``Cache`` contract over block tables and layer pools.

One forward over a :class:`PagedCache` (``docs/how-it-works.md`` draws it):

1. **begin**: transformers' mask builder calls :meth:`PagedCache.get_mask_sizes`, whose
   ``kv_offset`` carries the cache to our mask function (``attention.py``), which calls
   :meth:`PagedCache.begin_forward`: the block tables plan the forward (``block_table.py``:
   blocks for the new tokens, copy-on-write, prefix reuse), the plan goes to the device in one
   copy (``forward.py``), and the :class:`~hf_paged.forward.PagedForward` returned is every
   attention layer's ``attention_mask``.
2. **each layer**: :meth:`PagedCache.update` gives the layer its pools (``layer_pools.py``), runs
   its copy-on-write copies, hands its new K/V to the forward and returns them; the attention
   function writes them and reads the layer's context from its pool (``kernels/``).
3. **end**: :meth:`PagedCache.end_forward` writes whatever no attention call wrote; the next
   ``begin_forward`` ends the previous forward if nobody did.
"""

from __future__ import annotations

import contextlib
import weakref

import numpy as np
import torch
from transformers.cache_utils import Cache

from . import compat
from .block_pool import BlockPool
from .block_table import BlockTables
from .forward import ForwardMetadata, PagedForward, real_new_tokens
from .kernels import backend_for, cdiv
from .kernels.env import switch
from .kernels.tuning import WINDOW_READ_MARGIN
from .layer_pools import LayerPools
from .memory import blocks_within, check_count, config_bytes_per_token, config_kv_shape, parse_memory
from .paged_layer import PagedLayer, dense_kv
from .prefix_cache import model_key


DEFAULT_BLOCK_SIZE = 16
WINDOW_ENV_VAR = "HF_PAGED_WINDOW_BLOCKS"


def _release_rows(cache_tables: list) -> None:
    """A cache over a prefix cache is gone: its rows' blocks go back to the shared pools (hashes
    registered by a forward that never completed are dropped first)."""
    for tables in cache_tables:
        tables.forget_registered()
        tables.clear(keep_cached=True)


def _window_layers(config) -> tuple[int | None, frozenset]:
    """The sliding window of the config's windowed layers and their indices (``layer_types``, or
    every layer when the config has a ``sliding_window`` and no layer types, as Mistral's); (None,
    empty) without them, or with ``HF_PAGED_WINDOW_BLOCKS=0`` (every layer keeps every block)."""
    if not switch(WINDOW_ENV_VAR):
        return None, frozenset()
    window = getattr(config, "sliding_window", None)
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        return None, frozenset()
    types = compat.layer_types(config)
    if types:
        layers = frozenset(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        layers = frozenset(range(int(getattr(config, "num_hidden_layers", 0) or 0)))
    return (window, layers) if layers else (None, frozenset())


class CacheStateError(RuntimeError):
    """The cache's rows cannot serve this forward (the message says why; ``reset()`` clears them)."""


class PagedCache(Cache):
    """KV cache kept in fixed-size blocks (PagedAttention).

    Stores, per layer, a pool of K and V blocks ``[num_blocks, block_size, num_kv_heads, head_dim]``;
    one block table per row (shared by all layers) maps each row's stored token ``i`` to block
    ``table[i // block_size]``, offset ``i % block_size``. Pads are never stored; rows that share
    a prefix (beams, ``num_return_sequences`` copies, identical prompt blocks) share blocks,
    copy-on-write. Memory grows a block at a time as sequences grow. Sliding-window layers
    (Mistral, and those of Gemma 2/3, gpt-oss, Qwen2 that ``layer_types`` marks) keep their blocks
    in a second pool with its own tables (``window_tables``), where blocks that have left the
    window are freed: a long generation holds about one window per row there.

    Use it through ``attn_implementation="paged"`` (``generate`` then creates one), or pass
    ``past_key_values=PagedCache(config=model.config, block_size=..., max_memory="4GiB")`` to
    choose the block size or cap the memory. ``memory_stats()`` reports what is held and used.

    Args:
        config: the model config (sizes ``max_memory`` before the first forward; else the config of
            the first model that uses the cache is taken).
        block_size: tokens per block (a multiple of 16 for the Triton kernels).
        max_blocks: cap on the number of blocks in the pool.
        max_memory: cap on the pool's bytes over all layers (int or e.g. ``"4GiB"``).
        share_prefixes: prefill duplicated prompts once and store identical full prompt blocks once.
        max_prefill_tokens: generate's prefill runs the prompts, sorted by length, in groups of at
            most this many (padded) tokens, each group trimmed to its own longest prompt: the
            activations stop growing with the batch and less padding is computed. ``None``: one
            prefill forward for the whole batch, as stock transformers does.
        prefix_cache: a :class:`~hf_paged.prefix_cache.PrefixCache` whose pool and tensors this
            cache borrows (its cap and block size apply): prompt blocks stored by earlier calls
            are reused, and this cache's blocks return there when it lets its rows go.
    """

    def __init__(self, config=None, block_size: int = DEFAULT_BLOCK_SIZE, max_blocks: int | None = None,
                 max_memory: int | str | None = None, share_prefixes: bool = True,
                 max_prefill_tokens: int | None = 8192, prefix_cache=None):
        super().__init__(layers=[])
        block_size = check_count(block_size, "block_size")
        max_blocks = check_count(max_blocks, "max_blocks")
        self.max_prefill_tokens = check_count(max_prefill_tokens, "max_prefill_tokens")
        if max_blocks is not None and max_memory is not None:
            raise ValueError("hf_paged: pass max_blocks or max_memory, not both")
        if prefix_cache is not None and (max_blocks is not None or max_memory is not None):
            raise ValueError("hf_paged: a PagedCache over a prefix_cache uses the prefix cache's cap: pass max_memory "
                             "/ max_blocks to PrefixCache, not to PagedCache")
        if prefix_cache is not None and block_size not in (DEFAULT_BLOCK_SIZE, prefix_cache.block_size):
            raise ValueError(f"hf_paged: block_size={block_size} differs from the prefix cache's "
                             f"{prefix_cache.block_size}; build the PrefixCache with the block size you want")
        self.config = compat.text_config(config) if config is not None else None
        self._config_given = config is not None  # else the config of the model it serves (until reset)
        self.prefix_cache = prefix_cache
        if prefix_cache is not None:
            # borrowed: the pool and tensors outlive this cache; hashes wait for bind_model's salt
            self.block_size = prefix_cache.block_size
            self.max_memory = prefix_cache.max_memory
            self.pool = prefix_cache.pool
            self.pools = prefix_cache.pools
            self.tables = BlockTables(self.pool, self.block_size)
            self.tables.salt = None
            self._all_tables = [self.tables]  # the rows' blocks go back to the shared pools with this cache
            weakref.finalize(self, _release_rows, self._all_tables)
        else:
            self.block_size = block_size
            self.max_memory = parse_memory(max_memory) if max_memory is not None else None
            self.pool = BlockPool(max_blocks=max_blocks)
            self.tables = BlockTables(self.pool, block_size)
            self.pools = LayerPools(block_size)
            self._all_tables = [self.tables]
        # sliding-window layers: their indices and their tables (None: none kept apart)
        self.window_layers: frozenset = frozenset()
        self.window_tables: BlockTables | None = None
        self.share_prefixes = share_prefixes
        self.tokens_prefilled = 0  # prompt tokens run through the model
        self.tokens_reused = 0  # prompt tokens whose K/V came from stored blocks, without compute
        self._prompt_forward = False  # the next forward runs prompt tokens (set_prefill_tokens)
        self._pads_are_padding = False  # the leading pads of the forwards in prefill_group(continued=True)
        self.max_row_blocks: int | None = None  # bound on any row's table length (reserve_for_generation)
        self.graph_state = None  # CUDA graphs of the decode step, tied to these pools (graphs.py)
        self.model_key: bytes | None = None  # the key of the model the rows are run by (bind_model)
        self.interrupted: str | None = None  # why the rows are unusable (an exception mid-generate)
        self.forwards = 0  # forwards begun (generate tells from it whether a failed call changed the rows)
        self._forward: PagedForward | None = None  # the forward in progress
        self._prefill_tokens: torch.Tensor | None = None  # token ids of the next forward, for prefix hashing
        self._group_rows: list[int] | None = None  # the cache rows of the forwards in row_subset
        # the forward in packed_group: its real tokens in the padded batch and their flat positions
        self._packed: tuple[np.ndarray, torch.Tensor] | None = None
        self._seq_length: torch.Tensor | None = None  # get_seq_length() inside a captured decode step
        self._model_config = None  # weakref to the config of the model whose K/V the rows hold
        self._layers_per_forward = 0  # layers a complete forward updates (known after the first one)
        if self.config is not None:
            self._setup_window_tables()

    # ================================================================ transformers contract
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._seq_length if self._seq_length is not None else self.tables.logical_len

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        return -1

    def get_mask_sizes(self, query_length, layer_idx: int = 0) -> tuple[int, int]:
        query_length = compat.mask_query_length(query_length)
        past = self.tables.logical_len
        fwd = self._forward
        if fwd is not None and not fwd.updated and fwd.meta.q_len == query_length:
            past = fwd.new_logical_len - query_length  # a second mask of the forward begun
        return past + query_length, compat.MaskOffset(self)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self.tables.logical_len

    @property
    def batch_size(self) -> int:
        return self.tables.num_rows or -1

    @property
    def is_initialized(self) -> bool:
        return self.tables.num_rows > 0

    # is_compileable (False), is_croppable, is_sliding, __len__: the base Cache's, over self.layers

    def __repr__(self) -> str:
        return (f"PagedCache(rows={self.tables.num_rows}, block_size={self.block_size}, "
                f"blocks_used={self.pool.num_used}/{self.pool.num_blocks}, layers={len(self.layers)})")

    def activate_past_recording(self, **kwargs):
        # every token is kept: crop can always roll back. Assisted decoding calls it; 5.25 passes
        # recurrent_states_to_keep (for linear-attention layers' states, which a PagedCache has not)
        pass

    def is_recording_past(self, layer_idx: int) -> bool:
        return True

    # the rows, read-only views of the block tables
    @property
    def block_tables(self) -> list[list[int]]:
        return self.tables.tables

    @property
    def seq_lens(self) -> list[int]:
        return self.tables.seq_lens

    @property
    def key_cache(self) -> list[torch.Tensor | None]:
        return self.pools.keys

    @property
    def value_cache(self) -> list[torch.Tensor | None]:
        return self.pools.values

    def layer_pools(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.pools.get(layer_idx)

    # ================================================================ one forward
    def begin_forward(self, attention_mask: torch.Tensor | None, q_len: int, batch_size: int, device: torch.device,
                      dtype: torch.dtype | None = None, table_width: int = 0, config=None,
                      pad_rows_to: int = 0) -> PagedForward:
        """Allocate blocks for this forward's new tokens and build its metadata (once per forward).

        ``attention_mask``: the 2D padding mask (None: every new token is real). ``table_width``: pad
        the block table to at least this many columns, and size the kernels for that width (CUDA
        graphs keep one launch for many steps). ``config``: the config of the model running the
        forward (checked against the model whose K/V the rows hold). ``pad_rows_to``: append pad
        rows (reading and writing nothing) up to this batch size; the model then runs that many
        rows (the engine's decode graphs, captured for bucketed batch sizes).
        """
        fwd = self._forward
        if fwd is not None and not fwd.updated and fwd.call_shape == (batch_size, q_len):
            return fwd  # a second mask (e.g. sliding-window layers) of the same forward
        backend_for(device)  # a backend that cannot run here fails before anything changes
        self._check_usable(config)
        self.end_forward()
        packed, packed_index = self._packed if self._packed is not None else (None, None)
        if packed is not None:  # the model runs [1, N]: the plan is the padded batch's
            call_shape = (batch_size, q_len)
            if call_shape != (1, int(packed.sum())):
                raise ValueError(f"hf_paged: a packed forward over {int(packed.sum())} tokens (packed_group) got a "
                                 f"batch of {batch_size} x {q_len}")
            batch_size, q_len = packed.shape
        rows = self._forward_rows(batch_size)
        self.resolve_memory_cap(dtype)
        seq_before = np.asarray([self.tables.seq_lens[r] for r in rows], dtype=np.int64)
        real = packed if packed is not None else real_new_tokens(attention_mask, q_len, batch_size, seq_before)
        self._check_pads_in_rows(real, seq_before)
        tokens, self._prefill_tokens = self._prefill_tokens, None
        tokens = tokens.to("cpu").numpy() if tokens is not None and self.share_prefixes else None
        plan = self.tables.plan_forward(rows, real, tokens, table_width,
                                        leading_pads_are_padding=self._pads_are_padding).padded(pad_rows_to)
        window_plan = None
        if self.window_tables is not None:
            window_plan = self.window_tables.plan_forward(
                rows, real, tokens, table_width, leading_pads_are_padding=self._pads_are_padding,
                follow=self.tables).padded(pad_rows_to)
            if not np.array_equal(window_plan.seq_lens, plan.seq_lens):
                raise RuntimeError("hf_paged: the window layers' tables disagree with the others' (bookkeeping bug)")
        if self._prompt_forward:
            self.tokens_prefilled += int(real.sum())
            self._prompt_forward = False
        meta = ForwardMetadata.from_plan(plan, device, max_seq_len=table_width * self.block_size,
                                         window_plan=window_plan)
        self.forwards += 1
        self._forward = self._new_forward(meta, self.tables.logical_len + q_len)
        if packed is not None:
            self._forward.call_shape = call_shape
            self._forward.packed_index = packed_index.to(device)
        return self._forward

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Take the new K/V of one layer and return them unchanged.

        The attention function that comes next writes them to the layer's pool (pads skipped),
        inside its own kernel launch for decode: one launch per layer rather than two. Nothing is
        concatenated: attention reads the whole context through the block table.
        """
        fwd = self._forward
        if fwd is None or layer_idx in fwd.updated:
            raise RuntimeError(
                "hf_paged: PagedCache.update was called with no paged metadata for this forward. The model must "
                "build its attention mask through transformers' masking utilities with attn_implementation='paged' "
                "(a precomputed 4D attention_mask is not supported), and PagedCache must be used with "
                "attn_implementation='paged'."
            )
        if not fwd.updated:  # the forward is happening: commit its logical length
            self._set_logical_len(fwd.new_logical_len)
        fwd.updated.add(layer_idx)
        given = key_states, value_states
        if fwd.packed_index is not None and key_states.shape[:1] + key_states.shape[2:3] == fwd.call_shape:
            here = fwd.on(key_states.device)  # the layer's device (device_map)
            key_states, value_states = here.unpack(key_states), here.unpack(value_states)
        if key_states.shape[0] != fwd.meta.batch or key_states.shape[2] != fwd.meta.q_len:
            raise ValueError(
                f"hf_paged: layer {layer_idx} gave K/V of shape {tuple(key_states.shape)} but this forward has "
                f"{fwd.meta.batch} rows of {fwd.meta.q_len} tokens"
            )
        if not self.pools.has(layer_idx):
            self._check_layer_against_cap(layer_idx, key_states.shape[1], key_states.shape[3], value_states.shape[3])
            while len(self.layers) <= layer_idx:
                self.layers.append(PagedLayer(self, len(self.layers)))
        self.pools.ensure(layer_idx, key_states, value_states, self._tables_of(layer_idx).pool.num_blocks)
        fwd.copy_blocks(self.pools, [layer_idx])  # copy-on-write before anything writes the copied blocks
        fwd.new_kv[layer_idx] = (key_states, value_states)
        return given

    def end_forward(self, replayed: bool = False) -> None:
        """The forward in progress is over: write whatever K/V no attention call wrote.
        ``replayed``: its layers ran in a CUDA graph replay (no Python, so no update() committed
        its logical length): commit it here."""
        fwd, self._forward = self._forward, None
        if fwd is not None:
            if replayed:
                self._set_logical_len(fwd.new_logical_len)
            complete = bool(fwd.updated) and len(fwd.updated) >= self._layers_per_forward
            if fwd.updated:
                self._layers_per_forward = max(self._layers_per_forward, len(fwd.updated))
            fwd.write_new_kv()
            if complete:
                for tables in self._all_tables:
                    tables.registered = []  # every layer wrote the blocks hashed for this forward

    def set_prefill_tokens(self, input_ids: torch.Tensor | None) -> None:
        """The next forward runs prompt tokens (counted in ``tokens_prefilled``); ``input_ids``: their
        ids ``[B, Q]``, so that identical full prompt blocks (same tokens from the row's first token
        on) are stored once and hashed for later reuse (None: ids unknown, nothing hashed)."""
        self._prefill_tokens = input_ids
        self._prompt_forward = True

    def bind_model(self, model) -> None:
        """The model this cache's next forwards run (generate calls it once per call): its key
        (``prefix_cache.model_key``: weights, dtype, adapters) keys the CUDA graphs of the decode
        step and, in a pool shared with other calls (a prefix cache), the prefix hashes; a cache
        with its own pool hashes without it (``reset()`` forgets it)."""
        self.model_key = model_key(model)
        if self.prefix_cache is not None:
            for tables in self._all_tables:
                tables.salt = self.model_key

    def reuse_prefix(self, row: int, tokens, max_tokens: int | None = None, hashes: list[bytes] | None = None) -> int:
        """Give the empty row ``row`` the stored blocks (held or cached) holding the leading full
        blocks of its prompt ``tokens`` (at most ``max_tokens`` tokens): returns the tokens it now
        holds without compute (counted in ``tokens_reused``). ``hashes``: the chained hashes of
        the prompt's full blocks under this cache's salt, when the caller computed them already."""
        if not self.share_prefixes:
            return 0
        n = self.tables.reuse_prefix(row, tokens, max_tokens, hashes)
        if self.window_tables is not None and self.window_tables.reuse_prefix(
                row, tokens, n, hashes if self.window_tables.salt == self.tables.salt else None) != n:
            raise RuntimeError("hf_paged: the window layers' pool lacks a reused prefix block (bookkeeping bug)")
        self.tokens_reused += n
        return n

    @contextlib.contextmanager
    def replaying(self, meta: ForwardMetadata, seq_length: torch.Tensor, new_logical_len: int):
        """Run a forward over prebuilt metadata (the static buffers of a CUDA graph, for the step
        that ends at ``new_logical_len``), with ``get_seq_length()`` a device tensor: what a
        captured decode step reads. Yields the forward's :class:`PagedForward`."""
        begun, self._forward = self._forward, self._new_forward(meta, new_logical_len)
        self._seq_length = seq_length
        try:
            yield self._forward
            self._forward.write_new_kv()  # inside the graph too
        finally:
            self._forward = begun  # the step's own forward, which the caller ends
            self._seq_length = None

    # ================================================================ sliding-window layers
    def _setup_window_tables(self) -> None:
        """Give the config's sliding-window layers their own tables and pool (once, before any
        row holds a block: the tables then follow every row operation from the start)."""
        if self.window_tables is not None or self.config is None:
            return
        window, layers = _window_layers(self.config)
        if self.prefix_cache is not None:
            # its layers' tensors are addressed by one pool per layer: every model must split them alike
            split = (window, layers)
            if self.prefix_cache.layer_split is None:
                self.prefix_cache.layer_split = split
            elif self.prefix_cache.layer_split != split:
                def describe(w, ls):
                    return f"layers {sorted(ls)} windowed ({w} tokens)" if w else "no layer windowed"
                raise ValueError(
                    f"hf_paged: this PrefixCache holds K/V of a model with {describe(*self.prefix_cache.layer_split)}, "
                    f"but this model has {describe(*split)} (or HF_PAGED_WINDOW_BLOCKS changed): give each model "
                    f"its own PrefixCache, or call PrefixCache.clear() first.")
        if window is None or self.pool.num_used or any(self.tables.tables):
            return
        if self.prefix_cache is not None:
            pool = self.prefix_cache.window_pool(window)
        else:
            pool = BlockPool()  # at most about a window per row: bounded without a cap
        tables = BlockTables(pool, self.block_size, window=window)
        tables.window_margin = WINDOW_READ_MARGIN
        tables.salt = self.tables.salt
        tables.add_rows(self.tables.num_rows)
        tables.logical_len = self.tables.logical_len
        tables.left_pads = list(self.tables.left_pads)
        tables.partner, self.tables.partner = self.tables, tables
        # every layer windowed (Mistral): the first tables only keep the rows' bookkeeping
        self.tables.serves_attention = len(layers) < int(getattr(self.config, "num_hidden_layers", 0) or 0)
        self.window_layers, self.window_tables = layers, tables
        self._all_tables.append(tables)

    def _drop_window_tables(self) -> None:
        """Forget the window tables (their rows are gone): every layer in the first tables again."""
        if self.window_tables is not None:
            self._all_tables.remove(self.window_tables)
            self.tables.partner = None
            self.tables.serves_attention = True
            self.window_layers, self.window_tables = frozenset(), None

    @property
    def window(self) -> int | None:
        """The sliding window of the layers kept in ``window_tables`` (None: none kept apart)."""
        return self.window_tables.window if self.window_tables is not None else None

    def _set_logical_len(self, n: int) -> None:
        for tables in self._all_tables:
            tables.logical_len = n

    def _tables_of(self, layer_idx: int) -> BlockTables:
        """The tables (and so the pool) that address layer ``layer_idx``'s K/V tensors."""
        return self.window_tables if layer_idx in self.window_layers and self.window_tables else self.tables

    def _new_forward(self, meta: ForwardMetadata, new_logical_len: int) -> PagedForward:
        return PagedForward(meta, self.pools, new_logical_len, window_layers=self.window_layers, window=self.window)

    # ================================================================ forwards over some rows
    @contextlib.contextmanager
    def row_subset(self, rows: list[int], continued: bool = False):
        """Run the forwards inside over the cache rows ``rows`` only: batch row ``i`` is cache row
        ``rows[i]`` (a prefill group, or the engine's rows that decode). ``continued``: the rows
        may already hold tokens and the leading pads of the forwards only pad the batch (they are
        no positions of the rows)."""
        self.end_forward()
        self._group_rows = rows
        self._pads_are_padding = continued
        try:
            yield
            self.end_forward()
        finally:
            self._group_rows = None
            self._forward = None
            self._pads_are_padding = False

    @contextlib.contextmanager
    def prefill_group(self, rows: list[int], continued: bool = False):
        """One forward over the cache rows ``rows`` only, its logical positions from 0 (a prefill
        group trimmed to its longest prompt, see generation.py). ``continued``: the rows may
        already hold a prefix of their prompt (reused blocks); the leading pads of the forward only
        pad the batch."""
        with self.row_subset(rows, continued):
            self._set_logical_len(0)
            yield

    @contextlib.contextmanager
    def packed_group(self, rows: list[int], real: np.ndarray, continued: bool = False, device=None):
        """One forward over the cache rows ``rows`` whose model runs only the real tokens, packed
        into one row: ``real`` (bool ``[len(rows), Q]``) marks them in the padded batch the cache
        plans, and the model's input is their ids in row-major order, ``[1, real.sum()]``, with
        their positions. Attention reads and writes the padded layout
        (:meth:`PagedForward.unpack` / :meth:`PagedForward.pack`): the model's other layers never
        compute a pad. ``continued`` as in :meth:`prefill_group`. Yields the packed tokens' flat
        positions in the padded batch (int64 ``[real.sum()]`` on ``device``), to pack the
        model's inputs with."""
        real = np.asarray(real, dtype=bool)
        if real.shape[0] != len(rows) or not real.any(axis=1).all():
            raise ValueError(f"hf_paged: packed_group needs a [rows, Q] mask with a real token in each of the "
                             f"{len(rows)} rows, got shape {real.shape}")
        index = torch.from_numpy(np.flatnonzero(real.reshape(-1))).to(device)
        with self.prefill_group(rows, continued):
            self._packed = real, index
            try:
                yield index
            finally:
                self._packed = None

    @property
    def in_row_subset(self) -> bool:
        return self._group_rows is not None

    def add_rows(self, n: int) -> None:
        """``n`` empty rows (the distinct prompts a grouped prefill fills)."""
        for tables in self._all_tables:
            tables.add_rows(n)

    def end_grouped_prefill(self, width: int, left_padded: bool) -> None:
        """Every row is logically ``width`` long; a trimmed (left-padded) group's pads come first."""
        self._set_logical_len(width)
        if left_padded:
            for tables in self._all_tables:
                for r in range(tables.num_rows):
                    tables.left_pads[r] = width - tables.seq_lens[r]

    def _forward_rows(self, batch_size: int) -> list[int]:
        """The cache rows this forward's batch rows are (all rows, or a prefill group's rows)."""
        if self._group_rows is not None:
            if batch_size != len(self._group_rows):
                raise ValueError(f"hf_paged: a forward over {len(self._group_rows)} rows of the cache (row_subset) "
                                 f"got a batch of {batch_size}")
            return self._group_rows
        if not self.tables.num_rows:
            self.add_rows(batch_size)
        elif batch_size != self.tables.num_rows:
            raise ValueError(
                f"hf_paged: this forward has batch size {batch_size} but the cache holds {self.tables.num_rows} "
                f"rows (call cache.reset() before reusing it for another batch)"
            )
        return list(range(batch_size))

    def _check_pads_in_rows(self, real: np.ndarray, seq_before: np.ndarray) -> None:
        """Chunked attention counts a chunk's positions over pads inside a row (stock), the paged
        cache over stored tokens: refuse pads after a row's first token with chunked layers."""
        if self.config is None or "chunked_attention" not in compat.layer_types(self.config):
            return
        before = 0 if self._pads_are_padding else seq_before[:, None]  # leading batch padding is no position
        if any(self.tables.inner_pads) or (~real & (np.cumsum(real, 1) + before > 0)).any():
            raise CacheStateError(
                "hf_paged: pads after a row's first token (a continued multi-turn batch, a mask with holes) are not "
                "supported with chunked attention (Llama 4): stock counts a chunk's positions over those pads, the "
                "paged cache over stored tokens. Give each turn as a fresh, left-padded prompt."
            )

    def _check_usable(self, config) -> None:
        """Refuse rows left unusable (an exception mid-generate, a forward cut short, another
        model's K/V); bind a fresh cache to the model of its first forward."""
        if self.interrupted is not None:
            raise CacheStateError(f"hf_paged: this PagedCache was left mid-generation by an exception "
                                  f"({self.interrupted}); its rows are incomplete. Call cache.reset() before reusing it.")
        fwd = self._forward
        if fwd is not None and fwd.updated and len(fwd.updated) < self._layers_per_forward:
            raise CacheStateError(
                f"hf_paged: the previous forward on this PagedCache stopped after {len(fwd.updated)} of "
                f"{self._layers_per_forward} layers (an exception?); its rows are incomplete. Call cache.reset() "
                f"before reusing it."
            )
        if config is None:
            return
        config = compat.text_config(config)
        if self._model_config is not None and self._model_config() is config:
            return
        if self._model_config is not None and self.tables.num_rows:
            raise CacheStateError("hf_paged: this PagedCache holds the K/V of another model; call cache.reset() "
                                  "before using it with this one, or give each model its own PagedCache.")
        shape = config_kv_shape(config)
        if self.config is not None and self.config is not config and shape is not None and \
                config_kv_shape(self.config) != shape:
            raise ValueError(
                f"hf_paged: this PagedCache was built from a config with (layers, KV heads, key dim, value dim) = "
                f"{config_kv_shape(self.config)} but the model using it has {shape}. Build it with "
                f"PagedCache(config=model.config, ...)."
            )
        other_shape = shape is not None and any(s != shape[1:] for s in self.pools.head_shapes())
        if other_shape and self.prefix_cache is not None:
            raise ValueError(
                f"hf_paged: the prefix cache holds the K/V of a model with (KV heads, key dim, value dim) = "
                f"{sorted(self.pools.head_shapes())} but this model has {shape[1:]}: give each model its own "
                f"PrefixCache (or call PrefixCache.clear())."
            )
        if other_shape:
            # reset() kept the tensors of a model of another shape: they cannot serve this one
            self.pools.clear()
            self.layers = []
            # a new pool (the rows are empty): a cap in bytes is sized again for this model
            self._drop_window_tables()
            self.pool = BlockPool(max_blocks=self.pool.max_blocks if self.max_memory is None else None)
            self.tables = BlockTables(self.pool, self.block_size)
            self._all_tables[:] = [self.tables]
        self.config = config
        self._model_config = weakref.ref(config)
        self._setup_window_tables()

    # ================================================================ sizing
    def reserve_for_generation(self, prompt_lengths: list[int], copies: list[int], max_new_tokens: int) -> None:
        """Size the pool for a ``generate`` call: an upper bound of what it can use (see
        :meth:`BlockTables.reservation`). generate calls this with ``max_new_tokens=0`` before the
        prefill (so the prefill's activations do not sit on top of the decode's reservation) and
        with the real value after it."""
        for tables in self._all_tables:  # each pool: the window tables' bound their rows by the window
            blocks, longest = tables.reservation(prompt_lengths, copies, max_new_tokens)
            if max_new_tokens > 0:
                if tables is self.tables:
                    self.max_row_blocks = longest or None
                # the prompts are in the cache: what is left to allocate is the decode's part
                blocks -= tables.reservation(prompt_lengths, copies, 0)[0]
            tables.pool.reserve(blocks)

    def reserve_window_blocks(self, rows: int, prefill_tokens: int, bound: int) -> None:
        """Make room in the window layers' pool for ``rows`` decoding rows and a prefill of
        ``prefill_tokens`` tokens, at most ``bound`` blocks (the engine's run; nothing without
        window tables)."""
        if self.window_tables is not None:
            need = rows * self.window_tables.window_blocks() + cdiv(prefill_tokens, self.block_size)
            self.window_tables.pool.reserve(min(bound, need))

    def grow_layer_pools(self) -> None:
        """Enlarge every layer's tensors to the block pool's size now (a CUDA graph must not see a
        reallocation)."""
        for tables in self._all_tables:
            self.pools.grow(tables.pool.num_blocks, [i for i in range(len(self.pools)) if self._tables_of(i) is tables])

    def resolve_memory_cap(self, dtype: torch.dtype | None) -> None:
        """Turn ``max_memory`` into a number of blocks (once, from the pools or the config)."""
        if self.max_memory is not None and self.pool.max_blocks is None:
            per_token = self.pools.bytes_per_token() or config_bytes_per_token(self.config, dtype)
            self.pool.max_blocks = blocks_within(self.max_memory, per_token, self.block_size)

    def _check_layer_against_cap(self, layer_idx: int, kv_heads: int, key_dim: int, value_dim: int) -> None:
        """max_memory became a number of blocks through the config's K/V shape: a layer that
        stores another shape would take the pool past the cap."""
        if self.max_memory is None or self.pool.max_blocks is None or self.pools.bytes_per_token():
            return
        shape = config_kv_shape(self.config)
        if shape is not None and layer_idx < shape[0] and (kv_heads, key_dim, value_dim) == shape[1:]:
            return
        raise ValueError(
            f"hf_paged: max_memory was turned into {self.pool.max_blocks} blocks from the config's K/V shape "
            f"(layers, KV heads, key dim, value dim) = {shape}, but layer {layer_idx} stores {kv_heads} heads x "
            f"{key_dim}/{value_dim} dims: the pool would exceed the cap. Pass max_blocks instead of max_memory."
        )

    # ================================================================ row operations
    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Beam search: row ``i`` becomes old row ``beam_idx[i]``. Tables move, K/V do not."""
        self.fork_rows(beam_idx.tolist() if isinstance(beam_idx, torch.Tensor) else list(beam_idx))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.fork_rows(indices.tolist() if isinstance(indices, torch.Tensor) else list(indices))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.fork_rows([i for i in range(self.tables.num_rows) for _ in range(repeats)])

    def fork_rows(self, idx: list[int]) -> None:
        """Row ``i`` becomes old row ``idx[i]``; rows taken more than once share blocks, copy-on-write."""
        if self.tables.num_rows:
            self.end_forward()
            for tables in self._all_tables:
                tables.select_rows(idx)

    def drop_rows(self, rows: list[int]) -> None:
        """Remove the cache rows ``rows`` (the others keep their order); blocks no other row
        references return to the pool."""
        if rows:
            self.end_forward()
            for tables in self._all_tables:
                tables.drop_rows(rows)

    def crop(self, max_length) -> None:
        """Keep the first logical positions (see :func:`compat.crop_length` for the convention);
        blocks no longer referenced return to the pool."""
        length = compat.crop_length(self.tables.logical_len, max_length)
        if length is not None:
            self.end_forward()
            if self.window_tables is not None:
                self.window_tables.crop(length)  # first: it refuses a crop back past a released window
            self.tables.crop(length)

    def reset(self) -> None:
        """Forget every row; blocks return to the pool (its tensors stay allocated for reuse). Over
        a prefix cache, the rows' hashed blocks stay findable there (unless an exception may have
        left them unwritten)."""
        if self._forward is not None or self.interrupted is not None:
            for tables in self._all_tables:
                tables.forget_registered()  # their forward may not have written them
        self._forward = None  # its unwritten K/V belonged to rows that are gone
        self.max_row_blocks = None
        for tables in self._all_tables:
            tables.clear(keep_cached=self.prefix_cache is not None)
        self._prefill_tokens = None
        self._group_rows = None
        self._model_config = None
        self.model_key = None
        if not self._config_given:
            self.config = None
            self._drop_window_tables()  # the next model's config decides its windows
        self._layers_per_forward = 0
        self.interrupted = None

    def release_rows(self, failed: bool = False) -> None:
        """Over a prefix cache: finish the forward in progress and give every row's blocks back to
        the prefix cache (hashed ones stay findable there); the counters are kept. generate does
        this at the end of a call whose cache it created. ``failed``: an exception ended the call:
        the blocks hashed by a forward not known complete are not trusted."""
        if failed:
            for tables in self._all_tables:
                tables.forget_registered()
            self._forward = None
        else:
            self.end_forward()
        self.reset()

    # ================================================================ memory
    def dense_layer(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Layer ``layer_idx``'s K/V as a DynamicCache holds them (see :func:`dense_kv`)."""
        self.end_forward()
        return dense_kv(self.pools, self._tables_of(layer_idx), layer_idx)

    def memory_stats(self) -> dict:
        """What the cache holds and uses, and what a DynamicCache would hold for the same rows.

        Keys: ``block_size``, ``blocks_total`` (held by the pool), ``blocks_used`` (distinct blocks
        referenced by some row), ``blocks_shared`` (referenced more than once), ``rows``,
        ``tokens_logical`` (sum of the rows' non-pad lengths), ``tokens_stored`` (distinct stored
        token slots), ``tokens_dense`` (rows x padded length: a DynamicCache's tokens),
        ``bytes_per_token``, ``bytes_reserved`` (pool tensors), ``bytes_used``, ``bytes_dense``,
        ``saving`` (bytes_dense / bytes_used), ``tokens_prefilled`` (prompt tokens run through the
        model, over the cache's life), ``tokens_reused`` (prompt tokens whose K/V came from stored
        blocks without compute). With sliding-window layers kept apart: ``window``,
        ``window_layers`` (how many), ``window_blocks_total`` / ``window_blocks_used`` and
        ``window_tokens_stored`` (their pool; ``blocks_*`` count the other layers' pool, and
        ``bytes_used`` both).
        """
        usage = self.tables.usage()
        per_token = self.pools.bytes_per_token()
        rows, width = self.tables.num_rows, self.tables.logical_len
        bytes_used = usage["blocks_used"] * self.block_size * per_token
        window = {}
        if self.window_tables is not None:
            # the window layers' bytes live in their own pool
            w_usage = self.window_tables.usage()
            w_per_token = self.pools.bytes_per_token(self.window_layers)
            bytes_used = (usage["blocks_used"] * (per_token - w_per_token)
                          + w_usage["blocks_used"] * w_per_token) * self.block_size
            window = {"window": self.window, "window_layers": len(self.window_layers),
                      "window_blocks_total": self.window_tables.pool.num_blocks,
                      "window_blocks_used": w_usage["blocks_used"], "window_tokens_stored": w_usage["tokens_stored"]}
        bytes_dense = rows * width * per_token
        return {
            "block_size": self.block_size,
            "blocks_total": self.pool.num_blocks,
            "blocks_used": usage["blocks_used"],
            "blocks_shared": usage["blocks_shared"],
            "rows": rows,
            "tokens_logical": int(sum(self.tables.seq_lens)),
            "tokens_stored": usage["tokens_stored"],
            "tokens_dense": rows * width,
            "bytes_per_token": per_token,
            "bytes_reserved": self.pools.bytes_reserved(),
            "bytes_used": bytes_used,
            "bytes_dense": bytes_dense,
            "saving": (bytes_dense / bytes_used) if bytes_used else 0.0,
            "tokens_prefilled": self.tokens_prefilled,
            "tokens_reused": self.tokens_reused,
            **window,
        }
