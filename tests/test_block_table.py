"""Property-based tests of the block tables alone (no tensors, no model): every forward plan,
row selection, crop and clear keeps the pool's counts exact and every write private."""

import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_paged import BlockPool, OutOfBlocksError
from hf_paged.block_table import BlockTables
from hf_paged.kernels import context_lens


@pytest.fixture(autouse=True, scope="module")
def shared_prefix_groups_planned():
    """Decode plans carry their shared-prefix groups here (HF_PAGED_CASCADE=auto), so that every
    plan of the property tests checks them; off by default, they would be empty."""
    saved = os.environ.get("HF_PAGED_CASCADE")
    os.environ["HF_PAGED_CASCADE"] = "auto"
    yield
    if saved is None:
        del os.environ["HF_PAGED_CASCADE"]
    else:
        os.environ["HF_PAGED_CASCADE"] = saved


def _check_plan(tables: BlockTables, plan, blocks_before: set, lens_before: list[int], real: np.ndarray):
    bs = tables.block_size
    slots = plan.slot_mapping[plan.slot_mapping >= 0].tolist()
    # every slot is written at most once, only real tokens are written, and never into a block
    # another row already shared before this forward (copy-on-write gave the writer its own)
    assert len(slots) == len(set(slots))
    assert not (plan.slot_mapping[~real] >= 0).any()
    for blk in {s // bs for s in slots}:
        if tables.pool.ref_count(blk) > 1:
            assert blk not in blocks_before  # a block filled in this very forward by rows sharing a prefix
    # copy-on-write sources are blocks that existed, targets fresh ones
    assert {s for s, _ in plan.copies} <= blocks_before
    assert {d for _, d in plan.copies}.isdisjoint(blocks_before)
    # the layout the multi-token kernel reads own tokens with: context_lens finds each row's stored
    # length before the forward (rows with pads after their first token read the pool instead)
    if not plan.pads_after_start:
        found = context_lens(torch.from_numpy(plan.seq_lens), torch.from_numpy(plan.query_pos)).tolist()
        assert found == lens_before
    assert plan.max_context_len == max(lens_before)
    assert plan.seq_lens.tolist() == [n + int(r.sum()) for n, r in zip(lens_before, real)]
    _check_shared_prefixes(plan, bs, set(slots))


def _check_shared_prefixes(plan, bs: int, written: set) -> None:
    """A decode plan's groups (kernels/cascade.py): each chunk's rows hold its first S tokens in the
    same blocks, stored before their queries; nothing this forward writes is a slot a chunk reads
    (the shared-prefix kernel and the decode kernel's fused store run side by side)."""
    shared = plan.shared_prefixes
    if plan.query_pos.shape[1] != 1:
        assert shared is None
        return
    read, in_chunk = set(), np.zeros(len(plan.seq_lens), dtype=bool)
    for s_len, first, count in shared.chunks[:shared.num_chunks].tolist():
        rows = shared.members[first:first + count]
        assert count >= 2 and s_len >= 1 and not in_chunk[rows].any()
        in_chunk[rows] = True
        assert (plan.query_pos[rows, 0] >= s_len).all()
        held = -(-s_len // bs)
        assert (plan.block_table[rows, :held] == plan.block_table[rows[0], :held]).all()
        assert (shared.own_start[rows] == s_len).all()
        read |= {int(plan.block_table[rows[0], p // bs]) * bs + p % bs for p in range(s_len)}
    assert not shared.chunks[shared.num_chunks:].any()
    assert (shared.own_start[~in_chunk] == 0).all()
    assert read.isdisjoint(written)


ops = st.lists(
    st.tuples(st.sampled_from(["prefill", "decode", "multi", "turn", "reorder", "select", "repeat", "drop", "crop",
                               "clear"]),
              st.integers(0, 10 ** 6)),
    min_size=1, max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from([16, 32]))
def test_block_tables_random_operations_keep_counts_exact(seq, block_size):
    """Forwards (prompts with shared prefixes, decode, multi-token, turns with pads inside rows),
    beam reordering, selection, repetition, crop and clear: the pool's counts always equal the
    tables' references, every row holds exactly the blocks its tokens need, nothing leaks."""
    tables = BlockTables(BlockPool(max_blocks=200), block_size)
    rng = np.random.default_rng(0)
    for op, r in seq:
        rows = tables.num_rows
        try:
            if op == "prefill" and rows == 0:
                b = 1 + r % 4
                lengths = [1 + (r // (i + 1)) % 70 for i in range(b)]
                width = max(lengths)
                real = np.zeros((b, width), dtype=bool)
                for i, n in enumerate(lengths):
                    real[i, width - n:] = True
                shared = rng.integers(3, 9, size=(1, width))  # few symbols: many equal blocks
                tokens = np.repeat(shared, b, 0) if r % 2 else rng.integers(3, 9, (b, width))
                tables.add_rows(b)
                plan = tables.plan_forward(list(range(b)), real, tokens)
                _check_plan(tables, plan, set(), [0] * b, real)
                tables.logical_len += width
            elif op in ("decode", "multi", "turn") and rows:
                q = 1 if op == "decode" else 1 + r % 5
                real = np.ones((rows, q), dtype=bool)
                if op == "turn":  # a new turn per row, left-padded on its own: pads inside the rows
                    for i in range(rows):
                        real[i, : (r // (i + 1)) % q] = False
                before = {blk for t in tables.tables for blk in t}
                lens_before = list(tables.seq_lens)
                plan = tables.plan_forward(list(range(rows)), real)
                _check_plan(tables, plan, before, lens_before, real)
                tables.logical_len += q
            elif op == "reorder" and rows:
                tables.select_rows([(r // (i + 1)) % rows for i in range(rows)])
            elif op == "select" and rows:
                tables.select_rows(sorted({(r // (i + 1)) % rows for i in range(1 + r % rows)}))
            elif op == "repeat" and rows and rows <= 4:
                tables.select_rows([i for i in range(rows) for _ in range(1 + r % 3)])
            elif op == "drop" and rows:
                gone = sorted({(r // (i + 1)) % rows for i in range(1 + r % rows)})
                kept = [list(t) for i, t in enumerate(tables.tables) if i not in gone]
                tables.drop_rows(gone)
                assert tables.tables == kept  # the other rows keep their tables, in order
            elif op == "crop" and rows:
                tables.crop(max(0, tables.logical_len - (1 + r % 20)))
            elif op == "clear":
                tables.clear()
        except OutOfBlocksError:
            pass
        tables.check_consistency()
        assert tables.usage()["blocks_used"] == tables.pool.num_used
        for b in range(tables.num_rows):  # every stored token has a logical position, in order
            positions = tables.stored_positions(b)
            assert len(positions) == tables.seq_lens[b] and (np.diff(positions) > 0).all()
    tables.clear()
    assert tables.pool.num_free == tables.pool.num_blocks


def test_kept_block_table_is_patched_and_a_stale_one_is_caught():
    """A decode step writes only the entries it changed into the block table kept from the last
    forward (new blocks, a copied-on-write tail); any row operation invalidates it. The tests run
    with ``check_dense`` (conftest.py): a table changed behind the tables' back is caught."""
    assert BlockTables.check_dense  # every test's forwards compare the kept table with a fresh one
    tables = BlockTables(BlockPool(), 4)
    tables.add_rows(2)
    tables.plan_forward([0, 1], np.ones((2, 6), dtype=bool))
    tables.select_rows([0, 0, 1])  # row 0 forked: its tail block is shared
    first = tables.plan_forward([0, 1, 2], np.ones((3, 1), dtype=bool))  # copy-on-write of row 1's tail
    kept = tables._dense
    second = tables.plan_forward([0, 1, 2], np.ones((3, 1), dtype=bool))  # row 0 and 1 cross a block
    assert tables._dense is kept  # patched in place, not rebuilt
    assert first.block_table[1, 1] != first.block_table[0, 1]  # the copied tail
    assert second.block_table.tolist() == [t + [0] * (second.block_table.shape[1] - len(t)) for t in tables.tables]
    tables.tables[2][0], tables.tables[2][1] = tables.tables[2][1], tables.tables[2][0]  # behind its back
    with pytest.raises(AssertionError, match="kept block table went stale"):
        tables.plan_forward([0, 1, 2], np.ones((3, 1), dtype=bool))


def test_a_bad_cascade_setting_raises_before_any_row_changes(monkeypatch):
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(2)
    tables.plan_forward([0, 1], np.ones((2, 20), dtype=bool))
    before = (list(map(list, tables.tables)), list(tables.seq_lens), tables.pool.num_used)
    monkeypatch.setenv("HF_PAGED_CASCADE", "sometimes")
    with pytest.raises(ValueError, match="HF_PAGED_CASCADE='sometimes' is not understood"):
        tables.plan_forward([0, 1], np.ones((2, 1), dtype=bool))
    assert (list(map(list, tables.tables)), list(tables.seq_lens), tables.pool.num_used) == before


def test_out_of_blocks_changes_nothing():
    tables = BlockTables(BlockPool(max_blocks=3), 16)
    tables.add_rows(2)
    real = np.ones((2, 20), dtype=bool)
    with pytest.raises(OutOfBlocksError, match=r"needs 4 more block.*longest row would hold 20 tokens"):
        tables.plan_forward([0, 1], real)
    assert tables.seq_lens == [0, 0] and tables.tables == [[], []] and tables.pool.num_used == 0


def test_identical_prompt_blocks_are_stored_once_and_written_once():
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(3)
    tokens = np.tile(np.arange(40), (3, 1))
    tokens[2, 20:] = 7  # row 2 shares the first full block only
    plan = tables.plan_forward([0, 1, 2], np.ones((3, 40), dtype=bool), tokens)
    assert tables.tables[0][:2] == tables.tables[1][:2] and tables.tables[2][0] == tables.tables[0][0]
    assert tables.tables[2][1] != tables.tables[0][1]
    # the shared blocks are written by their first row only
    assert (plan.slot_mapping[1, :32] == -1).all() and (plan.slot_mapping[2, :16] == -1).all()
    assert tables.usage() == {"blocks_used": 3 + 1 + 2, "blocks_shared": 2, "tokens_stored": 40 + 8 + 24}


def test_decode_plans_group_rows_over_shared_blocks(monkeypatch):
    """Forked rows (samples of one prompt) share its blocks: a decode step's plan groups them, uses
    the shared-prefix attention when it pays (HF_PAGED_CASCADE=auto or unset, the default) or when
    forced, and never with HF_PAGED_CASCADE=0."""
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(1)
    tables.plan_forward([0], np.ones((1, 4000), dtype=bool))
    tables.select_rows([0, 0, 0, 0])
    tables.add_rows(1)
    tables.plan_forward([4], np.ones((1, 50), dtype=bool))  # a row of its own
    decode = np.ones((5, 1), dtype=bool)
    monkeypatch.delenv("HF_PAGED_CASCADE", raising=False)  # auto by default
    plan = tables.plan_forward(list(range(5)), decode)
    shared = plan.shared_prefixes
    # 4000 tokens = 250 full blocks; the tail (none: 4000 % 16 == 0) is not shared
    assert shared.num_chunks == 1 and shared.chunks[0].tolist() == [4000, 0, 4]
    assert shared.own_start.tolist() == [4000] * 4 + [0]
    assert shared.saved_tokens == 3 * 4000 and plan.use_cascade
    _check_shared_prefixes(plan, 16, set(plan.slot_mapping.ravel().tolist()) - {-1})
    monkeypatch.setenv("HF_PAGED_CASCADE", "0")
    plan = tables.plan_forward(list(range(5)), decode)
    assert not plan.use_cascade and plan.shared_prefixes.num_chunks == 0
    tables.select_rows([0, 4])  # two rows that share nothing: never worth it, unless forced
    monkeypatch.setenv("HF_PAGED_CASCADE", "auto")
    assert not tables.plan_forward([0, 1], np.ones((2, 1), dtype=bool)).use_cascade
    monkeypatch.setenv("HF_PAGED_CASCADE", "1")
    plan = tables.plan_forward([0, 1], np.ones((2, 1), dtype=bool))
    assert plan.use_cascade and plan.shared_prefixes.num_chunks == 0
    assert tables.plan_forward([0, 1], np.ones((2, 3), dtype=bool)).shared_prefixes is None  # decode only


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_decode_groups_under_beam_reordering(seed, monkeypatch):
    """Beam search's pattern (rows reordered and forked every step, prompts of any length, blocks
    of 16): every decode plan's groups hold (same leading blocks, stored before every member's
    query, never written by the step) and rows that share blocks are grouped."""
    monkeypatch.setenv("HF_PAGED_CASCADE", "auto")  # plans groups (the default; set in case the caller's is 0)
    rng = np.random.default_rng(seed)
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(2)
    lengths = rng.integers(20, 90, size=2)
    real = np.zeros((2, int(lengths.max())), dtype=bool)
    for i, n in enumerate(lengths):
        real[i, real.shape[1] - n:] = True
    tables.plan_forward([0, 1], real)
    tables.select_rows([0, 0, 0, 1, 1, 1])  # three beams per prompt
    grouped = 0
    for _ in range(40):
        tables.select_rows([3 * (i // 3) + int(rng.integers(0, 3)) for i in range(6)])
        before = {blk for t in tables.tables for blk in t}
        lens_before = list(tables.seq_lens)
        decode = np.ones((6, 1), dtype=bool)
        plan = tables.plan_forward(list(range(6)), decode)
        _check_plan(tables, plan, before, lens_before, decode)
        shared = plan.shared_prefixes
        grouped += shared.num_chunks
        # rows whose first blocks are the same (after this step's copy-on-write) are grouped
        for i in range(6):
            for j in range(i + 1, 6):
                if plan.block_table[i, 0] == plan.block_table[j, 0] and min(plan.query_pos[[i, j], 0]) >= 16:
                    assert shared.own_start[i] > 0 and shared.own_start[j] > 0
        tables.logical_len += 1
    assert grouped >= 40  # both prompts' beams share their prompt's full blocks at every step


def test_blocks_needed_is_what_the_forward_takes():
    """blocks_needed counts a forward's new blocks and copy-on-write copies before it runs."""
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(1)
    tables.plan_forward([0], np.ones((1, 20), dtype=bool))
    tables.select_rows([0, 0, 0])  # three rows share a full block and a partial tail block
    used = tables.pool.num_used
    # rows 0 and 1 add one token, row 2 thirteen: row 2 needs a third block, and two of the three
    # writers of the shared tail copy it (the last writes in place)
    assert tables.blocks_needed([0, 1, 2], [1, 1, 13]) == 1 + 2
    real = np.arange(13)[None, :] >= np.array([[12], [12], [0]])
    tables.plan_forward([0, 1, 2], real)
    assert tables.pool.num_used - used == 3


# ------------------------------------------------------------------ prefix reuse without compute
reuse_ops = st.lists(st.tuples(st.sampled_from(["start", "reuse", "decode", "free"]), st.integers(0, 10 ** 6)),
                     min_size=1, max_size=40)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reuse_ops)
def test_reused_blocks_hold_the_tokens_they_are_found_for(seq):
    """Prompts over three preambles start (reusing stored blocks, or planning their whole prompt),
    decode and leave, in a small capped pool, so freed hashed blocks are cached, re-hit and
    evicted. The test writes every planned slot's token into ``content``: after every step, each
    hash the pool can find names a block holding exactly that hash's tokens (a block rewritten for
    other content is never found under its old hash), and no block is both free and referenced."""
    from hf_paged.block_table import chain_hashes

    bs = 4
    pool = BlockPool(max_blocks=20)
    tables = BlockTables(pool, bs)
    preambles = [[(i * 7 + k * 3) % 50 + 1 for k in range(24)] for i in range(3)]
    content: dict[int, int] = {}  # slot -> the token last written there
    tokens_of_hash: dict[bytes, list[int]] = {}
    prompts: list[list[int]] = []  # row -> its tokens so far
    for op, r in seq:
        if op in ("start", "reuse"):
            prompt = preambles[r % 3][: (r // 3) % 25] + [60 + (r // 80) % 4] * (1 + r % 5)
            hashes = chain_hashes(np.asarray(prompt, dtype=np.int64), bs, tables.salt)
            for i, h in enumerate(hashes):
                tokens_of_hash[h] = prompt[i * bs:(i + 1) * bs]
            tables.add_rows(1)
            row = tables.num_rows - 1
            n = tables.reuse_prefix(row, prompt, len(prompt) - 1) if op == "reuse" else 0
            assert n % bs == 0 and n <= len(prompt) - 1
            for i in range(n):
                assert content[tables.tables[row][i // bs] * bs + i % bs] == prompt[i]
            rest = np.asarray(prompt[n:], dtype=np.int64)[None, :]
            try:
                plan = tables.plan_forward([row], np.ones(rest.shape, bool), rest, leading_pads_are_padding=True)
            except OutOfBlocksError:
                tables.select_rows(list(range(row)))  # the row goes, its reused blocks with it
                continue
            for j, slot in enumerate(plan.slot_mapping[0].tolist()):
                if slot >= 0:
                    content[slot] = int(rest[0, j])
            # the multi-token kernel reads the reused blocks as context and the rest as own tokens
            found = context_lens(torch.from_numpy(plan.seq_lens), torch.from_numpy(plan.query_pos)).tolist()
            assert found == [n] and plan.max_context_len == n
            prompts.append(prompt)
        elif op == "decode" and prompts:
            row = r % len(prompts)
            try:
                plan = tables.plan_forward([row], np.ones((1, 1), bool))
            except OutOfBlocksError:
                continue
            for src, dst in plan.copies:
                for k in range(bs):
                    if src * bs + k in content:
                        content[dst * bs + k] = content[src * bs + k]
            content[int(plan.slot_mapping[0, 0])] = 999  # a generated token
            prompts[row] = prompts[row] + [999]
        elif op == "free" and prompts:
            gone = r % len(prompts)
            keep = [i for i in range(len(prompts)) if i != gone]
            tables.select_rows(keep)
            prompts = [prompts[i] for i in keep]
        tables.check_consistency()
        for h, blk in pool.hash_to_block.items():
            assert [content.get(blk * bs + k) for k in range(bs)] == tokens_of_hash[h]
        for row, toks in enumerate(prompts):
            stored = [content.get(tables.tables[row][i // bs] * bs + i % bs) for i in range(tables.seq_lens[row])]
            assert stored == toks


def test_a_continued_batch_keeps_the_own_token_layout():
    """Rows holding reused blocks and rows starting, left-padded in one forward whose leading pads
    only pad the batch: pads read nothing, every row's own tokens are where the kernel reads them
    (context_lens = the tokens each row held before), and no pad becomes a position of its row."""
    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(3)
    prompt = np.arange(1, 50)
    first = tables.plan_forward([0], np.ones((1, 49), bool), prompt[None, :])
    assert first.seq_lens.tolist() == [49]
    assert tables.reuse_prefix(1, prompt.tolist() + [7, 8], max_tokens=50) == 48
    real = np.zeros((2, 5), bool)
    real[0, 2:] = True  # row 1: its 3 last tokens after the 48 reused
    real[1, :] = True  # row 2: a new 5-token prompt
    tokens = np.array([[0, 0, 49, 7, 8], [9, 9, 9, 9, 9]])
    plan = tables.plan_forward([1, 2], real, tokens, leading_pads_are_padding=True)
    assert plan.query_pos.tolist() == [[-1, -1, 48, 49, 50], [0, 1, 2, 3, 4]]
    assert context_lens(torch.from_numpy(plan.seq_lens), torch.from_numpy(plan.query_pos)).tolist() == [48, 0]
    assert not plan.pads_after_start and tables.inner_pads == [[], [], []]
    assert tables.tables[1][:3] == tables.tables[0][:3]
    tables.check_consistency()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 20), st.integers(1, 5)), min_size=1, max_size=8))
def test_chain_hashes_of_prompts_equal_each_prompts_own_chain(rows):
    """Prompts that open with part of one preamble (any length, cut mid-block or not), then their
    own tokens: the chains taken over from the prompt before are each prompt's own chain."""
    from hf_paged.block_table import chain_hashes, chain_hashes_of_prompts

    bs = 4
    preamble = list(range(1, 41))
    prompts = [np.asarray(preamble[:keep] + [100 + tag] * extra, dtype=np.int64) for keep, extra, tag in rows]
    got = chain_hashes_of_prompts(prompts, bs, b"salt")
    assert got == [chain_hashes(p, bs, b"salt") for p in prompts]


def test_reuse_prefix_with_given_hashes_takes_the_same_blocks():
    """The hashes prefill planning computed (one more block's than asked for) give a row the
    blocks it would find by hashing its tokens itself; too few hashes are not trusted."""
    from hf_paged.block_table import chain_hashes

    tables = BlockTables(BlockPool(), 16)
    tables.add_rows(4)
    prompt = np.arange(1, 70)
    tables.plan_forward([0], np.ones((1, 69), bool), prompt[None, :])
    hashes = chain_hashes(prompt[:64], 16, tables.salt)
    assert tables.reuse_prefix(1, prompt, max_tokens=50, hashes=hashes) == 48
    assert tables.reuse_prefix(2, prompt, max_tokens=50) == 48
    assert tables.reuse_prefix(3, prompt, max_tokens=68, hashes=hashes[:2]) == 64  # 2 < 4 blocks: hashed again
    assert tables.tables[1] == tables.tables[2] == tables.tables[0][:3] and tables.tables[3] == tables.tables[0][:4]
    tables.check_consistency()
