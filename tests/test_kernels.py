"""Triton kernels vs the PyTorch reference, and the reference vs a naive dense oracle.

On a machine without CUDA the Triton kernels run under Triton's interpreter
(TRITON_INTERPRET=1, set below before hf_paged.kernels' Triton modules are imported);
with CUDA they also run on the GPU. Every case draws fresh random data from its own seed:
ragged seq_lens, partly filled last blocks, shuffled (non-contiguous) block tables whose
tail entries point at other rows' blocks, recycled blocks full of NaN wherever no valid
token lives, and NaN-poisoned outputs that must be fully written.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402

import hf_paged.kernels as K  # noqa: E402
from hf_paged.kernels import reference  # noqa: E402
from hf_paged.kernels.checks import interpreter_usable  # noqa: E402

NAN = float("nan")


DEVICES = (["cpu"] if interpreter_usable() else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no device can run the Triton kernels (no CUDA, interpreter unavailable)", allow_module_level=True)

# CPU covers fp32 + fp16 and CUDA covers fp32 + bf16; bf16 under the interpreter (whose own
# bf16 tl.dot is broken: the kernels work around it) has its own small test,
# test_bf16_under_interpreter.
DTYPES = {"cpu": (torch.float32, torch.float16), "cuda": (torch.float32, torch.bfloat16)}
TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (1e-2, 6e-2)}  # (rel-norm, max-abs)


def _tri():
    return K.get_backend("triton")


def _dtypes(device, seed):
    # Interpreter time is precious: one dtype per CPU case (alternating); both on CUDA.
    return DTYPES[device] if device == "cuda" else DTYPES[device][seed % 2:seed % 2 + 1]


# ----------------------------------------------------------------------------- fixtures


class PagedCase:
    """A randomly laid-out paged KV pool holding `seq_lens` tokens per row."""

    def __init__(self, seed, seq_lens, num_kv_heads, head_dim, block_size, dtype, device,
                 spare_blocks=3, strided_cache=False):
        g = torch.Generator().manual_seed(seed)
        self.g = g
        self.seq_lens_list = list(seq_lens)
        batch = len(seq_lens)
        need = [math.ceil(s / block_size) for s in seq_lens]
        width = max(max(need), 1) + 1  # one junk column past every row's last block
        num_blocks = sum(need) + spare_blocks
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        if strided_cache:
            # Heads interleaved with unused heads: non-contiguous kv_head and block strides.
            base_k = torch.full((num_blocks, block_size, 2 * num_kv_heads, head_dim), NAN, dtype=dtype)
            base_v = base_k.clone()
            self.key_cache = base_k.to(device)[:, :, ::2]
            self.value_cache = base_v.to(device)[:, :, 1::2]
        else:
            self.key_cache = torch.full(shape, NAN, dtype=dtype, device=device)
            self.value_cache = torch.full(shape, NAN, dtype=dtype, device=device)
        pool = torch.randperm(num_blocks, generator=g)
        table = torch.zeros(batch, width, dtype=torch.int32)
        cursor = 0
        for b, n in enumerate(need):
            table[b, :n] = pool[cursor:cursor + n].to(torch.int32)
            cursor += n
            # Entries past the last block: arbitrary valid ids (here other rows' blocks).
            table[b, n:] = torch.randint(0, num_blocks, (width - n,), generator=g, dtype=torch.int32)
        self.block_table = table.to(device)
        self.seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
        self.block_size = block_size
        # Fill exactly the valid tokens; everything else stays NaN (recycled garbage).
        for b, s in enumerate(seq_lens):
            if s == 0:
                continue
            p = torch.arange(s)
            blk = table[b, p // block_size].long()
            off = p % block_size
            self.key_cache[blk.to(device), off.to(device)] = torch.randn(s, num_kv_heads, head_dim, generator=g).to(device, dtype)
            self.value_cache[blk.to(device), off.to(device)] = torch.randn(s, num_kv_heads, head_dim, generator=g).to(device, dtype)


    def new_kv(self, query_pos):
        """(block, offset) of each query token's slot, and the pool's K/V at those slots as the model
        hands a forward's K/V over: [B, Hkv, Q, D] transposed views of [B, Q, Hkv, D] copies."""
        safe = query_pos.clamp_min(0).long()
        blk = self.block_table.long().gather(1, safe // self.block_size)
        off = safe % self.block_size
        return (blk, off, self.key_cache[blk, off].clone().transpose(1, 2),
                self.value_cache[blk, off].clone().transpose(1, 2))


def _tail_positions(seq_lens, q_len, pads):
    """query_pos [B, Q] as the cache lays a forward out: each row's last Q stored positions, the
    first `pads` of row 0 left padding (-1)."""
    qpos = seq_lens[:, None] - q_len + torch.arange(q_len, dtype=torch.int32, device=seq_lens.device)[None]
    qpos[0, :pads] = -1
    return qpos.contiguous()


def _query(g, batch, num_q_heads, num_queries, head_dim, dtype, device):
    # transformers hands [B, H, Q, D] as a transposed view of [B, Q, H, D].
    return torch.randn(batch, num_queries, num_q_heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)


def _check_close(out, ref, dtype):
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or polluted by recycled blocks)"
    rel_tol, abs_tol = TOL[dtype]
    o, r = out.double(), ref.double()
    rel = ((o - r).norm() / r.norm().clamp_min(1e-12)).item()
    err = (o - r).abs().max().item()
    assert rel < rel_tol and err < abs_tol, f"rel {rel:.3e} (tol {rel_tol}), max abs {err:.3e} (tol {abs_tol})"


def _feature_kwargs(feature, g, num_q_heads, device="cpu", window=None, softcap=4.0, sink_scale=1.0):
    """Attention kwargs for one optional feature: a sliding window (drawn from 1-39 when window is
    None), Llama 4's attention chunk ("chunk=C": chunk_size C), a softcap, or attention sinks
    drawn from g (times sink_scale); {} for None."""
    if feature is not None and feature.startswith("chunk="):
        return {"chunk_size": int(feature.partition("=")[2])}
    if feature == "window":
        return {"sliding_window": window if window is not None else int(torch.randint(1, 40, (1,), generator=g))}
    if feature == "softcap":
        return {"softcap": softcap}
    if feature == "sinks":
        return {"sinks": (torch.randn(num_q_heads, generator=g) * sink_scale).to(device)}
    return {}


