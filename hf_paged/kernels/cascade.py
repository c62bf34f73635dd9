"""Shared-prefix (cascade) decode: which rows of a decode step read the same leading blocks, planned
once per forward on the host (numpy, no device values), and whether reading them once pays.

Beams, ``num_return_sequences`` samples and prompts with a common preamble hold their common
prefix in the same pool blocks. The plain decode kernel still reads those blocks once per row; the
cascade decode reads them once per **chunk** (up to ``MAX_CHUNK_ROWS`` rows of one group, all
their query heads in one tile) and each row's own blocks as before; the two partial softmaxes
merge by their log-sum-exp (``attention_kernels.py``).

A group is the rows whose block tables start with the same block; its shared length ``S`` is the
longest run of leading blocks every member holds, in tokens, capped by the members' query
positions (only tokens every member stored before its query are shared: ``S`` may end mid-block).
Groups of one row are not groups. A group larger than ``MAX_CHUNK_ROWS`` is cut into near-equal
chunks (each of >= 2 rows), so there are at most ``B // 2`` chunks: the device arrays have a fixed
size for a batch, as CUDA graphs need.

Layout (int32, the tail of a decode forward's packed metadata; see ``forward.py``):
    chunks    [C, 3], C = max(1, B // 2): (shared tokens S, first index into members, member count);
              S = 0 marks an unused slot
    members   [B]: the chunks' rows, chunk after chunk (unused entries 0)
    own_start [B]: where each row's own part starts (its chunk's S; 0 for a row in no chunk)

``HF_PAGED_CASCADE``: ``auto`` or unset (the default) uses the cascade kernels when
:meth:`SharedPrefixPlan.pays` says so, ``1`` for every decode step, ``0`` never. Measured on an
H200 (docs/performance.md): where nothing is shared, auto runs the plain kernel at 1.00x its time
(0.99x end to end); 64 rows over an 8k prefix attend in 0.21x the plain kernel's time, and 16
samples each of two 8k-token prompts generate 1.52x faster end to end (best runs; 1.47x medians).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .arith import cdiv
from .env import switch

ENV_VAR = "HF_PAGED_CASCADE"
MAX_CHUNK_ROWS = 16  # rows of one group read a shared K/V tile together (their heads fill the tile)
# Auto mode: the shared reads saved must be a real share of the step's K/V traffic, and large
# enough to repay the extra launch per layer (the merge) and the partials written.
MIN_SAVED_FRACTION = 0.25
MIN_SAVED_TOKENS = 2048


def setting() -> bool | None:
    """``HF_PAGED_CASCADE``: True (force on), False (off) or None (``auto``, the default:
    :meth:`SharedPrefixPlan.pays` decides); read at each call."""
    return switch(ENV_VAR, default=None, auto=True)


@dataclass(frozen=True)
class SharedPrefixPlan:
    """One decode forward's groups (host arrays, in the layout above) and what they save."""

    chunks: np.ndarray  # int32 [C, 3]
    members: np.ndarray  # int32 [B]
    own_start: np.ndarray  # int32 [B]
    num_chunks: int
    max_chunk_rows: int  # most members of a chunk
    max_shared_len: int  # longest S (host bound: sizes the shared kernel's split-KV)
    max_own_len: int  # most keys a row reads from its own part (host bound: sizes split-KV)
    read_tokens: int  # keys the plain kernel reads (sum over rows)
    saved_tokens: int  # keys the cascade does not read again

    def sizes(self) -> tuple[int, int, int, int]:
        """The host bounds a launch is sized from (:class:`CascadeBatch`)."""
        return self.num_chunks, self.max_chunk_rows, self.max_shared_len, self.max_own_len

    def arrays(self) -> list[np.ndarray]:
        return [self.chunks.ravel(), self.members, self.own_start]

    @staticmethod
    def size(batch: int) -> int:
        """int32 elements of the arrays for a batch of ``batch`` rows."""
        return 3 * num_chunk_slots(batch) + 2 * batch

    def padded(self, batch: int) -> SharedPrefixPlan:
        """The arrays for ``batch`` rows, the rows past this plan's in no chunk (pad rows of a
        CUDA graph captured for a larger batch)."""
        extra = batch - len(self.members)
        if extra <= 0:
            return self
        chunks = np.zeros((num_chunk_slots(batch), 3), np.int32)
        chunks[:len(self.chunks)] = self.chunks
        pad = np.zeros(extra, np.int32)
        return SharedPrefixPlan(chunks, np.concatenate([self.members, pad]), np.concatenate([self.own_start, pad]),
                                self.num_chunks, self.max_chunk_rows, self.max_shared_len, self.max_own_len,
                                self.read_tokens, self.saved_tokens)

    def pays(self) -> bool:
        return (self.saved_tokens >= MIN_SAVED_TOKENS
                and self.saved_tokens >= MIN_SAVED_FRACTION * max(self.read_tokens, 1))


