"""End-to-end generate benchmark: stock transformers (sdpa, DynamicCache) vs hf_paged, same process.

One random-weight model of the Llama-3.1-8B shape in bf16 (speed does not depend on the weights'
values); the attention implementation is switched on the SAME model between runs, so both paths
share weights, warm-up and GPU state. Every workload generates a fixed number of tokens
(eos_token_id=None, min_new_tokens=max_new_tokens).

    python benchmarks/generate_bench.py                    # everything (about 10 minutes on an H200)
    python benchmarks/generate_bench.py --only greedy,beam
    python benchmarks/generate_bench.py --tiny             # a CPU smoke run of the script itself

Prints one JSON line per measurement and a table at the end; writes $OUT/generate_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time

import torch
from bench_common import Record, llama_config
from transformers import AutoModelForCausalLM, GenerationConfig

import hf_paged  # noqa: F401 (registers attn_implementation="paged")
from hf_paged import cache_of
from hf_paged.testing import left_padded_batch

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--only", default="")
p.add_argument("--budget-gb", type=float, default=12.0, help="memory budget over weights for the batch test")
p.add_argument("--repeat", type=int, default=1, help="timed rounds per path, alternating; the best counts")
p.add_argument("--full-warmup", action="store_true",
               help="run each workload once per path, untimed, before timing it (stock's DynamicCache is "
                    "much slower until the CUDA allocator holds blocks of every size it grows through)")
p.add_argument("--gc-collect", action="store_true",
               help="call gc.collect() before each run (a user's loop does not: by default the peak is what a "
                    "loop of generate calls gets)")
p.add_argument("--eager-too", action="store_true",
               help="also time the paged path with CUDA graphs off (HF_PAGED_CUDA_GRAPHS=0), one round")
args = p.parse_args()

dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
record = Record(dev)
emit, sync, results = record.emit, record.sync, record.results


def want(name):
    return not args.only or name in args.only.split(",")


cfg = llama_config(args.tiny)
if args.tiny:
    S = dict(B=4, P=32, N=8, beams=2, nrs=2, cb_n=8, budget_new=4, budget_steps=[2, 4, 8])
else:
    S = dict(B=32, P=512, N=256, beams=4, nrs=8, cb_n=256, budget_new=64,
             budget_steps=[32, 64, 96, 128, 192, 256])

record.versions(gc_collect_before_each_run=args.gc_collect)

if dev == "cuda" and want("bw"):
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    sync()
    emit(what="copy_bandwidth", TBps=2 * x.numel() / ((time.perf_counter() - t) / 10) / 1e12)
    del x, y
    torch.cuda.empty_cache()

with torch.device(dev):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
model.eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
sync()
weights = torch.cuda.memory_allocated() if dev == "cuda" else 0
KV_PER_TOKEN = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * (
    2 if dtype == torch.bfloat16 else 4)


def use(impl):
    """sdpa (stock), paged (CUDA graphs of the decode step, the default) or paged_eager (graphs off)."""
    if impl == "paged_eager":
        os.environ["HF_PAGED_CUDA_GRAPHS"] = "0"
    else:
        os.environ.pop("HF_PAGED_CUDA_GRAPHS", None)
    model.set_attn_implementation("sdpa" if impl == "sdpa" else "paged")


def lens_mixed(n, lo, hi, seed=0):
    r = random.Random(seed)
    return [r.randint(lo, hi) for _ in range(n)]


def batch(lengths, seed=0):
    return left_padded_batch(lengths, cfg.vocab_size, seed=seed, low=1, device=dev)


def generate(lengths, new, cache=None, **gen):
    ids, mask = batch(lengths)
    if args.gc_collect:
        gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    extra = {"past_key_values": cache} if cache is not None else {}
    sync()
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                             return_dict_in_generate=True, **gen, **extra)
    sync()
    dt = time.perf_counter() - t
    peak = (torch.cuda.max_memory_allocated() - weights) / 1e9 if dev == "cuda" else 0.0
    return out, dt, peak


def compare(name, lengths, new, **gen):
    """Stock and paged on the same inputs, alternating (stock, paged, stock, paged, ... --repeat
    rounds) so that a drift of the host's speed hits both alike; each path's best round counts."""
    expand = max(gen.get("num_beams", 1), gen.get("num_return_sequences", 1))
    ideal = (sum(lengths) + len(lengths) * expand * new) * KV_PER_TOKEN / 1e9  # distinct prompt + new tokens
    row = {"what": name, "ideal_kv_GB": ideal}
    seqs = {}
    # paged_eager (graphs off) is timed once, after the alternating rounds of the other two
    paths = ("sdpa", "paged") + (("paged_eager",) if args.eager_too else ())

    def timed_round(impl):
        """One timed generate on this path; kept when it is the path's best so far."""
        use(impl)
        if gen.get("do_sample"):
            torch.manual_seed(0)
        out, dt, peak = generate(lengths, new, **gen)
        if impl in row and row[impl]["seconds"] <= dt:
            return
        row[impl] = {"seconds": dt, "new_tokens_per_s": out.sequences.shape[0] * new / dt,
                     "peak_over_weights_GB": peak}
        if impl == "paged":
            stats = cache_of(out).memory_stats()
            row[impl].update(kv_used_GB=stats["bytes_used"] / 1e9, kv_reserved_GB=stats["bytes_reserved"] / 1e9,
                             blocks_shared=stats["blocks_shared"], kv_dense_GB=stats["bytes_dense"] / 1e9)
        seqs[impl] = out.sequences

    if args.full_warmup:
        for impl in paths:
            use(impl)
            generate(lengths, new, **gen)  # result dropped at once: nothing of it counts later
    for _ in range(args.repeat):
        for impl in ("sdpa", "paged"):
            timed_round(impl)
    if args.eager_too:
        timed_round("paged_eager")
    for impl in paths:
        # The same call with one new token: its time is the prefill's, the rest is decode.
        use(impl)
        if gen.get("do_sample"):
            torch.manual_seed(0)
        _, dt1, _ = generate(lengths, 1, **gen)
        row[impl].update(prefill_seconds=dt1,
                         decode_ms_per_step=(row[impl]["seconds"] - dt1) / max(new - 1, 1) * 1e3)
    row["speedup"] = row["sdpa"]["seconds"] / row["paged"]["seconds"]
    row["peak_ratio"] = row["paged"]["peak_over_weights_GB"] / max(row["sdpa"]["peak_over_weights_GB"], 1e-9)
    row["kv_used_over_ideal"] = row["paged"]["kv_used_GB"] / ideal
    same = (seqs["sdpa"] == seqs["paged"]).all(dim=1)
    row["rows_with_identical_tokens"] = f"{int(same.sum())}/{same.numel()}"
    if args.eager_too:
        row["speedup_eager"] = row["sdpa"]["seconds"] / row["paged_eager"]["seconds"]
        row["graphs_vs_eager_identical_rows"] = int((seqs["paged"] == seqs["paged_eager"]).all(dim=1).sum())
    emit(**row)