# ----------------------------------------------------------------------------- naive oracle


def _naive_attention(query, case: PagedCase, query_pos, scale, sliding_window=None, softcap=None, sinks=None,
                     chunk_size=None):
    """Per-row, per-head dense float64 attention with an explicit mask."""
    batch, num_q_heads, num_queries, head_dim = query.shape
    num_kv_heads = case.key_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(batch, num_queries, num_q_heads, head_dim, dtype=torch.float64)
    table = case.block_table.cpu()
    for b, s in enumerate(case.seq_lens_list):
        p = torch.arange(s)
        blk, off = table[b, p // case.block_size].long(), p % case.block_size
        keys = case.key_cache.cpu()[blk, off].double()  # [s, Hkv, D]
        values = case.value_cache.cpu()[blk, off].double()
        for t in range(num_queries):
            qp = int(query_pos[b, t])
            if qp < 0:
                continue
            mask = p <= qp
            if sliding_window is not None:
                mask &= p > qp - sliding_window
            if chunk_size is not None:
                mask &= p // chunk_size == qp // chunk_size
            for h in range(num_q_heads):
                kvh = h // group
                sc = keys[:, kvh] @ query[b, h, t].double().cpu() * scale
                if softcap is not None:
                    sc = softcap * torch.tanh(sc / softcap)
                sc = sc.masked_fill(~mask, -math.inf)
                if sinks is not None:
                    sc = torch.cat([sc, sinks[h].double().cpu().reshape(1)])
                w = torch.softmax(sc, 0)[:s]
                out[b, t, h] = w @ values[:, kvh]
    return out


@pytest.mark.parametrize(
    "seed,heads,head_dim,block_size,q_len,feature",
    [
        (0, (8, 2), 64, 16, 1, None),
        (1, (4, 1), 80, 32, 1, "window"),
        (2, (4, 4), 96, 16, 6, None),
        (3, (8, 2), 128, 16, 5, "softcap"),
        (4, (6, 2), 64, 32, 7, "sinks"),
        (5, (4, 2), 256, 16, 4, "window"),
        (6, (4, 2), 64, 16, 7, "chunk=6"),
        (7, (2, 1), 64, 32, 1, "chunk=5"),
    ],
)
def test_reference_matches_naive(seed, heads, head_dim, block_size, q_len, feature):
    g = torch.Generator().manual_seed(100 + seed)
    seq_lens = [q_len + int(x) for x in torch.randint(0, 50, (3,), generator=g)]
    case = PagedCase(seed, seq_lens, heads[1], head_dim, block_size, torch.float32, "cpu")
    query = _query(g, 3, heads[0], q_len, head_dim, torch.float32, "cpu")
    qpos = case.seq_lens[:, None] - q_len + torch.arange(q_len, dtype=torch.int32)[None]
    if q_len > 2:
        qpos[0, :2] = -1  # left pads
    kw = _feature_kwargs(feature, g, heads[0], window=9, softcap=3.0)
    out = torch.full((3, q_len, heads[0], head_dim), NAN)
    reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                              head_dim ** -0.5, out=out, **kw)
    naive = _naive_attention(query, case, qpos, head_dim ** -0.5, **kw)
    _check_close(out, naive, torch.float32)
    if q_len > 2:
        assert (out[0, :2] == 0).all(), "pad queries must produce zeros"


def test_reference_chunked_prefill_matches_unchunked(monkeypatch):
    case = PagedCase(7, [37, 20], 2, 64, 16, torch.float32, "cpu")
    g = torch.Generator().manual_seed(7)
    query = _query(g, 2, 4, 20, 64, torch.float32, "cpu")
    qpos = case.seq_lens[:, None] - 20 + torch.arange(20, dtype=torch.int32)[None]
    args = (query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos, 0.125)
    full = reference.paged_attention(*args)
    monkeypatch.setattr(reference, "_SCORE_CHUNK_ELEMS", 4 * 37)  # forces 1-3 query rows per chunk
    _check_close(reference.paged_attention(*args), full, torch.float32)


def test_reference_store_and_copy_match_loops():
    g = torch.Generator().manual_seed(11)
    cache_k = torch.randn(9, 16, 2, 8, generator=g)
    cache_v = torch.randn(9, 16, 2, 8, generator=g)
    key = torch.randn(2, 5, 2, 8, generator=g).transpose(1, 2)
    value = torch.randn(2, 5, 2, 8, generator=g).transpose(1, 2)
    slots = torch.tensor([[3, 40, -1, 17, 130], [-5, 0, 99, 100, 16]])
    exp_k, exp_v = cache_k.clone(), cache_v.clone()
    for b in range(2):
        for t in range(5):
            s = int(slots[b, t])
            if s >= 0:
                exp_k[s // 16, s % 16] = key[b, :, t]
                exp_v[s // 16, s % 16] = value[b, :, t]
    reference.store_kv(key, value, cache_k, cache_v, slots)
    assert torch.equal(cache_k, exp_k) and torch.equal(cache_v, exp_v)
    src, dst = torch.tensor([1, 4]), torch.tensor([7, 2])
    exp_k[7], exp_k[2], exp_v[7], exp_v[2] = exp_k[1].clone(), exp_k[4].clone(), exp_v[1].clone(), exp_v[4].clone()
    reference.copy_blocks(cache_k, cache_v, src, dst)
    assert torch.equal(cache_k, exp_k) and torch.equal(cache_v, exp_v)


# ----------------------------------------------------------------------------- attention


def _run_attention(device, dtype, seed, heads, head_dim, block_size, seq_lens, q_len, feature=None,
                   pads=0, strided_cache=False, **tri_kw):
    num_q_heads, num_kv_heads = heads
    case = PagedCase(seed, seq_lens, num_kv_heads, head_dim, block_size, dtype, device, strided_cache=strided_cache)
    g = case.g
    batch = len(seq_lens)
    query = _query(g, batch, num_q_heads, q_len, head_dim, dtype, device)
    qpos = _tail_positions(case.seq_lens, q_len, pads)
    kw = _feature_kwargs(feature, g, num_q_heads, device, sink_scale=2.0)
    scale = head_dim ** -0.5
    out = torch.full((batch, q_len, num_q_heads, head_dim), NAN, dtype=dtype, device=device)
    res = _tri().paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                 scale, out=out, **kw, **tri_kw)
    assert res.data_ptr() == out.data_ptr() and res.is_contiguous()
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    scale, **kw)
    _check_close(out, ref, dtype)
    if pads:
        assert (out[0, :pads] == 0).all(), "pad queries must produce zeros"
    return out


