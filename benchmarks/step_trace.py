"""Where a graphed decode step's wall time goes: a torch.profiler trace (CPU annotations on
generate's and hf-paged's host functions, and every GPU kernel) of 32 replayed decode steps,
parsed into GPU busy time, idle gaps, and what the host was doing during the gaps; and the same
call's ms per step without the profiler (difference of two lengths). Llama-3.1-8B shape, bf16,
random weights, 32 rows: 2 prompts of 8k x 16 samples (cascade off / on) and 32 prompts of a
1,024-token preamble + 160 own tokens, greedy (cascade off / auto).

    PYTHONPATH=$PWD python benchmarks/step_trace.py        # about 1 minute on an H200
    PYTHONPATH=$PWD python benchmarks/step_trace.py --greedy   # the 32-prompt greedy cases only
    PYTHONPATH=$PWD python benchmarks/step_trace.py --dataset  # prefix_bench's batches beside the greedy case
    PYTHONPATH=$PWD python benchmarks/step_trace.py --call     # whole generate calls of prefix_bench's pass
    python benchmarks/step_trace.py --tiny                 # a CPU smoke run of the script itself

Writes $OUT/step_trace.json (or ./step_trace.json)."""
import json, os, sys, time, collections
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks")); sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
TINY = "--tiny" in sys.argv
if TINY:
    os.environ.setdefault("TRITON_INTERPRET", "1"); os.environ.setdefault("HF_PAGED_BACKEND", "triton")
import torch
from torch.profiler import profile, ProfilerActivity, record_function
from bench_common import few_shot_prompts, llama_config
from transformers import AutoModelForCausalLM
from transformers.generation import logits_process, stopping_criteria
import hf_paged
from hf_paged.testing import left_pad
from hf_paged import graphs, cache as cache_mod, forward as fwd_mod, block_table as bt_mod
from hf_paged.kernels import cascade

DEV = "cpu" if TINY else "cuda"
OUT = os.environ.get("OUT", ".")
if TINY:
    graphs._DEVICE_TYPES = ("cuda", "cpu")
    graphs._CAPTURE = lambda run, pool, starts=(): run

def label(obj, attr, name):
    orig = getattr(obj, attr)
    import functools
    @functools.wraps(orig)
    def wrapped(*a, **k):
        with record_function(name):
            return orig(*a, **k)
    setattr(obj, attr, wrapped)

label(graphs.GraphedForward, "__call__", "hfp.forward")
label(cache_mod.PagedCache, "begin_forward", "hfp.begin_forward")
label(cache_mod.PagedCache, "end_forward", "hfp.end_forward")
label(cascade, "plan_shared_prefixes", "hfp.plan_cascade")
label(bt_mod.BlockTables, "plan_forward", "hfp.plan_forward")
label(fwd_mod.ForwardMetadata, "from_plan", "hfp.from_plan")
label(graphs._DecodeGraph, "refresh", "hfp.refresh")
label(graphs._DecodeGraph, "outputs", "hfp.outputs")
label(logits_process.LogitsProcessorList, "__call__", "hf.logits_processors")
label(stopping_criteria.StoppingCriteriaList, "__call__", "hf.stopping")
from transformers.generation import utils as generation_utils  # noqa: E402
label(generation_utils.DeferredStopCheck, "__call__", "hf.deferred_stop_check")  # waits for the step before

cfg = llama_config(TINY)
with torch.device(DEV):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if TINY else torch.bfloat16, attn_implementation="sdpa")
model.set_attn_implementation("paged")
model.eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
label(type(model), "prepare_inputs_for_generation", "hf.prepare_inputs")
label(type(model), "_update_model_kwargs_for_generation", "hf.update_kwargs")
label(type(model), "generate", "hf.generate")
label(type(model), "_prefill", "hf.prefill")
label(cache_mod.PagedCache, "reserve_for_generation", "hfp.reserve")
label(cache_mod.PagedCache, "release_rows", "hfp.release_rows")
label(cache_mod.PagedCache, "grow_layer_pools", "hfp.grow_layer_pools")
from hf_paged import generation as gen_mod  # noqa: E402
label(gen_mod, "prefill_phases", "hfp.prefill_phases")
_capture = graphs._CAPTURE
def _labelled_capture(*a, **k):
    with record_function("hfp.capture"):
        return _capture(*a, **k)