B, P, N = S["B"], S["P"], S["N"]
# warm-up of both paths (first generate in a process is ~3x slower: kernel load, autotuning)
for impl in ("sdpa", "paged"):
    use(impl)
    generate([P] * B, 8)  # the shapes of the first workload: its prefill GEMMs, allocator pools
    generate([2 * P] * 4, 8, num_beams=S["beams"], do_sample=False)

if want("greedy"):
    compare("greedy_uniform", [P] * B, N)
if want("mixed"):
    compare("greedy_mixed", lens_mixed(B, P // 8, 2 * P), N)
if want("beam"):
    compare("beam", [2 * P] * 4, N // 2, num_beams=S["beams"], do_sample=False)
if want("sample"):
    compare("sample_n", [2 * P] * 4, N // 2, do_sample=True, num_return_sequences=S["nrs"])

if want("dataset"):
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(i)).tolist()
               for i, n in enumerate(lens_mixed(S["cb_n"], P // 8, 2 * P, seed=1))]
    for impl, order in (("sdpa", "given"), ("paged", "given")):
        use(impl)
        todo = sorted(prompts, key=len, reverse=True) if order == "sorted" else prompts
        sync()
        t = time.perf_counter()
        total = 0
        for i in range(0, len(todo), B):
            chunk = todo[i:i + B]
            width = max(len(x) for x in chunk)
            ids = torch.tensor([[0] * (width - len(x)) + x for x in chunk], device=dev)
            mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=dev)
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N, min_new_tokens=N)
            total += len(chunk) * N
        sync()
        dt = time.perf_counter() - t
        emit(what="dataset_static_batches", impl=impl, order=order, prompts=len(prompts), batch=B, seconds=dt,
             new_tokens_per_s=total / dt)
    if want("cb"):
        use("sdpa")
        try:
            gen_config = GenerationConfig(max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
            sync()
            t = time.perf_counter()
            res = model.generate_batch(inputs=prompts, generation_config=gen_config)
            sync()
            dt = time.perf_counter() - t
            total = sum(len(r.generated_tokens) for r in res.values())
            emit(what="dataset_hf_generate_batch", prompts=len(prompts), seconds=dt, new_tokens_per_s=total / dt)
        except Exception as e:  # report, do not hide
            emit(what="dataset_hf_generate_batch", error=repr(e)[:300])

if want("budget") and dev == "cuda":
    # The largest batch of mixed-length prompts (64-1024) whose generate fits a fixed budget of
    # memory over the weights, for each path: peak measured, not estimated.
    budget = args.budget_gb
    for impl in ("sdpa", "paged"):
        use(impl)
        best = 0
        for b in S["budget_steps"]:
            try:
                out, dt, peak = generate(lens_mixed(b, P // 8, 2 * P, seed=2), S["budget_new"])
                del out  # its cache must not count in the next probe's peak
            except torch.OutOfMemoryError:
                break
            emit(what="budget_probe", impl=impl, batch=b, peak_over_weights_GB=peak, seconds=dt)
            if peak > budget:
                break
            best = b
        emit(what="budget_largest_batch", impl=impl, budget_GB=budget, batch=best)

record.write("generate_bench.json")

print("\n{:<18} {:>10} {:>10} {:>8} {:>10} {:>10} {:>8} {:>8} {:>13} {:>13} {:>8}".format(
    "workload", "stock s", "paged s", "speedup", "stock GB", "paged GB", "peak x", "kv/ideal", "stock ms/step",
    "paged ms/step", "eager x"), file=sys.stderr)
for r in results:
    if "sdpa" in r and "paged" in r and isinstance(r["sdpa"], dict):
        print("{:<18} {:>10.2f} {:>10.2f} {:>8.2f} {:>10.2f} {:>10.2f} {:>8.2f} {:>8.2f} {:>13.1f} {:>13.1f} {:>8}".format(
            r["what"], r["sdpa"]["seconds"], r["paged"]["seconds"], r["speedup"], r["sdpa"]["peak_over_weights_GB"],
            r["paged"]["peak_over_weights_GB"], r["peak_ratio"], r["kv_used_over_ideal"],
            r["sdpa"]["decode_ms_per_step"], r["paged"]["decode_ms_per_step"],
            "%.2f" % r["speedup_eager"] if "speedup_eager" in r else "-"), file=sys.stderr)
