"""Property-based tests of the block pool and of the cache's row bookkeeping, without a model."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_paged import BlockPool, OutOfBlocksError, PagedCache


def test_allocate_is_all_or_nothing():
    pool = BlockPool(max_blocks=4)
    a = pool.allocate(3)
    assert sorted(a) == [0, 1, 2]
    with pytest.raises(OutOfBlocksError, match="needs 2 more block.*only 1 are available.*max_blocks=4"):
        pool.allocate(2)
    assert pool.num_used == 3
    pool.check_consistency([a])


def test_double_free_and_bad_incref_are_caught():
    pool = BlockPool()
    (b,) = pool.allocate(1)
    pool.decref([b])
    with pytest.raises(RuntimeError, match="double free"):
        pool.decref([b])
    with pytest.raises(RuntimeError, match="incref of free block"):
        pool.incref([b])


def test_hashes_are_dropped_with_their_block():
    pool = BlockPool()
    (b,) = pool.allocate(1)
    pool.register_hash(b, b"digest-1234")
    assert pool.lookup_hash(b"digest-1234") == b
    pool.decref([b])
    assert pool.lookup_hash(b"digest-1234") is None


# ------------------------------------------------------------------ pool alone, random ops
ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "fork", "append", "cow", "reorder", "free", "reset"]),
              st.integers(0, 10 ** 6)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pool_random_operations_never_leak(seq):
    """Tables kept by the test, every change made through the pool's API."""
    pool = BlockPool(max_blocks=64)
    tables: list[list[int]] = []
    for op, r in seq:
        try:
            if op == "alloc":
                tables.append(pool.allocate(1 + r % 4))
            elif op == "fork" and tables:
                t = list(tables[r % len(tables)])
                pool.incref(t)
                tables.append(t)
            elif op == "append" and tables:
                tables[r % len(tables)].extend(pool.allocate(1))
            elif op == "cow" and tables:
                t = tables[r % len(tables)]
                if t and pool.ref_count(t[-1]) > 1:
                    (new,) = pool.allocate(1)
                    pool.decref([t[-1]])
                    t[-1] = new
            elif op == "reorder" and tables:
                idx = [(r // (i + 1)) % len(tables) for i in range(len(tables))]
                new = [list(tables[i]) for i in idx]
                for t in new:
                    pool.incref(t)
                for t in tables:
                    pool.decref(t)
                tables = new
            elif op == "free" and tables:
                pool.decref(tables.pop(r % len(tables)))
            elif op == "reset":
                pool.reset()
                tables = []
        except OutOfBlocksError:
            pass
        pool.check_consistency(tables)
        assert pool.num_used == len({b for t in tables for b in t})
    for t in tables:
        pool.decref(t)
    assert pool.num_free == pool.num_blocks


def _assert_writes_are_private(cache, fwd, blocks_before):
    """Every slot is written at most once, and never into a block another row already shares
    (copy-on-write must have given the writer its own block)."""
    slots = fwd.slot_mapping[fwd.slot_mapping >= 0].tolist()
    assert len(slots) == len(set(slots))
    for blk in {s // cache.block_size for s in slots}:
        if cache.pool.ref_count(blk) > 1:
            # only a block filled in this very forward may be shared while written: rows with the
            # same prompt prefix reference it and just one of them writes it
            assert blk not in blocks_before
    # the copy-on-write targets are fresh blocks, sources are blocks that existed
    if fwd.copy_src is not None:
        assert set(fwd.copy_src.tolist()) <= blocks_before
        assert set(fwd.copy_dst.tolist()).isdisjoint(blocks_before)


# ------------------------------------------------------------------ the cache's row operations
cache_ops = st.lists(
    st.tuples(st.sampled_from(["prefill", "decode", "multi", "reorder", "select", "repeat", "crop", "reset"]),
              st.integers(0, 10 ** 6)),
    min_size=1, max_size=40,
)


def _assert_own_tokens_layout(fwd, lens_before):
    """Every forward the cache builds has the layout the multi-token kernel reads own tokens with
    (its context_lens finds each row's stored length before the forward), and max_context_len
    is the longest of those lengths (0 for a prompt forward)."""
    from hf_paged.kernels import context_lens

    assert context_lens(fwd.seq_lens, fwd.query_pos).tolist() == lens_before
    assert fwd.max_context_len == max(lens_before)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_ops, st.sampled_from([16, 32]))
def test_cache_row_operations_keep_counts_exact(seq, block_size):
    """begin_forward (append + copy-on-write + prefix reuse), reorder, fork, crop and reset on a
    PagedCache without a model: counts always equal table references, nothing leaks."""
    cache = PagedCache(block_size=block_size, max_blocks=200)
    rng = np.random.default_rng(0)
    for op, r in seq:
        rows = len(cache.block_tables)
        try:
            if op == "prefill" and rows == 0:
                b = 1 + r % 4
                lengths = [1 + (r // (i + 1)) % 70 for i in range(b)]
                width = max(lengths)
                mask = torch.zeros(b, width, dtype=torch.bool)
                for i, n in enumerate(lengths):
                    mask[i, width - n:] = True
                shared = rng.integers(3, 9, size=(1, width))  # few symbols: many equal blocks
                tokens = torch.from_numpy(np.repeat(shared, b, 0) if r % 2 else rng.integers(3, 9, (b, width)))
                cache.set_prefill_tokens(tokens)
                fwd = cache.begin_forward(mask, width, b, torch.device("cpu"))
                fwd.layers_done.add(0)
                _assert_writes_are_private(cache, fwd, set())
                _assert_own_tokens_layout(fwd, [0] * b)
                cache._logical_len = fwd.new_logical_len
            elif op in ("decode", "multi") and rows:
                q = 1 if op == "decode" else 1 + r % 5
                before = {blk for t in cache.block_tables for blk in t}
                lens_before = list(cache.seq_lens)
                fwd = cache.begin_forward(None, q, rows, torch.device("cpu"))
                fwd.layers_done.add(0)
                _assert_writes_are_private(cache, fwd, before)
                _assert_own_tokens_layout(fwd, lens_before)
                cache._logical_len = fwd.new_logical_len
                # a row that shares its partial tail gets a copy: sources are live, targets fresh
                if fwd.copy_src is not None:
                    assert set(fwd.copy_dst.tolist()).isdisjoint(fwd.copy_src.tolist())
            elif op == "reorder" and rows:
                cache.reorder_cache(torch.tensor([(r // (i + 1)) % rows for i in range(rows)]))
            elif op == "select" and rows:
                keep = sorted({(r // (i + 1)) % rows for i in range(1 + r % rows)})
                cache.batch_select_indices(torch.tensor(keep))
            elif op == "repeat" and rows and rows <= 4:
                cache.batch_repeat_interleave(1 + r % 3)
            elif op == "crop" and rows:
                cache.crop(-(1 + r % 20))
            elif op == "reset":
                cache.reset()
        except OutOfBlocksError:
            pass
        cache.pool.check_consistency(cache.block_tables)
        bs = cache.block_size
        for table, n in zip(cache.block_tables, cache.seq_lens):
            assert len(table) == -(-n // bs)  # exactly the blocks the row's tokens need
        stats = cache.memory_stats()
        assert stats["blocks_used"] == cache.pool.num_used
    cache.reset()
    assert cache.pool.num_free == cache.pool.num_blocks
