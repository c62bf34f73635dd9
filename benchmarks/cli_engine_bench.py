"""``hf-paged generate`` on the engine (the default) against ``--static-batches``, same process.

No checkpoint is needed: a random-weight model (SmolLM2-135M's shape, or Llama-3.1-8B's with
``--shape llama8b``) is saved once into a temporary folder with a word-level tokenizer ("w0" ..
"w31999"), and a prompts file of ``--prompts`` random prompts of 64..1024 words is written. Speed
does not depend on the weights' values; random weights rarely emit the end token, so every prompt
generates about ``--max-new-tokens`` tokens.

Correctness first: both runs must write one record per prompt, in input order, for the same
prompts. Greedy outputs are compared and the share of identical records printed (bf16 on a GPU:
a padded static batch and the engine's unpadded rows round differently, and random weights make
near-ties common, so this share is a figure, not a check; on the CPU in fp32 (``--tiny``) they
must be identical). Then the closing reports' tokens/s and KV figures side by side.

    python benchmarks/cli_engine_bench.py                            # SmolLM2 shape, 256 prompts
    python benchmarks/cli_engine_bench.py --shape llama8b --prompts 128
    python benchmarks/cli_engine_bench.py --tiny                     # a CPU smoke run
    # several GPUs: the same data set through accelerate (one engine per GPU), then compared:
    python benchmarks/cli_engine_bench.py --launch 2

Prints a table; writes $OUT/cli_engine_bench.json when OUT is set.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3),
    "llama8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=8),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
VOCAB = 32000


def build_model_folder(folder: str, shape: str, dtype) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(folder)
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3, **SHAPES[shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(folder)


def write_prompts(path: str, n: int, lo: int, hi: int) -> None:
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            words = " ".join(f"w{rng.randrange(VOCAB - 4)}" for _ in range(rng.randint(lo, hi)))
            f.write(json.dumps({"prompt": words}) + "\n")


def run_cli(argv: list[str]) -> tuple[int, str, float]:
    from hf_paged import cli

    out = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out):
        rc = cli.main(argv)
    return rc, out.getvalue(), time.perf_counter() - t0


def figures(report: str) -> dict:
    """The closing report's figures (the last report in the text)."""
    found = {}
    m = re.findall(r"(\d+) new tokens in ([\d.]+) s = ([\d.]+) tokens/s", report)
    if m:
        found.update(new_tokens=int(m[-1][0]), generate_s=float(m[-1][1]), tokens_per_s=float(m[-1][2]))
    m = re.findall(r"KV cache \(engine, peak[^)]*\): (\d+) blocks of \d+ tokens = ([\d.]+ \w+)", report)
    if m:
        found.update(peak_blocks=int(m[-1][0]), kv_peak=m[-1][1])
    m = re.findall(r"decode occupancy (\d+)% .*?([\d.]+) rows per decode step, (\d+) preemption", report)
    if m:
        found.update(occupancy_pct=int(m[-1][0]), rows_per_step=float(m[-1][1]), preemptions=int(m[-1][2]))
    m = re.findall(r"KV cache \(peak over batches\): paged used ([\d.]+ \w+)", report)
    if m:
        found.update(kv_peak=m[-1])
    return found


def records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="smollm2", choices=sorted(SHAPES))
    p.add_argument("--prompts", type=int, default=256)
    p.add_argument("--min-words", type=int, default=64)
    p.add_argument("--max-words", type=int, default=1024)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=32, help="--static-batches' batch size")
    p.add_argument("--launch", type=int, default=0, help="also run the engine on N processes (accelerate launch)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny shape, 12 prompts, fp32")
    args = p.parse_args()
    if args.tiny:
        args.shape, args.prompts, args.min_words, args.max_words, args.max_new_tokens = "tiny", 12, 5, 60, 8
        args.batch_size = 4
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    work = tempfile.mkdtemp(prefix="cli-engine-bench-")
    try:
        model_dir, prompts = os.path.join(work, "model"), os.path.join(work, "prompts.jsonl")
        build_model_folder(model_dir, args.shape, dtype)
        write_prompts(prompts, args.prompts, args.min_words, args.max_words)
        base = ["generate", "--model", model_dir, "--prompts", prompts, "--max-new-tokens", str(args.max_new_tokens),
                "--batch-size", str(args.batch_size), "--no-chat", "--max-print-chars", "0"]
        runs = {}
        for name, extra in (("engine", []), ("static", ["--static-batches"])):
            out = os.path.join(work, f"{name}.jsonl")
            rc, text, wall = run_cli([*base, *extra, "--output", out])
            assert rc == 0, f"{name}: exit status {rc}\n{text[-2000:]}"
            runs[name] = {"records": records(out), "wall_s": wall, **figures(text)}
            print(f"{name}: {json.dumps({k: v for k, v in runs[name].items() if k != 'records'})}", flush=True)
        if args.launch > 1:
            out = os.path.join(work, "launched.jsonl")
            cmd = [shutil.which("accelerate") or "accelerate", "launch", "--num_processes", str(args.launch),
                   *([] if cuda else ["--multi_gpu"]), "-m", "hf_paged", *base, "--output", out,
                   *([] if cuda else ["--device", "cpu"])]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": REPO})
            assert proc.returncode == 0, proc.stderr[-3000:]
            runs[f"engine x{args.launch}"] = {"records": records(out), "wall_s": time.perf_counter() - t0,
                                              **figures(proc.stdout)}
        # correctness first: every prompt once, in input order, the same prompts
        expected = [json.loads(line)["prompt"] for line in open(prompts)]
        for name, run in runs.items():
            assert [r["index"] for r in run["records"]] == list(range(len(expected))), name
            assert [r["prompt"] for r in run["records"]] == expected, name
        same = {name: sum(a["outputs"] == b["outputs"] for a, b in zip(run["records"], runs["static"]["records"]))
                for name, run in runs.items()}
        if not cuda:  # fp32 on the CPU: greedy outputs must be identical
            assert all(v == len(expected) for v in same.values()), same
        print(f"\n{args.prompts} prompts of {args.min_words}-{args.max_words} words, {args.max_new_tokens} new tokens, "
              f"{args.shape} shape, {str(dtype).replace('torch.', '')}, "
              f"{torch.cuda.get_device_name() if cuda else 'cpu'}")
        print(f"{'run':<12} {'tokens/s':>9} {'generate s':>10} {'wall s':>7} {'KV peak':>11} {'rows/step':>9} "
              f"{'preempt':>7} {'= static':>9}")
        for name, run in runs.items():
            print(f"{name:<12} {run.get('tokens_per_s', 0):>9.1f} {run.get('generate_s', 0):>10.1f} "
                  f"{run['wall_s']:>7.1f} {run.get('kv_peak', '-'):>11} {run.get('rows_per_step', '-'):>9} "
                  f"{run.get('preemptions', '-'):>7} {same[name]:>5}/{len(expected)}")
        if os.environ.get("OUT"):
            os.makedirs(os.environ["OUT"], exist_ok=True)
            with open(os.path.join(os.environ["OUT"], "cli_engine_bench.json"), "w") as f:
                json.dump({name: {k: v for k, v in run.items() if k != "records"} | {"same_as_static": same[name]}
                           for name, run in runs.items()} | {"args": vars(args)}, f, indent=1)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
