"""Block pool: which physical KV blocks are free, how many block-table references each one has,
and the content hash of full blocks (for prefix sharing).

A freed block that has a content hash keeps it: it waits in a least-recently-freed queue
(``cached``), still found by :meth:`BlockPool.lookup_hash`, until a table takes it again
(:meth:`BlockPool.take`: its tokens are reused without compute) or an allocation needs the room
(it is evicted: its hash is dropped before anything writes it). Free blocks without a hash are
handed out first.

The pool holds no tensors and knows nothing about layers or models: the cache (``cache.py``) owns
the per-layer K/V tensors and grows them to ``pool.num_blocks`` whenever the pool grows. A block's
reference count is the number of block-table entries (over all rows) that point at it; a block is
free exactly when its count is zero. Forking a row = copying its table and incrementing counts;
writing into a block whose count is above one must first copy it (copy-on-write, done by the cache).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable


class OutOfBlocksError(MemoryError):
    """The KV cache needs more blocks than its cap (``max_blocks`` / ``max_memory``) allows."""

    def __init__(self, needed: int, available: int, max_blocks: int | None, hint: str = ""):
        self.needed = needed
        self.available = available
        self.max_blocks = max_blocks
        msg = (
            f"hf_paged: the KV cache needs {needed} more block(s) but only {available} are available "
            f"(cap: max_blocks={max_blocks}). Raise the cache's max_blocks / max_memory, or lower the "
            f"batch size, num_beams / num_return_sequences or max_new_tokens."
        )
        if hint:
            msg += " " + hint
        super().__init__(msg)


class BlockPool:
    """Reference-counted allocator of block ids ``0 .. num_blocks - 1``.

    ``num_blocks`` grows on demand (geometrically, so that the cache resizes its tensors rarely) up
    to ``max_blocks`` when a cap is set. Allocation is all-or-nothing: a request that cannot be
    served raises :class:`OutOfBlocksError` and changes nothing.
    """

    def __init__(self, num_blocks: int = 0, max_blocks: int | None = None, growth: float = 1.5,
                 reserve_growth: float = 1.0):
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be a positive number of blocks, got {max_blocks}")
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.max_blocks = max_blocks
        self.growth = growth
        # reserve() grows to at least this factor of the pool: 1 for a pool that serves one call
        # (sized once for it), more for a pool that serves many (a prefix cache's: its tensors,
        # and the CUDA graphs that address them, then change a few times rather than every call)
        self.reserve_growth = reserve_growth
        self.num_blocks = 0
        self.ref_counts: list[int] = []
        self._free: list[int] = []  # free blocks without a hash; a stack: the most recently freed is reused first
        # free blocks that keep their hash (reusable by content), least recently freed first
        self.cached: OrderedDict[int, None] = OrderedDict()
        self.block_hash: dict[int, bytes] = {}  # block id -> content hash (full, hashed blocks only)
        self.hash_to_block: dict[bytes, int] = {}
        self.evictions = 0  # cached blocks handed out for other content (their hash dropped)
        self._grow_to(num_blocks)

    # ----------------------------------------------------------------- capacity
    @property
    def num_free(self) -> int:
        """Blocks no table references (cached ones included: they can be handed out)."""
        return len(self._free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self.cached)

    def available(self) -> int:
        """Blocks that can still be allocated: free ones (cached included) plus the room left under the cap."""
        if self.max_blocks is None:
            return 1 << 62
        return self.num_free + (self.max_blocks - self.num_blocks)

    def _grow_to(self, new_num_blocks: int) -> None:
        old = self.num_blocks
        if new_num_blocks <= old:
            return
        self.ref_counts.extend([0] * (new_num_blocks - old))
        # Push in reverse so that low ids are handed out first (keeps tables readable in tests).
        self._free[:0] = range(new_num_blocks - 1, old - 1, -1)
        self.num_blocks = new_num_blocks

    def reserve(self, num_blocks: int) -> None:
        """Make ``num_blocks`` more blocks allocatable without growing the pool later (capped by
        ``max_blocks``), so the cache's tensors are allocated once at that size instead of growing
        step by step. The pool grows before cached blocks are counted: they keep their content
        while the cap leaves room."""
        short = num_blocks - len(self._free)
        if short <= 0:
            return
        target = max(self.num_blocks + short, int(self.num_blocks * self.reserve_growth))
        if self.max_blocks is not None:
            target = min(target, self.max_blocks)
        self._grow_to(target)

    # ----------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1: blocks without a hash first, then
        cached ones, least recently freed first (their hash is dropped), then new ones (the pool
        grows if allowed)."""
        if n <= 0:
            return []
        if n > self.num_free:
            missing = n - self.num_free
            if n > self.available():
                raise OutOfBlocksError(n, self.available(), self.max_blocks)
            target = max(self.num_blocks + missing, int(self.num_blocks * self.growth) + 16)
            if self.max_blocks is not None:
                target = min(target, self.max_blocks)
            self._grow_to(target)
        while len(self._free) < n:
            b, _ = self.cached.popitem(last=False)
            self._drop_hash(b)
            self._free.append(b)
            self.evictions += 1
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

    def take(self, block: int) -> None:
        """One more reference to ``block``, found by its hash: a held block, or a cached free one
        (which leaves the cache with its content)."""
        if self.ref_counts[block] == 0:
            if block not in self.cached:
                raise RuntimeError(f"hf_paged: taking free block {block}, which holds no cached content "
                                   f"(bookkeeping bug)")
            del self.cached[block]
        self.ref_counts[block] += 1

    def incref(self, blocks: Iterable[int]) -> None:
        for b in blocks:
            if self.ref_counts[b] <= 0:
                raise RuntimeError(f"hf_paged: incref of free block {b} (bookkeeping bug)")
            self.ref_counts[b] += 1

    def decref(self, blocks: Iterable[int]) -> None:
        """Drop one reference to each block; blocks reaching zero return to the free list."""
        for b in blocks:
            c = self.ref_counts[b]
            if c <= 0:
                raise RuntimeError(f"hf_paged: double free of block {b} (bookkeeping bug)")
            c -= 1
            self.ref_counts[b] = c
            if c == 0:
                if b in self.block_hash:
                    self.cached[b] = None  # keeps its content and hash until evicted
                else:
                    self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self.ref_counts[block]

    # ----------------------------------------------------------------- prefix hashes
    def register_hash(self, block: int, content_hash: bytes) -> bool:
        """Remember that ``block`` (a full block) holds the content ``content_hash`` stands for.
        A hash already standing for a block keeps it, and a block keeps its first hash: returns
        whether this call registered anything."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"hf_paged: hashing free block {block} (bookkeeping bug)")
        if content_hash in self.hash_to_block or block in self.block_hash:
            return False
        self.block_hash[block] = content_hash
        self.hash_to_block[content_hash] = block
        return True

    def lookup_hash(self, content_hash: bytes) -> int | None:
        """The block (held or cached) holding the content ``content_hash`` stands for, if any."""
        return self.hash_to_block.get(content_hash)

    def forget_hash(self, block: int) -> None:
        """The block's content is about to change (or is not to be trusted): it no longer stands
        for its hash; a cached block becomes a plain free one."""
        self._drop_hash(block)
        if block in self.cached:
            del self.cached[block]
            self._free.append(block)

    def _drop_hash(self, block: int) -> None:
        h = self.block_hash.pop(block, None)
        if h is not None:
            del self.hash_to_block[h]

    def drop_cached(self) -> None:
        """Forget the content of every cached free block (they become plain free blocks)."""
        for b in list(self.cached):
            self.forget_hash(b)

    # ----------------------------------------------------------------- whole pool
    def reset(self) -> None:
        """Free every block (capacity is kept: the tensors behind it stay allocated)."""
        n = self.num_blocks
        self.ref_counts = [0] * n
        self._free = list(range(n - 1, -1, -1))
        self.cached.clear()
        self.block_hash.clear()
        self.hash_to_block.clear()

    def check_consistency(self, tables: Iterable[Iterable[int]]) -> None:
        """Assert every count equals the number of table references and free == count 0."""
        expected = [0] * self.num_blocks
        for table in tables:
            for b in table:
                expected[b] += 1
        if expected != self.ref_counts:
            bad = [i for i, (e, c) in enumerate(zip(expected, self.ref_counts)) if e != c]
            raise AssertionError(f"ref counts differ from table references for blocks {bad[:10]}")
        free = set(self._free)
        if len(free) != len(self._free):
            raise AssertionError("a block is on the free list twice")
        if free & set(self.cached):
            raise AssertionError(f"blocks both free and cached: {sorted(free & set(self.cached))[:10]}")
        zero = {i for i, c in enumerate(self.ref_counts) if c == 0}
        if free | set(self.cached) != zero:
            raise AssertionError("free and cached blocks differ from the set of blocks with count 0")
        for b in self.cached:
            if b not in self.block_hash:
                raise AssertionError(f"cached block {b} has no hash")
        for b in free:
            if b in self.block_hash:
                raise AssertionError(f"free block {b} still has a hash")
        if {self.hash_to_block[h]: h for h in self.hash_to_block} != self.block_hash:
            raise AssertionError("hash_to_block and block_hash disagree")
