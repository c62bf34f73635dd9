"""A decode step's CUDA graph captured whole or in parts (``HF_PAGED_GRAPH_SEGMENTS``): ms per
decode step for 1, 2, 4 and 8 graphs per step, in one process, and stock transformers' step for
reference.

Why parts: the host spends about a millisecond launching a graph of ~1,500 kernels, and
generate synchronises at every step, so the GPU waits for that launch; in parts, the GPU runs the
first while the host launches the rest.

Llama-3.1-8B shape, bf16, random weights; two workloads: 32 prompts of a shared 1,024-token
preamble + 160 own tokens, greedy (prefix_bench's decode step), and 2 prompts of 8k x 16 samples.
ms per step = the difference of two generate lengths (17 and 81 new tokens) within a round, the
median of 3 rounds (and the best), rounds interleaved over the settings; the greedy tokens must be identical for every setting (the same
kernels, launched in parts).

    PYTHONPATH=$PWD python benchmarks/graph_segments_bench.py      # about 2 minutes on an H200
    python benchmarks/graph_segments_bench.py --tiny               # a CPU smoke run (no graphs)

Writes $OUT/graph_segments_bench.json."""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import Record, llama_config
from transformers import AutoModelForCausalLM

import hf_paged  # noqa: F401  (registers attn_implementation="paged")
from hf_paged import cache_of, graphs

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--segments", default="1,2,4,8")
p.add_argument("--rounds", type=int, default=3)
args = p.parse_args()
DEV = "cpu" if args.tiny else "cuda"
record = Record(DEV)
record.versions()
cfg = llama_config(args.tiny)
with torch.device(DEV):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32 if args.tiny else torch.bfloat16,
                                             attn_implementation="sdpa")
model.set_attn_implementation("paged")
model.eval()
model.generation_config.eos_token_id = None
model.generation_config.pad_token_id = 0
g = torch.Generator().manual_seed(1)
P, PRE, OWN = (64, 32, 8) if args.tiny else (8192, 1024, 160)
workloads = {
    "greedy_32x(1024+160)": (torch.cat([torch.randint(1, cfg.vocab_size, (1, PRE), generator=g).expand(32, -1),
                                        torch.randint(1, cfg.vocab_size, (32, OWN), generator=g)], 1).to(DEV),
                             dict(do_sample=False)),
    "sample_2x8k_x16": (torch.randint(1, cfg.vocab_size, (2, P), generator=g).to(DEV),
                        dict(do_sample=True, num_return_sequences=16)),
}
settings = [int(s) for s in args.segments.split(",")]
SHORT, LONG = (3, 6) if args.tiny else (17, 81)


def gen(ids, new, kw, stock=False):
    if stock:
        model.set_attn_implementation("sdpa")
    try:
        torch.manual_seed(5)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                  min_new_tokens=new, return_dict_in_generate=True, **kw)
    finally:
        if stock:
            model.set_attn_implementation("paged")


def wall(ids, new, kw, stock=False):
    record.sync()
    t = time.perf_counter()
    out = gen(ids, new, kw, stock)
    record.sync()
    return time.perf_counter() - t, out


for name, (ids, kw) in workloads.items():
    walls = {s: {SHORT: [], LONG: []} for s in settings}
    tokens, segments_seen = {}, {}
    for s in settings:  # warm-up: compile, capture once per setting
        os.environ[graphs.SEGMENTS_ENV_VAR] = str(s)
        gen(ids, 8, kw)
    for _ in range(args.rounds):
        for s in settings:
            os.environ[graphs.SEGMENTS_ENV_VAR] = str(s)
            for new in (SHORT, LONG):
                dt, out = wall(ids, new, kw)
                walls[s][new].append(dt)
            tokens[s] = out.sequences
            state = cache_of(out).graph_state
            segments_seen[s] = None if state is None or not state.graphs else \
                getattr(next(iter(state.graphs.values())).replay, "segments", None)
    # per round: the step from that round's two lengths; the median over rounds, and the best
    per_round = {s: sorted((lo - sh) / (LONG - SHORT) * 1e3 for sh, lo in zip(walls[s][SHORT], walls[s][LONG]))
                 for s in settings}
    ms = {s: v[len(v) // 2] for s, v in per_round.items()}
    os.environ.pop(graphs.SEGMENTS_ENV_VAR)
    same = {s: bool(torch.equal(tokens[s], tokens[settings[0]])) for s in settings} if not kw["do_sample"] else None
    stock = {new: min(wall(ids, new, kw, stock=True)[0] for _ in range(2 if args.tiny else 1)) for new in (SHORT, LONG)}
    stock_ms = (stock[LONG] - stock[SHORT]) / (LONG - SHORT) * 1e3
    record.emit(what="decode_ms_per_step", workload=name, by_segments={str(s): round(v, 3) for s, v in ms.items()},
                best_round={str(s): round(v[0], 3) for s, v in per_round.items()},
                graphs_per_step=segments_seen, tokens_equal_to_first_setting=same, stock_ms_per_step=round(stock_ms, 3),
                walls={str(s): {str(k): [round(x, 4) for x in v] for k, v in w.items()} for s, w in walls.items()})
os.makedirs(os.environ.get("OUT", "."), exist_ok=True)
record.write("graph_segments_bench.json")
