"""GPU benchmark of the hf_paged Triton kernels (Llama-3.1-8B attention shapes).

One process: correctness first (Triton vs the PyTorch reference on small shapes), then
timings with triton.testing.do_bench (median, ms):
  * device copy bandwidth (2 GiB device-to-device copy, bytes read + written): the ceiling
  * decode 64 x 4k, 8 x 32k, 256 x 1k: paged kernel vs SDPA(enable_gqa) on contiguous KV
  * prefill 8 x 2k causal (no cached prefix) vs SDPA(is_causal=True): new tokens read from the
    projection output (as a forward does), with and without the store, and all from the pool
  * store_kv of 256k tokens x 8 heads x 128 dims bf16 through a random slot mapping
  * copy_blocks of 4096 random blocks
Prints a table and writes JSON to $OUT/kernel_bench.json (or ./kernel_bench.json).

    python benchmarks/kernel_bench.py            # full run
    BENCH_SWEEP=1 python benchmarks/kernel_bench.py   # also sweep decode/prefill configs
    BENCH_SWEEP=prefill python benchmarks/kernel_bench.py   # prefill configs only
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from hf_paged.kernels import tuning  # noqa: E402
from hf_paged.kernels import get_backend, reference  # noqa: E402

DEV = "cuda"
HQ, HKV, D, BS = 32, 8, 128, 16
DTYPE = torch.bfloat16
GIB = 1 << 30


def bench(fn) -> float:
    return do_bench(fn, warmup=50, rep=300, return_mode="median")


def make_paged(batch: int, ctx: int, extra_blocks: int = 0, dtype=DTYPE, heads=HKV, dim=D, block=BS):
    """Random KV pool with randomly permuted (non-identity) block tables."""
    blocks_per_row = triton.cdiv(ctx, block)
    num_blocks = batch * blocks_per_row + extra_blocks
    key_cache = torch.randn(num_blocks, block, heads, dim, device=DEV, dtype=dtype)
    value_cache = torch.randn_like(key_cache)
    block_table = torch.randperm(num_blocks, device=DEV)[: batch * blocks_per_row].to(torch.int32)
    block_table = block_table.view(batch, blocks_per_row).contiguous()
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
    return key_cache, value_cache, block_table, seq_lens


def correctness() -> dict:
    tri = get_backend("triton")
    torch.manual_seed(0)
    worst = {}
    for batch, q_len, ctx, kw in [
        (3, 1, 700, {}),
        (2, 1, 3000, {"num_kv_splits": 5}),
        (2, 1, 515, {"sliding_window": 100, "softcap": 30.0}),
        (2, 1, 515, {"sinks": torch.randn(HQ, device=DEV)}),
        (2, 77, 400, {}),
        (2, 300, 300, {"sliding_window": 64}),
    ]:
        kc, vc, bt, sl = make_paged(batch, ctx, extra_blocks=4)
        sl = torch.randint(max(q_len, ctx // 2), ctx + 1, (batch,), device=DEV, dtype=torch.int32)
        q = torch.randn(batch, q_len, HQ, D, device=DEV, dtype=DTYPE).transpose(1, 2)
        qpos = sl[:, None] - q_len + torch.arange(q_len, device=DEV, dtype=torch.int32)[None]
        ref = reference.paged_attention(q, kc, vc, bt, sl, qpos, D ** -0.5,
                                        **{k: v for k, v in kw.items() if k != "num_kv_splits"})
        out = tri.paged_attention(q, kc, vc, bt, sl, qpos, D ** -0.5, **kw)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        name = f"attn B{batch} Q{q_len} L{ctx} {sorted(kw)}"
        worst[name] = err
        assert err < 2e-2 and torch.isfinite(out).all(), (name, err)
    # store + copy
    kc, vc, bt, sl = make_paged(2, 64, extra_blocks=8)
    key = torch.randn(2, 64, HKV, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    slots = (bt.long()[:, :, None] * BS + torch.arange(BS, device=DEV)).reshape(2, -1)
    k2, v2 = kc.clone(), vc.clone()
    tri.store_kv(key, key, kc, vc, slots)
    reference.store_kv(key, key, k2, v2, slots)
    assert torch.equal(kc, k2) and torch.equal(vc, v2), "store_kv mismatch"
    src = torch.tensor([0, 1, 2], device=DEV, dtype=torch.int32)
    dst = torch.tensor([5, 7, 9], device=DEV, dtype=torch.int32)
    tri.copy_blocks(kc, vc, src, dst)
    reference.copy_blocks(k2, v2, src, dst)
    assert torch.equal(kc, k2) and torch.equal(vc, v2), "copy_blocks mismatch"
    return worst


def copy_bandwidth() -> float:
    src = torch.empty(GIB, device=DEV, dtype=torch.bfloat16).normal_()  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    del src, dst
    torch.cuda.empty_cache()
    return 2 * 2 * GIB / (ms * 1e-3)


def decode_case(batch: int, ctx: int, copy_bw: float, **kw) -> dict:
    tri = get_backend("triton")
    kc, vc, bt, sl = make_paged(batch, ctx)
    q = torch.randn(batch, 1, HQ, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    qpos = (sl - 1)[:, None].contiguous()
    out = torch.empty(batch, 1, HQ, D, device=DEV, dtype=DTYPE)
    scale = D ** -0.5
    ms = bench(lambda: tri.paged_attention(q, kc, vc, bt, sl, qpos, scale, out=out, max_seq_len=ctx, **kw))
    kv_bytes = 2 * batch * ctx * HKV * D * kc.element_size()
    del kc, vc
    torch.cuda.empty_cache()
    k = torch.randn(batch, HKV, ctx, D, device=DEV, dtype=DTYPE)
    v = torch.randn_like(k)
    qc = q.contiguous()
    sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qc, k, v, scale=scale, enable_gqa=True))
    del k, v
    torch.cuda.empty_cache()
    bw = kv_bytes / (ms * 1e-3)
    return {"ms": ms, "sdpa_ms": sdpa_ms, "vs_sdpa": ms / sdpa_ms, "GB/s": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw,
            "splits": tuning.choose_num_splits(batch, HKV, ctx, tuning.decode_config(D, 2)[0],
                                                 tuning.num_sms(torch.device(DEV))) if not kw else kw}


def prefill_case(batch: int, q_len: int, **kw) -> dict:
    """A prompt forward (no cached context) three ways, against SDPA on the same K/V:
    ms: the attention as a prompt forward runs it (max_context_len=0), the new tokens' K/V read
        from the projection output (transformers' [B, Hkv, Q, D] view of [B, Q, Hkv, D]); slots
        all -1, so the store launch writes nothing and the time is the attention's
    store_and_attention_ms: the same with the store of all tokens into the pool
    pool_ms: every key read from the pool through the block table (the path of a chunk over a
        cached context)"""
    tri = get_backend("triton")
    kc, vc, bt, sl = make_paged(batch, q_len)
    q = torch.randn(batch, q_len, HQ, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    new_key = torch.randn(batch, q_len, HKV, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    new_value = torch.randn(batch, q_len, HKV, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    qpos = torch.arange(q_len, device=DEV, dtype=torch.int32)[None].expand(batch, q_len).contiguous()
    slots = (bt.long()[:, :, None] * BS + torch.arange(BS, device=DEV)).reshape(batch, -1)[:, :q_len]
    slots = slots.to(torch.int32).contiguous()
    no_store = torch.full_like(slots, -1)
    out = torch.empty(batch, q_len, HQ, D, device=DEV, dtype=DTYPE)
    scale = D ** -0.5
    plans: dict = {}  # one forward's plan, as the model's layers share it

    def attend(slot_mapping, plans, max_context_len=0):
        return tri.paged_attention(q, kc, vc, bt, sl, qpos, scale, out=out, max_seq_len=q_len, new_key=new_key,
                                   new_value=new_value, slot_mapping=slot_mapping, plans=plans,
                                   max_context_len=max_context_len, **kw)

    store_plans: dict = {}
    general_plans: dict = {}
    store_ms = bench(lambda: attend(slots, store_plans))
    ms = bench(lambda: attend(no_store, plans))
    general_ms = bench(lambda: attend(no_store, general_plans, None))
    pool_ms = bench(lambda: tri.paged_attention(q, kc, vc, bt, sl, qpos, scale, out=out, max_seq_len=q_len, **kw))
    k = new_key.contiguous()
    v = new_value.contiguous()
    qc = q.contiguous()
    ref = F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=scale, enable_gqa=True).transpose(1, 2)
    attend(slots, None)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert err < 2e-2, f"prefill output differs from SDPA: rel err {err}"
    sdpa_ms = bench(lambda: F.scaled_dot_product_attention(qc, k, v, is_causal=True, scale=scale, enable_gqa=True))
    flops = 4 * batch * HQ * D * q_len * q_len / 2
    return {"ms": ms, "sdpa_ms": sdpa_ms, "vs_sdpa": ms / sdpa_ms, "TFLOP/s": flops / (ms * 1e-3) / 1e12,
            "sdpa_TFLOP/s": flops / (sdpa_ms * 1e-3) / 1e12, "store_and_attention_ms": store_ms,
            "store_and_attention_vs_sdpa": store_ms / sdpa_ms, "pool_ms": pool_ms, "pool_vs_sdpa": pool_ms / sdpa_ms,
            "general_kernel_ms": general_ms, "general_kernel_vs_sdpa": general_ms / sdpa_ms,
            "rel_err_vs_sdpa": err, "new_kv_tma": tuning.new_kv_tma(torch.device(DEV))}


def store_case(batch: int, q_len: int, copy_bw: float) -> dict:
    tri = get_backend("triton")
    kc, vc, bt, sl = make_paged(batch, q_len)
    key = torch.randn(batch, q_len, HKV, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    value = torch.randn(batch, q_len, HKV, D, device=DEV, dtype=DTYPE).transpose(1, 2)
    slots = (bt.long()[:, :, None] * BS + torch.arange(BS, device=DEV)).reshape(batch, -1)[:, :q_len]
    slots = slots.to(torch.int32).contiguous()
    ms = bench(lambda: tri.store_kv(key, value, kc, vc, slots))
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read + write
    bw = moved / (ms * 1e-3)
    return {"ms": ms, "GB/s": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw, "tokens": batch * q_len}


def copy_blocks_case(num_pairs: int, copy_bw: float) -> dict:
    tri = get_backend("triton")
    kc, vc, _, _ = make_paged(1, 2 * num_pairs * BS)
    ids = torch.randperm(kc.shape[0], device=DEV)[: 2 * num_pairs].to(torch.int32)
    src, dst = ids[:num_pairs].contiguous(), ids[num_pairs:].contiguous()
    ms = bench(lambda: tri.copy_blocks(kc, vc, src, dst))
    moved = 2 * 2 * num_pairs * kc[0].numel() * kc.element_size()
    bw = moved / (ms * 1e-3)
    return {"ms": ms, "GB/s": bw / 1e9, "pct_copy_bw": 100 * bw / copy_bw, "blocks": num_pairs}


def sweep(copy_bw: float) -> dict:
    """Optional config exploration (BENCH_SWEEP=1): decode BLOCK_N/warps/stages/splits, prefill tiles."""
    res = {}
    orig_dec, orig_mt = tuning.decode_config, tuning.multi_token_config
    try:
        decode_sweep = [] if os.environ.get("BENCH_SWEEP") == "prefill" else [(64, 4, 3), (64, 4, 4)]
        for bn, warps, stages in decode_sweep:
            tuning.decode_config = lambda block_d, eb, c=(bn, warps, stages): c
            for batch, ctx, splits in [(8, 32768, 8), (8, 32768, 16), (64, 4096, 1), (256, 1024, 1)]:
                r = decode_case(batch, ctx, copy_bw, num_kv_splits=splits)
                res[f"decode {batch}x{ctx} n{bn} w{warps} s{stages} splits{splits}"] = r
                print(f"  decode {batch}x{ctx} n{bn} w{warps} s{stages} splits {splits}: {r['ms']:.4f} ms "
                      f"{r['pct_copy_bw']:.1f}% vs_sdpa {r['vs_sdpa']:.2f}", flush=True)
        tuning.decode_config = orig_dec
        for bm, bn, warps, stages in [(256, 64, 8, 3), (256, 64, 8, 2), (256, 64, 8, 4), (256, 32, 8, 3),
                                      (128, 64, 4, 2), (128, 64, 4, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                      (128, 64, 8, 3), (256, 64, 16, 3)]:
            tuning.multi_token_config = lambda block_d, eb, kind="pool", c=(bm, bn, warps, stages): c
            try:
                r = prefill_case(8, 2048)
            except Exception as exc:  # e.g. out of shared memory for this tile shape
                print(f"  prefill m{bm} n{bn} w{warps} s{stages}: failed: {str(exc)[:120]}", flush=True)
                continue
            res[f"prefill m{bm} n{bn} w{warps} s{stages}"] = r
            print(f"  prefill m{bm} n{bn} w{warps} s{stages}: {r['ms']:.4f} ms vs_sdpa {r['vs_sdpa']:.2f}, "
                  f"general {r['general_kernel_ms']:.4f} ms, pool {r['pool_ms']:.4f} ms ({r['pool_vs_sdpa']:.2f}x)",
                  flush=True)
    finally:
        tuning.decode_config, tuning.multi_token_config = orig_dec, orig_mt
    return res


def main() -> None:
    assert torch.cuda.is_available(), "kernel_bench needs a CUDA GPU"
    props = torch.cuda.get_device_properties(0)
    info = {"device": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
            "triton": triton.__version__}
    print(info, flush=True)
    t0 = time.time()
    results: dict = {"info": info, "correctness_rel_err": correctness()}
    print("correctness ok:", {k: f"{v:.2e}" for k, v in results["correctness_rel_err"].items()}, flush=True)
    copy_bw = copy_bandwidth()
    results["copy_GB/s"] = copy_bw / 1e9
    print(f"device copy bandwidth: {copy_bw / 1e9:.0f} GB/s", flush=True)
    rows = []
    for batch, ctx in [(64, 4096), (8, 32768), (256, 1024)]:
        r = decode_case(batch, ctx, copy_bw)
        results[f"decode {batch}x{ctx}"] = r
        ok = r["pct_copy_bw"] >= 85 and r["vs_sdpa"] <= 1.15
        rows.append((f"decode {batch}x{ctx}", r["ms"], r["sdpa_ms"], f"{r['vs_sdpa']:.2f}x",
                     f"{r['GB/s']:.0f} GB/s = {r['pct_copy_bw']:.0f}% copy", "ok" if ok else "MISS"))
        print(rows[-1], flush=True)
    r = prefill_case(8, 2048)
    results["prefill 8x2k"] = r
    rows.append(("prefill 8x2k causal", r["ms"], r["sdpa_ms"], f"{r['vs_sdpa']:.2f}x",
                 f"{r['TFLOP/s']:.0f} TFLOP/s (sdpa {r['sdpa_TFLOP/s']:.0f})", "ok" if r["vs_sdpa"] <= 1.3 else "MISS"))
    print(rows[-1], flush=True)
    rows.append(("  + store of the 16k", r["store_and_attention_ms"], r["sdpa_ms"],
                 f"{r['store_and_attention_vs_sdpa']:.2f}x", "store_kv, then the attention", ""))
    rows.append(("  context-capable", r["general_kernel_ms"], r["sdpa_ms"], f"{r['general_kernel_vs_sdpa']:.2f}x",
                 "kernel with the pool phase compiled in", ""))
    rows.append(("  all from the pool", r["pool_ms"], r["sdpa_ms"], f"{r['pool_vs_sdpa']:.2f}x",
                 "block-table reads (chunk over a context)", ""))
    r = store_case(64, 4096, copy_bw)
    results["store 256k tokens"] = r
    rows.append(("store_kv 256k tok", r["ms"], float("nan"), "-", f"{r['GB/s']:.0f} GB/s = {r['pct_copy_bw']:.0f}% copy",
                 "ok" if r["pct_copy_bw"] >= 80 else "MISS"))
    print(rows[-1], flush=True)
    r = copy_blocks_case(4096, copy_bw)
    results["copy_blocks 4096"] = r
    rows.append(("copy_blocks 4096", r["ms"], float("nan"), "-", f"{r['GB/s']:.0f} GB/s = {r['pct_copy_bw']:.0f}% copy", ""))
    print(rows[-1], flush=True)
    if os.environ.get("BENCH_SWEEP"):
        results["sweep"] = sweep(copy_bw)

    print(f"\n{info['device']}  torch {info['torch']}  triton {info['triton']}  copy {copy_bw / 1e9:.0f} GB/s  "
          f"({time.time() - t0:.0f} s)")
    print(f"{'case':<22}{'paged ms':>10}{'sdpa ms':>10}{'ratio':>8}  {'throughput':<36}target")
    for name, ms, sdpa, ratio, thr, ok in rows:
        sd = "-" if math.isnan(sdpa) else f"{sdpa:.4f}"
        print(f"{name:<22}{ms:>10.4f}{sd:>10}{ratio:>8}  {thr:<36}{ok}")
    path = os.path.join(os.environ.get("OUT", "."), "kernel_bench.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print("wrote", path)


if __name__ == "__main__":
    main()