graphs._CAPTURE = _labelled_capture
g = torch.Generator().manual_seed(1)
P = 64 if TINY else 8192
sample_prompts = torch.randint(1, cfg.vocab_size, (2, P), generator=g).to(DEV)
greedy_prompts = torch.cat([torch.randint(1, cfg.vocab_size, (1, 64 if TINY else 1024), generator=g).expand(32, -1),
                            torch.randint(1, cfg.vocab_size, (32, 16 if TINY else 160), generator=g)], 1).to(DEV)

# prefix_bench.py's batches: one preamble, each row its own 32-256-token question, left-padded,
# through a PrefixCache (every call after the first finds the preamble stored)
rows = [torch.cat([greedy_prompts[0, :64 if TINY else 1024].cpu(),
                   torch.randint(1, cfg.vocab_size, (int(n),), generator=g)])
        for n in torch.randint(4 if TINY else 32, 24 if TINY else 257, (32,), generator=g)]
dataset_ids, dataset_mask = left_pad(rows, DEV)
prefix_cache = hf_paged.PrefixCache(max_memory="8GiB")

def gen(workload, new):
    ids = sample_prompts if workload == "sample" else greedy_prompts
    kw = dict(do_sample=True, num_return_sequences=16) if workload == "sample" else dict(do_sample=False)
    mask = torch.ones_like(ids)
    if workload == "dataset":
        ids, mask, kw = dataset_ids, dataset_mask, dict(do_sample=False, prefix_cache=prefix_cache)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **kw)

def sync():
    if DEV == "cuda": torch.cuda.synchronize()

def wall(workload, new):
    sync(); t = time.perf_counter(); gen(workload, new); sync(); return time.perf_counter() - t

