"""On a GPU: generate_many's greedy results against model.generate on each prompt alone (fp32,
tiny models of the tested families), with the decode steps as CUDA graphs and eagerly; prints
the first difference per family. A diagnosis aid; tests/test_cuda.py holds the assertions."""

import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from tiny_models import FAMILIES, make_pair  # noqa: E402

import hf_paged  # noqa: E402

os.environ["HF_PAGED_BACKEND"] = "triton"
g = torch.Generator().manual_seed(1)
prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 40, 17, 3, 61, 9, 33)]
limits = (20, 6, 14, 3, 11, 20, 9)
families = sys.argv[1].split(",") if len(sys.argv) > 1 else sorted(FAMILIES)
for name in families:
    paged, stock = make_pair(name)
    paged, stock = paged.cuda(), stock.cuda()
    refs = []
    for p, n in zip(prompts, limits):
        ids = torch.tensor([p], device="cuda")
        refs.append(stock.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                   do_sample=False, eos_token_id=None, pad_token_id=0)[0, len(p):].tolist())
    for mode in ("1", "0"):
        os.environ["HF_PAGED_CUDA_GRAPHS"] = mode
        seen = []
        try:
            res = hf_paged.generate_many(paged, [hf_paged.Request(p, max_new_tokens=n) for p, n in zip(prompts, limits)],
                                         do_sample=False, eos_token_id=None, pad_token_id=0, progress=seen.append)
            bad = [(i, r.sequences[0], ref) for i, (r, ref) in enumerate(zip(res, refs)) if r.sequences[0] != ref]
            st = seen[-1]
            print(name, "graphs" if mode == "1" else "eager", "OK" if not bad else f"DIFF {len(bad)}: {bad[0]}",
                  {k: st[k] for k in ("graph_captures", "graph_replays", "graphs_off", "decode_rows", "decode_slots")},
                  flush=True)
        except Exception:
            print(name, mode, "ERROR", traceback.format_exc()[-1500:], flush=True)