DECODE_CASES = [
    # seed, (Hq, Hkv), head_dim, block_size, seq_lens, feature, splits
    (0, (8, 2), 64, 16, [1, 17, 50], None, 1),
    (1, (8, 2), 128, 16, [33, 64, 70], None, 3),
    (2, (4, 1), 80, 32, [5, 90], "window", 1),
    (3, (4, 1), 96, 16, [40, 77], "window", 4),
    (4, (2, 2), 256, 32, [20, 49], "softcap", 2),
    (5, (6, 2), 128, 16, [31, 16, 1], "sinks", 1),
    (6, (6, 2), 64, 32, [100, 3], "sinks", 5),
    # chunked attention: keys from the query's own chunk only (row 2's query at 48 starts one)
    (7, (4, 1), 64, 16, [5, 90, 49], "chunk=8", 1),    # the chunk divides the block
    (8, (8, 2), 64, 16, [40, 77, 25], "chunk=12", 3),  # it does not; split-KV (early splits empty)
    (9, (4, 2), 80, 32, [100, 33], "chunk=48", 2),     # longer than a block, not a multiple of it
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,heads,head_dim,block_size,seq_lens,feature,splits", DECODE_CASES)
def test_decode(device, seed, heads, head_dim, block_size, seq_lens, feature, splits):
    for dtype in _dtypes(device, seed):
        _run_attention(device, dtype, seed, heads, head_dim, block_size, seq_lens, 1, feature,
                       num_kv_splits=splits, block_n=16 if device == "cpu" else None)


@pytest.mark.parametrize("device", DEVICES)
def test_decode_pad_row_and_strided_cache(device):
    dtype = DTYPES[device][0]
    case = PagedCase(21, [9, 40], 2, 64, 16, dtype, device, strided_cache=True)
    query = _query(case.g, 2, 4, 1, 64, dtype, device)
    qpos = torch.tensor([[-1], [39]], dtype=torch.int32, device=device)
    for splits in (1, 2):
        out = torch.full((2, 1, 4, 64), NAN, dtype=dtype, device=device)
        _tri().paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos, 0.1,
                               out=out, num_kv_splits=splits, sinks=torch.zeros(4, device=device))
        ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                        0.1, sinks=torch.zeros(4, device=device))
        _check_close(out, ref, dtype)
        assert (out[0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_decode_auto_splits_and_small_hint(device):
    # Splits chosen on the host; a max_seq_len hint smaller than the truth must only
    # cost balance (the last split runs to seq_len), never correctness.
    dtype = DTYPES[device][0]
    for hint in (None, 20):
        _run_attention(device, dtype, 31, (4, 2), 64, 16, [70, 45], 1, None, max_seq_len=hint,
                       num_kv_splits=None if hint is None else 3)


MULTI_CASES = [
    # seed, (Hq, Hkv), head_dim, block_size, seq_lens, q_len, pads, feature
    (0, (8, 2), 64, 16, [12, 40], 12, 3, None),       # row 0: prompt with left pads, no prefix
    (1, (4, 1), 128, 16, [90, 9], 9, 0, None),        # long cached prefix, MQA
    (2, (4, 4), 80, 32, [30, 55], 7, 2, "window"),
    (3, (8, 2), 96, 16, [21, 64], 6, 0, "softcap"),
    (4, (6, 2), 256, 16, [18, 25], 5, 1, "sinks"),
    (5, (2, 1), 64, 32, [70, 38], 33, 4, None),       # several query tiles
    (6, (4, 2), 128, 16, [50, 80], 20, 5, "window"),
    (7, (4, 2), 64, 16, [50, 80], 20, 5, "chunk=8"),   # several chunks per row, pads, chunk | block
    (8, (2, 1), 64, 32, [70, 38], 33, 4, "chunk=12"),  # several query tiles, chunk not dividing the block
    (9, (4, 1), 64, 16, [90, 9], 9, 0, "chunk=32"),    # long cached context: only its last chunk is read
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,heads,head_dim,block_size,seq_lens,q_len,pads,feature", MULTI_CASES)
def test_multi_token(device, seed, heads, head_dim, block_size, seq_lens, q_len, pads, feature):
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    for dtype in _dtypes(device, seed):
        _run_attention(device, dtype, seed, heads, head_dim, block_size, seq_lens, q_len, feature, pads=pads, **small)
    if device == "cuda":  # also the default (large) tile config on the GPU
        _run_attention(device, torch.bfloat16, seed + 50, heads, head_dim, block_size,
                       [s * 7 for s in seq_lens], q_len * 7, feature, pads=pads)


@pytest.mark.parametrize("device", DEVICES)
def test_multi_token_all_pad_tile_and_strided_cache(device):
    # Row 0 is all pads in its first query tiles (short prompt in a long padded batch).
    dtype = DTYPES[device][0]
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    _run_attention(device, dtype, 41, (4, 2), 64, 16, [6, 30], 24, None, pads=18, strided_cache=True, **small)


NEW_TOKEN_CASES = [
    # seed, (Hq, Hkv), head_dim, block_size, seq_lens, q_len, pads, feature, splits
    (60, (8, 2), 64, 16, [1, 17, 50], 1, 0, None, 1),     # decode: the store is fused into the launch
    (61, (8, 2), 128, 16, [33, 64, 70], 1, 0, None, 3),   # fused, split-KV: the last split stores
    (62, (4, 1), 80, 32, [5, 90], 1, 0, "window", 2),
    (63, (2, 2), 96, 16, [20, 49], 1, 0, "softcap", 1),
    (64, (6, 2), 64, 32, [31, 16], 1, 1, "sinks", 2),     # row 0 a pad query: nothing stored
    (65, (4, 2), 64, 16, [12, 40], 12, 3, None, None),    # several tokens: stored, then attended
    # chunked: row 0's query (32) starts a chunk, so its cache range is empty and it sees only the
    # token folded in from registers
    (66, (4, 2), 64, 16, [33, 64, 70], 1, 0, "chunk=8", 1),
    (67, (8, 2), 64, 16, [20, 49, 90], 1, 0, "chunk=12", 3),  # fused, split-KV
    (68, (4, 2), 64, 16, [12, 40], 12, 3, "chunk=5", None),   # several tokens over chunk edges
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,heads,head_dim,block_size,seq_lens,q_len,pads,feature,splits", NEW_TOKEN_CASES)
def test_attention_stores_new_tokens_then_attends(device, seed, heads, head_dim, block_size, seq_lens, q_len, pads,
                                                  feature, splits):
    """With new_key/new_value/slot_mapping the kernel writes this forward's K/V (negative slots
    skipped) and attends to them: same output as the reference over a cache that already held
    them, and the same cache afterwards."""
    num_q_heads, num_kv_heads = heads
    dtype = _dtypes(device, seed)[0]
    case = PagedCase(seed, seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    g, batch = case.g, len(seq_lens)
    query = _query(g, batch, num_q_heads, q_len, head_dim, dtype, device)
    qpos = _tail_positions(case.seq_lens, q_len, pads)
    blk, off, new_key, new_value = case.new_kv(qpos)
    slots = torch.where(qpos >= 0, blk * block_size + off, -1).to(torch.int32).contiguous()
    new_key[0, :, :pads] = 123.0  # pads carry a value that must show up nowhere in the cache
    new_value[0, :, :pads] = 123.0
    kw = _feature_kwargs(feature, g, num_q_heads, device, window=7)
    scale = head_dim ** -0.5
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    scale, **kw)
    expected_k, expected_v = case.key_cache.clone(), case.value_cache.clone()
    real = slots.reshape(-1) >= 0
    k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
    k_cache[blk.reshape(-1)[real], off.reshape(-1)[real]] = NAN  # not yet written: must come from new_key
    v_cache[blk.reshape(-1)[real], off.reshape(-1)[real]] = NAN
    out = torch.full((batch, q_len, num_q_heads, head_dim), NAN, dtype=dtype, device=device)
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    if q_len == 1:
        small.pop("block_m", None)
        small["num_kv_splits"] = splits
    _tri().paged_attention(query, k_cache, v_cache, case.block_table, case.seq_lens, qpos, scale, out=out,
                           new_key=new_key, new_value=new_value, slot_mapping=slots, **kw, **small)
    _check_close(out, ref, dtype)
    if pads:
        assert (out[0, :pads] == 0).all()
    finite = ~torch.isnan(expected_k)
    assert torch.equal(k_cache[finite], expected_k[finite]) and torch.equal(v_cache[finite], expected_v[finite])
    assert torch.isnan(k_cache[~finite]).all() and not (k_cache == 123.0).any() and not (v_cache == 123.0).any(), \
        "a pad (negative slot) must not be written"


def _addresses(key_cache, value_cache):
    return torch.tensor([key_cache.data_ptr(), value_cache.data_ptr()], dtype=torch.int64, device=key_cache.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused,splits,feature", [(True, 1, None), (True, 3, "window"), (False, 2, "sinks"),
                                                  (False, 1, None)])
def test_decode_reads_and_writes_the_pools_at_pool_addresses(device, fused, splits, feature):
    """With pool_addresses the decode kernel (plain, split-KV, with the fused store) reads and
    writes the pools whose addresses the tensor holds: key_cache / value_cache, decoys of the same
    shape and strides here, give only dtype and strides (what a CUDA graph keeps when the pools
    are reallocated) and are never touched."""
    dtype = DTYPES[device][0]
    case = PagedCase(91, [17, 40, 66], 2, 64, 16, dtype, device)
    g = case.g
    query = _query(g, 3, 8, 1, 64, dtype, device)
    qpos = _tail_positions(case.seq_lens, 1, 0)
    kw = _feature_kwargs(feature, g, 8, device, window=9)
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    0.125, **kw)
    k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
    new_kw = {}
    if fused:
        blk, off, new_key, new_value = case.new_kv(qpos)
        k_cache[blk.reshape(-1), off.reshape(-1)] = NAN  # written by the launch, through the addresses
        v_cache[blk.reshape(-1), off.reshape(-1)] = NAN
        new_kw = dict(new_key=new_key, new_value=new_value,
                      slot_mapping=(blk * 16 + off).to(torch.int32).contiguous())
    decoy_k, decoy_v = torch.full_like(k_cache, 7.0), torch.full_like(v_cache, 7.0)
    out = _tri().paged_attention(query, decoy_k, decoy_v, case.block_table, case.seq_lens, qpos, 0.125,
                                 num_kv_splits=splits, pool_addresses=_addresses(k_cache, v_cache), **kw, **new_kw)
    _check_close(out, ref, dtype)
    assert (decoy_k == 7.0).all() and (decoy_v == 7.0).all()
    finite = ~torch.isnan(case.key_cache)
    assert torch.equal(k_cache[finite], case.key_cache[finite]) and torch.equal(v_cache[finite], case.value_cache[finite])


@pytest.mark.parametrize("device", DEVICES)
def test_store_writes_the_pools_at_pool_addresses(device):
    dtype = DTYPES[device][0]
    g = torch.Generator().manual_seed(3)
    k_cache = torch.randn(4, 16, 2, 32, generator=g).to(device, dtype)
    v_cache = torch.randn(4, 16, 2, 32, generator=g).to(device, dtype)
    key = torch.randn(2, 2, 3, 32, generator=g).to(device, dtype)
    value = torch.randn(2, 2, 3, 32, generator=g).to(device, dtype)
    slots = torch.tensor([[5, -1, 40], [17, 63, 0]], dtype=torch.int32, device=device)
    exp_k, exp_v = k_cache.clone(), v_cache.clone()
    reference.store_kv(key, value, exp_k, exp_v, slots)
    decoy_k, decoy_v = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    _tri().store_kv(key, value, decoy_k, decoy_v, slots, _addresses(k_cache, v_cache))
    assert torch.equal(k_cache, exp_k) and torch.equal(v_cache, exp_v)
    assert not decoy_k.any() and not decoy_v.any()
    with pytest.raises(ValueError, match="pool_addresses must be a contiguous int64 \\[2\\] tensor"):
        _tri().store_kv(key, value, k_cache, v_cache, slots, _addresses(k_cache, v_cache).to(torch.int32))


def _tma_modes(device):
    # Pointer loads everywhere; TMA in the interpreter and on GPUs that have it (sm90+).
    if device == "cuda" and torch.cuda.get_device_capability()[0] < 9:
        return [False]
    return [False, True]


NEW_MULTI_CASES = [
    # seed, (Hq, Hkv), head_dim, block_size, seq_lens, q_len, pads, feature
    (80, (8, 2), 64, 16, [12, 40], 12, 3, None),        # row 0: a prompt with left pads; row 1: 28 cached + 12 new
    (81, (4, 1), 128, 16, [90, 9], 9, 0, None),         # MQA, long cached context; row 1: a prompt
    (82, (4, 4), 80, 32, [30, 55], 7, 2, "window"),
    (83, (8, 2), 96, 16, [21, 64], 6, 0, "softcap"),
    (84, (6, 2), 256, 16, [18, 25], 5, 1, "sinks"),
    (85, (2, 1), 64, 32, [70, 38], 37, 4, None),        # several query and key tiles of new tokens
    (86, (4, 2), 128, 16, [50, 80], 40, 21, "window"),  # pads over more than one key tile
    (87, (4, 2), 64, 16, [48, 33], 33, 0, None),        # row 1: a prompt of exactly Q tokens, unaligned
    (88, (4, 2), 64, 16, [50, 80], 40, 21, "chunk=8"),  # pads over a key tile; chunks in context and own tokens
    (89, (2, 1), 64, 32, [70, 38], 37, 4, "chunk=12"),  # chunk not dividing the block; several query tiles
    (90, (4, 4), 64, 16, [48, 33], 33, 0, "chunk=20"),  # row 1 a prompt; chunk edges off the tiles
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,heads,head_dim,block_size,seq_lens,q_len,pads,feature", NEW_MULTI_CASES)
def test_multi_token_reads_own_tokens_from_new_kv(device, seed, heads, head_dim, block_size, seq_lens, q_len, pads,
                                                  feature, monkeypatch):
    """Several new tokens per row: a row's own tokens are read from new_key/new_value and only
    its cached context from the pool. Here the slots say "store nothing" (as for reused prefix
    blocks) and the pool holds NaN at the new tokens' places, so reading them from the pool
    fails; pad tokens' K/V are NaN / inf and must not leak either."""
    from hf_paged.kernels import tuning

    num_q_heads, num_kv_heads = heads
    dtype = _dtypes(device, seed)[-1]  # bf16 on CUDA (the prompt test below covers fp32 there)
    case = PagedCase(seed, seq_lens, num_kv_heads, head_dim, block_size, dtype, device)
    g, batch = case.g, len(seq_lens)
    query = _query(g, batch, num_q_heads, q_len, head_dim, dtype, device)
    qpos = _tail_positions(case.seq_lens, q_len, pads)
    kw = _feature_kwargs(feature, g, num_q_heads, device, window=9)
    scale = head_dim ** -0.5
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    scale, **kw)
    blk, off, new_key, new_value = case.new_kv(qpos)
    new_key[0, :, :pads], new_value[0, :, :pads] = NAN, float("inf")
    real = qpos >= 0
    k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
    k_cache[blk[real], off[real]] = NAN
    v_cache[blk[real], off[real]] = NAN
    no_store = torch.full_like(qpos, -1)
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    for tma in _tma_modes(device):
        monkeypatch.setattr(tuning, "NEW_KV_TMA", tma)
        out = torch.full((batch, q_len, num_q_heads, head_dim), NAN, dtype=dtype, device=device)
        _tri().paged_attention(query, k_cache, v_cache, case.block_table, case.seq_lens, qpos, scale, out=out,
                               new_key=new_key, new_value=new_value, slot_mapping=no_store, **kw, **small)
        _check_close(out, ref, dtype)
        if pads:
            assert (out[0, :pads] == 0).all()
    assert torch.isnan(k_cache[blk[real], off[real]]).all(), "slot -1: nothing may be stored"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("feature", [None, "window", "sinks", "chunk=8"])
def test_prompt_forward_reads_no_pool(device, feature, monkeypatch):
    """max_context_len=0 (a prompt forward): the kernel is built without the pool phase and reads
    every key from new_key/new_value (the pool is all NaN here). A row that has a context after
    all (a wrong hint) gets NaN, not a quietly wrong output."""
    from hf_paged.kernels import tuning

    dtype = DTYPES[device][0]
    q_len, pads = 37, 5
    case = PagedCase(95, [q_len - pads, q_len], 2, 64, 16, dtype, device)
    query = _query(case.g, 2, 8, q_len, 64, dtype, device)
    qpos = torch.arange(q_len, dtype=torch.int32, device=device)[None].repeat(2, 1) - torch.tensor(
        [[pads], [0]], dtype=torch.int32, device=device)
    qpos[0, :pads] = -1
    kw = _feature_kwargs(feature, case.g, 8, device, window=11)
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    0.125, **kw)
    _, _, new_key, new_value = case.new_kv(qpos)
    empty_k, empty_v = torch.full_like(case.key_cache, NAN), torch.full_like(case.value_cache, NAN)
    no_store = torch.full_like(qpos, -1)
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    for tma in _tma_modes(device):
        monkeypatch.setattr(tuning, "NEW_KV_TMA", tma)
        out = _tri().paged_attention(query, empty_k, empty_v, case.block_table, case.seq_lens, qpos, 0.125,
                                     new_key=new_key, new_value=new_value, slot_mapping=no_store,
                                     max_context_len=0, **kw, **small)
        _check_close(out, ref, dtype)
    # Row 1 claims one token fewer than it has stored: its first token becomes a context.
    wrong_pos = qpos.clone()
    wrong_pos[1, 0] = -1
    out = _tri().paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, wrong_pos,
                                 0.125, new_key=new_key, new_value=new_value, slot_mapping=no_store,
                                 max_context_len=0, **kw, **small)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_context_lens_follow_the_cache_layout_or_send_rows_to_the_pool():
    from hf_paged.kernels import context_lens

    seq_lens = torch.tensor([8, 8, 4, 8, 8, 8], dtype=torch.int32)
    query_pos = torch.tensor([
        [5, 6, 7],      # three new tokens after 5 cached: context 5
        [-1, 6, 7],     # a left pad: context 6
        [-1, -1, -1],   # no new token: everything is context
        [5, -1, 7],     # a pad between real tokens: not the layout -> pool (seq_len)
        [4, 5, 6],      # not ending at seq_len - 1 -> pool
        [6, 7, -1],     # a trailing pad -> pool
    ], dtype=torch.int32)
    assert context_lens(seq_lens, query_pos).tolist() == [5, 6, 4, 8, 8, 8]


