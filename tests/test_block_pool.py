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


def test_a_freed_block_keeps_its_hash_until_it_is_handed_out_again():
    pool = BlockPool(max_blocks=2)
    (b,) = pool.allocate(1)
    pool.register_hash(b, b"digest-1234")
    assert pool.lookup_hash(b"digest-1234") == b
    pool.decref([b])
    assert pool.lookup_hash(b"digest-1234") == b and pool.num_cached == 1 and pool.num_free == 2
    pool.take(b)  # found by its hash: reused with its content
    assert pool.ref_count(b) == 1 and pool.num_cached == 0
    pool.decref([b])
    # free blocks without a hash go first; then the cached one is evicted, its hash dropped
    first = pool.allocate(1)
    assert first != [b] and pool.lookup_hash(b"digest-1234") == b
    second = pool.allocate(1)
    assert second == [b] and pool.lookup_hash(b"digest-1234") is None and pool.evictions == 1
    pool.check_consistency([first, second])


def test_cached_blocks_are_evicted_least_recently_freed_first():
    pool = BlockPool(max_blocks=3)
    blocks = pool.allocate(3)
    for i, b in enumerate(blocks):
        pool.register_hash(b, bytes([i]))
    pool.decref([blocks[1]])
    pool.decref([blocks[0]])
    pool.decref([blocks[2]])
    assert pool.allocate(1) == [blocks[1]]
    assert pool.lookup_hash(bytes([1])) is None and pool.lookup_hash(bytes([0])) == blocks[0]


def test_reserve_grows_before_counting_cached_blocks():
    pool = BlockPool(num_blocks=1, max_blocks=6)
    (b,) = pool.allocate(1)
    pool.register_hash(b, b"x")
    pool.decref([b])
    pool.reserve(3)  # three allocatable without touching the cached block, while the cap allows
    assert pool.num_blocks == 4
    assert len(pool.allocate(3)) == 3 and pool.lookup_hash(b"x") == b
    pool.reserve(5)  # the cap leaves room for two more; the cached block counts as allocatable
    assert pool.num_blocks == 6 and pool.available() == 3


def test_reserve_of_a_pool_serving_many_calls_grows_geometrically():
    """A prefix cache's pool (reserve_growth=2) doubles when a call lacks blocks, up to the cap:
    its tensors, and the CUDA graphs over them, change a few times rather than at every call."""
    pool = BlockPool(reserve_growth=2.0, max_blocks=100)
    pool.reserve(10)
    assert pool.num_blocks == 10  # an empty pool: what was asked
    pool.allocate(10)
    pool.reserve(3)
    assert pool.num_blocks == 20  # doubled, not 13
    pool.allocate(10)
    pool.reserve(1)
    assert pool.num_blocks == 40
    pool.reserve(30)
    assert pool.num_blocks == 80
    pool.allocate(60)
    pool.reserve(5)
    assert pool.num_blocks == 100  # capped
    plain = BlockPool()
    plain.reserve(10)
    plain.allocate(10)
    plain.reserve(3)
    assert plain.num_blocks == 13  # a pool for one call: exactly what it lacks


# ------------------------------------------------------------------ pool alone, random ops
ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "fork", "append", "cow", "reorder", "free", "reset", "hash", "hit"]),
              st.integers(0, 10 ** 6)),
    min_size=1, max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops)
def test_pool_random_operations_never_leak(seq):
    """Tables kept by the test, every change made through the pool's API. Blocks are hashed with
    a content tag the test keeps (``content``: what the test wrote there); a block found by its
    hash must still hold that content, whether held or cached after being freed (no stale hit),
    and no block is ever both free and referenced (check_consistency)."""
    pool = BlockPool(max_blocks=64)
    tables: list[list[int]] = []
    content: dict[int, bytes] = {}  # block -> the content last written there
    for op, r in seq:
        try:
            if op == "alloc":
                new = pool.allocate(1 + r % 4)
                for b in new:
                    content[b] = r.to_bytes(4, "little") + bytes([b])  # written anew
                tables.append(new)
            elif op == "hash" and tables and tables[r % len(tables)]:
                b = tables[r % len(tables)][-1]
                pool.register_hash(b, content[b])
            elif op == "hit" and content:
                key = sorted(content.values())[r % len(content)]
                b = pool.lookup_hash(key)
                if b is not None:
                    assert content[b] == key  # never a block rewritten with other content
                    pool.take(b)
                    tables.append([b])
            elif op == "fork" and tables:
                t = list(tables[r % len(tables)])
                pool.incref(t)
                tables.append(t)
            elif op == "append" and tables:
                (new,) = pool.allocate(1)
                content[new] = r.to_bytes(4, "little") + bytes([new])
                tables[r % len(tables)].append(new)
            elif op == "cow" and tables:
                t = tables[r % len(tables)]
                if t and pool.ref_count(t[-1]) > 1:
                    (new,) = pool.allocate(1)
                    content[new] = content[t[-1]]
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
        for h, b in pool.hash_to_block.items():
            assert content[b] == h
    for t in tables:
        pool.decref(t)
    assert pool.num_free == pool.num_blocks
