"""Block pool: which physical KV blocks are free, how many block-table references each one has,
and the content hash of full blocks (for prefix sharing).

The pool holds no tensors and knows nothing about layers or models: the cache (``cache.py``) owns
the per-layer K/V tensors and grows them to ``pool.num_blocks`` whenever the pool grows. A block's
reference count is the number of block-table entries (over all rows) that point at it; a block is
free exactly when its count is zero. Forking a row = copying its table and incrementing counts;
writing into a block whose count is above one must first copy it (copy-on-write, done by the cache).
"""

from __future__ import annotations

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

    def __init__(self, num_blocks: int = 0, max_blocks: int | None = None, growth: float = 1.5):
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks must be a positive number of blocks, got {max_blocks}")
        if max_blocks is not None:
            num_blocks = min(num_blocks, max_blocks)
        self.max_blocks = max_blocks
        self.growth = growth
        self.num_blocks = 0
        self.ref_counts: list[int] = []
        self._free: list[int] = []  # a stack: the most recently freed block is reused first
        self.block_hash: dict[int, bytes] = {}  # block id -> content hash (full, hashed blocks only)
        self.hash_to_block: dict[bytes, int] = {}
        self._grow_to(num_blocks)

    # ----------------------------------------------------------------- capacity
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def available(self) -> int:
        """Blocks that can still be allocated: free ones plus the room left under the cap."""
        if self.max_blocks is None:
            return 1 << 62
        return len(self._free) + (self.max_blocks - self.num_blocks)

    def _grow_to(self, new_num_blocks: int) -> None:
        old = self.num_blocks
        if new_num_blocks <= old:
            return
        self.ref_counts.extend([0] * (new_num_blocks - old))
        # Push in reverse so that low ids are handed out first (keeps tables readable in tests).
        self._free[:0] = range(new_num_blocks - 1, old - 1, -1)
        self.num_blocks = new_num_blocks

    def reserve(self, num_blocks: int) -> None:
        """Hold capacity for ``num_blocks`` blocks in all (capped by ``max_blocks``), so the
        cache's tensors are allocated once at that size instead of growing step by step."""
        if self.max_blocks is not None:
            num_blocks = min(num_blocks, self.max_blocks)
        self._grow_to(num_blocks)

    # ----------------------------------------------------------------- allocation
    def allocate(self, n: int) -> list[int]:
        """Take ``n`` free blocks, each with reference count 1. Grows the pool if allowed."""
        if n <= 0:
            return []
        if n > len(self._free):
            missing = n - len(self._free)
            if n > self.available():
                raise OutOfBlocksError(n, self.available(), self.max_blocks)
            target = max(self.num_blocks + missing, int(self.num_blocks * self.growth) + 16)
            if self.max_blocks is not None:
                target = min(target, self.max_blocks)
            self._grow_to(target)
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self.ref_counts[b] = 1
        return blocks

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
                h = self.block_hash.pop(b, None)
                if h is not None and self.hash_to_block.get(h) == b:
                    del self.hash_to_block[h]
                self._free.append(b)

    def ref_count(self, block: int) -> int:
        return self.ref_counts[block]

    # ----------------------------------------------------------------- prefix hashes
    def register_hash(self, block: int, content_hash: bytes) -> None:
        """Remember that ``block`` (a full block) holds the content ``content_hash`` stands for."""
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"hf_paged: hashing free block {block} (bookkeeping bug)")
        self.block_hash[block] = content_hash
        self.hash_to_block.setdefault(content_hash, block)

    def lookup_hash(self, content_hash: bytes) -> int | None:
        return self.hash_to_block.get(content_hash)

    def forget_hash(self, block: int) -> None:
        """The block's content is about to change: it no longer stands for its hash."""
        h = self.block_hash.pop(block, None)
        if h is not None and self.hash_to_block.get(h) == block:
            del self.hash_to_block[h]

    # ----------------------------------------------------------------- whole pool
    def reset(self) -> None:
        """Free every block (capacity is kept: the tensors behind it stay allocated)."""
        n = self.num_blocks
        self.ref_counts = [0] * n
        self._free = list(range(n - 1, -1, -1))
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
        zero = {i for i, c in enumerate(self.ref_counts) if c == 0}
        if free != zero:
            raise AssertionError("free list differs from the set of blocks with count 0")
        for b in self.block_hash:
            if self.ref_counts[b] == 0:
                raise AssertionError(f"free block {b} still has a hash")
