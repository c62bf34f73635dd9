"""Prefix compute sharing on a few-shot data set: plain ``generate`` in batches, with sharing
(within a call, and a PrefixCache across calls) vs the paged path without compute sharing, same
process, same model.

One random-weight model of the Llama-3.1-8B shape in bf16 (speed does not depend on the weights'
values; built from a config as in generate_bench.py). The data set: 256 prompts = one shared
1,024-token preamble + a 32-256-token question each; 64 new tokens per prompt (eos_token_id=None,
min_new_tokens=max_new_tokens); batches of 32.

1. tokens: both paged paths against stock transformers (sdpa, DynamicCache), greedy, on the first
   batch (16 new tokens; the shared path twice: within a call, then across calls from its
   PrefixCache): first on a 2-layer model of the same shape in fp32 (every row must agree), then
   on the bf16 model (a row whose tokens differ, a near-tie of random weights flipped by another
   accumulation order, is reported with where it diverges);
2. time: the whole data set with each path (after one untimed warm-up batch per path), end to end;
   prompt tokens computed (``memory_stats()['tokens_prefilled']``) vs the distinct prompt tokens of
   the data set (target <= 1.1x) and the time ratio (target >= 2.5x); stock transformers over the
   same data set, same batches, for reference (one pass after a warm-up), and each pass's peak
   GPU memory;
3. (--phases, instead of 1-2) where a pass's time goes, call by call, without synchronising the
   decode steps: prefill seconds, decode seconds per step, captures, and the host's time per step
   in the decode forward, its graph launches and the deferred stop check (where it waits for the
   GPU), for the default settings and a few others.

    python benchmarks/prefix_bench.py            # about 7 minutes on an H200
    python benchmarks/prefix_bench.py --no-ablations   # the issue's figures only (about 4 minutes)
    python benchmarks/prefix_bench.py --quick    # 128 prompts
    python benchmarks/prefix_bench.py --tiny     # a CPU smoke run of the script itself
    python benchmarks/prefix_bench.py --phases   # only section 3: a pass's time call by call (2 minutes)

Prints one JSON line per measurement and a table at the end; writes $OUT/prefix_bench.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import Record, few_shot_prompts, llama_config
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged
from hf_paged import PagedCache, PrefixCache, cache_of
from hf_paged.testing import left_pad

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (smoke run)")
p.add_argument("--quick", action="store_true", help="128 prompts instead of 256")
p.add_argument("--prompts", type=int, default=None)
p.add_argument("--batch", type=int, default=32)
p.add_argument("--new", type=int, default=64)
p.add_argument("--preamble", type=int, default=1024)
p.add_argument("--prefix-memory", default="8GiB", help="the PrefixCache's cap")
p.add_argument("--stock-only", action="store_true", help="only stock transformers' pass (its time and peak)")
p.add_argument("--phases", action="store_true",
               help="only where a pass's time goes, call by call, without synchronising each step (section 3)")
p.add_argument("--no-ablations", action="store_true",
               help="skip the ablation rows and the per-forward breakdown (the figures of the issue only: tokens, "
                    "the three paths' passes, stock)")
p.add_argument("--paths", default=None,
               help="with --phases: the comma-separated rows to run (default: all), e.g. unshared,shared+cascade")
args = p.parse_args()

dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
record = Record(dev)
emit, sync, results = record.emit, record.sync, record.results


cfg = llama_config(args.tiny)
if args.tiny:
    n_prompts, preamble_len, q_range, new, batch_size = args.prompts or 16, 64, (4, 24), 8, 8
else:
    n_prompts = args.prompts or (128 if args.quick else 256)
    preamble_len, q_range, new, batch_size = args.preamble, (32, 256), args.new, args.batch

record.versions()

with torch.device(dev):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="paged")
model.eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0

# the data set: one preamble, each prompt its own question
preamble, questions = few_shot_prompts(cfg.vocab_size, n_prompts, preamble_len, q_range)
prompts = [preamble + q for q in questions]
distinct_tokens = preamble_len + sum(len(q) for q in questions)  # what a perfect prefix cache computes
batches = [prompts[i:i + batch_size] for i in range(0, n_prompts, batch_size)]
emit(what="dataset", prompts=n_prompts, preamble=preamble_len, question_tokens=sum(len(q) for q in questions),
     distinct_prompt_tokens=distinct_tokens, all_prompt_tokens=sum(len(x) for x in prompts), batch=batch_size,
     new_tokens=new)


def run(rows, path, prefix, max_new, logits=False):
    """One generate call; returns (new tokens [rows, max_new], its cache's stats: None for stock)."""
    ids, mask = left_pad(rows, dev)
    kw = {}
    if path == "stock":  # stock transformers: sdpa attention, its DynamicCache
        model.set_attn_implementation("sdpa")
        try:
            with torch.inference_mode():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                     min_new_tokens=max_new, do_sample=False, return_dict_in_generate=True,
                                     output_logits=logits)
        finally:
            model.set_attn_implementation("paged")
        stats = {"tokens_prefilled": int(mask.sum()), "tokens_reused": 0}
        if logits:
            stats["first_logits"] = out.logits[0].float().cpu()
        return out.sequences[:, ids.shape[1]:].cpu(), stats
    if path == "shared":
        kw["prefix_cache"] = prefix
    else:  # the paged path without compute sharing: every row runs its whole prompt
        kw[hf_paged.compat.generate_cache_kwarg()] = PagedCache(config=model.config, share_prefixes=False)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, return_dict_in_generate=True, output_logits=logits, **kw)
    stats = cache_of(out).memory_stats()
    if logits:
        stats["first_logits"] = out.logits[0].float().cpu()
    return out.sequences[:, ids.shape[1]:].cpu(), stats


