"""KV held by the sliding-window layers of a Mistral-shaped model over a long generation (issue 14).

A random-weight model of the Mistral-7B layer shape (hidden 4096, 32 query / 8 KV heads of 128,
sliding window 4,096, bf16; ``--layers`` of them, 4 by default: what a windowed layer holds does
not depend on how many there are, and 32k decode steps of 32 layers would take minutes) generates
32,768 tokens from a 512-token prompt, batch 1, greedy, in one process:

1. paged, window blocks freed (the default): the window layers' blocks in use at the end against
   the window's worth (target <= 1.1x);
2. paged with ``HF_PAGED_WINDOW_BLOCKS=0`` (every block kept, as before), the same generation: the
   same tokens as 1. (the same kernels, launched alike, read the same K/V from other block ids:
   bit-identical), and what it holds;
3. stock transformers (sdpa, its DynamicCache with sliding-window layers) over ``--short-tokens``
   (4,608 by default: past one window, for time; its windowed layers stop growing at one window):
   what it holds, and where its tokens leave paged's (bf16: another attention's rounding).

    python benchmarks/window_bench.py               # about 2 minutes on an H200
    python benchmarks/window_bench.py --tiny        # a CPU smoke run of the script

Prints one JSON line per measurement; writes $OUT/window_bench.json.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import Record
from transformers import AutoModelForCausalLM, MistralConfig

import hf_paged  # noqa: F401  (registers "paged")
from hf_paged import cache_of
from hf_paged.memory import config_bytes_per_token

p = argparse.ArgumentParser()
p.add_argument("--tiny", action="store_true")
p.add_argument("--layers", type=int, default=4)
p.add_argument("--tokens", type=int, default=32768, help="prompt + new tokens")
p.add_argument("--prompt", type=int, default=512)
p.add_argument("--short-tokens", type=int, default=4608)
args = p.parse_args()

dev = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
record = Record(dev)
emit, sync = record.emit, record.sync
record.versions()

if args.tiny:
    cfg = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1000, sliding_window=32, max_position_embeddings=4096)
    total, prompt_len, stock_total = 400, 40, 200
else:
    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=32000,
                        sliding_window=4096, max_position_embeddings=131072, rope_theta=1e6)
    total, prompt_len, stock_total = args.tokens, args.prompt, args.short_tokens
window = cfg.sliding_window
per_layer_token = config_bytes_per_token(cfg, dtype) // cfg.num_hidden_layers  # K+V bytes of a token in one layer

with torch.device(dev):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="paged")
model.eval()
prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(1)).to(dev)


def generate(new_tokens):
    with torch.inference_mode():
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
                              return_dict_in_generate=True)


sequences = {}
for label, env in (("paged_window_blocks_freed", "1"), ("paged_every_block_kept", "0")):
    os.environ["HF_PAGED_WINDOW_BLOCKS"] = env
    if dev == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    sync()
    t = time.perf_counter()
    out = generate(total - prompt_len)
    sync()
    seconds = time.perf_counter() - t
    stats = cache_of(out).memory_stats()
    sequences[label] = out.sequences.cpu()
    if env == "1":
        held_tokens = stats["window_blocks_used"] * stats["block_size"]
    else:
        held_tokens = stats["blocks_used"] * stats["block_size"]
    emit(what="paged", path=label, tokens=total, window=window, layers=cfg.num_hidden_layers, seconds=round(seconds, 2),
         window_layer_tokens_held=held_tokens, window_layer_mib=round(held_tokens * per_layer_token / 2 ** 20, 1),
         over_window=round(held_tokens / window, 3), blocks_used=stats["blocks_used"],
         window_blocks_used=stats.get("window_blocks_used"), window_blocks_total=stats.get("window_blocks_total"),
         peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if dev == "cuda" else None)
    del out
os.environ.pop("HF_PAGED_WINDOW_BLOCKS", None)
same = torch.equal(sequences["paged_window_blocks_freed"], sequences["paged_every_block_kept"])
diverge = None if same else int((sequences["paged_window_blocks_freed"] != sequences["paged_every_block_kept"])
                                .nonzero()[0, 1])
emit(what="tokens_equal", paths=list(sequences), equal=same, first_divergence=diverge, tokens=total)
freed = sequences["paged_window_blocks_freed"][:, :stock_total]

# stock: its DynamicCache over the same weights
model.set_attn_implementation("sdpa")
sync()
t = time.perf_counter()
with torch.inference_mode():
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                         max_new_tokens=stock_total - prompt_len, min_new_tokens=stock_total - prompt_len,
                         do_sample=False, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True)
sync()
cache = out.past_key_values
held = [layer.keys.shape[-2] for layer in cache.layers]
emit(what="stock", tokens=stock_total, seconds=round(time.perf_counter() - t, 2), cache=type(cache).__name__,
     layer_classes=sorted({type(layer).__name__ for layer in cache.layers}), tokens_held_per_layer=held,
     over_window=round(max(held) / window, 3),
     tokens_equal_paged=bool(torch.equal(out.sequences.cpu(), freed)),
     first_divergence_from_paged=None if torch.equal(out.sequences.cpu(), freed)
     else int((out.sequences.cpu() != freed).nonzero()[0, 1]))
record.write("window_bench.json")