def num_chunk_slots(batch: int) -> int:
    return max(1, batch // 2)


def empty_plan(batch: int) -> SharedPrefixPlan:
    return SharedPrefixPlan(np.zeros((num_chunk_slots(batch), 3), np.int32), np.zeros(batch, np.int32),
                            np.zeros(batch, np.int32), 0, 0, 0, 0, 0, 0)


def plan_shared_prefixes(block_table: np.ndarray, seq_lens: np.ndarray, query_pos: np.ndarray,
                         block_size: int) -> SharedPrefixPlan:
    """The groups of a decode step: ``block_table`` [B, W], ``seq_lens`` [B] (after the step),
    ``query_pos`` [B] (the new token's stored index; < 0: a pad query, in no group).

    Shared tokens must precede every member's query (``S <= pos``), so they were stored before this
    step and the kernels' fused store never writes them."""
    batch = block_table.shape[0]
    plan = empty_plan(batch)
    pos = np.asarray(query_pos, np.int64).reshape(batch)
    seq = np.asarray(seq_lens, np.int64)
    read = int(np.minimum(seq, pos + 1).clip(min=0).sum())
    candidates = np.flatnonzero(pos >= 1)
    if len(candidates) < 2:
        return SharedPrefixPlan(plan.chunks, plan.members, plan.own_start, 0, 0, 0, int(seq.max(initial=0)), read, 0)
    firsts = block_table[candidates, 0]
    order = np.argsort(firsts, kind="stable")
    sorted_rows, sorted_firsts = candidates[order], firsts[order]
    # group boundaries in the sorted rows (plain ints: a decode step has few groups)
    starts = [0, *(np.flatnonzero(sorted_firsts[1:] != sorted_firsts[:-1]) + 1).tolist(), len(sorted_rows)]
    chunks, members, own_start = plan.chunks, plan.members, plan.own_start
    n_chunks = n_members = saved = max_shared = max_rows = 0
    for lo, hi in zip(starts[:-1], starts[1:]):
        n = hi - lo
        if n < 2:
            continue
        rows = sorted_rows[lo:hi]
        # common leading blocks of every member with the first one, then capped by the queries
        first_query = int(pos[rows].min())
        held = cdiv(first_query, block_size)  # blocks that hold tokens before every query
        same = (block_table[rows, :held] == block_table[rows[0], :held]).all(axis=0)
        common = held if same.all() else int(np.argmin(same))
        shared = min(common * block_size, first_query)
        if shared <= 0:
            continue
        k = cdiv(n, MAX_CHUNK_ROWS)
        # near-equal parts of >= 2 rows each, the first n % k one row longer (as np.array_split)
        at = 0
        for i in range(k):
            size = n // k + (1 if i < n % k else 0)
            chunks[n_chunks] = (shared, n_members, size)
            members[n_members:n_members + size] = rows[at:at + size]
            n_chunks += 1
            n_members += size
            at += size
            saved += (size - 1) * shared
            max_rows = max(max_rows, size)
        own_start[rows] = shared
        max_shared = max(max_shared, shared)
    own = np.minimum(seq, pos + 1) - own_start
    return SharedPrefixPlan(chunks, members, own_start, n_chunks, max_rows, max_shared, int(own.max(initial=0)), read,
                            saved)


@dataclass(frozen=True)
class CascadeBatch:
    """A decode forward's chunks on the device (views of its packed metadata, or of a CUDA graph's
    static copy), with the host bounds that size the launch. The kernels read the tensors only, so
    a captured launch stays correct for any plan of the same batch size."""

    chunks: torch.Tensor  # int32 [C, 3]
    members: torch.Tensor  # int32 [B]
    own_start: torch.Tensor  # int32 [B]
    num_chunks: int
    max_chunk_rows: int
    max_shared_len: int
    max_own_len: int

    @classmethod
    def over(cls, flat: torch.Tensor, batch: int, sizes: tuple[int, int, int, int]) -> CascadeBatch:
        """The three arrays as views of ``flat`` (``SharedPrefixPlan.size(batch)`` int32)."""
        c = num_chunk_slots(batch)
        return cls(flat[:3 * c].view(c, 3), flat[3 * c:3 * c + batch], flat[3 * c + batch:3 * c + 2 * batch], *sizes)

    @classmethod
    def from_plan(cls, plan: SharedPrefixPlan, device) -> CascadeBatch:
        flat = torch.from_numpy(np.concatenate(plan.arrays()).astype(np.int32)).to(device)
        return cls.over(flat, len(plan.members), plan.sizes())

