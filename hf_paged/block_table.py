"""Block tables: which pool blocks hold each row's tokens, and the plan of one forward over them.

Plain ints and numpy arrays, no tensors and no transformers: testable without a model. The
cache (``cache.py``) sends a :class:`ForwardPlan` to the device as the forward's metadata.

A row is one sequence of the batch. Its tokens are stored in order and pads never are: stored
token ``i`` of row ``b`` lives in block ``tables[b][i // block_size]`` at offset
``i % block_size``. Logically every row is as long as the batch (``logical_len``, the padded
length a DynamicCache holds); a row's pads are the logical positions without a stored token:
``left_pads`` before its first token, ``inner_pads`` (runs) after it (multi-turn batches).

Rows that share a prefix share its full blocks: forked rows (beams, samples) and rows whose
prompts hash alike (identical full blocks from the row's first token on). A row about to write
into a shared, partially filled block copies it first (copy-on-write): the plan lists the copies
for the cache to run before the forward's writes.

Sliding-window layers keep their K/V in a second set of tables over their own pool (``window``
set): the same rows, the same operations in the same order (the cache calls both), but a block
that has fallen out of the window of every query to come is released (its entry becomes
``RELEASED``), so a long generation holds about one window per row there. Prefix reuse is planned
once, by the first tables, and followed by the window tables (a stored prefix is reused only when
both pools hold it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .block_pool import BlockPool, OutOfBlocksError
from .kernels import cascade
from .kernels.arith import cdiv

RELEASED = -1  # a window table's entry whose block fell out of the window (read as block 0, never visited)


def chain_hashes(tokens: np.ndarray, block_size: int, parent: bytes) -> list[bytes]:
    """The chained hashes of the full blocks of ``tokens`` (int64), the first chained on ``parent``
    (the hash of the block before, or the pool's salt for a row's first block)."""
    hashes, h = [], parent
    for i in range(len(tokens) // block_size):
        # 128-bit digest chained over the prefix: collisions are out of reach, and every process
        # (tensor-parallel ranks) computes the same value
        h = hashlib.blake2b(h + tokens[i * block_size:(i + 1) * block_size].tobytes(), digest_size=16).digest()
        hashes.append(h)
    return hashes


def chain_hashes_of_prompts(prompts: list[np.ndarray], block_size: int, parent: bytes) -> list[list[bytes]]:
    """:func:`chain_hashes` of each prompt (int64 arrays), each chain taken over from the prompt
    before it as far as their leading full blocks agree: a batch whose prompts open with one long
    preamble hashes the preamble once, not once per row (the same values: a chained hash depends
    only on the tokens from the row's first on)."""
    out: list[list[bytes]] = []
    prev: np.ndarray | None = None
    for tokens in prompts:
        full = len(tokens) // block_size
        common = 0
        if prev is not None:
            m = min(full, len(out[-1])) * block_size
            differ = np.flatnonzero(tokens[:m] != prev[:m])
            common = (int(differ[0]) if len(differ) else m) // block_size
        hashes = out[-1][:common] if common else []
        start = hashes[-1] if common else parent
        hashes = hashes + chain_hashes(tokens[common * block_size:full * block_size], block_size, start)
        out.append(hashes)
        prev = tokens
    return out


@dataclass(frozen=True)
class ForwardPlan:
    """What one forward writes and reads, as host arrays (one row per batch row of the forward)."""

    block_table: np.ndarray  # int32 [B, W]: the rows' tables, padded with 0 to at least W columns
    seq_lens: np.ndarray  # int32 [B]: stored tokens per row after the forward
    query_pos: np.ndarray  # int32 [B, Q]: the stored index each new token reads up to (itself for a
    # real token; for a pad after the row's first token, the last real one before it); -1 sees nothing
    slot_mapping: np.ndarray  # int32 [B, Q]: where each new token is written; -1: not written
    copies: tuple[tuple[int, int], ...]  # (src, dst) blocks to copy before any write (copy-on-write)
    max_context_len: int  # most tokens any row held before the forward (0: a prompt forward)
    pads_after_start: bool  # some row has a pad after its first token (a query that is not stored)
    # decode forwards (Q = 1): the rows' shared prefixes (kernels/cascade.py; empty with
    # HF_PAGED_CASCADE=0), and whether the attention reads them once per group of rows
    shared_prefixes: cascade.SharedPrefixPlan | None = None
    use_cascade: bool = False

    @property
    def max_seq_len(self) -> int:
        return max(1, int(self.seq_lens.max())) if len(self.seq_lens) else 1

    def padded(self, batch: int) -> ForwardPlan:
        """The plan with pad rows appended up to ``batch`` rows: no blocks, nothing stored, a pad
        query that reads nothing (a CUDA graph captured for a larger batch runs them; their outputs
        are discarded)."""
        extra = batch - len(self.seq_lens)
        if extra <= 0:
            return self
        q_len = self.query_pos.shape[1]
        return ForwardPlan(
            block_table=np.concatenate([self.block_table, np.zeros((extra, self.block_table.shape[1]), np.int32)]),
            seq_lens=np.concatenate([self.seq_lens, np.zeros(extra, np.int32)]),
            query_pos=np.concatenate([self.query_pos, np.full((extra, q_len), -1, np.int32)]),
            slot_mapping=np.concatenate([self.slot_mapping, np.full((extra, q_len), -1, np.int32)]),
            copies=self.copies, max_context_len=self.max_context_len, pads_after_start=self.pads_after_start,
            shared_prefixes=self.shared_prefixes.padded(batch) if self.shared_prefixes is not None else None,
            use_cascade=self.use_cascade,
        )


class BlockTables:
    """Per-row block tables over a :class:`BlockPool`, with each row's stored length and pads.

    ``window``: these tables serve sliding-window layers of that window: blocks no query to come
    can see are released (the first ``released[r]`` entries of row ``r``). ``window_margin``:
    tokens kept before the window besides (a kernel's key tile starts at a multiple of its tile
    size at or before the window's first key and reads the whole tile, masked after loading).
    """

    # Tests set this: every forward's dense table is also built afresh and compared (a row
    # operation that forgot to bump ``_row_ops`` would leave a stale table).
    check_dense = False

    def __init__(self, pool: BlockPool, block_size: int, window: int | None = None):
        self.pool = pool
        self.block_size = block_size
        self.window = window
        self.window_margin = 0
        self.partner: BlockTables | None = None  # the other tables of the same rows (joint prefix lookups)
        self.last_reuse: tuple[dict, dict] | None = None  # the last plan_forward's reuse, for the partner
        self.released: list[int] = []  # per row: leading entries released (window tables)
        self.serves_attention = True  # False: no layer reads through these tables (every layer windowed)
        self.tables: list[list[int]] = []
        self.seq_lens: list[int] = []  # stored tokens per row
        self.left_pads: list[int] = []  # logical positions before the row's first token
        self.inner_pads: list[list[tuple[int, int]]] = []  # (logical position, count) runs after it
        self.logical_len = 0  # the padded length every row has logically
        # Prefix hashes: salt starts every chain (None: no hashing at all), so that a pool shared by
        # several models never gives one model another's blocks. Per row, the ids of its stored
        # tokens while every forward gave them (None once one did not) and the chained hashes of
        # its full blocks; ``registered``: blocks hashed since forget_registered() last ran.
        self.salt: bytes | None = b""
        self.row_tokens: list[list[int] | None] = []
        self.row_hashes: list[list[bytes]] = []
        self.registered: list[int] = []
        # The dense block table of the last forward's rows, kept so that the next forward writes
        # only the entries it changed (a decode step of 32 rows x 8k tokens would otherwise copy
        # 16k list entries into numpy every step). Valid while no row operation ran since
        # (``_row_ops``, bumped by each of them) and the forward has the same rows.
        self._row_ops = 0
        self._dense: np.ndarray | None = None
        self._dense_key: tuple | None = None

    @property
    def num_rows(self) -> int:
        return len(self.tables)

    def lookup(self, content_hash: bytes) -> int | None:
        """The block of this pool holding ``content_hash``'s content, when the partner tables'
        pool (the other layers' K/V of the same tokens) holds it too; else None."""
        blk = self.pool.lookup_hash(content_hash)
        if blk is not None and self.partner is not None and self.partner.pool.lookup_hash(content_hash) is None:
            return None
        return blk

    def add_rows(self, n: int) -> None:
        self._row_ops += 1
        self.released.extend([0] * n)
        self.tables.extend([] for _ in range(n))
        self.seq_lens.extend([0] * n)
        self.left_pads.extend([0] * n)
        self.inner_pads.extend([] for _ in range(n))
        self.row_tokens.extend([] for _ in range(n))
        self.row_hashes.extend([] for _ in range(n))

    # ------------------------------------------------------------------ one forward
    def plan_forward(self, rows: list[int], real: np.ndarray, tokens: np.ndarray | None = None,
                     table_width: int = 0, leading_pads_are_padding: bool = False,
                     follow: BlockTables | None = None) -> ForwardPlan:
        """Allocate blocks for the new tokens of ``rows`` (``real[b, j]``: token ``j`` of batch row
        ``b`` is stored), all or nothing, and plan the forward. ``tokens`` (int ``[B, Q]``): the
        new tokens' ids (a prompt forward): full blocks are hashed, and rows that start here reuse
        identical full blocks already stored. ``table_width``: pad the block table to at least this
        many columns. ``leading_pads_are_padding``: the pads before each row's first new token only
        pad the batch (a prompt continued over a reused prefix), they are no positions of the row."""
        bs = self.block_size
        batch, q_len = real.shape
        # read before any row changes: a bad HF_PAGED_CASCADE raises with the rows untouched
        forced = cascade.setting() if q_len == 1 else None
        tables = [self.tables[r] for r in rows]  # the same list objects: edits land in place
        lens_before = [len(t) for t in tables]
        released_before = [self.released[r] for r in rows] if self.window is not None else None
        seq_before = np.asarray([self.seq_lens[r] for r in rows], dtype=np.int64)
        seq_after = seq_before + real.sum(axis=1)
        # a real token's stored index is the next one of its row; a pad reads up to the last real
        # token before it (the keys stock's query at a pad sees), or nothing before the first
        seen = np.cumsum(real, axis=1)
        rank = seq_before[:, None] + seen - 1
        visible = (seen > 0) if leading_pads_are_padding else (rank >= 0)
        query_pos = np.where(real | visible, rank, -1)
        pads_after_start = ~real & (query_pos >= 0)
        started_here = (seq_before == 0) & real.any(axis=1)

        if self.window is not None:
            # before allocating, so the released blocks serve this forward; the window pool has no
            # cap, so nothing below can fail and leave them released for a forward that never ran
            self._release_out_of_window(rows, seq_before)
        cow_rows, n_copies = self._copy_on_write(tables, seq_before, seq_after)
        if follow is not None:
            reuse, row_hashes = self._follow_reuse(*follow.last_reuse)
        else:
            reuse, row_hashes = self._plan_prefix_reuse(rows, real, started_here, tokens)
        self.last_reuse = (reuse, row_hashes)
        blocks_after = cdiv(seq_after, bs)
        need = int(sum(blocks_after[b] - len(tables[b]) for b in range(batch)))
        # blocks found in the pool are taken before allocating: the allocation must not evict them
        taken = [ref for refs in reuse.values() for ref in refs if isinstance(ref, int)]
        for blk in taken:
            self.pool.take(blk)
        try:
            fresh = self.pool.allocate(need + n_copies - sum(len(r) for r in reuse.values()))
        except OutOfBlocksError as e:
            self.pool.decref(taken)
            self._row_ops += 1  # window entries may have been released above: the kept table is stale
            raise OutOfBlocksError(
                e.needed, e.available, e.max_blocks,
                hint=f"(block_size={bs}; rows={batch}; longest row would hold {int(seq_after.max())} tokens)",
            ) from None

        # --- nothing fails from here on: the rows change ---------------------------------
        fresh.reverse()
        copies: list[tuple[int, int]] = []
        for b in cow_rows:
            src = tables[b][-1]
            if self.pool.ref_count(src) == 1:
                continue  # the other sharers copied it away: this row now owns it
            dst = fresh.pop()
            tables[b][-1] = dst
            copies.append((src, dst))
            self.pool.decref([src])  # after allocate: a freed src is never handed out as a dst
        written_from = np.zeros(batch, dtype=np.int64)  # stored index from which a row writes
        for b in range(batch):
            table = tables[b]
            for ref in reuse.get(b, ()):
                if isinstance(ref, int):
                    table.append(ref)  # taken above
                else:
                    blk = tables[ref[0]][ref[1]]
                    self.pool.incref([blk])
                    table.append(blk)
            written_from[b] = len(table) * bs if b in reuse else 0
            table.extend(fresh.pop() for _ in range(int(blocks_after[b]) - len(table)))
        assert not fresh
        any_pad_after_start = bool(pads_after_start.any())
        for b, r in enumerate(rows):
            if b not in row_hashes:
                self.row_tokens[r] = None  # not a prompt forward: the row's later blocks are not hashed
                continue
            if started_here[b]:
                self.row_tokens[r], self.row_hashes[r] = [], []
            self.row_tokens[r] += tokens[b][real[b]].tolist()
            for i, h in row_hashes[b]:
                self.row_hashes[r].append(h)
                if self.pool.register_hash(tables[b][i], h):
                    self.registered.append(tables[b][i])
        for b, r in enumerate(rows):
            if seq_before[b] == 0 and not leading_pads_are_padding:
                self.left_pads[r] += int(real[b].argmax()) if real[b].any() else q_len
            if any_pad_after_start:
                for j in np.flatnonzero(pads_after_start[b]):
                    self._add_inner_pad(r, self.logical_len + int(j))
            self.seq_lens[r] = int(seq_after[b])

        # --- metadata, vectorised (no per-token Python loops) ------------------------------
        width = max(1, max(len(t) for t in tables), table_width)
        block_table = self._dense_table(rows, tables, width, lens_before, released_before)
        safe_pos = np.maximum(query_pos, 0)
        slot = np.take_along_axis(block_table, safe_pos // bs, axis=1).astype(np.int64) * bs + safe_pos % bs
        slot = np.where(real & (query_pos >= written_from[:, None]), slot, -1)
        shared, use_cascade = None, False
        if q_len == 1 and (self.window is not None or not self.serves_attention):
            shared = cascade.empty_plan(batch)  # window layers read one window: the plain decode kernel
        elif q_len == 1:
            # Groups of rows over the same leading blocks (after this forward's copy-on-write):
            # planned once per forward, read by every layer's decode attention.
            shared = (cascade.empty_plan(batch) if forced is False
                      else cascade.plan_shared_prefixes(block_table, seq_after, query_pos[:, 0], bs))
            use_cascade = bool(forced) if forced is not None else shared.pays()
        return ForwardPlan(
            block_table=block_table, seq_lens=seq_after.astype(np.int32), query_pos=query_pos.astype(np.int32),
            slot_mapping=slot.astype(np.int32), copies=tuple(copies),
            max_context_len=int(seq_before.max()) if batch else 0, pads_after_start=any_pad_after_start,
            shared_prefixes=shared, use_cascade=use_cascade,
        )

    def _fresh_dense(self, rows: list[int], tables: list[list[int]], columns: int) -> np.ndarray:
        """The rows' block table, ``columns`` wide, padded with 0 (released entries 0 too: never
        read, any valid id)."""
        dense = np.zeros((len(tables), columns), dtype=np.int32)
        for b, (table, r) in enumerate(zip(tables, rows)):
            done = self.released[r] if self.window is not None else 0
            dense[b, done: len(table)] = table[done:]
        return dense

    def _dense_table(self, rows: list[int], tables: list[list[int]], width: int, lens_before: list[int],
                     released_before: list[int] | None) -> np.ndarray:
        """The forward's block table [B, width] (a copy), from the kept one when it is valid: only
        the entries this forward changed are written (its new blocks, a copied-on-write tail, the
        entries released out of the window)."""
        key = (tuple(rows), self._row_ops)
        dense = self._dense
        if dense is None or self._dense_key != key or dense.shape[1] < width:
            dense = self._dense = self._fresh_dense(rows, tables, width + 16)  # room to grow a little
            self._dense_key = key
        else:
            for b, table in enumerate(tables):
                if released_before is not None and self.released[rows[b]] > released_before[b]:
                    dense[b, released_before[b]:self.released[rows[b]]] = 0
                n = len(table)
                if n != lens_before[b] or (n and dense[b, n - 1] != table[n - 1]):
                    start = max(lens_before[b] - 1, 0)  # a copy-on-write replaces the old tail
                    dense[b, start:n] = table[start:n]
        out = dense[:, :width].copy()
        if self.check_dense and not np.array_equal(out, fresh := self._fresh_dense(rows, tables, width)):
            raise AssertionError(f"hf_paged: the kept block table went stale (rows {np.flatnonzero((out != fresh).any(1))})")
        return out

    def blocks_needed(self, rows: list[int], n_new: list[int]) -> int:
        """The blocks a forward appending ``n_new[i]`` real tokens to row ``rows[i]`` would take:
        new blocks and copy-on-write copies (prefix reuse aside)."""
        tables = [self.tables[r] for r in rows]
        seq_before = np.asarray([self.seq_lens[r] for r in rows], dtype=np.int64)
        seq_after = seq_before + np.asarray(n_new, dtype=np.int64)
        new = int(sum(cdiv(int(a), self.block_size) - len(t) for t, a in zip(tables, seq_after)))
        return new + self._copy_on_write(tables, seq_before, seq_after)[1]

    def _copy_on_write(self, tables, seq_before, seq_after) -> tuple[list[int], int]:
        """The rows about to write into a shared, partially filled tail block, and how many copies
        they need: of k such writers of a block with r references, min(k, r - 1) copy it; the
        last one writes in place."""
        bs = self.block_size
        rows = [b for b in range(len(tables)) if seq_after[b] > seq_before[b] and seq_before[b] % bs
                and self.pool.ref_count(tables[b][-1]) > 1]
        writers: dict[int, int] = {}
        for b in rows:
            writers[tables[b][-1]] = writers.get(tables[b][-1], 0) + 1
        return rows, sum(min(k, self.pool.ref_count(blk) - 1) for blk, k in writers.items())

    def _release_out_of_window(self, rows: list[int], seq_before: np.ndarray) -> None:
        """Window tables: release the blocks of ``rows`` that no query of this forward or a later
        one can see (the first query is the row's next stored token, at ``seq_before``)."""
        bs = self.block_size
        upto_all = np.maximum(seq_before - (self.window - 1 + self.window_margin), 0) // bs
        released = np.fromiter((self.released[r] for r in rows), dtype=np.int64, count=len(rows))
        for b in np.flatnonzero(upto_all > released):  # about one row in block_size per decode step
            r, upto = rows[b], int(upto_all[b])
            table = self.tables[r]
            gone = [blk for blk in table[self.released[r]:upto] if blk != RELEASED]
            table[self.released[r]:upto] = [RELEASED] * (upto - self.released[r])
            self.released[r] = upto
            self.pool.decref(gone)

    def _follow_reuse(self, reuse: dict, row_hashes: dict) -> tuple[dict, dict]:
        """The partner's prefix reuse in this pool: a block it took from its pool is taken here by
        the same hash (both pools hold it: :meth:`lookup`); a block shared within the forward is
        shared here too."""
        mine = {}
        for b, refs in reuse.items():
            hashes = row_hashes[b]
            out = []
            for i, ref in enumerate(refs):
                if isinstance(ref, int):
                    blk = self.pool.lookup_hash(hashes[i][1])
                    if blk is None:
                        raise RuntimeError("hf_paged: a reused prefix block is missing from the window layers' pool "
                                           "(bookkeeping bug)")
                    out.append(blk)
                else:
                    out.append(ref)
            mine[b] = out
        return mine, row_hashes

    def _add_inner_pad(self, row: int, at: int) -> None:
        runs = self.inner_pads[row]
        if runs and sum(runs[-1]) == at:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((at, 1))

    def _plan_prefix_reuse(self, rows, real, started_here, tokens):
        """Which full blocks of rows that start in this forward already exist, and the hashes of
        the full blocks every row of a prompt forward fills.

        Returns ``reuse`` (batch row -> leading blocks to reference: a block id from the pool, or
        ``(row, i)`` for block ``i`` of an earlier row of this forward, not yet allocated) and
        ``row_hashes`` (batch row -> ``(block index, chained hash)`` of the full blocks it fills,
        registered once allocated; only rows whose every stored token came with its id).
        Hashes chain over the tokens from the row's first real token, so a hit means the same
        tokens at the same positions: the same K/V.
        """
        if tokens is None or tokens.shape != real.shape or self.salt is None:
            return {}, {}
        bs = self.block_size
        reuse: dict[int, list] = {}
        row_hashes: dict[int, list[tuple[int, bytes]]] = {}
        first_seen: dict[bytes, tuple[int, int]] = {}  # hash -> (batch row, block index) in this forward
        for b, r in enumerate(rows):
            if not started_here[b] and self.row_tokens[r] is None:
                continue  # some of the row's tokens came without ids: its later blocks are not hashed
            known = [] if started_here[b] else self.row_tokens[r]
            done = 0 if started_here[b] else len(self.row_hashes[r])
            parent = self.row_hashes[r][-1] if done else self.salt
            # the blocks not hashed yet: the row's stored tail past its hashed blocks, then this forward's
            row = np.concatenate([np.asarray(known[done * bs:], dtype=np.int64), tokens[b][real[b]].astype(np.int64)])
            hashes = chain_hashes(row, bs, parent)
            row_hashes[b] = [(done + i, h) for i, h in enumerate(hashes)]
            if not started_here[b]:
                continue
            refs: list = []
            for h in hashes:
                hit = self.lookup(h)
                if hit is None:
                    hit = first_seen.get(h)
                if hit is None:
                    break
                refs.append(hit)
            for i in range(len(refs), len(hashes)):
                first_seen.setdefault(hashes[i], (b, i))
            if refs:
                reuse[b] = refs
        return reuse, row_hashes

    # ------------------------------------------------------------------ prefixes without compute
    def cached_prefix(self, tokens, max_tokens: int | None = None, hashes: list[bytes] | None = None) -> list[int]:
        """The pool's blocks (held or cached) holding the leading full blocks of a prompt of
        ``tokens`` (at most ``max_tokens`` tokens of them), in order. ``hashes``: the chained
        hashes of those leading blocks under this table's salt, when the caller has them (at
        least as many as the blocks asked for; only those are read)."""
        if self.salt is None:
            return []
        tokens = np.asarray(tokens, dtype=np.int64)
        n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens)
        full = n // self.block_size
        if hashes is None or len(hashes) < full:
            hashes = chain_hashes(tokens[:full * self.block_size], self.block_size, self.salt)
        blocks = []
        for h in hashes[:full]:
            blk = self.lookup(h)
            if blk is None:
                break
            blocks.append(blk)
        return blocks

    def reuse_prefix(self, row: int, tokens, max_tokens: int | None = None, hashes: list[bytes] | None = None) -> int:
        """Give the empty row ``row`` the pool's blocks holding its prompt's leading full blocks
        (``tokens``: the prompt's ids; at most ``max_tokens`` of them): those tokens are stored
        without running the model. Returns how many tokens the row now holds. ``hashes``: as
        for :meth:`cached_prefix`."""
        if self.tables[row] or self.seq_lens[row]:
            raise RuntimeError(f"hf_paged: reuse_prefix on row {row}, which already holds tokens (bookkeeping bug)")
        self._row_ops += 1
        blocks = self.cached_prefix(tokens, max_tokens, hashes)
        if not blocks:
            return 0
        for blk in blocks:
            self.pool.take(blk)
        n = len(blocks) * self.block_size
        self.tables[row] = blocks
        self.seq_lens[row] = n
        self.row_tokens[row] = np.asarray(tokens[:n], dtype=np.int64).tolist()
        self.row_hashes[row] = [self.pool.block_hash[b] for b in blocks]
        return n

    def forget_registered(self) -> None:
        """Drop the hashes registered since the last call (their forwards may not have written the
        blocks: an exception cut them short)."""
        for blk in self.registered:
            if self.pool.ref_count(blk) > 0 or blk in self.pool.cached:
                self.pool.forget_hash(blk)
        self.registered = []

    # ------------------------------------------------------------------ row operations
    def select_rows(self, idx: list[int]) -> None:
        """Row ``i`` becomes old row ``idx[i]`` (beam reordering, forks with repetition, batch
        selection). Tables move, blocks are shared: no K/V is copied."""
        self._row_ops += 1
        old = self.tables
        if any(i < 0 or i >= len(old) for i in idx):
            raise IndexError(f"hf_paged: row index out of range for a cache of {len(old)} rows: {idx}")
        # A row that stays itself (beam search: most beams at most steps) keeps its table and its
        # references; only the rows that change pay for ref counting (increfs before decrefs, so
        # no block is freed on the way).
        kept = [i < len(old) and src == i for i, src in enumerate(idx)]
        new = [old[i] if keep else list(old[src]) for i, (src, keep) in enumerate(zip(idx, kept))]
        for table, keep in zip(new, kept):
            if not keep:
                self.pool.incref(_held(table))
        for i, table in enumerate(old):
            if not (i < len(kept) and kept[i]):
                self.pool.decref(_held(table))
        self.tables = new
        self.released = [self.released[i] for i in idx]
        self.seq_lens = [self.seq_lens[i] for i in idx]
        self.left_pads = [self.left_pads[i] for i in idx]
        self.inner_pads = [list(self.inner_pads[i]) for i in idx]
        # a row that stays itself keeps its lists; a copy gets its own (they grow with its prompt)
        self.row_tokens = [self.row_tokens[i] if keep or self.row_tokens[i] is None else list(self.row_tokens[i])
                           for i, keep in zip(idx, kept)]
        self.row_hashes = [self.row_hashes[i] if keep else list(self.row_hashes[i]) for i, keep in zip(idx, kept)]

    def drop_rows(self, rows: list[int]) -> None:
        """Remove rows ``rows``; the others keep their tables and order (rows that finished:
        only their own references are dropped, unlike a :meth:`select_rows` that renumbers)."""
        self._row_ops += 1
        gone = set(rows)
        if any(r < 0 or r >= self.num_rows for r in gone):
            raise IndexError(f"hf_paged: row index out of range for a cache of {self.num_rows} rows: {rows}")
        for r in gone:
            self.pool.decref(_held(self.tables[r]))
        keep = [i for i in range(self.num_rows) if i not in gone]
        self.tables = [self.tables[i] for i in keep]
        self.released = [self.released[i] for i in keep]
        self.seq_lens = [self.seq_lens[i] for i in keep]
        self.left_pads = [self.left_pads[i] for i in keep]
        self.inner_pads = [self.inner_pads[i] for i in keep]
        self.row_tokens = [self.row_tokens[i] for i in keep]
        self.row_hashes = [self.row_hashes[i] for i in keep]

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` logical positions of every row; blocks no longer
        referenced return to the pool. Window tables refuse (changing nothing) a crop back past
        blocks they have released."""
        self._row_ops += 1
        bs = self.block_size
        keep = []
        for b in range(self.num_rows):
            # stored tokens among the first max_length logical positions: all but the pads there
            runs = [(at, min(n, max_length - at)) for at, n in self.inner_pads[b] if at < max_length]
            unstored = min(self.left_pads[b], max_length) + sum(n for _, n in runs)
            keep_tokens = max(0, min(self.seq_lens[b], max_length - unstored))
            if self.window is not None and keep_tokens and \
                    self.released[b] > max(0, keep_tokens - self.window + 1 - self.window_margin) // bs:
                raise RuntimeError(
                    f"hf_paged: cannot crop back to {max_length} positions: the sliding-window layers have released "
                    f"the blocks that position's window needs (crop back by fewer tokens, or call reset())")
            keep.append((runs, keep_tokens))
        for b, (table, (runs, keep_tokens)) in enumerate(zip(self.tables, keep)):
            self.inner_pads[b] = runs
            keep_blocks = cdiv(keep_tokens, bs)
            dropped = table[keep_blocks:]
            del table[keep_blocks:]
            self.pool.decref(_held(dropped))
            self.released[b] = min(self.released[b], keep_blocks)
            if keep_tokens % bs and self.pool.ref_count(table[-1]) == 1:
                self.pool.forget_hash(table[-1])  # it becomes partial and will be written again
            self.seq_lens[b] = keep_tokens
            self.left_pads[b] = min(self.left_pads[b], max_length)
            if self.row_tokens[b] is not None:
                del self.row_tokens[b][keep_tokens:]
            del self.row_hashes[b][keep_tokens // bs:]
        self.logical_len = max_length

    def clear(self, keep_cached: bool = False) -> None:
        """Forget every row; every block returns to the pool. ``keep_cached``: the pool is shared
        (a prefix cache): only this table's references are dropped, and hashed blocks stay
        findable; else the whole pool is reset."""
        self._row_ops += 1
        if keep_cached:
            for table in self.tables:
                self.pool.decref(_held(table))
        else:
            self.pool.reset()
        self.released = []
        self.tables, self.seq_lens, self.left_pads, self.inner_pads = [], [], [], []
        self.row_tokens, self.row_hashes, self.registered = [], [], []
        self.logical_len = 0

    # ------------------------------------------------------------------ sizes and views
    def reservation(self, prompt_lengths: list[int], copies: list[int], max_new_tokens: int) -> tuple[int, int]:
        """``(blocks, longest table)`` a generate call can use at most: distinct prompt ``d`` of
        ``prompt_lengths[d]`` real tokens is stored once and continued by ``copies[d]`` rows (beams,
        samples), each generating ``max_new_tokens``. A row then owns at most the blocks of its new
        tokens (the last generated token is never fed back) plus, when its prompt is shared, a copy
        of the prompt's partial tail. Window tables: a row holds at most :meth:`window_blocks`
        blocks past its prompt."""
        bs = self.block_size
        blocks = 0
        for length, n in zip(prompt_lengths, copies):
            blocks += cdiv(length, bs)
            if max_new_tokens > 0:
                shared_prefix = cdiv(length, bs) if n == 1 else length // bs
                per_row = cdiv(length + max_new_tokens - 1, bs) - shared_prefix
                if self.window is not None:
                    per_row = min(per_row, self.window_blocks())
                blocks += n * per_row
        longest = max((cdiv(length + max_new_tokens - 1, bs) for length in prompt_lengths), default=0)
        return blocks, longest

    def window_blocks(self, q_len: int = 1) -> int:
        """Window tables: the most blocks a row holds after a forward of ``q_len`` tokens (the
        window, the margin before it, the forward's tokens, and block rounding at both ends)."""
        return cdiv(self.window + self.window_margin + q_len - 1, self.block_size) + 1

    def stored_positions(self, row: int) -> np.ndarray:
        """The logical positions of ``row``'s stored tokens, in order."""
        stored = np.ones(self.logical_len, dtype=bool)
        stored[: self.left_pads[row]] = False
        for at, count in self.inner_pads[row]:
            stored[at:at + count] = False
        return np.flatnonzero(stored)[: self.seq_lens[row]]

    def usage(self) -> dict:
        """``blocks_used`` (distinct blocks some row references), ``blocks_shared`` (referenced
        more than once) and ``tokens_stored`` (distinct filled token slots)."""
        bs = self.block_size
        filled: dict[int, int] = {}
        for table, n in zip(self.tables, self.seq_lens):
            for i, blk in enumerate(table):
                if blk != RELEASED:
                    filled[blk] = max(filled.get(blk, 0), min(bs, n - i * bs))
        return {
            "blocks_used": len(filled),
            "blocks_shared": sum(1 for b in filled if self.pool.ref_count(b) > 1),
            "tokens_stored": int(sum(filled.values())),
        }

    def check_consistency(self) -> None:
        """Assert the pool's counts match the tables and every table covers its row's tokens."""
        self.pool.check_consistency([_held(t) for t in self.tables])
        for b, (table, n) in enumerate(zip(self.tables, self.seq_lens)):
            if len(table) != cdiv(n, self.block_size):
                raise AssertionError(f"row {b} stores {n} tokens in {len(table)} blocks")


def _held(table: list[int]) -> list[int]:
    """The blocks a table references (a window table's released entries left out)."""
    return [blk for blk in table if blk != RELEASED] if table and table[0] == RELEASED else table
