"""Where does a prefill's attention lose time against SDPA? (H200 experiment, 2026-11-29)

Variants of one simplified causal prefill kernel (no window/softcap/sinks, no cached prefix),
Llama-8B shape 8 x 2k, 32 q heads / 8 kv heads, D=128, bf16, GQA-packed tiles like the
production kernel, each checked against SDPA and timed in one process:
  KV_SRC 0: K/V from the paged pool, one block-table lookup per position
  KV_SRC 1: K/V from the contiguous projection tensors [B, Hkv, S, D], pointer loads
  KV_SRC 2: K/V from the contiguous projection tensors through TMA descriptors
  BT_MODE 1: one block-table load per paged block, broadcast to its positions
  WS: Triton's warp specialisation of the main loop
plus the production kernel and SDPA per backend (flash, cuDNN). The finding (gather ~ pointer
loads; TMA on contiguous K/V faster) is what the production multi-token kernel's own-token path
is built on; results in benchmarks/results/prefill_variants_h200.json, discussion in
docs/performance.md.

    python benchmarks/prefill_variants.py                  # writes $OUT/prefill_variants.json
    PV_ONLY=tma,production python benchmarks/prefill_variants.py   # a subset (substring match)
    PV_ONCE=1 ncu ... python benchmarks/prefill_variants.py        # one launch each, for ncu
"""
from __future__ import annotations

import json
import os
import sys
import traceback

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hf_paged.kernels import get_backend  # noqa: E402

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

