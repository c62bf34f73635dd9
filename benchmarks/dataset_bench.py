"""A data set whose answers end at different lengths: generate_many against static generate batches.

One random-weight model of the Llama-3.1-8B shape in bf16; every path runs on the SAME model in the
same process. The data set: 256 prompts of 64-1,024 tokens (uniform), whose answers end after a
log-normal number of tokens (median 128, sigma 0.75, clipped to [8, 512]). Random weights never
choose an end token, so each answer's end is given: ``generate_many`` gets it as the request's
``max_new_tokens``, static ``generate`` batches as a stopping criterion that ends each row at its
length (a finished row keeps being computed, padded, until its batch's longest row ends: what an
end token does in a static batch), transformers' ``generate_batch`` machinery as each request's
``max_new_tokens``. Every path produces exactly the same useful tokens.

    python benchmarks/dataset_bench.py                 # about 5 minutes on an H200
    python benchmarks/dataset_bench.py --tiny          # a CPU smoke run of the script itself

Reports useful new tokens/s per path, decode slots doing useful work, and the engine's decode step
(host wall time) against the GPU time of its forward (CUDA graph replay, timed with events).
Writes $OUT/dataset_bench.json.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import time

import torch
from bench_common import Record, llama_config
from transformers import AutoModelForCausalLM, GenerationConfig, StoppingCriteria, StoppingCriteriaList

import hf_paged
from hf_paged.engine import Engine

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--only", default="", help="comma list of: engine,paged128,paged32,stock32,generate_batch")
p.add_argument("--stock-prompts", type=int, default=64,
               help="stock generate runs on the first N prompts only (it is slow); its tokens/s is that subset's")
p.add_argument("--max-batch-tokens", type=int, default=8192, help="generate_many's prefill token budget per step")
args = p.parse_args()

dev = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
record = Record(dev)
emit, sync, results = record.emit, record.sync, record.results


def want(name):
    return not args.only or name in args.only.split(",")


cfg = llama_config(args.tiny)
if args.tiny:
    N_PROMPTS, LO, HI, MEDIAN, CLIP = 24, 8, 64, 12, (2, 40)
    args.stock_prompts = min(args.stock_prompts, 16)
else:
    N_PROMPTS, LO, HI, MEDIAN, CLIP = 256, 64, 1024, 128, (8, 512)

record.versions()

with torch.device(dev):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
model.eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0

rng = random.Random(1)
prompt_lens = [rng.randint(LO, HI) for _ in range(N_PROMPTS)]
answer_lens = [min(CLIP[1], max(CLIP[0], round(math.exp(rng.gauss(math.log(MEDIAN), 0.75)))))
               for _ in range(N_PROMPTS)]
g = torch.Generator().manual_seed(2)
prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in prompt_lens]
emit(what="dataset", prompts=N_PROMPTS, prompt_tokens=sum(prompt_lens), useful_new_tokens=sum(answer_lens),
     answer_median=sorted(answer_lens)[N_PROMPTS // 2], answer_max=max(answer_lens), answer_min=min(answer_lens))


class RowLengths(StoppingCriteria):
    """Row i of a static batch is done after lengths[i] new tokens (where its end token would be)."""

    def __init__(self, start: int, lengths: list[int]):
        self.start = start
        self.lengths = torch.tensor(lengths, device=dev)

    def __call__(self, input_ids, scores, **kwargs):
        return (input_ids.shape[1] - self.start) >= self.lengths


def static_batches(impl: str, batch: int, n: int) -> dict:
    model.set_attn_implementation(impl)
    useful = computed = 0
    sync()
    t = time.perf_counter()
    for i in range(0, n, batch):
        chunk, lengths = prompts[i:min(i + batch, n)], answer_lens[i:min(i + batch, n)]
        width = max(len(x) for x in chunk)
        ids = torch.tensor([[0] * (width - len(x)) + x for x in chunk], device=dev)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk], device=dev)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lengths),
                                 stopping_criteria=StoppingCriteriaList([RowLengths(width, lengths)]))
        steps = out.shape[1] - width
        assert steps == max(lengths), (steps, max(lengths))
        useful += sum(lengths)
        computed += len(chunk) * steps
    sync()
    dt = time.perf_counter() - t
    return dict(prompts=n, batch=batch, seconds=dt, useful_new_tokens=useful, useful_tokens_per_s=useful / dt,
                useful_decode_slots=useful / computed)


def engine_run(n: int, timing: bool) -> dict:
    """generate_many over the first n prompts; with ``timing``, the decode steps' host wall time
    and their graph replays' GPU time."""
    model.set_attn_implementation("paged")
    requests = [hf_paged.Request(prompts[i], max_new_tokens=answer_lens[i]) for i in range(n)]
    walls, engines, prefill_walls = [], [], []
    original_decode, original_init, original_prefill = Engine._decode, Engine.__init__, Engine._prefill

    def prefill(self, finished):
        t0 = time.perf_counter()
        ran = original_prefill(self, finished)
        prefill_walls.append(time.perf_counter() - t0)
        return ran

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        if timing and self.graphs is not None and dev == "cuda":
            self.graphs.replay_events = []
        engines.append(self)

    def decode(self, finished):
        replays = self.graphs.replays if self.graphs is not None else 0
        t0 = time.perf_counter()
        ran = original_decode(self, finished)
        if ran:  # (wall seconds, whether a graph replay served it)
            walls.append((time.perf_counter() - t0, self.graphs is not None and self.graphs.replays > replays))
        return ran

    Engine.__init__, Engine._decode, Engine._prefill = init, decode, prefill
    stats = []
    try:
        sync()
        t = time.perf_counter()
        results_ = hf_paged.generate_many(model, requests, do_sample=False, progress=stats.append,
                                          max_batch_tokens=args.max_batch_tokens)
        sync()
        dt = time.perf_counter() - t
    finally:
        Engine.__init__, Engine._decode, Engine._prefill = original_init, original_decode, original_prefill
    useful = sum(len(r.sequences[0]) for r in results_)
    assert [len(r.sequences[0]) for r in results_] == answer_lens[:n]
    s = stats[-1]
    row = dict(prompts=n, seconds=dt, useful_new_tokens=useful, useful_tokens_per_s=useful / dt,
               useful_decode_slots=s["decode_rows"] / max(1, s["decode_slots"]), decode_steps=s["decode_steps"],
               engine_steps=s["steps"], prompt_tokens=s["prompt_tokens"], preemptions=s["preemptions"],
               peak_blocks=s["peak_blocks"], max_blocks=s["max_blocks"], graph_captures=s["graph_captures"],
               graph_replays=s["graph_replays"], graphs_off=s["graphs_off"],
               prefill_wall_s=sum(prefill_walls), decode_wall_s=sum(w for w, _ in walls))
    engine = engines[-1]
    events = engine.graphs.replay_events if engine.graphs is not None else None
    if timing and events:
        gpu = [a.elapsed_time(b) for a, b in events]  # ms, replayed steps only
        replayed_walls = [w for w, replayed in walls if replayed]
        assert len(replayed_walls) == len(gpu)
        row.update(decode_step_wall_ms=1e3 * sum(w for w, _ in walls) / len(walls),
                   replayed_step_wall_ms=1e3 * sum(replayed_walls) / len(replayed_walls),
                   replay_gpu_ms=sum(gpu) / len(gpu),
                   step_over_gpu=(sum(replayed_walls) * 1e3 / len(replayed_walls)) / (sum(gpu) / len(gpu)))
    return row