@pytest.mark.parametrize("device", DEVICES)
def test_multi_token_rows_in_another_layout_read_the_pool(device):
    """A row whose query positions are not the cache's layout (here: every other position) must
    not be read from new_key (NaN here): the kernel reads all its keys from the pool."""
    dtype = DTYPES[device][0]
    case = PagedCase(90, [30, 26], 2, 64, 16, dtype, device)
    query = _query(case.g, 2, 4, 3, 64, dtype, device)
    qpos = torch.tensor([[25, 27, 29], [23, 24, 25]], dtype=torch.int32, device=device)
    blk, off, new_key, new_value = case.new_kv(qpos)
    new_key[0], new_value[0] = NAN, NAN  # row 0 must come from the pool
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    0.125)
    k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
    k_cache[blk[1], off[1]] = NAN  # row 1 (the layout) must come from new_key
    v_cache[blk[1], off[1]] = NAN
    small = dict(block_n=16, block_m=16) if device == "cpu" else {}
    out = _tri().paged_attention(query, k_cache, v_cache, case.block_table, case.seq_lens, qpos, 0.125,
                                 new_key=new_key, new_value=new_value, slot_mapping=torch.full_like(qpos, -1),
                                 **small)
    _check_close(out, ref, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_launch_plans_are_reused_across_layers_and_keyed_on_what_changes(device):
    """One plans dict per forward: a later layer with other pools (same shapes) reuses the first
    layer's launch with its own tensors; another window, chunk or softcap gets a plan of its own."""
    dtype = DTYPES[device][0]
    seq_lens = [20, 45]
    ref_case = PagedCase(70, seq_lens, 2, 64, 16, dtype, device)
    g = torch.Generator().manual_seed(5)
    # a second layer: other values at the same slots (one block table for all layers, as in a forward)
    second = (ref_case.key_cache + torch.randn(ref_case.key_cache.shape, generator=g).to(device, dtype),
              ref_case.value_cache - torch.randn(ref_case.value_cache.shape, generator=g).to(device, dtype))
    layers = [(ref_case.key_cache, ref_case.value_cache), second]
    qpos = (ref_case.seq_lens - 1)[:, None].contiguous()
    plans: dict = {}
    for kw in ({}, {}, {"sliding_window": 6}, {"softcap": 2.0}, {"chunk_size": 6}, {"chunk_size": 8}):
        for key_cache, value_cache in layers:
            query = _query(g, 2, 8, 1, 64, dtype, device)
            out = _tri().paged_attention(query, key_cache, value_cache, ref_case.block_table,
                                         ref_case.seq_lens, qpos, 0.125, plans=plans, **kw)
            ref = reference.paged_attention(query, key_cache, value_cache, ref_case.block_table,
                                            ref_case.seq_lens, qpos, 0.125, **kw)
            _check_close(out, ref, dtype)
    assert len(plans) == 5  # {}, window, softcap, two chunks: one plan each, shared by both layers


def test_unsupported_shapes_raise():
    dev = DEVICES[0]
    case = PagedCase(0, [4], 1, 512, 16, torch.float32, dev)
    q = torch.zeros(1, 1, 1, 512, device=dev)
    qpos = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    with pytest.raises(ValueError, match=r"head_dim 512 .*<= 256"):
        _tri().paged_attention(q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos, 1.0)
    case = PagedCase(0, [4], 1, 64, 24, torch.float32, dev)
    q = torch.zeros(1, 1, 1, 64, device=dev)
    with pytest.raises(ValueError, match=r"block_size 24 .*multiple of 16"):
        _tri().paged_attention(q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos, 1.0)


def test_window_and_chunk_arguments_checked():
    """A window and a chunk cannot be combined; a chunk (like a window) must be >= 1. Both backends
    and the backends' typed interface, which passes a layer's chunk through."""
    dev = DEVICES[0]
    case = PagedCase(3, [20], 1, 64, 16, torch.float32, dev)
    q = _query(case.g, 1, 2, 1, 64, torch.float32, dev)
    qpos = torch.tensor([[19]], dtype=torch.int32, device=dev)
    args = (q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos, 0.125)
    for backend in (reference, _tri()):
        with pytest.raises(ValueError, match=r"sliding_window \(4\) and chunk_size \(8\) cannot be combined"):
            backend.paged_attention(*args, sliding_window=4, chunk_size=8)
        for bad in (0, -3):
            with pytest.raises(ValueError, match=rf"chunk_size must be >= 1 or None, got {bad}"):
                backend.paged_attention(*args, chunk_size=bad)
    # the typed interface passes the layer's chunk through
    batch = SimpleNamespace(block_table=case.block_table, seq_lens=case.seq_lens, query_pos=qpos, slot_mapping=None,
                            max_seq_len=20, max_context_len=None)
    for backend in (K.get_backend("torch"), _tri()):
        out = backend.attend(q, case.key_cache, case.value_cache, batch, K.LayerAttention(0.125, chunk_size=8))
        _check_close(out, _naive_attention(q, case, qpos, 0.125, chunk_size=8).to(out.device), torch.float32)  # keys 16..19


BF16_CPU_CASES = [
    # q_len, pads, feature, new (this forward's K/V passed as new_key/new_value), splits
    (1, 0, None, False, 1),
    (1, 0, "window", True, 2),
    (1, 0, "softcap", True, 1),
    (6, 2, None, False, None),
    (6, 2, "window", True, None),
    (6, 2, "softcap", True, None),
]


@pytest.mark.skipif("cpu" not in DEVICES, reason="needs Triton's CPU interpreter")
@pytest.mark.parametrize("q_len,pads,feature,new,splits", BF16_CPU_CASES)
def test_bf16_under_interpreter(q_len, pads, feature, new, splits, monkeypatch):
    """bf16 in Triton's interpreter: it keeps bf16 as uint16 bit patterns and its own tl.dot
    multiplies the bits (triton-lang/triton#11584), so the kernels upcast tl.dot operands to fp32
    when interpreted (attention_kernels._INTERPRETED). Decode and multi-token, pool and new K/V, tiny."""
    from hf_paged.kernels import tuning

    dtype, batch, num_q_heads, head_dim, block_size = torch.bfloat16, 2, 4, 32, 16
    case = PagedCase(120 + q_len, [6, 40], 2, head_dim, block_size, dtype, "cpu")
    query = _query(case.g, batch, num_q_heads, q_len, head_dim, dtype, "cpu")
    qpos = _tail_positions(case.seq_lens, q_len, pads)
    kw = _feature_kwargs(feature, case.g, num_q_heads, window=7)
    scale = head_dim ** -0.5
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    scale, **kw)
    small = dict(block_n=16, num_kv_splits=splits) if q_len == 1 else dict(block_n=16, block_m=16)
    for tma in ([False, True] if new and q_len > 1 else [False]):
        monkeypatch.setattr(tuning, "NEW_KV_TMA", tma)
        k_cache, v_cache = case.key_cache.clone(), case.value_cache.clone()
        new_kw = {}
        if new:
            blk, off, new_key, new_value = case.new_kv(qpos)
            real = qpos >= 0
            k_cache[blk[real], off[real]] = NAN  # not yet written: must come from new_key/new_value
            v_cache[blk[real], off[real]] = NAN
            slots = torch.where(real, blk * block_size + off, -1).to(torch.int32).contiguous()
            new_kw = dict(new_key=new_key, new_value=new_value, slot_mapping=slots)
        out = torch.full((batch, q_len, num_q_heads, head_dim), NAN, dtype=dtype)
        _tri().paged_attention(query, k_cache, v_cache, case.block_table, case.seq_lens, qpos, scale, out=out,
                               **kw, **small, **new_kw)
        _check_close(out, ref, dtype)
        if pads:
            assert (out[0, :pads] == 0).all()
        finite = ~torch.isnan(case.key_cache)
        assert torch.equal(k_cache[finite], case.key_cache[finite]) and torch.equal(v_cache[finite],
                                                                                   case.value_cache[finite])


