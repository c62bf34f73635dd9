"""Where a decode step's time goes, stock (sdpa + DynamicCache) vs paged, Llama-3.1-8B shape, bf16.

Stock generate is host-bound on an H200 (about 9 ms of GPU work in a 25-38 ms step at 32 rows), so
the paged path is only as fast as its Python per layer. One process measures:
  1. host microseconds per call (no sync; the GPU keeps up) of the per-layer attention pieces:
     stock's torch.cat + SDPA(enable_gqa) and our store_kv + paged_attention (decode, 32 rows x 512),
     and an empty Triton launch as the floor;
  2. (--full) generate: ms per decode step (difference of two lengths) and GPU-busy ms per step
     (torch.profiler kernel time), for both paths;
  3. host ms per step in the mask function, cache.update, the attention function and the model
     forward, and the CUDA runtime calls per step (synchronising calls show up there).
Parts 2-3 run one workload of 32 decode rows (--workload): greedy (32 x 512 prompts, default),
sample (4 x 1024 prompts, 8 samples each) or beam (8 x 1024 prompts, 4 beams).

    python benchmarks/host_profile.py                      # parts 1 and 3, about 1 minute on an H200
    python benchmarks/host_profile.py --full               # also part 2, about 2 minutes
    python benchmarks/host_profile.py --workload sample    # parts 1 and 3 with the sampling workload
    python benchmarks/host_profile.py --tiny --workload sample --full   # CPU smoke run of the script
Writes $OUT/host_profile.json.
"""
from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import hf_paged  # noqa: E402
from hf_paged.kernels import get_backend  # noqa: E402
from hf_paged.testing import left_padded_batch  # noqa: E402

TINY = "--tiny" in sys.argv  # a CPU smoke run of parts 2-3 on a 2-layer model (checks the script, not speed)
DEV = "cpu" if TINY else "cuda"
# --workload greedy (32 x 512) | sample (4 x 1024, n=8) | beam (8 x 1024, 4 beams): parts 2 and 3
WORKLOAD = sys.argv[sys.argv.index("--workload") + 1] if "--workload" in sys.argv else "greedy"
OUT = os.environ.get("OUT", ".")
res: dict = {"torch": torch.__version__, "triton": triton.__version__,
             "transformers": __import__("transformers").__version__, "gpu": "cpu" if TINY else torch.cuda.get_device_name(),
             "date": time.strftime("%Y-%m-%d"), "workload": WORKLOAD}


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


@triton.jit
def _empty_kernel(x_ptr, n):  # noqa: ARG001
    pass


def host_us(fn, n=500) -> tuple[float, float]:
    """(host us per call without sync, wall us per call with a final sync)."""
    for _ in range(20):
        fn()
    sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    sync()
    wall = time.perf_counter() - t
    return host / n * 1e6, wall / n * 1e6


def part1() -> None:
    B, HQ, HKV, D, L, BS = 32, 32, 8, 128, 512, 16
    dt = torch.bfloat16
    q = torch.randn(B, 1, HQ, D, device=DEV, dtype=dt).transpose(1, 2)
    k = torch.randn(B, HKV, L, D, device=DEV, dtype=dt)
    v = torch.randn_like(k)
    new = torch.randn(B, 1, HKV, D, device=DEV, dtype=dt).transpose(1, 2)
    nb = B * (L // BS + 1)
    kp = torch.randn(nb, BS, HKV, D, device=DEV, dtype=dt)
    vp = torch.randn_like(kp)
    bt = torch.arange(nb, device=DEV, dtype=torch.int32).view(B, -1)
    sl = torch.full((B,), L + 1, device=DEV, dtype=torch.int32)
    qp = torch.full((B, 1), L, device=DEV, dtype=torch.int32)
    slots = (bt[:, L // BS] * BS + (L % BS)).view(B, 1).contiguous()
    tri = get_backend("triton")
    x = torch.empty(1, device=DEV)
    r = {}
    r["empty triton launch"] = host_us(lambda: _empty_kernel[(1,)](x, 1))
    r["torch.cat (x1)"] = host_us(lambda: torch.cat([k, new], dim=-2))
    r["sdpa enable_gqa"] = host_us(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True))
    r["store_kv"] = host_us(lambda: tri.store_kv(new, new, kp, vp, slots))
    r["paged_attention decode"] = host_us(
        lambda: tri.paged_attention(q, kp, vp, bt, sl, qp, D ** -0.5, max_seq_len=L + 1))
    plans: dict = {}  # what generate does: one plan per forward, the store fused into the launch
    r["paged_attention decode, planned + store"] = host_us(
        lambda: tri.paged_attention(q, kp, vp, bt, sl, qp, D ** -0.5, None, None, None, None, L + 1,
                                    new, new, slots, plans=plans))
    r["paged_attention decode 4 splits"] = host_us(
        lambda: tri.paged_attention(q, kp, vp, bt, sl, qp, D ** -0.5, max_seq_len=L + 1, num_kv_splits=4))
    for name, (h, w) in r.items():
        print(f"  {name:34s} host {h:7.1f} us/call   wall {w:7.1f} us/call", flush=True)
    res["per_call_us"] = {k2: {"host": h, "wall": w} for k2, (h, w) in r.items()}


def part2() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    if TINY:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000)
    else:
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                          rope_theta=500000.0)
    with torch.device(DEV):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if TINY else torch.bfloat16,
                                                 attn_implementation="sdpa")
    model.eval()
    model_ref.append(model)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    # 32 decode rows in every workload: 32 prompts, 4 prompts x 8 samples, or 8 prompts x 4 beams.
    lengths, gen_kw = {
        "greedy": ([512] * 32, dict(do_sample=False)),
        "sample": ([1024] * 4, dict(do_sample=True, num_return_sequences=8)),
        "beam": ([1024] * 8, dict(do_sample=False, num_beams=4)),
    }[WORKLOAD]
    ids, mask = left_padded_batch(lengths, cfg.vocab_size, seed=0, low=1, device=DEV)

    def gen(n):
        torch.manual_seed(0)
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **gen_kw)

    def timed(n):
        sync()
        t = time.perf_counter()
        gen(n)
        sync()
        return time.perf_counter() - t

    def gpu_ms(n):
        from torch.profiler import ProfilerActivity, profile

        if DEV != "cuda":
            return 0.0

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            gen(n)
            sync()
        return sum(e.self_device_time_total for e in prof.key_averages()) / 1e3

    # Everything timed first, both paths; the torch.profiler sessions last (a paged breakdown
    # timed after a profiler session once came out 1.7x slower than the same workload timed
    # without one, so no timing follows a profiler session).
    res["breakdown_ms_per_step"] = {}
    for impl in ("sdpa", "paged"):
        model.set_attn_implementation(impl)
        res["breakdown_ms_per_step"][impl] = breakdown(gen, 64)
    out = {}
    for impl in ("sdpa", "paged") if "--full" in sys.argv else ():
        model.set_attn_implementation(impl)
        gen(96)  # warm: allocator blocks of every size, kernels compiled
        t_short, t_long = min(timed(32) for _ in range(2)), min(timed(96) for _ in range(2))
        out[impl] = {"ms_per_step": (t_long - t_short) / 64 * 1e3}
    res["cuda_api_per_step"] = {}
    for impl in ("sdpa", "paged"):
        model.set_attn_implementation(impl)
        res["cuda_api_per_step"][impl] = cuda_api(gen, 32)
        if impl in out:
            out[impl]["gpu_busy_ms_per_step"] = (gpu_ms(96) - gpu_ms(32)) / 64
            print(f"  {impl:5s}: {out[impl]['ms_per_step']:6.2f} ms/step wall, "
                  f"{out[impl]['gpu_busy_ms_per_step']:6.2f} ms/step GPU busy", flush=True)
    res["decode_step_32x512"] = out