LOG2E = tl.constexpr(1.4426950408889634)
NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _tile(q, m_i, l_i, acc, start, pos, kv_end, b, kv_head, dims,
          kc_ptr, vc_ptr, bt_row, k_ptr, v_ptr, desc_k, desc_v,
          stride_kb, stride_kt, stride_kh, stride_nb, stride_nh, stride_nt, qk_scale,
          HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
          MASKED: tl.constexpr, KV_SRC: tl.constexpr, BT_MODE: tl.constexpr):
    n = start + tl.arange(0, BLOCK_N)
    n_mask = n < kv_end
    if KV_SRC == 0:
        if BT_MODE == 0:
            if MASKED:
                bid = tl.load(bt_row + n // BLOCK_SIZE, mask=n_mask, other=0)
            else:
                bid = tl.load(bt_row + n // BLOCK_SIZE)
        else:
            NB: tl.constexpr = BLOCK_N // BLOCK_SIZE
            j = start // BLOCK_SIZE + tl.arange(0, NB)
            bj = tl.load(bt_row + j, mask=j * BLOCK_SIZE < kv_end, other=0)
            bid = tl.reshape(tl.broadcast_to(bj[:, None], [NB, BLOCK_SIZE]), [BLOCK_N])
        row = bid.to(tl.int64) * stride_kb + (n % BLOCK_SIZE) * stride_kt + kv_head * stride_kh
        if MASKED:
            k = tl.load(kc_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(kc_ptr + row[:, None] + dims[None, :])
    elif KV_SRC == 1:
        row = b * stride_nb + kv_head * stride_nh + n.to(tl.int64) * stride_nt
        if MASKED:
            k = tl.load(k_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + row[:, None] + dims[None, :])
    else:
        k = desc_k.load([b.to(tl.int32), start, kv_head * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        valid = (n[None, :] <= pos[:, None]) & n_mask[None, :]
        s = tl.where(valid, s, NEG_INF)
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
    if MASKED:
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if KV_SRC == 0:
        if MASKED:
            v = tl.load(vc_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(vc_ptr + row[:, None] + dims[None, :])
    elif KV_SRC == 1:
        if MASKED:
            v = tl.load(v_ptr + row[:, None] + dims[None, :], mask=n_mask[:, None], other=0.0)
        else:
            v = tl.load(v_ptr + row[:, None] + dims[None, :])
    else:
        v = desc_v.load([b.to(tl.int32), start, kv_head * HEAD_DIM]).reshape(BLOCK_N, HEAD_DIM)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_variant(out_ptr, q_ptr, kc_ptr, vc_ptr, bt_ptr, k_ptr, v_ptr, desc_k, desc_v,
                     scale, S,
                     stride_qb, stride_qh, stride_qt,
                     stride_kb, stride_kt, stride_kh,
                     stride_bt_b,
                     stride_nb, stride_nh, stride_nt,
                     stride_ob, stride_ot, stride_oh,
                     GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     KV_SRC: tl.constexpr, BT_MODE: tl.constexpr, WS: tl.constexpr):
    q_tile = tl.num_programs(0) - 1 - tl.program_id(0)
    kv_head = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    r = tl.arange(0, BLOCK_M)
    token = q_tile * BLOCK_Q + r // GROUP
    row_mask = token < S
    head = kv_head * GROUP + r % GROUP
    dims = tl.arange(0, HEAD_DIM)
    pos = tl.where(row_mask, token, -1)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + token[:, None] * stride_qt + dims[None, :],
                mask=row_mask[:, None], other=0.0)
    kv_end = tl.minimum(S, tl.max(pos, 0) + 1)
    first_pos = q_tile * BLOCK_Q
    m_i = tl.full([BLOCK_M], NEG_INF, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    bt_row = bt_ptr + b * stride_bt_b
    qk_scale = scale * LOG2E
    masked_start = (tl.minimum(first_pos + 1, kv_end) // BLOCK_N) * BLOCK_N
    for start in tl.range(0, masked_start, BLOCK_N, warp_specialize=WS):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, pos, kv_end, b, kv_head, dims,
                              kc_ptr, vc_ptr, bt_row, k_ptr, v_ptr, desc_k, desc_v,
                              stride_kb, stride_kt, stride_kh, stride_nb, stride_nh, stride_nt, qk_scale,
                              HEAD_DIM, BLOCK_N, BLOCK_SIZE, False, KV_SRC, BT_MODE)
    for start in range(masked_start, kv_end, BLOCK_N):
        m_i, l_i, acc = _tile(q, m_i, l_i, acc, start, pos, kv_end, b, kv_head, dims,
                              kc_ptr, vc_ptr, bt_row, k_ptr, v_ptr, desc_k, desc_v,
                              stride_kb, stride_kt, stride_kh, stride_nb, stride_nh, stride_nt, qk_scale,
                              HEAD_DIM, BLOCK_N, BLOCK_SIZE, True, KV_SRC, BT_MODE)
    o = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
             o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None])


def run_variant(q, kc, vc, bt, k, v, out, kv_src, bt_mode=0, ws=False, bm=256, bn=64, warps=8, stages=3):
    B, Hq, S, D = q.shape
    Hkv = k.shape[1]
    group = Hq // Hkv
    block_q = bm // group
    desc_k = desc_v = k  # placeholders (never read unless KV_SRC == 2)
    if kv_src == 2:
        k3 = k.transpose(1, 2).reshape(B, S, Hkv * D)  # view: k is a transpose of [B, S, Hkv, D]
        v3 = v.transpose(1, 2).reshape(B, S, Hkv * D)
        desc_k = TensorDescriptor(k3, list(k3.shape), list(k3.stride()), [1, bn, D])
        desc_v = TensorDescriptor(v3, list(v3.shape), list(v3.stride()), [1, bn, D])
    grid = (triton.cdiv(S, block_q), Hkv, B)

    def launch():
        return _prefill_variant[grid](out, q, kc, vc, bt, k, v, desc_k, desc_v, D ** -0.5, S,
                               q.stride(0), q.stride(1), q.stride(2),
                               kc.stride(0), kc.stride(1), kc.stride(2), bt.stride(0),
                               k.stride(0), k.stride(1), k.stride(2),
                               out.stride(0), out.stride(1), out.stride(2),
                               GROUP=group, HEAD_DIM=D, BLOCK_M=bm, BLOCK_Q=block_q, BLOCK_N=bn, BLOCK_SIZE=kc.shape[1],
                               KV_SRC=kv_src, BT_MODE=bt_mode, WS=ws, num_warps=warps, num_stages=stages)
    return launch


def main():
    dev = "cuda"
    B, S, Hq, Hkv, D, BS = 8, 2048, 32, 8, 128, 16
    torch.manual_seed(0)
    dt = torch.bfloat16
    q = torch.randn(B, S, Hq, D, device=dev, dtype=dt).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, device=dev, dtype=dt).transpose(1, 2)
    nblk = B * S // BS
    bt = torch.randperm(nblk, device=dev).to(torch.int32).view(B, S // BS).contiguous()
    kc = torch.empty(nblk, BS, Hkv, D, device=dev, dtype=dt)
    vc = torch.empty_like(kc)
    slots = (bt.long()[:, :, None] * BS + torch.arange(BS, device=dev)).reshape(B, S).to(torch.int32)
    tri = get_backend("triton")
    tri.store_kv(k, v, kc, vc, slots)
    sl = torch.full((B,), S, device=dev, dtype=torch.int32)
    qpos = torch.arange(S, device=dev, dtype=torch.int32)[None].expand(B, S).contiguous()
    scale = D ** -0.5
    flops = 4 * B * Hq * D * S * S / 2
    res = {"info": {"torch": torch.__version__, "triton": triton.__version__, "gpu": torch.cuda.get_device_name()}}
    qc, kcont, vcont = q.contiguous(), k.contiguous(), v.contiguous()
    ref = F.scaled_dot_product_attention(qc, kcont, vcont, is_causal=True, scale=scale, enable_gqa=True)
    ref = ref.transpose(1, 2)  # [B, S, Hq, D]

    only = [x for x in os.environ.get("PV_ONLY", "").split(",") if x]
    once = bool(os.environ.get("PV_ONCE"))

    def rec(name, fn, out=None):
        if only and not any(x in name for x in only):
            return
        try:
            if once:  # for ncu: compile, then one more launch
                fn()
                fn()
                torch.cuda.synchronize()
                return
            handle = fn()
            torch.cuda.synchronize()
            regs = {a: getattr(handle, a, None) for a in ("n_regs", "n_spills")} if handle is not None else {}
            err = None
            if out is not None:
                err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = do_bench(fn, warmup=50, rep=300, return_mode="median")
            res[name] = {"ms": ms, "TFLOP/s": flops / ms / 1e9, "rel_err": err, **regs}
            print(f"{name:48s} {ms:.4f} ms {flops / ms / 1e9:6.1f} TFLOP/s err {err} {regs}", flush=True)
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"{name:48s} FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            traceback.print_exc(limit=2)

    from torch.nn.attention import SDPBackend, sdpa_kernel
    rec("sdpa default", lambda: F.scaled_dot_product_attention(qc, kcont, vcont, is_causal=True, scale=scale,
                                                               enable_gqa=True))
    for be in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        def f(be=be):
            with sdpa_kernel(getattr(SDPBackend, be)):
                return F.scaled_dot_product_attention(qc, kcont, vcont, is_causal=True, scale=scale, enable_gqa=True)
        rec(f"sdpa {be}", f)
    out = torch.empty(B, S, Hq, D, device=dev, dtype=dt)
    rec("production paged_attention", lambda: tri.paged_attention(q, kc, vc, bt, sl, qpos, scale, out=out,
                                                                  max_seq_len=S), out)
    for name, kw in [
        ("paged ptr (prod-like)", dict(kv_src=0)),
        ("paged ptr, block-table per block", dict(kv_src=0, bt_mode=1)),
        ("paged ptr s4", dict(kv_src=0, stages=4)),
        ("contig ptr", dict(kv_src=1)),
        ("contig ptr s4", dict(kv_src=1, stages=4)),
        ("contig tma", dict(kv_src=2)),
        ("contig tma s4", dict(kv_src=2, stages=4)),
        ("contig tma s2", dict(kv_src=2, stages=2)),
        ("contig tma n128 s2", dict(kv_src=2, bn=128, stages=2)),
        ("contig tma m128 n128 w8 s3", dict(kv_src=2, bm=128, bn=128, warps=8)),
        ("contig tma m128 n64 w4 s3", dict(kv_src=2, bm=128, bn=64, warps=4)),
        ("contig tma ws", dict(kv_src=2, ws=True)),
        ("contig tma ws m128 n128 w4", dict(kv_src=2, ws=True, bm=128, bn=128, warps=4)),
        ("paged ptr ws", dict(kv_src=0, ws=True)),
        ("contig ptr ws", dict(kv_src=1, ws=True)),
    ]:
        o = torch.full((B, S, Hq, D), float("nan"), device=dev, dtype=dt)
        try:
            fn = run_variant(q, kc, vc, bt, k, v, o, **kw)
        except Exception as exc:  # noqa: BLE001
            res[name] = {"error": str(exc)[:300]}
            print(name, "setup failed", exc)
            continue
        rec(name, fn, o)
    if once:
        return
    path = os.path.join(os.environ.get("OUT", "."), "prefill_variants.json")
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
