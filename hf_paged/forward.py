"""One forward pass over the paged cache: its metadata on the device and the state its layers share.

transformers gives every attention layer what the mask function returned as its
``attention_mask``; ours returns a :class:`PagedForward` (see ``attention.py``). It holds

- :class:`ForwardMetadata`: the block table, stored lengths, query positions and slot mapping of
  the forward, as device tensors, built once per forward from the host's
  :class:`~hf_paged.block_table.ForwardPlan` with one host-to-device copy and never changed;
- the cache's layer pools (not the cache: the cache holds the forward, so a reference back would
  be a cycle);
- the K/V each layer handed to ``PagedCache.update``, until that layer's attention call writes
  them (inside its own kernel launch for decode: one launch per layer instead of two).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .block_table import ForwardPlan
from .kernels import backend_for, device_guard
from .kernels.cascade import CascadeBatch, SharedPrefixPlan
from .layer_pools import LayerPools


def real_new_tokens(attention_mask: torch.Tensor | None, q_len: int, batch_size: int,
                    seq_before: np.ndarray) -> np.ndarray:
    """bool [B, Q]: which of a forward's new tokens are real (stored), from the 2D padding mask
    (``seq_before``: each row's stored tokens before the forward)."""
    # A decode step (one new token for rows that all hold tokens) is never padded by generate:
    # reading the mask on the GPU at every step would cost a host-device synchronisation.
    # Prompts, continued multi-turn batches and multi-token steps are read.
    must_read = attention_mask is not None and (
        attention_mask.device.type == "cpu" or q_len > 1 or bool((seq_before == 0).any()))
    if not must_read:
        return np.ones((batch_size, q_len), dtype=bool)
    real = attention_mask[:, -q_len:].to("cpu", torch.bool).numpy()
    if real.shape != (batch_size, q_len):
        raise ValueError(f"hf_paged: attention_mask of shape {tuple(attention_mask.shape)} does not cover "
                         f"{batch_size} rows x {q_len} new tokens")
    return real


@dataclass(frozen=True)
class ForwardMetadata:
    """A forward's metadata on one device (the kernels' view of the batch).

    ``block_table`` int32 [B, W], ``seq_lens`` int32 [B], ``query_pos`` int32 [B, Q] and
    ``slot_mapping`` int32 [B, Q] (see ForwardPlan) are views of one packed int32 tensor, so a
    CUDA graph's static copy is refreshed with one ``copy_``. ``copy_src`` / ``copy_dst`` int64 [N]:
    the copy-on-write block copies to run before any write (None: none). ``max_seq_len`` and
    ``max_context_len`` are host bounds that size the kernels without reading the device.
    A decode forward (``q_len == 1``) also packs its shared-prefix arrays (``kernels/cascade.py``)
    after the slot mapping; ``cascade`` views them when the attention reads shared prefixes once
    per group of rows (None: the plain decode kernel).
    ``window``: the sliding-window layers' view when they keep their own tables (their block table
    and slot mapping packed last, the same lengths and positions, their own copies; no cascade).
    """

    q_len: int
    packed: torch.Tensor  # int32 [B*W + B + 2*B*Q (+ the cascade arrays when Q == 1) (+ B*W + B*Q)]:
    # block_table | seq_lens | query_pos | slot_mapping (| chunks | members | own_start)
    # (| the window layers' block_table | slot_mapping)
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_pos: torch.Tensor
    slot_mapping: torch.Tensor
    max_seq_len: int
    max_context_len: int | None  # 0: a prompt forward (no row had a stored token); None: unknown
    pads_after_start: bool  # a row has a pad after its first token (a query that is not stored)
    copy_src: torch.Tensor | None = None
    copy_dst: torch.Tensor | None = None
    cascade: CascadeBatch | None = None
    window: ForwardMetadata | None = None

    @classmethod
    def from_plan(cls, plan: ForwardPlan, device: torch.device, max_seq_len: int | None = None,
                  window_plan: ForwardPlan | None = None) -> ForwardMetadata:
        """The plan's arrays (and the window layers' plan's) on ``device`` in one transfer (pinned,
        asynchronous on CUDA)."""
        batch, width = plan.block_table.shape
        plans = [plan] if window_plan is None else [plan, window_plan]
        copies = np.asarray([c[i] for p in plans for i in (0, 1) for c in p.copies], np.int32)
        shared = plan.shared_prefixes
        if (shared is not None) != (plan.query_pos.shape[1] == 1):
            raise AssertionError("a decode forward's plan carries its shared prefixes, and only a decode forward's")
        if window_plan is not None and window_plan.block_table.shape != plan.block_table.shape:
            raise AssertionError("the window layers' block table has the shape of the others'")
        host = torch.from_numpy(np.concatenate([
            plan.block_table.ravel(), plan.seq_lens, plan.query_pos.ravel(), plan.slot_mapping.ravel(),
            *(shared.arrays() if shared is not None else ()),
            *((window_plan.block_table.ravel(), window_plan.slot_mapping.ravel()) if window_plan is not None else ()),
            copies,
        ]))
        dev = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
        n_meta = dev.numel() - copies.size
        copy_views = []
        at = n_meta
        for p in plans:
            n = len(p.copies)
            copy_views.append((dev[at:at + n].long(), dev[at + n:at + 2 * n].long()) if n else (None, None))
            at += 2 * n
        return cls.over(
            dev[:n_meta], batch, width, plan.query_pos.shape[1],
            max_seq_len=max_seq_len or plan.max_seq_len, max_context_len=plan.max_context_len,
            pads_after_start=plan.pads_after_start, cascade_sizes=shared.sizes() if plan.use_cascade else None,
            copy_src=copy_views[0][0], copy_dst=copy_views[0][1],
            window_copies=copy_views[1] if window_plan is not None else None,
        )

    @classmethod
    def over(cls, packed: torch.Tensor, batch: int, width: int, q_len: int, *, max_seq_len: int,
             max_context_len: int | None, pads_after_start: bool, copy_src=None, copy_dst=None,
             cascade_sizes: tuple | None = None, window_copies: tuple | None = None) -> ForwardMetadata:
        """The metadata whose tensors are views of ``packed`` (a forward's own transfer, or the
        static buffer a CUDA graph replays). ``cascade_sizes``: the host bounds of the shared-prefix
        plan when the attention uses it (``SharedPrefixPlan.sizes()``), else None.
        ``window_copies``: ``(copy_src, copy_dst)`` of the window layers when ``packed`` carries
        their tables (None: it does not)."""
        a = batch * width
        b = a + batch
        c = b + batch * q_len
        d = c + batch * q_len
        cascade = None
        if cascade_sizes is not None:
            cascade = CascadeBatch.over(packed[d:d + SharedPrefixPlan.size(batch)], batch, cascade_sizes)
        common = dict(q_len=q_len, packed=packed, seq_lens=packed[a:b], query_pos=packed[b:c].view(batch, q_len),
                      max_seq_len=max_seq_len, max_context_len=max_context_len, pads_after_start=pads_after_start)
        window = None
        if window_copies is not None:
            e = d + (SharedPrefixPlan.size(batch) if q_len == 1 else 0)
            window = cls(block_table=packed[e:e + a].view(batch, width),
                         slot_mapping=packed[e + a:e + a + batch * q_len].view(batch, q_len),
                         copy_src=window_copies[0], copy_dst=window_copies[1], **common)
        return cls(block_table=packed[:a].view(batch, width), slot_mapping=packed[c:d].view(batch, q_len),
                   copy_src=copy_src, copy_dst=copy_dst, cascade=cascade, window=window, **common)

    @property
    def cascade_sizes(self) -> tuple | None:
        c = self.cascade
        return None if c is None else (c.num_chunks, c.max_chunk_rows, c.max_shared_len, c.max_own_len)

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def width(self) -> int:
        return self.block_table.shape[1]

    @property
    def window_copies(self) -> tuple | None:
        w = self.window
        return None if w is None else (w.copy_src, w.copy_dst)

    def to(self, device: torch.device) -> ForwardMetadata:
        def move(t):
            return None if t is None else t.to(device, non_blocking=True)

        window_copies = self.window_copies
        return ForwardMetadata.over(
            move(self.packed), self.batch, self.width, self.q_len, max_seq_len=self.max_seq_len,
            max_context_len=self.max_context_len, pads_after_start=self.pads_after_start,
            copy_src=move(self.copy_src), copy_dst=move(self.copy_dst), cascade_sizes=self.cascade_sizes,
            window_copies=None if window_copies is None else tuple(move(t) for t in window_copies),
        )


class PagedForward:
    """One forward pass over a PagedCache, as every attention layer of the model receives it.

    ``meta``: the forward's metadata on this object's device; ``pools``: the cache's layer pools;
    ``backend``: the kernels for that device. ``new_kv`` maps a layer to the K/V it gave
    ``update`` until its attention call (or :meth:`write_new_kv`) writes them; the per-device
    objects of :meth:`on` (``device_map`` across GPUs) share it.
    """

    def __init__(self, meta: ForwardMetadata, pools: LayerPools, new_logical_len: int, new_kv: dict | None = None,
                 window_layers: frozenset = frozenset(), window: int | None = None,
                 packed_index: torch.Tensor | None = None):
        self.meta = meta
        # A packed forward (PagedCache.packed_group): the model runs the rows' real tokens one
        # after another as one row [1, N]; the metadata is the padded batch's [B, Q]. packed_index
        # (int64 [N], on this device): where each packed token sits in the padded batch, row-major.
        self.packed_index = packed_index
        self.call_shape: tuple[int, int] = (meta.batch, meta.q_len)  # the model's (batch, tokens) of this forward
        # the sliding-window layers that keep their own tables (meta.window), and their window
        self.window_layers = window_layers if meta.window is not None else frozenset()
        self.window = window
        self.window_plans: dict = {}  # their kernel launch plans (another block table than plans')
        self.pools = pools
        self.backend = backend_for(meta.packed.device)
        self.new_logical_len = new_logical_len  # the padded length once this forward is done
        self.new_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {} if new_kv is None else new_kv
        self.updated: set[int] = set()  # layers whose update() ran (shared with the per-device objects)
        self.plans: dict = {}  # kernel launch plans of this forward on this device, reused layer after layer
        self.copied: set[int] = set()  # layers whose copy-on-write copies ran (shared with the per-device objects)
        # Layers whose attention read their pools other than through LayerPools.addresses (latent
        # attention's PyTorch gather): a CUDA graph of this forward holds those pools' addresses.
        self.direct_pool_reads: set[int] = set()
        self._on_device: dict[torch.device, PagedForward] = {}

    @property
    def device(self) -> torch.device:
        return self.meta.packed.device

    def on(self, device: torch.device) -> PagedForward:
        """This forward on ``device`` (one copy of the metadata per device and forward)."""
        if device == self.device:
            return self
        moved = self._on_device.get(device)
        if moved is None:
            moved = self._on_device[device] = PagedForward(
                self.meta.to(device), self.pools, self.new_logical_len, self.new_kv, self.window_layers, self.window,
                None if self.packed_index is None else self.packed_index.to(device))
            moved.updated, moved.copied, moved.call_shape = self.updated, self.copied, self.call_shape
            moved.direct_pool_reads = self.direct_pool_reads
        return moved

    def unpack(self, states: torch.Tensor) -> torch.Tensor:
        """A packed forward's per-head states ``[1, H, N, D]`` laid out as the padded batch's
        ``[B, H, Q, D]`` (zeros at the pads, which nothing stores or reads)."""
        batch, q_len = self.meta.batch, self.meta.q_len
        heads, dim = states.shape[1], states.shape[3]
        padded = states.new_zeros(batch * q_len, heads, dim)
        padded.index_copy_(0, self.packed_index, states[0].transpose(0, 1))
        return padded.view(batch, q_len, heads, dim).transpose(1, 2)

    def pack(self, out: torch.Tensor) -> torch.Tensor:
        """An attention output over the padded batch ``[B, Q, H, D]`` as the packed forward's
        ``[1, N, H, D]`` (the pads' rows dropped)."""
        return out.reshape(-1, *out.shape[2:]).index_select(0, self.packed_index).unsqueeze(0)

    def meta_for(self, layer_idx: int) -> ForwardMetadata:
        """The metadata layer ``layer_idx``'s K/V is written and read with (its own tables for a
        sliding-window layer whose blocks are released out of its window)."""
        return self.meta.window if layer_idx in self.window_layers else self.meta

    def copy_blocks(self, pools: LayerPools, layers=None) -> None:
        """Run the forward's copy-on-write block copies in ``layers`` (default: every layer with
        tensors), once per layer, each on its layer's device, before anything writes them."""
        if self.meta.copy_src is None and self.meta.window_copies in (None, (None, None)):
            return
        for layer_idx in range(len(pools)) if layers is None else layers:
            k_pool, v_pool = pools.get(layer_idx)
            if k_pool is None or layer_idx in self.copied:
                continue
            here = self.on(k_pool.device)
            meta = here.meta_for(layer_idx)
            if meta.copy_src is not None:
                with device_guard(k_pool.device):
                    here.backend.copy_blocks(k_pool, v_pool, meta.copy_src, meta.copy_dst)
            self.copied.add(layer_idx)

    def take_new_kv(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The K/V ``layer_idx`` gave update() and nothing wrote yet (the caller writes them)."""
        return self.new_kv.pop(layer_idx, None)

    def write_new_kv(self) -> None:
        """Write the K/V update() took and no attention call wrote."""
        for layer_idx in list(self.new_kv):
            key, value = self.new_kv.pop(layer_idx)
            here = self.on(key.device)
            k_pool, v_pool = self.pools.get(layer_idx)
            with device_guard(key.device):
                here.backend.store_kv(key, value, k_pool, v_pool, here.meta_for(layer_idx).slot_mapping,
                                      self.pools.addresses[layer_idx])
