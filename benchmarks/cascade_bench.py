"""GPU benchmark of the shared-prefix (cascade) decode attention (issue 15), one process, ~5 minutes.

1. kernels (Llama-3.1-8B attention: 32 q heads, 8 kv heads, head_dim 128, bf16, blocks of 16),
   outputs checked against the PyTorch reference first, then timed (triton.testing.do_bench, median):
   * 64 rows sharing an 8k-token prefix, 256 own tokens each: cascade vs today's decode kernel
     (target <= 0.25x);
   * 64 rows of 8k + 256 tokens sharing nothing: auto mode (the planner finds no group: today's
     kernel) vs today's (target <= 1.02x), the planner's host time per step, and the cascade forced
     on a batch without sharing (what auto avoids);
2. end to end (Llama-3.1-8B shape, random weights, bf16, CUDA graphs as by default): 2 prompts of
   8k tokens, 16 samples each (num_return_sequences), 256 new tokens: HF_PAGED_CASCADE=1 vs =0 in
   the same process (target >= 1.5x). First a greedy check: 2 prompts x 16 copies, both modes, the
   tokens compared (random weights give near-flat logits, so a bf16 rounding difference may flip
   a late argmax: the first differing step is printed, and the first step's logit gap). Then 32
   distinct prompts of 1k tokens, 128 new tokens, greedy: HF_PAGED_CASCADE=auto vs off, the cost of planning
   every step when nothing is shared (target <= 1.02x).

    python benchmarks/cascade_bench.py                 # everything
    python benchmarks/cascade_bench.py --only kernels  # or --only e2e
    python benchmarks/cascade_bench.py --only e2e --profile  # and where a decode step's GPU time goes
    TRITON_INTERPRET=1 python benchmarks/cascade_bench.py --tiny   # a CPU smoke run of the script itself

Prints a table; writes $OUT/cascade_bench.json (or ./cascade_bench.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if "--tiny" in sys.argv:  # before Triton builds the kernels: interpreted, and the end-to-end run through them
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("HF_PAGED_BACKEND", "triton")

from triton.testing import do_bench  # noqa: E402

from hf_paged.kernels import cascade, get_backend, reference  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--only", default="", help="kernels or e2e")
p.add_argument("--tiny", action="store_true", help="CPU smoke run (TRITON_INTERPRET=1): tiny shapes, no timing")
p.add_argument("--skip-stock", action="store_true", help="end to end: leave out stock transformers' run")
p.add_argument("--profile", action="store_true", help="end to end: also a torch.profiler table per mode (top kernels)")
args = p.parse_args()

DEV = "cpu" if args.tiny else "cuda"
HQ, HKV, D, BS = (4, 2, 32, 16) if args.tiny else (32, 8, 128, 16)
DTYPE = torch.float32 if args.tiny else torch.bfloat16
# kernels: rows, shared prefix, own tokens; e2e: prompt length, samples per prompt, new tokens, greedy tokens
ROWS, PREFIX, OWN = (8, 256, 32) if args.tiny else (64, 8192, 256)
PROMPT, SAMPLES, NEW, GREEDY_NEW = (64, 4, 8, 4) if args.tiny else (8192, 16, 256, 32)
NOSHARE_ROWS, NOSHARE_PROMPT, NOSHARE_NEW = (3, 40, 4) if args.tiny else (32, 1024, 128)
OUT = os.environ.get("OUT", ".")
results: dict = {"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "torch": torch.__version__,
                 "date": time.strftime("%Y-%m-%d")}


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def emit(key, **kw):
    print(json.dumps({key: kw}), flush=True)
    results[key] = kw


def bench(fn) -> float:
    if DEV != "cuda":  # smoke run: one call, wall time
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def want(name):
    return not args.only or name in args.only.split(",")


# ------------------------------------------------------------------------------------ kernels


def decode_batch(rows: int, prefix: int, own: int, share: bool, seed: int = 0, groups: int = 1):
    """A pool and block tables: every row holds prefix + own tokens (its query the last one); with
    ``share`` the prefix's blocks are one set that the rows of each of ``groups`` equal groups start
    with (one set per group)."""
    g = torch.Generator(device=DEV).manual_seed(seed)  # noqa: F841
    p_blocks, o_blocks = prefix // BS, -(-own // BS)  # the prefix is whole blocks
    n_blocks = (groups * p_blocks + rows * o_blocks) if share else rows * (p_blocks + o_blocks)
    kc = torch.randn(n_blocks + 8, BS, HKV, D, device=DEV, dtype=DTYPE, generator=g)
    vc = torch.randn_like(kc)
    perm = torch.randperm(n_blocks, device=DEV, generator=g).to(torch.int32)
    if share:
        own_ids = perm[groups * p_blocks:].view(rows, o_blocks)
        prefixes = perm[:groups * p_blocks].view(groups, p_blocks).repeat_interleave(rows // groups, 0)
        bt = torch.cat([prefixes, own_ids], 1).contiguous()
    else:
        bt = perm.view(rows, p_blocks + o_blocks).contiguous()
    seq = torch.full((rows,), prefix + own, dtype=torch.int32, device=DEV)
    qpos = (seq - 1)[:, None].contiguous()
    q = torch.randn(rows, 1, HQ, D, device=DEV, dtype=DTYPE, generator=g).transpose(1, 2)
    nk = torch.randn(rows, 1, HKV, D, device=DEV, dtype=DTYPE, generator=g).transpose(1, 2)
    nv = torch.randn_like(nk)
    pos = qpos[:, 0].long()
    slots = (bt.long().gather(1, (pos // BS)[:, None])[:, 0] * BS + pos % BS).to(torch.int32)[:, None].contiguous()
    return dict(q=q, kc=kc, vc=vc, bt=bt, seq=seq, qpos=qpos, nk=nk, nv=nv, slots=slots, max_seq=prefix + own)


def run_kernel(b, cascade_batch=None, plans=None, out=None, **kw):
    return get_backend("triton").paged_attention(
        b["q"], b["kc"], b["vc"], b["bt"], b["seq"], b["qpos"], D ** -0.5, out=out, new_key=b["nk"],
        new_value=b["nv"], slot_mapping=b["slots"], plans=plans, cascade=cascade_batch,
        max_seq_len=b["max_seq"], **kw)


def plan_of(b):
    return cascade.plan_shared_prefixes(b["bt"].cpu().numpy(), b["seq"].cpu().numpy(), b["qpos"][:, 0].cpu().numpy(),
                                        BS)


def rel_err(out, ref):
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def kernel_checks() -> None:
    """Cascade vs reference on small GPU shapes with every option, then the benchmark shapes."""
    worst = 0.0
    for rows, prefix, own, kw in [(6, 700, 48, {}), (5, 300, 17, {"sliding_window": 100, "softcap": 30.0}),
                                  (4, 513, 32, {"sinks": torch.randn(HQ, device=DEV)})]:
        b = decode_batch(rows, prefix - prefix % BS, own, share=True, seed=rows)
        ref = reference.paged_attention(b["q"], b["kc"].clone(), b["vc"].clone(), b["bt"], b["seq"], b["qpos"],
                                        D ** -0.5, new_key=b["nk"], new_value=b["nv"], slot_mapping=b["slots"], **kw)
        plan = plan_of(b)
        assert plan.num_chunks >= 1
        out = get_backend("triton").paged_attention(
            b["q"], b["kc"], b["vc"], b["bt"], b["seq"], b["qpos"], D ** -0.5, new_key=b["nk"], new_value=b["nv"],
            slot_mapping=b["slots"], cascade=cascade.CascadeBatch.from_plan(plan, DEV), **kw)
        worst = max(worst, rel_err(out, ref))
    emit("kernel_check_small", worst_rel_err=worst, ok=worst < 2e-2)
    assert worst < 2e-2, worst


GRAPH_LAYERS = 2  # (tiny) or 8: the layers of one captured step, each with its own pool


def in_graph(b, modes: dict) -> dict:
    """Decode attention as a decode step runs it: one call per layer, each layer over its own pool
    (cold in L2, as a model's next layer is), captured in one CUDA graph (no host time between
    launches, as generate replays it). ``modes``: name -> CascadeBatch or None (the plain kernel).
    The modes' replays are interleaved, five rounds of 20; returns per mode the median ms per layer
    and, from a torch.profiler pass over replays, each kernel's ms per layer."""
    layers = 8 if DEV == "cuda" else GRAPH_LAYERS
    stack = [b] + [dict(b, kc=torch.randn_like(b["kc"]), vc=torch.randn_like(b["vc"]), q=torch.randn_like(b["q"]),
                        nk=torch.randn_like(b["nk"]), nv=torch.randn_like(b["nv"])) for _ in range(layers - 1)]
    outs = [torch.empty(b["q"].shape[0], 1, HQ, D, device=DEV, dtype=DTYPE) for _ in range(layers)]
    modes = {name: m if isinstance(m, tuple) else (m, {}) for name, m in modes.items()}
    if DEV != "cuda":  # smoke run: the calls once each
        for name, (cb, kw) in modes.items():
            for lb, o in zip(stack, outs):
                run_kernel(lb, cb, {}, o, **kw)
        return {name: {"ms_per_layer": None} for name in modes}
    graphs = {}
    for name, (cb, kw) in modes.items():
        plans: dict = {}
        for lb, o in zip(stack, outs):  # plans the launch, compiles
            run_kernel(lb, cb, plans, o, **kw)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for lb, o in zip(stack, outs):
                run_kernel(lb, cb, plans, o, **kw)
        g.replay()
        graphs[name] = g
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(5):
        for name, g in graphs.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                g.replay()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end) / (20 * layers))
    result = {}
    from torch.profiler import ProfilerActivity, profile

    for name, g in graphs.items():
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                g.replay()
            torch.cuda.synchronize()
        per_kernel = {e.key[:60]: e.device_time_total / 1e3 / (10 * layers) for e in prof.key_averages()
                      if e.device_time_total > 0}
        ms = sorted(times[name])
        result[name] = {"ms_per_layer": ms[len(ms) // 2], "rounds": ms, "kernels_ms_per_layer": per_kernel}
    del graphs, stack
    return result


def split_sweep(rows: int, prefix: int, own: int, groups: int) -> None:
    """In a CUDA graph: the shared-prefix kernel's split count against the default's choice, for
    ``groups`` groups of rows sharing ``prefix`` tokens each (the end-to-end run's shape: 2 x 16)."""
    b = decode_batch(rows, prefix, own, True, groups=groups)
    plan = plan_of(b)
    cb = cascade.CascadeBatch.from_plan(plan, DEV)
    ref = reference.paged_attention(b["q"], b["kc"].clone(), b["vc"].clone(), b["bt"], b["seq"], b["qpos"],
                                    D ** -0.5, new_key=b["nk"], new_value=b["nv"], slot_mapping=b["slots"])
    err = rel_err(run_kernel(b, cb), ref)
    assert err < 2e-2, err
    modes = {"today": None, "cascade": cb, **{f"splits_{n}": (cb, {"num_shared_splits": n}) for n in (4, 8, 16, 32)}}
    graphed = in_graph(b, modes)
    emit(f"graphed_split_sweep_{rows}x{prefix}_{groups}_groups_own{own}", chunks=plan.num_chunks, cascade_rel_err=err,
         **{f"{m}_ms": graphed[m]["ms_per_layer"] for m in modes}, graphed=graphed)


def kernels() -> None:
    kernel_checks()
    rows, prefix, own = ROWS, PREFIX, OWN
    split_sweep(rows // 2, prefix, own, 2)  # the end-to-end run's groups
    split_sweep(rows, prefix, own, 1)
    split_sweep(rows // 2, prefix // 8, own // 2, 1)  # prefix_bench's: 32 rows over a 1k preamble
    for share in (True, False):
        b = decode_batch(rows, prefix, own, share)
        plan = plan_of(b)
        t0 = time.perf_counter()
        for _ in range(20):
            plan_of(b)
        host_us = (time.perf_counter() - t0) / 20 * 1e6
        cb = cascade.CascadeBatch.from_plan(plan, DEV)
        ref = reference.paged_attention(b["q"], b["kc"].clone(), b["vc"].clone(), b["bt"], b["seq"], b["qpos"],
                                        D ** -0.5, new_key=b["nk"], new_value=b["nv"], slot_mapping=b["slots"])
        plain_out = run_kernel(b)
        casc_out = run_kernel(b, cb)
        errs = dict(plain_rel_err=rel_err(plain_out, ref), cascade_rel_err=rel_err(casc_out, ref))
        del ref
        assert max(errs.values()) < 2e-2, errs
        out = torch.empty_like(plain_out)
        plain_plans, casc_plans, auto_plans = {}, {}, {}
        t_plain = bench(lambda: run_kernel(b, None, plain_plans, out))
        t_casc = bench(lambda: run_kernel(b, cb, casc_plans, out))
        auto = cb if plan.pays() else None  # what the forward would launch in auto mode
        t_auto = bench(lambda: run_kernel(b, auto, auto_plans, out))
        sweep = {}
        if share:  # the shared kernel's split count: parallelism against partials written and merged
            for n in (4, 8, 16, 32):
                sweep_plans: dict = {}
                sweep[n] = bench(lambda: get_backend("triton").paged_attention(
                    b["q"], b["kc"], b["vc"], b["bt"], b["seq"], b["qpos"], D ** -0.5, out=out, new_key=b["nk"],
                    new_value=b["nv"], slot_mapping=b["slots"], plans=sweep_plans, cascade=cb,
                    num_shared_splits=n))
        config_sweep = {}
        if share and not args.tiny:  # the shared-prefix kernel's tile (BLOCK_M, BLOCK_N, warps, stages)
            from hf_paged.kernels import tuning

            default = tuning.shared_prefix_config
            for cfg in ((64, 64, 4, 3), (64, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3), (32, 64, 4, 3)):
                tuning.shared_prefix_config = lambda block_d, elem_bytes, cfg=cfg: cfg
                cfg_plans: dict = {}
                run_kernel(b, cb, cfg_plans, out)
                config_sweep["/".join(map(str, cfg))] = bench(lambda: run_kernel(b, cb, cfg_plans, out))
            tuning.shared_prefix_config = default
        kv_bytes = 2 * HKV * D * 2 * (int(b["seq"].sum()) if not share else prefix + rows * own)
        name = f"shared_{rows}x{prefix}_own{own}" if share else f"unshared_{rows}x{prefix}_plus{own}"
        graphed = in_graph(b, {"today": None, "cascade": cb, "auto": auto})
        g_ratio = {f"{m}_over_today": (graphed[m]["ms_per_layer"] / graphed["today"]["ms_per_layer"]
                                       if graphed["today"]["ms_per_layer"] else None) for m in ("cascade", "auto")}
        emit(name, **errs, chunks=plan.num_chunks, pays=plan.pays(),
             graphed_today_ms=graphed["today"]["ms_per_layer"], graphed_cascade_ms=graphed["cascade"]["ms_per_layer"],
             graphed_auto_ms=graphed["auto"]["ms_per_layer"], **{f"graphed_{k}": v for k, v in g_ratio.items()},
             graphed=graphed, today_ms=t_plain, cascade_ms=t_casc,
             auto_ms=t_auto, cascade_over_today=t_casc / t_plain, auto_over_today=t_auto / t_plain,
             planner_host_us=host_us, distinct_kv_GB=kv_bytes / 1e9, shared_splits_sweep_ms=sweep,
             shared_config_sweep_ms=config_sweep)
        del b


# ------------------------------------------------------------------------------------ end to end


def decode_profile(generate, mode: str, prompts, kw) -> dict:
    """GPU time of one decode step by kernel (torch.profiler): the same call with 33 and with 65 new
    tokens, the difference over 32 steps, so the prefill and the first steps drop out. Run with
    CUDA graphs off: the same kernels, each one visible to the profiler; the graphed step's wall
    time is the timed runs'."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if DEV == "cuda" else [ProfilerActivity.CPU]  # kernels only
    short, long = (2, 3) if args.tiny else (33, 65)
    totals = {}
    os.environ["HF_PAGED_CUDA_GRAPHS"] = "0"
    try:
        for new in (short, long):
            torch.manual_seed(5)
            with profile(activities=activities) as prof:
                generate(mode, prompts, new, **kw)
            totals[new] = {e.key: (e.device_time_total if DEV == "cuda" else e.cpu_time_total, e.count)
                           for e in prof.key_averages()}
    finally:
        os.environ.pop("HF_PAGED_CUDA_GRAPHS")
    steps = long - short
    per_step = {}
    for key, (t, n) in totals[long].items():
        t0, n0 = totals[short].get(key, (0.0, 0))
        if t - t0 > 0:
            per_step[key[:70]] = {"us": (t - t0) / steps, "calls": (n - n0) / steps}
    top = dict(sorted(per_step.items(), key=lambda kv: -kv[1]["us"])[:30])
    gpu_ms = sum(v["us"] for v in per_step.values()) if DEV == "cuda" else 0.0
    print(f"--- decode step, HF_PAGED_CASCADE={mode}: kernels' time per step (us), top 30 ---", flush=True)
    for key, v in top.items():
        print(f"{v['us']:10.1f} us {v['calls']:7.1f} calls  {key}", flush=True)
    return {"kernel_us_per_step_top30": top, "kernels": len(per_step), "gpu_ms_per_step_all_kernels": gpu_ms / 1e3}


def e2e() -> None:
    from bench_common import llama_config
    from transformers import AutoModelForCausalLM

    import hf_paged  # noqa: F401  (registers attn_implementation="paged")
    from hf_paged import cache_of

    cfg = llama_config(args.tiny)
    with torch.device(DEV):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPE, attn_implementation="sdpa")
    model.set_attn_implementation("paged")  # as generate_bench.py switches it
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, cfg.vocab_size, (2, PROMPT), generator=g).to(DEV)

    def generate(mode: str, ids, new: int, **kw):
        os.environ[cascade.ENV_VAR] = mode
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 min_new_tokens=new, return_dict_in_generate=True, **kw)
        sync()
        return out, time.perf_counter() - t

    # which decode launches were planned (eager steps, and the steps a graph is captured from)
    from hf_paged.kernels import attention as triton_attention

    planned = {"cascade": 0}
    plan_cascade = triton_attention._plan_cascade_decode

    def counting(*a, **k):
        planned["cascade"] += 1
        return plan_cascade(*a, **k)

    triton_attention._plan_cascade_decode = counting

    # greedy check: 2 prompts x 16 copies (generate prefills each distinct prompt once and forks)
    copies = prompts.repeat_interleave(SAMPLES, 0)
    greedy, used = {}, {}
    for mode in ("0", "1"):
        before = planned["cascade"]
        greedy[mode], _ = generate(mode, copies, GREEDY_NEW, do_sample=False, output_logits=True)
        used[mode] = planned["cascade"] > before
    assert used == {"0": False, "1": True}, used
    a, b = greedy["0"], greedy["1"]
    same = (a.sequences == b.sequences).all(1)
    diff_steps = (a.sequences[:, PROMPT:] != b.sequences[:, PROMPT:]).any(0).nonzero()
    first_logits_gap = (a.logits[1].float() - b.logits[1].float()).abs().max().item()  # step 1: the first decode step
    emit("e2e_greedy_check", rows=copies.shape[0], new_tokens=GREEDY_NEW, rows_equal=int(same.sum()),
         first_differing_step=int(diff_steps[0]) if len(diff_steps) else None,
         first_decode_step_max_logit_gap=first_logits_gap,
         logit_scale=a.logits[1].float().abs().max().item())
    del greedy, a, b

    # sampling: 16 samples of each of the 2 prompts, 256 new tokens; warm-up then alternate
    kw = dict(do_sample=True, num_return_sequences=SAMPLES)
    times: dict[str, list[float]] = {"0": [], "1": []}
    for mode in ("0", "1"):
        # compile for the timed calls' shapes (the table width, and so the splits and the merge's
        # tile, follow max_new_tokens): the first timed call would otherwise pay a compilation
        generate(mode, prompts, NEW, **kw)
    for _ in range(1 if args.tiny else 3):
        for mode in ("0", "1"):
            torch.manual_seed(5)
            out, dt = generate(mode, prompts, NEW, **kw)
            times[mode].append(dt)
            state = cache_of(out).graph_state
            results.setdefault("e2e_graphs", {})[mode] = None if state is None else dict(
                captures=state.captures, replays=state.replays, disabled=state.disabled)
    off, on = min(times["0"]), min(times["1"])
    # stock transformers (sdpa, DynamicCache: generate expands each prompt to its 16 rows), same
    # calls: a warm-up of the same length, then one timed run
    stock_s = float("nan")
    model.set_attn_implementation("sdpa")
    try:
        if not args.skip_stock:
            generate("0", prompts, NEW, **kw)
            torch.manual_seed(5)
            stock_s = generate("0", prompts, NEW, **kw)[1]
    finally:
        model.set_attn_implementation("paged")
    # the same calls with one new token: their prefill (and the rest is decode)
    prefill = {}
    for mode in ("0", "1"):
        torch.manual_seed(5)
        prefill[mode] = min(generate(mode, prompts, 1, **kw)[1] for _ in range(2))
    emit(f"e2e_{SAMPLES}_samples_x2_prompts_{PROMPT}_{NEW}_new", off_s=off, cascade_s=on, speedup=off / on,
         stock_s=stock_s, stock_over_cascade=stock_s / on, stock_over_off=stock_s / off,
         off_runs=times["0"], cascade_runs=times["1"], graphs=results.get("e2e_graphs"),
         prefill_s={m: prefill[m] for m in prefill},
         decode_ms_per_step={m: (t - prefill[m]) / (NEW - 1) * 1e3 for m, t in (("0", off), ("1", on))},
         decode_speedup=(off - prefill["0"]) / max(on - prefill["1"], 1e-9))
    if args.profile:  # where a decode step's GPU time goes, per kernel, in both modes
        results["decode_step_profile"] = {mode: decode_profile(generate, mode, prompts, kw) for mode in ("0", "1")}

    # no sharing: distinct prompts, auto (the planner runs every step and finds nothing) vs off
    distinct = torch.randint(1, cfg.vocab_size, (NOSHARE_ROWS, NOSHARE_PROMPT), generator=g).to(DEV)
    times = {"auto": [], "0": []}
    for mode in times:
        generate(mode, distinct, 8, do_sample=False)
    for _ in range(1 if args.tiny else 2):
        for mode in times:
            times[mode].append(generate(mode, distinct, NOSHARE_NEW, do_sample=False)[1])
    emit(f"e2e_no_sharing_{NOSHARE_ROWS}x{NOSHARE_PROMPT}_{NOSHARE_NEW}_new", off_s=min(times["0"]),
         auto_s=min(times["auto"]), auto_over_off=min(times["auto"]) / min(times["0"]), off_runs=times["0"],
         auto_runs=times["auto"])
    os.environ.pop(cascade.ENV_VAR, None)


def main() -> None:
    t0 = time.time()
    if want("kernels"):
        kernels()
    if want("e2e"):
        e2e()
    results["wall_s"] = time.time() - t0
    print()
    for key, value in results.items():
        if isinstance(value, dict):
            brief = {k: (float(f"{v:.4g}") if isinstance(v, float) else v) for k, v in value.items()
                     if not isinstance(v, (list, dict))}
            print(f"{key:40s} {brief}")
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "cascade_bench.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    main()