if want("engine"):
    engine_run(min(16, N_PROMPTS), timing=False)  # compiles the kernels (graphs are per run)
    emit(what="engine_generate_many", **engine_run(N_PROMPTS, timing=False))
    emit(what="engine_generate_many_timed", **engine_run(N_PROMPTS, timing=True))
if want("paged128"):
    static_batches("paged", 32, 32)  # warm-up
    emit(what="paged_generate", **static_batches("paged", 128, N_PROMPTS))
if want("paged32"):
    emit(what="paged_generate", **static_batches("paged", 32, N_PROMPTS))
if want("stock32"):
    static_batches("sdpa", 32, 32)  # warm-up
    emit(what="stock_generate", **static_batches("sdpa", 32, args.stock_prompts))
if want("generate_batch"):
    model.set_attn_implementation("sdpa")
    try:
        gen_config = GenerationConfig(do_sample=False, eos_token_id=None, pad_token_id=0, max_new_tokens=CLIP[1])
        sync()
        t = time.perf_counter()
        with model.continuous_batching_context_manager(generation_config=gen_config, block=True, timeout=5) as mgr:
            ids = [mgr.add_request(p_, max_new_tokens=n) for p_, n in zip(prompts, answer_lens)]
            got = {}
            while len(got) < len(ids):
                r = mgr.get_result(timeout=1)
                if r is not None and r.is_finished():
                    got[r.request_id] = len(r.generated_tokens)
                elif r is None and not mgr.is_running():
                    raise RuntimeError("generate_batch's manager stopped")
        sync()
        dt = time.perf_counter() - t
        useful = sum(got.values())
        emit(what="hf_generate_batch", prompts=N_PROMPTS, seconds=dt, useful_new_tokens=useful,
             useful_tokens_per_s=useful / dt, all_lengths_right=sorted(got.values()) == sorted(answer_lens))
    except Exception as e:  # report, do not hide
        emit(what="hf_generate_batch", error=repr(e)[:300])

record.write("dataset_bench.json")

print(f"\n{'path':<34} {'prompts':>7} {'seconds':>8} {'useful tok/s':>12} {'useful slots':>12}", file=sys.stderr)
for r in results:
    if "useful_tokens_per_s" in r:
        name = r["what"] + (f" (batch {r['batch']})" if "batch" in r else "")
        slots = "%.0f%%" % (100 * r["useful_decode_slots"]) if "useful_decode_slots" in r else "-"
        print(f"{name:<34} {r['prompts']:>7} {r['seconds']:>8.1f} {r['useful_tokens_per_s']:>12.0f} {slots:>12}",
              file=sys.stderr)
    if "replay_gpu_ms" in r:
        print(f"engine decode step {r['replayed_step_wall_ms']:.2f} ms wall vs {r['replay_gpu_ms']:.2f} ms GPU "
              f"(x{r['step_over_gpu']:.2f}); all decode steps {r['decode_step_wall_ms']:.2f} ms", file=sys.stderr)