def load_trace(trace_path):
    """(GPU events sorted by start, host annotations, CUDA runtime calls) of a chrome trace."""
    ev = [e for e in json.load(open(trace_path))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted([e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")], key=lambda e: e["ts"])
    return gpu, [e for e in ev if e.get("cat") == "user_annotation"], [e for e in ev if e.get("cat") == "cuda_runtime"]

def host_during_gaps(events, gap_list, t0, t1):
    """Microseconds each host event name overlaps the GPU's idle intervals ``gap_list`` within
    [t0, t1] (nested events each count)."""
    c = collections.Counter()
    for e in events:
        s, f = e["ts"], e["ts"] + e["dur"]
        if f < t0 or s > t1: continue
        for a, b in gap_list:
            o = min(f, b) - max(s, a)
            if o > 0: c[e["name"][:50]] += o
    return c

def analyse(trace_path, steps_wanted):
    gpu, ann, rt = load_trace(trace_path)
    fw = sorted([e for e in ann if e["name"] == "hfp.forward"], key=lambda e: e["ts"])
    fw = fw[-(steps_wanted + 1):]
    t0, t1 = fw[0]["ts"], fw[-1]["ts"]
    n = len(fw) - 1
    win = [e for e in gpu if t0 <= e["ts"] < t1]
    busy = sum(e["dur"] for e in win)
    gaps = collections.Counter(); gap_list = []
    end = t0
    for e in win:
        if e["ts"] > end:
            gap = e["ts"] - end
            b = "<3us" if gap < 3 else "3-20us" if gap < 20 else "20-200us" if gap < 200 else ">200us"
            gaps[b] += gap
            gaps[b + " n"] += 1
            if gap >= 20:
                gap_list.append((end, e["ts"]))
        end = max(end, e["ts"] + e["dur"])
    if t1 > end:
        gap_list.append((end, t1)); gaps["tail"] += t1 - end
    host_incl = collections.Counter()
    for e in ann + rt:
        if t0 <= e["ts"] < t1: host_incl[e["name"][:50]] += e["dur"]
    kern = collections.Counter()
    for e in win: kern[e["name"][:50]] += e["dur"]
    return dict(steps=n, wall_ms_per_step=round((t1 - t0) / n / 1e3, 3), gpu_busy_ms_per_step=round(busy / n / 1e3, 3),
                gpu_events_per_step=round(len(win) / n, 1),
                gaps_us_per_step={k: round(v / n, 1) for k, v in sorted(gaps.items())},
                host_during_gaps_us_per_step={k: round(v / n, 1)
                                              for k, v in host_during_gaps(ann + rt, gap_list, t0, t1).most_common(20)},
                host_inclusive_us_per_step={k: round(v / n, 1) for k, v in host_incl.most_common(25)},
                top_kernels_us_per_step={k: round(v / n, 1) for k, v in kern.most_common(12)})

def analyse_call(trace_path):
    """A whole generate call: its wall time, the GPU's busy time, and the GPU's idle time (gaps of
    20 us or more) by the host annotations running during it (nested ones each count)."""
    gpu, ann, rt = load_trace(trace_path)
    ann = ann + rt
    calls = sorted([e for e in ann if e["name"] == "hf.generate"], key=lambda e: e["ts"])
    out = []
    for call in calls:
        t0, t1 = call["ts"], call["ts"] + call["dur"]
        win = [e for e in gpu if t0 <= e["ts"] < t1]
        busy = sum(e["dur"] for e in win)
        gaps, end = [], t0
        for e in win:
            if e["ts"] - end >= 20:
                gaps.append((end, e["ts"]))
            end = max(end, e["ts"] + e["dur"])
        if t1 - end >= 20:
            gaps.append((end, t1))
        idle = host_during_gaps([e for e in ann if e is not call], gaps, t0, t1)
        big = sorted(gaps, key=lambda g: g[0] - g[1])[:12]
        def where(t):  # the innermost hf/hfp annotation open at time t
            open_ = [e for e in ann if e["ts"] <= t < e["ts"] + e["dur"] and e["name"].startswith(("hf", "cuda"))
                     and e is not call]
            return min(open_, key=lambda e: e["dur"])["name"] if open_ else "-"
        out.append(dict(wall_ms=round(call["dur"] / 1e3, 2), gpu_busy_ms=round(busy / 1e3, 2),
                        gpu_idle_ms=round(sum(b - a for a, b in gaps) / 1e3, 2), idle_gaps=len(gaps),
                        idle_ms_by_host_annotation={k: round(v / 1e3, 2) for k, v in idle.most_common(25)},
                        largest_gaps=[dict(at_ms=round((a - t0) / 1e3, 2), ms=round((b - a) / 1e3, 2),
                                           host=where((a + b) / 2)) for a, b in big]))
    return out


res = {}
if "--call" in sys.argv:  # whole calls: where the GPU waits between and around the decode steps
    os.environ["HF_PAGED_CASCADE"] = "auto"
    preamble, questions = (few_shot_prompts(cfg.vocab_size, 16, 64, (4, 24)) if TINY
                           else few_shot_prompts(cfg.vocab_size, 256, 1024, (32, 256)))  # prefix_bench.py's
    size = 8 if TINY else 32
    NEW = 8 if TINY else 64
    batches = [left_pad([preamble + q for q in questions[i:i + size]], DEV) for i in range(0, len(questions), size)]
    for _ in range(2):  # a first pass compiles every shape
        prefix_cache = hf_paged.PrefixCache(max_memory="8GiB")
        for ids, mask in batches:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, prefix_cache=prefix_cache)
    # the pass as prefix_bench times it (a new PrefixCache), its first three calls traced
    prefix_cache = hf_paged.PrefixCache(max_memory="8GiB")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        for ids, mask in batches[:3]:
            with torch.inference_mode():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW,
                               do_sample=False, prefix_cache=prefix_cache)
    path = os.path.join(OUT, "trace_calls.json")
    prof.export_chrome_trace(path)
    res["calls"] = analyse_call(path)
    print(json.dumps(res, indent=1), flush=True)
    if not TINY: os.remove(path)
    json.dump(res, open(os.path.join(OUT, "step_trace_calls.json"), "w"), indent=1)
    raise SystemExit(0)
cases = [("sample", "0"), ("sample", "1"), ("greedy", "0"), ("greedy", "auto")]
if "--greedy" in sys.argv:  # the few-shot shape only (prefix_bench's decode step)
    cases = cases[2:]
if "--dataset" in sys.argv:  # prefix_bench's batches (mixed question lengths, a PrefixCache)
    cases = [("dataset", "auto"), ("greedy", "auto")]
for workload, mode in cases:
    os.environ["HF_PAGED_CASCADE"] = mode
    gen(workload, 8)
    short, long = (3, 6) if TINY else (17, 81)
    ws = min(wall(workload, short) for _ in range(2)); wl = min(wall(workload, long) for _ in range(2))
    per_step = (wl - ws) / (long - short) * 1e3
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV == "cuda" else [])) as prof:
        gen(workload, 6 if TINY else 40)
    path = os.path.join(OUT, f"trace_{workload}_{mode}.json")
    prof.export_chrome_trace(path)
    r = analyse(path, 3 if TINY else 32)
    r["unprofiled_wall_ms_per_step"] = round(per_step, 3)
    res[f"{workload}_cascade{mode}"] = r
    print(json.dumps({f"{workload}_cascade{mode}": r}, indent=1), flush=True)
    if not TINY: os.remove(path)
json.dump(res, open(os.path.join(OUT, "step_trace.json"), "w"), indent=1)
