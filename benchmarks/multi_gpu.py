"""Paged cache on models larger than one GPU: accelerate's device_map and transformers' tensor
parallelism, each compared token for token with stock transformers under the same layout.

    # device_map: a SmolLM2-shaped model (random fp32 weights) split over 2 GPUs
    python benchmarks/multi_gpu.py device_map

    # tp_plan="auto": a Llama-shaped model whose head counts divide by 2, 2 ranks
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/multi_gpu.py tp

Each mode prints one JSON line per check and exits non-zero if any tokens differ.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import hf_paged  # noqa: F401
from hf_paged.testing import left_padded_batch

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts


def batch(lengths, vocab, device, seed=0):
    return left_padded_batch(lengths, vocab, seed=seed, low=1, device=device)


def checks(model, ids, mask):
    kw = dict(pad_token_id=0, eos_token_id=None, do_sample=False)
    with torch.no_grad():
        greedy = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=24, **kw)
        beam = model.generate(input_ids=ids[:2], attention_mask=mask[:2], max_new_tokens=12, num_beams=4,
                              num_return_sequences=2, **kw)
    return greedy, beam


def save_random(cfg, folder):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), dtype=torch.float32)
    model.save_pretrained(folder)


def device_map_mode():
    assert torch.cuda.device_count() >= 2, "device_map mode needs 2 GPUs"
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                      max_position_embeddings=8192)
    layout = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.norm": 1, "lm_head": 1}
    layout.update({f"model.layers.{i}": (0 if i < 15 else 1) for i in range(30)})
    failures = 0
    with tempfile.TemporaryDirectory() as folder:
        save_random(cfg, folder)
        results = {}
        for impl in ("sdpa", "paged"):
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=layout,
                                                         attn_implementation=impl).eval()
            ids, mask = batch([7, 300, 96, 200], cfg.vocab_size, "cuda:0", seed=1)
            results[impl] = checks(model, ids, mask)
            if impl == "paged":
                with torch.no_grad():
                    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                                         eos_token_id=None, return_dict_in_generate=True)
                cache = out["cache"] if "cache" in out else out["past_key_values"]
                pools = sorted({str(k.device) for k in cache.key_cache})
                print(json.dumps({"what": "device_map_pools", "devices": pools}))
            del model
        for i, mode in enumerate(("greedy", "beam")):
            same = torch.equal(results["sdpa"][i].cpu(), results["paged"][i].cpu())
            failures += not same
            print(json.dumps({"what": "device_map_tokens_equal", "mode": mode, "equal": same}))
    return failures


def tp_mode():
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
                      num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096)
    folder = "/tmp/hf_paged_tp_model"
    if rank == 0:
        save_random(cfg, folder)
    dist.init_process_group("nccl") if not dist.is_initialized() else None
    dist.barrier()
    failures = 0
    results = {}
    for impl in ("sdpa", "paged"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, tp_plan="auto",
                                                     attn_implementation=impl).eval()
        ids, mask = batch([9, 150, 64], cfg.vocab_size, model.device, seed=2)
        results[impl] = checks(model, ids, mask)
        del model
    for i, mode in enumerate(("greedy", "beam")):
        same = torch.equal(results["sdpa"][i], results["paged"][i])
        failures += not same
        if rank == 0:
            print(json.dumps({"what": "tp_tokens_equal", "ranks": dist.get_world_size(), "mode": mode,
                              "equal": same}))
    dist.destroy_process_group()
    return failures


if __name__ == "__main__":
    mode = sys.argv[1] if len(sys.argv) > 1 else "device_map"
    n_fail = device_map_mode() if mode == "device_map" else tp_mode()
    sys.exit(1 if n_fail else 0)
