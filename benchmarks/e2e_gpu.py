"""End-to-end equality on the GPU: models of SmolLM2-135M's and Llama-3.1-8B's shapes (random
weights: equality does not depend on their values), paged (Triton kernels) vs stock sdpa.

- fp32: greedy on a left-padded batch of very different lengths and beam search (4 beams,
  2 returned) must give the same tokens as stock, with the decode steps replayed as CUDA graphs
  (the default; the replays are counted) and run eagerly (HF_PAGED_CUDA_GRAPHS=0).
- bf16: the logits of one forward over a left-padded batch, compared with an fp32 reference of
  the same weights: paged's error must be of the size of stock's own bf16 error (the tolerance:
  paged max error <= 1.5 x stock's, and the greedy tokens of both bf16 runs are reported).

    python benchmarks/e2e_gpu.py            # writes $OUT/e2e_gpu.json
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged  # noqa: F401
from hf_paged import graphs
from hf_paged.testing import left_padded_batch

assert torch.cuda.is_available(), "run this on a CUDA GPU"
dev = "cuda"
OUT = os.environ.get("OUT", ".")
results = []
failures = []


def emit(**kw):
    print(json.dumps(kw), flush=True)
    results.append(kw)


SHAPES = {
    "smollm2_135m": LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                                max_position_embeddings=8192, rope_theta=100000.0),
    "llama31_8b": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072,
                              rope_theta=500000.0),
}


def batch(lengths, vocab, seed=0):
    return left_padded_batch(lengths, vocab, seed=seed, low=1, device=dev)


def gen(model, ids, mask, **kw):
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **kw)


for name, cfg in SHAPES.items():
    with torch.device(dev):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    ids, mask = batch([7, 300, 96, 511], cfg.vocab_size, seed=1)
    outs = {}
    for impl in ("sdpa", "paged", "paged_eager"):
        model.set_attn_implementation("sdpa" if impl == "sdpa" else "paged")
        os.environ[graphs.ENV_VAR] = "0" if impl == "paged_eager" else "1"
        before = dict(graphs.STATS)
        t = time.perf_counter()
        outs[impl] = (gen(model, ids, mask, max_new_tokens=32, do_sample=False),
                      gen(model, ids[:2], mask[:2], max_new_tokens=16, num_beams=4, num_return_sequences=2,
                          do_sample=False))
        counts = {k: graphs.STATS[k] - before[k] for k in before}
        emit(what="fp32_generate", shape=name, impl=impl, seconds=time.perf_counter() - t, graphs=counts)
        if impl == "paged" and (counts["replays"] == 0 or counts["disabled"]):
            failures.append(f"{name}: the paged decode steps did not run as CUDA graphs ({counts})")
    os.environ.pop(graphs.ENV_VAR, None)
    for impl in ("paged", "paged_eager"):
        for i, mode in enumerate(("greedy", "beam")):
            same = torch.equal(outs["sdpa"][i], outs[impl][i])
            emit(what="fp32_tokens_equal", shape=name, impl=impl, mode=mode, equal=same)
            if not same:
                failures.append(f"{name} fp32 {mode} ({impl})")

    # bf16 logits against an fp32 reference of the same weights
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids, attention_mask=mask).logits.float()
    model.to(torch.bfloat16)
    logits, toks = {}, {}
    for impl in ("sdpa", "paged"):
        model.set_attn_implementation(impl)
        with torch.no_grad():
            cache = hf_paged.PagedCache(config=model.config) if impl == "paged" else None
            logits[impl] = model(ids, attention_mask=mask, past_key_values=cache).logits.float()
        toks[impl] = gen(model, ids, mask, max_new_tokens=32, do_sample=False)
    real = mask.bool()
    err = {impl: (logits[impl] - ref)[real].abs().max().item() for impl in logits}
    between = (logits["paged"] - logits["sdpa"])[real].abs().max().item()
    agree = (toks["sdpa"] == toks["paged"]).float().mean().item()
    ok = err["paged"] <= 1.5 * err["sdpa"]
    emit(what="bf16_logits", shape=name, max_err_vs_fp32_stock=err["sdpa"], max_err_vs_fp32_paged=err["paged"],
         max_diff_paged_vs_stock=between, logit_scale=ref[real].abs().max().item(),
         greedy_token_agreement=agree, within_tolerance=ok)
    if not ok:
        failures.append(f"{name} bf16 logits error {err['paged']:.3g} > 1.5 x stock's {err['sdpa']:.3g}")
    del model, ref, logits
    torch.cuda.empty_cache()

with open(os.path.join(OUT, "e2e_gpu.json"), "w") as f:
    json.dump(results, f, indent=1)
print("FAILURES: " + "; ".join(failures) if failures else "e2e_gpu: all checks passed", file=sys.stderr)
sys.exit(1 if failures else 0)
