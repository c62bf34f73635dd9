"""Shared-prefix (cascade) decode: the host plan of the groups, and the Triton kernels against the
PyTorch reference on random group structures (several groups per batch, groups of one, chunks cut
from large groups, prefixes ending mid-block, rows whose own part is empty, pad rows; recycled
blocks full of NaN), with GQA, windows, chunks, soft-capping and sinks.

On a machine without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set
before hf_paged.kernels' Triton modules are imported); tests marked ``cuda`` run on the GPU.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import hf_paged.kernels as K  # noqa: E402
from hf_paged.kernels import cascade, reference  # noqa: E402
from hf_paged.kernels.checks import interpreter_usable  # noqa: E402

NAN = float("nan")
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 6e-2)}


CPU_MARK = pytest.mark.skipif(not interpreter_usable(), reason="needs Triton's interpreter")


def _on(device, *args):
    """A parameter set on "cpu" (Triton's interpreter) or "cuda" (marked cuda)."""
    return pytest.param(device, *args, marks=CPU_MARK if device == "cpu" else pytest.mark.cuda)


DEVICES = [_on("cpu"), _on("cuda")]


class SharedCase:
    """A paged pool whose rows share leading blocks as a PagedCache's do.

    ``rows``: per row ``(parent, common_blocks, seq_len)``: the row's table starts with the first
    ``common_blocks`` blocks of row ``parent``'s table (None: no parent), then fresh blocks. A slot
    holds random K/V when some row referencing its block stores that position; every other slot of
    the pool is NaN (recycled garbage). ``pad_rows``: rows whose query is a pad (query_pos -1).
    """

    def __init__(self, seed, rows, num_kv_heads, head_dim, block_size, dtype, device, pad_rows=()):
        g = self.g = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        tables: list[list[int]] = []
        next_block = 0
        for parent, common, seq in rows:
            table = list(tables[parent][:common]) if parent is not None else []
            need = math.ceil(seq / block_size)
            while len(table) < need:
                table.append(next_block)
                next_block += 1
            tables.append(table)
        num_blocks = next_block + 3
        order = torch.randperm(num_blocks, generator=g)  # shuffled block ids
        width = max(len(t) for t in tables) + 1
        bt = torch.zeros(len(rows), width, dtype=torch.int32)
        filled = np.zeros(num_blocks, np.int64)
        for b, table in enumerate(tables):
            ids = [int(order[i]) for i in table]
            bt[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
            bt[b, len(ids):] = torch.randint(0, num_blocks, (width - len(ids),), generator=g, dtype=torch.int32)
            seq = rows[b][2]
            for i, blk in enumerate(ids):
                filled[blk] = max(filled[blk], min(block_size, seq - i * block_size))
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.key_cache = torch.full(shape, NAN, dtype=dtype)
        self.value_cache = torch.full(shape, NAN, dtype=dtype)
        for blk in range(num_blocks):
            n = int(filled[blk])
            self.key_cache[blk, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
            self.value_cache[blk, :n] = torch.randn(n, num_kv_heads, head_dim, generator=g).to(dtype)
        self.key_cache, self.value_cache = self.key_cache.to(device), self.value_cache.to(device)
        self.block_table_np = bt.numpy()
        self.block_table = bt.to(device)
        seq_lens = [r[2] for r in rows]
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        qpos = torch.tensor([s - 1 for s in seq_lens], dtype=torch.int32)
        for b in pad_rows:
            qpos[b] = -1
        self.query_pos = qpos[:, None].contiguous().to(device)

    def plan(self) -> cascade.SharedPrefixPlan:
        return cascade.plan_shared_prefixes(self.block_table_np, self.seq_lens.cpu().numpy(),
                                            self.query_pos.cpu().numpy()[:, 0], self.block_size)


def _random_rows(g: torch.Generator, n: int, block_size: int, mid_block: bool) -> list:
    """Random forest of rows: a row shares leading blocks with an earlier one or starts fresh.
    Without ``mid_block`` a row never shares the block its own query is written to (copy-on-write:
    a decode step writes only blocks no other row reads); with it, a row may end inside a shared
    block (a pad query that reads its last token from there, as a query that stores nothing)."""
    rows = []

    def r(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    for i in range(n):
        if i and r(0, 3):
            parent = r(0, i - 1)
            p_seq = rows[parent][2]
            limit = (p_seq - 1) // block_size  # blocks wholly before the parent's query
            if limit >= 1:
                common = r(1, limit)
                if mid_block and r(0, 2) == 0:
                    seq = common * block_size - r(0, block_size - 2)
                else:
                    seq = common * block_size + r(1, 2 * block_size)  # own part: 0 to 2 blocks before the query
                rows.append((parent, common, seq))
                continue
        rows.append((None, 0, r(2, 5 * block_size)))
    return rows


def _check_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or polluted by recycled blocks)"
    rel_tol, abs_tol = TOL[dtype]
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-12)).item()
    err = (o - r).abs().max().item()
    assert rel < rel_tol and err < abs_tol, f"rel {rel:.3e} (tol {rel_tol}), max abs {err:.3e} (tol {abs_tol})"


def _feature(feature, g, num_q_heads, device):
    if feature == "window":
        return {"sliding_window": int(torch.randint(3, 40, (1,), generator=g))}
    if feature == "chunk":
        return {"chunk_size": 24}
    if feature == "softcap":
        return {"softcap": 4.0}
    if feature == "sinks":
        return {"sinks": torch.randn(num_q_heads, generator=g).to(device)}
    return {}


def _run(case: SharedCase, heads, dtype, device, feature, fused, splits=(None, None), min_chunks=1,
         via_addresses=False, launches=1):
    """Cascade vs the reference on one case; returns the plan. ``via_addresses``: the kernels get
    the pools through ``pool_addresses`` and decoys (same shape and strides) as key_cache /
    value_cache, which must stay untouched. ``launches``: the same launch (one plan, as layer
    after layer of a forward: its partial buffers reused) run that many times, each output checked."""
    num_q_heads, num_kv_heads = heads
    head_dim = case.key_cache.shape[3]
    batch = case.block_table.shape[0]
    plan = case.plan()
    assert plan.num_chunks >= min_chunks, "the case has no shared prefix: the cascade path would not run"
    query = torch.randn(batch, 1, num_q_heads, head_dim, generator=case.g).to(device, dtype).transpose(1, 2)
    kw = _feature(feature, case.g, num_q_heads, device)
    scale = head_dim ** -0.5
    new_kw = {}
    k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
    if fused:
        qpos = case.query_pos
        safe = qpos.clamp_min(0).long()
        blk = case.block_table.long().gather(1, safe // case.block_size)
        off = safe % case.block_size
        new_key = case.key_cache[blk, off].clone().transpose(1, 2)
        new_value = case.value_cache[blk, off].clone().transpose(1, 2)
        real = qpos >= 0
        k_cache[blk[real], off[real]] = NAN  # not yet written: must come from new_key / new_value
        v_cache[blk[real], off[real]] = NAN
        slots = torch.where(real, blk * case.block_size + off, -1).to(torch.int32).contiguous()
        new_kw = dict(new_key=new_key, new_value=new_value, slot_mapping=slots)
    ref = reference.paged_attention(query, case.key_cache.clone(), case.value_cache.clone(), case.block_table,
                                    case.seq_lens, case.query_pos, scale, **kw)
    pools, addresses = (k_cache, v_cache), None
    if via_addresses:
        pools = (torch.full_like(k_cache, 7.0), torch.full_like(v_cache, 7.0))
        addresses = torch.tensor([k_cache.data_ptr(), v_cache.data_ptr()], dtype=torch.int64, device=device)
    plans: dict = {}
    batch_plan = cascade.CascadeBatch.from_plan(plan, device)
    for _ in range(launches):
        out = torch.full((batch, 1, num_q_heads, head_dim), NAN, dtype=dtype, device=device)
        K.get_backend("triton").paged_attention(
            query, *pools, case.block_table, case.seq_lens, case.query_pos, scale, out=out, **kw, **new_kw,
            cascade=batch_plan, num_kv_splits=splits[0], num_shared_splits=splits[1], pool_addresses=addresses,
            plans=plans)
        _check_close(out, ref, dtype)
    assert len(plans) == 1
    if via_addresses:
        assert (pools[0] == 7.0).all() and (pools[1] == 7.0).all()
    pads = (case.query_pos[:, 0] < 0).cpu()
    assert (out[pads] == 0).all()
    if fused:  # the fused store wrote exactly the new tokens
        finite = ~torch.isnan(case.key_cache)
        assert torch.equal(k_cache[finite], case.key_cache[finite])
        assert torch.equal(v_cache[finite], case.value_cache[finite])
    return plan


# A fixed structure with every kind of row (block size 16):
#   0-2: a group; row 2 shares 3 blocks only (the group's prefix is 48 tokens), own parts 22 / 27 / 1
#   3 and 7: groups of one;  4-5: a group whose row 5 has an empty own part (its query starts
#   block 5);  6: a pad query;  8-9: a group whose prefix is one block
FIXED_ROWS = [(None, 0, 70), (0, 4, 75), (0, 3, 49), (None, 0, 33), (None, 0, 90), (4, 5, 81), (None, 0, 20),
              (None, 0, 40), (None, 0, 30), (8, 1, 17)]


# (device, seed, heads, head_dim, dtype, feature, fused, splits); interpreter cases stay small
CASES = [
    _on("cpu", 0, (4, 2), 32, torch.float32, None, True, (None, None)),
    _on("cpu", 1, (4, 1), 32, torch.float16, "softcap", True, (2, 3)),
    _on("cpu", 2, (8, 2), 32, torch.bfloat16, "sinks", True, (None, 2)),
    _on("cpu", 3, (2, 2), 32, torch.float32, "window", False, (3, 2)),
    _on("cpu", 4, (6, 2), 40, torch.float16, "chunk", True, (None, None)),
]
CUDA_CASES = [
    _on("cuda", seed, heads, head_dim, dtype, feature, fused, splits)
    for seed, (heads, head_dim, feature, fused, splits) in enumerate([
        ((32, 8), 128, None, True, (None, None)),
        ((32, 8), 128, "window", True, (2, 4)),
        ((8, 2), 64, "softcap", False, (None, 3)),
        ((16, 2), 128, "sinks", True, (3, None)),
        ((4, 4), 256, "chunk", True, (None, None)),
    ])
    for dtype in (torch.float32, torch.bfloat16)
]


@pytest.mark.parametrize("device,seed,heads,head_dim,dtype,feature,fused,splits", CASES + CUDA_CASES)
def test_cascade_fixed_structure(device, seed, heads, head_dim, dtype, feature, fused, splits):
    case = SharedCase(seed, FIXED_ROWS, heads[1], head_dim, 16, dtype, device, pad_rows=(6,))
    plan = _run(case, heads, dtype, device, feature, fused, splits, min_chunks=3, launches=2)
    assert plan.own_start.tolist() == [48, 48, 48, 0, 80, 80, 0, 0, 16, 16]
    assert plan.num_chunks == 3


@pytest.mark.parametrize("device,seed,heads,head_dim,dtype,feature,fused,splits",
                         [c for c in CASES + CUDA_CASES if c.values[1] in (0, 1, 3)])
def test_cascade_reads_the_pools_at_pool_addresses(device, seed, heads, head_dim, dtype, feature, fused, splits):
    """Both cascade launches (the shared prefixes, the own parts with the fused store) read and
    write the pools through pool_addresses (what a CUDA graph keeps when the pools grow)."""
    case = SharedCase(seed, FIXED_ROWS, heads[1], head_dim, 16, dtype, device, pad_rows=(6,))
    _run(case, heads, dtype, device, feature, fused, splits, min_chunks=3, via_addresses=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,mid_block", [(10, False), (14, True), (12, False), (24, True)])
def test_cascade_random_structures(device, seed, mid_block):
    g = torch.Generator().manual_seed(seed)
    rows = _random_rows(g, 9 if device == "cpu" else 40, 16, mid_block)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    heads, head_dim = ((4, 2), 32) if device == "cpu" else ((32, 8), 128)
    feature = [None, "window", "softcap", "sinks"][seed % 4]
    case = SharedCase(seed, rows, heads[1], head_dim, 16, dtype, device)
    plan = _run(case, heads, dtype, device, feature, fused=not mid_block)
    if mid_block:
        assert any(s % 16 for s, _, _ in plan.chunks[:plan.num_chunks]), "no prefix ends mid-block"


@pytest.mark.parametrize("device", DEVICES)
def test_large_group_is_cut_into_chunks_and_subtiles(device, monkeypatch):
    """A group larger than a chunk: chunks of near-equal size, each read by several subtiles when
    its rows' heads do not fit one tile (fp32: 32-row tiles, 4 heads per kv head: 8 rows each)."""
    monkeypatch.setattr(cascade, "MAX_CHUNK_ROWS", 10)
    rows = [(None, 0, 50)] + [(0, 3, 48 + i) for i in range(1, 20)] + [(None, 0, 9)]
    case = SharedCase(5, rows, 2, 32, 16, torch.float32, device)
    plan = _run(case, (8, 2), torch.float32, device, None, fused=True, splits=(None, 2))
    assert plan.num_chunks == 2 and plan.chunks[:2, 2].tolist() == [10, 10]
    assert plan.max_chunk_rows == 10


def test_plan_of_a_batch_without_sharing_is_empty_and_does_not_pay():
    bt = np.arange(12, dtype=np.int32).reshape(4, 3)
    plan = cascade.plan_shared_prefixes(bt, np.array([40, 41, 42, 43]), np.array([39, 40, 41, 42]), 16)
    assert plan.num_chunks == 0 and not plan.own_start.any() and not plan.pays()
    assert plan.chunks.shape == (2, 3) and plan.members.shape == (4,)


def test_plan_counts_the_reads_it_saves_and_pays_only_when_large():
    # 16 rows sharing 512 blocks of 16 tokens (8192 tokens), 256 own tokens each
    bs, shared_blocks, rows = 16, 512, 16
    bt = np.zeros((rows, shared_blocks + 17), np.int32)
    bt[:, :shared_blocks] = np.arange(shared_blocks)
    bt[:, shared_blocks:] = 10_000 + np.arange(rows * 17).reshape(rows, 17)
    seq = np.full(rows, shared_blocks * bs + 256)
    plan = cascade.plan_shared_prefixes(bt, seq, seq - 1, bs)
    assert plan.num_chunks == 1 and plan.max_shared_len == 8192 and plan.max_own_len == 256
    assert plan.saved_tokens == 15 * 8192 and plan.read_tokens == rows * (8192 + 256)
    assert plan.pays()
    two = bt[:2, :4].copy()
    two[1, 3] = 999  # the rows' fourth blocks (where their queries go) differ
    small = cascade.plan_shared_prefixes(two, np.array([50, 50]), np.array([49, 49]), bs)
    assert small.num_chunks == 1 and small.saved_tokens == 48 and not small.pays()


def test_setting_reads_the_environment(monkeypatch):
    for value, want in (("1", True), ("0", False), ("", None), ("auto", None)):
        monkeypatch.setenv(cascade.ENV_VAR, value)
        assert cascade.setting() is want
    monkeypatch.setenv(cascade.ENV_VAR, "sometimes")
    with pytest.raises(ValueError, match="HF_PAGED_CASCADE='sometimes'"):
        cascade.setting()


@pytest.mark.parametrize("device", DEVICES)
def test_cascade_plan_of_another_batch_is_refused(device):
    case = SharedCase(6, FIXED_ROWS, 2, 32, 16, torch.float32, device)
    other = cascade.CascadeBatch.from_plan(cascade.empty_plan(4), device)
    query = torch.randn(len(FIXED_ROWS), 4, 1, 32).to(device)
    with pytest.raises(ValueError, match=r"cascade.chunks must be int32 \[5, 3\] .* for a batch of 10 rows"):
        K.get_backend("triton").paged_attention(query, case.key_cache, case.value_cache, case.block_table,
                                                case.seq_lens, case.query_pos, 0.1, cascade=other)