def timed_pass(path, prefix):
    computed = reused = 0
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    for rows in batches:
        _, stats = run(rows, path, prefix, new)
        computed += stats["tokens_prefilled"]
        reused += stats["tokens_reused"]
    sync()
    return time.perf_counter() - t, computed, reused


# ---------------------------------------------------------------- 3. phases (--phases)
def phase_pass(path, prefix):
    """One pass with a synchronisation at each call's start, prefill end and end only (the decode
    steps run as they do untimed): seconds in prefills, in the rest of the calls (the decode
    steps, the captures among them), and between the calls (this script's batching)."""
    from transformers import GenerationMixin

    import hf_paged.graphs as graphs_mod

    prefill = GenerationMixin._prefill
    spent = {"prefill_s": 0.0, "calls_s": 0.0}

    def timed_prefill(self, *a, **kw):
        sync()
        t0 = time.perf_counter()
        out = prefill(self, *a, **kw)
        sync()
        spent["prefill_s"] += time.perf_counter() - t0
        return out

    # host seconds (no synchronisation added) in the graphed decode forwards, in their graph
    # launches, and in the deferred stop check (which waits there for the step before)
    from transformers.generation import utils as generation_utils

    host = {"forward_s": 0.0, "launch_s": 0.0, "stop_check_s": 0.0}
    patched = [(graphs_mod.GraphedForward, "__call__", "forward_s"), (torch.cuda.CUDAGraph, "replay", "launch_s"),
               (generation_utils.DeferredStopCheck, "__call__", "stop_check_s")]
    originals = [getattr(owner, name) for owner, name, _ in patched]

    def timing(fn, key):
        def timed(*a, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                ids = kw.get("input_ids")
                if key != "forward_s" or (ids is not None and ids.shape[-1] == 1):  # decode forwards only
                    host[key] += time.perf_counter() - t0
        return timed

    for (owner, name, key), fn in zip(patched, originals):
        setattr(owner, name, timing(fn, key))
    GenerationMixin._prefill = timed_prefill
    before = dict(graphs_mod.STATS)
    try:
        sync()
        t = time.perf_counter()
        for rows in batches:
            sync()
            t0 = time.perf_counter()
            run(rows, path, prefix, new)
            sync()
            spent["calls_s"] += time.perf_counter() - t0
        total = time.perf_counter() - t
    finally:
        GenerationMixin._prefill = prefill
        for (owner, name, _), fn in zip(patched, originals):
            setattr(owner, name, fn)
    steps = graphs_mod.STATS["replays"] - before["replays"]
    decode = spent["calls_s"] - spent["prefill_s"]
    return dict(seconds=round(total, 3), prefill_s=round(spent["prefill_s"], 3), decode_and_captures_s=round(decode, 3),
                between_calls_s=round(total - spent["calls_s"], 3), replays=steps,
                captures=graphs_mod.STATS["captures"] - before["captures"],
                ms_per_decode_step=round(decode / max(steps, 1) * 1e3, 3),
                **{k.replace("_s", "_ms_per_step"): round(v / max(steps, 1) * 1e3, 3) for k, v in host.items()})


if args.stock_only:
    run(batches[-1][:4], "stock", None, 4)
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    weights_gb = torch.cuda.memory_allocated() / 1e9 if dev == "cuda" else None
    dt, computed, _ = timed_pass("stock", None)
    emit(what="run", path="stock", run=1, seconds=round(dt, 3), prompt_tokens_computed=computed,
         prompt_tokens_reused=0, computed_over_distinct=round(computed / distinct_tokens, 3), prefix_cache=None,
         peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None,
         allocated_before_gb=round(weights_gb, 2) if weights_gb is not None else None)
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    record.write("prefix_bench_stock.json")
    raise SystemExit(0)

if args.phases:
    import hf_paged.prefix_cache as prefix_mod

    for label, path, cascade_mode, growth, env in (
            ("unshared", "unshared", "0", None, {}),
            ("shared+cascade", "shared", "auto", None, {}),
            ("shared+cascade, pool grows 4x", "shared", "auto", 4.0, {}),
            ("shared+cascade, 1 graph per step", "shared", "auto", None, {"HF_PAGED_GRAPH_SEGMENTS": "1"}),
            ("unshared, 1 graph per step", "unshared", "0", None, {"HF_PAGED_GRAPH_SEGMENTS": "1"}),
            ("shared+cascade, no deferred stop", "shared", "auto", None, {"HF_PAGED_DEFERRED_STOP": "0"}),
            ("unshared (PyTorch norms)", "unshared", "0", None, {"HF_PAGED_FUSED_NORMS": "0"}),
            ("shared+cascade (PyTorch norms)", "shared", "auto", None, {"HF_PAGED_FUSED_NORMS": "0"})):
        if args.paths is not None and label not in args.paths.split(","):
            continue
        os.environ["HF_PAGED_CASCADE"] = cascade_mode
        os.environ.update(env)
        kept = prefix_mod.RESERVE_GROWTH
        if growth is not None:
            prefix_mod.RESERVE_GROWTH = growth
        try:
            run(batches[-1][:4], path, PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None, 4)
            # a path's first pass compiles its prefill shapes (the warm-up batch has not them)
            for pass_no in (1, 2) if label in ("unshared", "shared+cascade") else (1,):
                prefix = PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None
                emit(what="phases", path=label, run=pass_no, **phase_pass(path, prefix),
                     prefix_cache=prefix.stats() if prefix is not None else None)
        finally:
            prefix_mod.RESERVE_GROWTH = kept
            for k in env:
                os.environ.pop(k)
    os.environ.pop("HF_PAGED_CASCADE", None)
    os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
    record.write("prefix_bench_phases.json")
    raise SystemExit(0)


# ---------------------------------------------------------------- 1. tokens
def check_tokens(label):
    """Both paths, greedy, on the first batch, twice for the shared path (the second call finds
    the preamble in its PrefixCache), against stock transformers: rows with equal new tokens, and
    where the others diverge. Returns the shared path's rows (equal or not)."""
    check_new = min(16, new)
    ref, ref_stats = run(batches[0], "stock", None, check_new, logits=True)
    ref_logits = ref_stats["first_logits"]
    top2 = ref_logits.topk(2, dim=-1).values
    prefix = PrefixCache(max_memory=args.prefix_memory)
    equal = []
    for call in ("unshared", "within_call", "across_calls"):
        path = "unshared" if call == "unshared" else "shared"
        got, got_stats = run(batches[0], path, prefix, check_new, logits=True)
        rows = [bool(torch.equal(a, b)) for a, b in zip(ref, got)]
        diverge = [int((a != b).nonzero()[0]) for a, b, e in zip(ref, got, rows) if not e]
        emit(what="tokens_equal", model=label, call=call, rows=len(rows), equal_rows=sum(rows),
             new_tokens=check_new, first_divergence=diverge,
             # the first step's logits: how far apart, against the gap between the top two
             first_logits_max_diff=round((got_stats["first_logits"] - ref_logits).abs().max().item(), 5),
             first_logits_scale=round(ref_logits.abs().max().item(), 3),
             smallest_top2_gap=round((top2[:, 0] - top2[:, 1]).min().item(), 5), against="stock")
        if path == "shared":
            equal += rows
    return equal


check_fp32 = dev == "cuda" or args.tiny  # the tiny run goes through it too (the script's smoke test)
if check_fp32:
    # fp32, 2 layers of the same shape: the kernels' exactness (every row must agree); the bf16
    # model below can flip a near-tie of its random-weight logits when an accumulation order differs
    full_model = model
    with torch.device(dev):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 2}),
                                                 dtype=torch.float32, attn_implementation="paged")
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    fp32_equal = check_tokens("fp32_2_layers")
    del model
    if dev == "cuda":
        torch.cuda.empty_cache()
    model = full_model
    if not all(fp32_equal):
        print("TOKENS DIFFER in fp32: prefix sharing changed the results", flush=True)