# ----------------------------------------------------------------------------- store / copy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed,num_kv_heads,head_dim,block_size,slot_dtype,strided_cache",
                         [(0, 2, 64, 16, torch.int32, False), (1, 3, 80, 32, torch.int64, True),
                          (2, 1, 256, 16, torch.int64, False)])
def test_store_kv(device, seed, num_kv_heads, head_dim, block_size, slot_dtype, strided_cache):
    dtype = DTYPES[device][seed % 2]
    g = torch.Generator().manual_seed(seed)
    batch, q_len, num_blocks = 3, 7, 6
    case = PagedCase(seed, [0], num_kv_heads, head_dim, block_size, dtype, device, spare_blocks=num_blocks,
                     strided_cache=strided_cache)
    # Sentinel contents everywhere, so untouched slots are checkable exactly.
    case.key_cache.copy_(torch.randn(case.key_cache.shape, generator=g).to(dtype))
    case.value_cache.copy_(torch.randn(case.value_cache.shape, generator=g).to(dtype))
    key = torch.randn(batch, q_len, num_kv_heads, head_dim, generator=g).to(device, dtype).transpose(1, 2)
    value = torch.randn(batch, num_kv_heads, q_len, head_dim, generator=g).to(device, dtype)  # contiguous
    slots = torch.randperm(num_blocks * block_size, generator=g)[: batch * q_len].reshape(batch, q_len)
    slots[torch.rand(batch, q_len, generator=g) < 0.3] = -1
    slots[0, 0] = -7
    slots = slots.to(device, slot_dtype)
    exp_k, exp_v = case.key_cache.clone(), case.value_cache.clone()
    reference.store_kv(key, value, exp_k, exp_v, slots)
    _tri().store_kv(key, value, case.key_cache, case.value_cache, slots)
    assert torch.equal(case.key_cache, exp_k) and torch.equal(case.value_cache, exp_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strided_cache", [False, True])
def test_copy_blocks(device, strided_cache):
    dtype = DTYPES[device][1]
    g = torch.Generator().manual_seed(5)
    case = PagedCase(5, [0], 2, 80, 16, dtype, device, spare_blocks=10, strided_cache=strided_cache)
    case.key_cache.copy_(torch.randn(case.key_cache.shape, generator=g).to(dtype))
    case.value_cache.copy_(torch.randn(case.value_cache.shape, generator=g).to(dtype))
    exp_k, exp_v = case.key_cache.clone(), case.value_cache.clone()
    empty = torch.empty(0, dtype=torch.int32, device=device)
    _tri().copy_blocks(case.key_cache, case.value_cache, empty, empty)
    assert torch.equal(case.key_cache, exp_k) and torch.equal(case.value_cache, exp_v)
    src = torch.tensor([3, 0, 9], device=device)
    dst = torch.tensor([1, 7, 4], device=device, dtype=torch.int32)
    reference.copy_blocks(exp_k, exp_v, src, dst)
    _tri().copy_blocks(case.key_cache, case.value_cache, src, dst)
    assert torch.equal(case.key_cache, exp_k) and torch.equal(case.value_cache, exp_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("key_dim,value_dim", [(48, 16), (16, 40)])
def test_store_and_copy_with_two_widths(device, key_dim, value_dim):
    """K and V of different widths (multi-head latent attention caches its two latents so):
    store and copy each with its own (head, dim) run, against the reference."""
    dtype = DTYPES[device][1]
    g = torch.Generator().manual_seed(9)
    num_blocks, block_size, heads, batch, q_len = 6, 16, 1, 2, 5

    def pools():
        return (torch.randn(num_blocks, block_size, heads, key_dim, generator=g).to(device, dtype),
                torch.randn(num_blocks, block_size, heads, value_dim, generator=g).to(device, dtype))

    k_pool, v_pool = pools()
    key = torch.randn(batch, q_len, heads, key_dim, generator=g).to(device, dtype).transpose(1, 2)
    value = torch.randn(batch, heads, q_len, value_dim, generator=g).to(device, dtype)
    slots = torch.randperm(num_blocks * block_size, generator=g)[: batch * q_len].reshape(batch, q_len)
    slots[0, 1] = -1
    slots = slots.to(device, torch.int32)
    exp_k, exp_v = k_pool.clone(), v_pool.clone()
    reference.store_kv(key, value, exp_k, exp_v, slots)
    _tri().store_kv(key, value, k_pool, v_pool, slots)
    assert torch.equal(k_pool, exp_k) and torch.equal(v_pool, exp_v)
    src = torch.tensor([3, 0], device=device)
    dst = torch.tensor([1, 5], device=device)
    reference.copy_blocks(exp_k, exp_v, src, dst)
    _tri().copy_blocks(k_pool, v_pool, src, dst)
    assert torch.equal(k_pool, exp_k) and torch.equal(v_pool, exp_v)


# ----------------------------------------------------------------------------- backends


def test_get_backend_names(monkeypatch):
    assert K.get_backend("torch").paged_attention is reference.paged_attention
    with pytest.raises(ValueError, match=r"unknown hf_paged kernel backend 'cuda'; valid backends: torch, triton"):
        K.get_backend("cuda")
    monkeypatch.setenv("HF_PAGED_BACKEND", "torch")
    assert K.get_backend().name == "torch"
    monkeypatch.setenv("HF_PAGED_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"valid backends: torch, triton"):
        K.get_backend()
    monkeypatch.delenv("HF_PAGED_BACKEND")
    assert K.get_backend().name == ("triton" if torch.cuda.is_available() else "torch")
    assert "torch" in K.available_backends()


CPU_ERROR = r"Triton backend got CPU tensors but the Triton interpreter is not enabled: set TRITON_INTERPRET=1 .*HF_PAGED_BACKEND=torch"


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=CPU_ERROR):
        K.get_backend("triton")
    # Per call too: CPU tensors handed to the Triton functions.
    attention = pytest.importorskip("hf_paged.kernels.attention")
    q = torch.zeros(1, 1, 1, 64)
    cache = torch.zeros(2, 16, 1, 64)
    idx = torch.zeros(1, 1, dtype=torch.int32)
    with pytest.raises(RuntimeError, match=CPU_ERROR):
        attention.paged_attention(q, cache, cache, idx, idx[0], idx, 1.0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU, no-interpreter path")
def test_triton_without_interpreter_subprocess():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HF_PAGED_BACKEND")}
    code = (
        "import hf_paged.kernels as K\n"
        "assert K.get_backend().name == 'torch'\n"
        "try:\n    K.get_backend('triton')\nexcept RuntimeError as e:\n    print('ERR', e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "ERR" in res.stdout and "TRITON_INTERPRET=1" in res.stdout and "HF_PAGED_BACKEND=torch" in res.stdout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("q_len,block_n", [(1, None), (1, 128), (5, None), (5, 128)])
def test_window_reads_no_block_before_the_margin(device, q_len, block_n):
    """A sliding-window layer's cache releases the blocks wholly before its first query's window
    less ``WINDOW_READ_MARGIN`` keys (block_table.py), and they may then hold anything: poisoned
    with NaN here, the kernels' output stays finite and equal to the reference (decode and
    multi-token, at the default tile and at the widest, 128)."""
    from hf_paged.kernels.tuning import WINDOW_READ_MARGIN

    window, block_size, dtype = 40, 16, torch.float32
    case = PagedCase(11, [300, 230], 2, 32, block_size, dtype, device)
    qpos = _tail_positions(case.seq_lens, q_len, 0)
    for b in range(2):
        first_kept = max(0, int(qpos[b].min()) - window + 1 - WINDOW_READ_MARGIN) // block_size
        assert first_kept >= 2
        released = case.block_table[b, :first_kept].long()
        case.key_cache[released] = NAN
        case.value_cache[released] = NAN
    query = _query(case.g, 2, 4, q_len, 32, dtype, device)
    kw = dict(sliding_window=window, block_n=block_n)
    out = _tri().paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                 32 ** -0.5, **kw)
    ref = reference.paged_attention(query, case.key_cache, case.value_cache, case.block_table, case.seq_lens, qpos,
                                    32 ** -0.5, sliding_window=window)
    _check_close(out, ref, dtype)
