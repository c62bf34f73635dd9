"""Property-based tests of the block pool, without a model (the block tables over it: test_block_table.py)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_paged import BlockPool, OutOfBlocksError


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