equal_rows = check_tokens("bf16" if dev == "cuda" else "fp32")

# ---------------------------------------------------------------- 2. time
timing = {}
# "unshared" and "shared" decode with the plain kernel (HF_PAGED_CASCADE=0); "shared+cascade" is
# "shared" with the shared-prefix decode attention left to its planner (HF_PAGED_CASCADE=auto, the
# default), which reads the preamble once per step for the batch
for path in ("unshared", "shared", "shared+cascade"):
    os.environ["HF_PAGED_CASCADE"] = "auto" if path == "shared+cascade" else "0"
    label = path
    path = "shared" if path == "shared+cascade" else path
    run(batches[-1][:4], path, PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None, 4)  # warm-up
    # two passes over the data set, each with a new PrefixCache: the first is what a user's first
    # run in a fresh process meets (the Triton kernels compile for the prefill shapes the warm-up
    # did not have), the second the steady state; the ratio is taken on the second
    for pass_no in (1, 2):
        prefix = PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None
        dt, computed, reused = timed_pass(path, prefix)
        emit(what="run", path=label, run=pass_no, seconds=round(dt, 3), prompt_tokens_computed=computed,
             prompt_tokens_reused=reused, computed_over_distinct=round(computed / distinct_tokens, 3),
             prefix_cache=prefix.stats() if prefix is not None else None,
             peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None)
    timing[label] = dt