def breakdown(gen, n) -> dict:
    """Host ms per decode step in each piece (wrappers accumulate perf_counter time; nested pieces
    are included in their parents)."""
    from transformers import AttentionInterface, cache_utils
    from transformers.masking_utils import AttentionMaskInterface

    from hf_paged.cache import PagedCache

    acc: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc[name] = acc.get(name, 0.0) + time.perf_counter() - t
        return wrapper

    patches = [(AttentionInterface._global_mapping, "sdpa"), (AttentionInterface._global_mapping, "paged"),
               (AttentionMaskInterface._global_mapping, "sdpa"), (AttentionMaskInterface._global_mapping, "paged")]
    saved = [m[k] for m, k in patches]
    for (m, k), kind in zip(patches, ["attn", "attn", "mask", "mask"]):
        m[k] = timed(kind, m[k])
    upd = [(cache_utils.DynamicLayer, "update"), (PagedCache, "update")]
    saved_upd = [getattr(c, a) for c, a in upd]
    for c, a in upd:
        setattr(c, a, timed("cache.update", getattr(c, a)))
    fwd = type(model_ref[0]).forward
    type(model_ref[0]).forward = timed("model.forward", fwd)
    try:
        gen(n)
        acc.clear()
        sync()
        t = time.perf_counter()
        gen(n)
        sync()
        acc["generate"] = time.perf_counter() - t
    finally:
        for (m, k), v in zip(patches, saved):
            m[k] = v
        for (c, a), v in zip(upd, saved_upd):
            setattr(c, a, v)
        type(model_ref[0]).forward = fwd
    out = {k: v / n * 1e3 for k, v in acc.items()}
    print("  breakdown", model_ref[0].config._attn_implementation, {k: round(v, 2) for k, v in out.items()}, flush=True)
    return out


def cuda_api(gen, n) -> dict:
    """CUDA runtime calls per step (count, host ms) from torch.profiler: shows synchronising calls."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])
    with profile(activities=activities) as prof:
        gen(n)
        sync()
    rows = {}
    for e in prof.key_averages():
        if e.key.startswith("cuda") or "Synchronize" in e.key or "Memcpy" in e.key or "HostAlloc" in e.key:
            rows[e.key] = (e.count / n, e.self_cpu_time_total / 1e3 / n)
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:12]
    print("  cuda api per step", model_ref[0].config._attn_implementation,
          [(k, round(c, 1), round(ms, 3)) for k, (c, ms) in top], flush=True)
    return dict(top)


model_ref: list = []


print(res["gpu"], res["torch"], res["transformers"], res["triton"], "hf_paged", hf_paged.__version__, flush=True)
if not TINY:
    print("1. host cost per call (32 rows x 512 context, 8B attention shape)", flush=True)
    part1()
print(f"2. generate ({WORKLOAD}, 32 decode rows): per decode step", flush=True)
part2()
with open(os.path.join(OUT, "host_profile.json"), "w") as f:
    json.dump(res, f, indent=1)