os.environ.pop("HF_PAGED_CASCADE", None)

os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
record.write("prefix_bench.json")  # written again after each section: a run cut short keeps its figures

# what a setting gives: one pass each with it off (a new PrefixCache each; the decode graphs are
# captured again for the other setting). "stop checked every step": the decode loop synchronises
# with the GPU at every step, as before the deferred stop check (both paths pay it alike).
ABLATIONS = (("shared, stop checked every step", "HF_PAGED_DEFERRED_STOP", "0", "shared"),
             ("unshared, stop checked every step", "HF_PAGED_DEFERRED_STOP", "0", "unshared"),
             ("shared, pads computed", "HF_PAGED_PACKED_PREFILL", "0", "shared"))
for label, var, value, path in () if args.no_ablations else ABLATIONS:
    if args.tiny and var == "HF_PAGED_GRAPH_SEGMENTS":
        continue
    os.environ["HF_PAGED_CASCADE"] = "0"
    os.environ[var] = value
    prefix = PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None
    run(batches[-1][:4], path, PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None, 4)
    dt, computed, reused = timed_pass(path, prefix)
    emit(what="run", path=label, run=1, seconds=round(dt, 3), prompt_tokens_computed=computed,
         prompt_tokens_reused=reused, computed_over_distinct=round(computed / distinct_tokens, 3),
         prefix_cache=prefix.stats() if prefix is not None else None,
         peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None)
    timing[label] = dt
    os.environ.pop(var)
os.environ.pop("HF_PAGED_CASCADE", None)

# stock transformers over the same batches (one warm-up call, one pass: it compiles nothing); the
# last pass's PrefixCache is dropped first: its pool would count in stock's peak (freed by reference
# counting: a PrefixCache's pools need no cyclic collection)
prefix = None
run(batches[-1][:4], "stock", None, 4)
dt, computed, _ = timed_pass("stock", None)
emit(what="run", path="stock", run=1, seconds=round(dt, 3), prompt_tokens_computed=computed, prompt_tokens_reused=0,
     computed_over_distinct=round(computed / distinct_tokens, 3), prefix_cache=None,
     peak_gb=round(torch.cuda.max_memory_allocated() / 1e9, 2) if dev == "cuda" else None)
timing["stock"] = dt
record.write("prefix_bench.json")

# where the time goes: one more pass per path with every forward timed (synchronised: slower than
# the timed passes, so only the split is read from it)
import collections  # noqa: E402

import hf_paged.graphs as graphs_mod  # noqa: E402

_call = graphs_mod.GraphedForward.__call__
phase_s: collections.Counter = collections.Counter()
phase_n: collections.Counter = collections.Counter()


def _timed_call(self, *a, **kw):
    ids = kw.get("input_ids")
    before = dict(graphs_mod.STATS)
    sync()
    t0 = time.perf_counter()
    out = _call(self, *a, **kw)
    sync()
    if ids is not None and ids.shape[-1] > 1:
        kind = "prefill_forwards"
    elif graphs_mod.STATS["captures"] > before["captures"]:
        kind = "capture_steps"
    elif graphs_mod.STATS["replays"] > before["replays"]:
        kind = "replayed_steps"
    else:
        kind = "eager_decode_steps"  # the verification of a new graph, or graphs off
    phase_s[kind] += time.perf_counter() - t0
    phase_n[kind] += 1
    return out


graphs_mod.GraphedForward.__call__ = _timed_call
for path in () if args.no_ablations else ("unshared", "shared"):
    phase_s.clear()
    phase_n.clear()
    dt, _, _ = timed_pass(path, PrefixCache(max_memory=args.prefix_memory) if path == "shared" else None)
    split = {k: {"seconds": round(v, 3), "calls": phase_n[k]} for k, v in sorted(phase_s.items())}
    emit(what="breakdown", path=path, seconds=round(dt, 3), phases=split,
         outside_forwards_s=round(dt - sum(phase_s.values()), 3))
graphs_mod.GraphedForward.__call__ = _call

speedup = timing["unshared"] / timing["shared"]
emit(what="summary", speedup=round(speedup, 3), shared_vs_stock=round(timing["stock"] / timing["shared"], 3),
     unshared_vs_stock=round(timing["stock"] / timing["unshared"], 3), speedup_with_cascade=round(timing["unshared"] / timing["shared+cascade"], 3),
     target_speedup=2.5,
     computed_over_distinct=[r for r in results if r.get("path") == "shared" and r.get("run") == 2][0]["computed_over_distinct"],
     target_computed_over_distinct=1.1, tokens_equal_rows=f"{sum(equal_rows)}/{len(equal_rows)}",
     fp32_tokens_equal_rows=f"{sum(fp32_equal)}/{len(fp32_equal)}" if check_fp32 else None)

print()
print(f"{'path, run':<36} {'seconds':>9} {'prompt tokens computed':>23} {'/ distinct':>11} {'reused':>9} {'peak GB':>8}")
for r in results:
    if r.get("what") == "run":
        print(f"{r['path'] + ' ' + str(r['run']):<36} {r['seconds']:>9.2f} {r['prompt_tokens_computed']:>23} "
              f"{r['computed_over_distinct']:>11.3f} {r['prompt_tokens_reused']:>9} {str(r['peak_gb']):>8}")
print(f"stock / shared: {timing['stock'] / timing['shared']:.2f}x, stock / unshared: {timing['stock'] / timing['unshared']:.2f}x")
print(f"speedup (unshared / shared): {speedup:.2f}x, with cascade {timing['unshared'] / timing['shared+cascade']:.2f}x; tokens equal on the check batch (within a call and "
      f"across calls): {sum(equal_rows)}/{len(equal_rows)} rows"
      + (f", fp32 2-layer model: {sum(fp32_equal)}/{len(fp32_equal)}" if check_fp32 else ""))
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
record.write("prefix_bench.json")
