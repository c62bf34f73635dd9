"""pass@1 and pass@k on HumanEval with a paged KV cache.

    python examples/evaluate_humaneval.py --limit 20 --k 4          # SmolLM2-135M-Instruct
    python examples/evaluate_humaneval.py --model /path/to/model --k 10
    python examples/evaluate_humaneval.py --static-batches --batch-size 8   # model.generate batches

The problems run through the continuous-batching engine (``hf_paged.iter_generate_many``): each
problem is one request with num_return_sequences=k, whose k sequences fork after one prefill of the
prompt and share its KV blocks (copy-on-write); a problem whose samples are done leaves the batch
and the next one takes its place. With ``--static-batches``, batches of ``--batch-size`` problems
go through ``model.generate`` with num_return_sequences=k instead (the rows of a problem share its
blocks there too). Completions end at HumanEval's stop sequences and each one is tested in a
separate Python subprocess with a timeout (never in this process). pass@k uses the unbiased
estimator of Chen et al. (2021).

WARNING: this executes model-generated code (in a subprocess, in a temporary folder, with a
timeout, but otherwise unsandboxed). Run it on a machine where that is acceptable.

The core is ``run_eval(...) -> dict``, importable from tests.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import hf_paged  # registers attn_implementation="paged"

# Completion style (base models): the model continues the prompt's function body, which ends at
# the first of these.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
# Chat style (instruct models): the model writes the whole function in a ```python block (helper
# functions included), which ends at the closing fence or at top-level test code.
CHAT_STOP_SEQUENCES = ("\n```", "\nif __name__", "\nprint(")
CHAT_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"


def format_prompt(problem_prompt: str, tokenizer, style: str) -> str:
    """The text fed to the model. ``completion``: the HumanEval prompt as is. ``chat``: a user
    message asking for the function, and the assistant's answer opened with a python fence."""
    if style == "completion":
        return problem_prompt
    message = [{"role": "user", "content": CHAT_INSTRUCTION.format(prompt=problem_prompt)}]
    return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True) + "```python\n"


def resolve_style(style: str, tokenizer) -> str:
    if style == "auto":
        return "chat" if getattr(tokenizer, "chat_template", None) else "completion"
    if style not in ("chat", "completion"):
        raise ValueError(f"prompt style must be auto, chat or completion, got {style!r}")
    return style


def truncate_completion(text: str, stops=STOP_SEQUENCES) -> str:
    """Cut a completion at the first stop sequence (the function body ends there)."""
    cut = len(text)
    for stop in stops:
        i = text.find(stop)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimator of pass@k from n samples of which c pass: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def check_completion(problem: dict, completion: str, timeout: float = 10.0) -> bool:
    """Run the problem's tests on prompt + completion in a fresh Python subprocess."""
    program = (
        problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n" + f"check({problem['entry_point']})\n"
    )
    with tempfile.TemporaryDirectory(prefix="humaneval-") as tmp:
        try:
            proc = subprocess.run(
                [sys.executable, "-I", "-c", program],  # -I: isolated (no site, no cwd on sys.path)
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def load_model(model_path=None, device=None, dtype=None, attn_implementation="paged"):
    """(model, tokenizer) of a local checkpoint, or of the embedded SmolLM2-135M-Instruct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_paged.cli.real_model import prepare_tokenizer, smollm2_path

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path = model_path or smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def run_eval(
    model=None,
    tokenizer=None,
    *,
    model_path=None,
    limit: int | None = None,
    k: int = 4,
    batch_size: int = 4,
    max_new_tokens: int = 128,
    temperature: float = 0.8,
    top_p: float = 0.95,
    device=None,
    dtype=None,
    seed: int = 0,
    prompt_style: str = "auto",
    timeout: float = 10.0,
    workers: int = 2,
    progress: bool = True,
    static_batches: bool = False,
) -> dict:
    """Sample k completions per HumanEval problem and test them; returns a dict with ``pass@1``,
    ``pass@k``, ``k``, ``problems``, ``samples``, ``new_tokens``, ``wall_s`` (generation only),
    ``tokens_per_s``, KV memory (``kv_bytes_used``: the peak; with ``static_batches`` also
    ``kv_bytes_dense``, ``blocks_shared``, ``saving``: peaks over batches; on the engine its
    counters in ``engine``) and per-problem ``results``.

    ``prompt_style``: ``completion`` feeds the raw HumanEval prompt and cuts the continuation at
    :data:`STOP_SEQUENCES`; ``chat`` (for instruct models) asks for the function in the chat
    template and tests the whole function the model writes (defined after the prompt, so it
    replaces the prompt's stub); ``auto`` picks ``chat`` when the tokenizer has a chat template."""
    from tqdm.auto import tqdm

    from hf_paged.cli.prompts import load_humaneval

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if model is None:
        model, tokenizer = load_model(model_path, device, dtype)
    style = resolve_style(prompt_style, tokenizer)
    stops = CHAT_STOP_SEQUENCES if style == "chat" else STOP_SEQUENCES
    problems = list(load_humaneval(limit=limit))
    texts = [format_prompt(p["prompt"], tokenizer, style) for p in problems]
    settings = dict(do_sample=True, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                    stop_strings=list(stops), pad_token_id=tokenizer.pad_token_id)  # a sample ends with its function
    generate = _generate_static if static_batches else _generate_engine
    texts_k, new_tokens, gen_time, memory = generate(model, tokenizer, texts, k, settings, seed=seed,
                                                     batch_size=batch_size, progress=progress)
    # chat style: the model's whole function goes after the prompt (whose stub it redefines)
    completions = [["\n" + c if style == "chat" else c for c in (truncate_completion(t, stops) for t in texts_k[i])]
                   for i in range(len(problems))]

    # Test every completion in its own subprocess (a few in parallel).
    jobs = [(i, s) for i in range(len(problems)) for s in range(k)]
    passed = [[False] * k for _ in problems]
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(check_completion, problems[i], completions[i][s], timeout): (i, s) for i, s in jobs}
        for fut in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="testing",
                        unit="sample", disable=not progress, file=sys.stderr):
            i, s = futures[fut]
            passed[i][s] = fut.result()

    results = [
        {"task_id": p["task_id"], "passed": passed[i], "completions": completions[i]} for i, p in enumerate(problems)
    ]
    p1 = float(np.mean([pass_at_k(k, sum(r["passed"]), 1) for r in results])) if results else 0.0
    pk = float(np.mean([pass_at_k(k, sum(r["passed"]), k) for r in results])) if results else 0.0
    return {
        "problems": len(problems),
        "prompt_style": style,
        "k": k,
        "samples": len(problems) * k,
        "pass@1": p1,
        f"pass@{k}": pk,
        "pass@k": pk,
        "new_tokens": new_tokens,
        "wall_s": gen_time,
        "tokens_per_s": new_tokens / gen_time if gen_time else 0.0,
        **memory,
        "results": results,
    }


def _generate_engine(model, tokenizer, texts, k, settings, *, seed, batch_size, progress):
    """All problems through the engine; returns (k texts per problem, new tokens, seconds, memory)."""
    from tqdm.auto import tqdm

    from hf_paged.cli.engine_jobs import EngineProgress, engine_figures

    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    out: list[list[str]] = [[] for _ in texts]
    stats, new_tokens = {}, 0
    bar = tqdm(total=len(texts), desc="generating", unit="problem", disable=not progress, file=sys.stderr)
    moved = EngineProgress(bar)

    def on_step(s):
        stats.update(s)
        if progress:
            moved(s)

    t0 = time.perf_counter()
    try:
        for res in hf_paged.iter_generate_many(model, ids, tokenizer=tokenizer, seed=seed, progress=on_step,
                                               num_return_sequences=k, **settings):
            out[res.index] = res.texts
            new_tokens += sum(len(s) for s in res.sequences)  # up to and including the end token
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
    finally:
        bar.close()
    figures = engine_figures(stats, model)
    return out, new_tokens, time.perf_counter() - t0, {"kv_bytes_used": figures["peak_bytes"], "engine": figures}


def _generate_static(model, tokenizer, texts, k, settings, *, seed, batch_size, progress):
    """Batches of ``batch_size`` problems through ``model.generate``, longest prompts first (a
    batch holds similar lengths), k rows per problem; returns as :func:`_generate_engine`."""
    from tqdm.auto import tqdm

    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    out: list[list[str]] = [[] for _ in texts]
    new_tokens, gen_time = 0, 0.0
    peak = {"bytes_used": 0, "bytes_dense": 0, "blocks_shared": 0}
    eos = tokenizer.eos_token_id
    for batch in tqdm(batches, desc="generating", unit="batch", disable=not progress, file=sys.stderr):
        enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False)
        enc = enc.to(model.device)
        torch.manual_seed(seed)
        t0 = time.perf_counter()
        with torch.inference_mode():
            result = model.generate(**enc, num_return_sequences=k,  # k rows per prompt, sharing its KV blocks
                                    tokenizer=tokenizer, return_dict_in_generate=True, **settings)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        gen_time += time.perf_counter() - t0
        generated = result.sequences[:, enc["input_ids"].shape[1]:]
        for row in generated.tolist():  # tokens up to and including EOS (not the pads after it)
            new_tokens += row.index(eos) + 1 if eos in row else len(row)
        decoded = tokenizer.batch_decode(generated, skip_special_tokens=True)
        for j, i in enumerate(batch):
            out[i] = decoded[j * k : (j + 1) * k]
        cache = hf_paged.cache_of(result)
        if hasattr(cache, "memory_stats"):  # a PagedCache (attn_implementation="paged")
            stats = cache.memory_stats()
            for key in peak:
                peak[key] = max(peak[key], int(stats[key]))
        del result, cache
    memory = {"kv_bytes_used": peak["bytes_used"], "kv_bytes_dense": peak["bytes_dense"],
              "blocks_shared": peak["blocks_shared"],
              "saving": peak["bytes_dense"] / peak["bytes_used"] if peak["bytes_used"] else 0.0}
    return out, new_tokens, gen_time, memory


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=None, help="first N problems (default: all 164)")
    parser.add_argument("--k", type=int, default=4, help="samples per problem (num_return_sequences); reports pass@1 and pass@k")
    parser.add_argument("--static-batches", action="store_true",
                        help="batches of model.generate instead of the continuous-batching engine (the default)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="with --static-batches: problems per generate call (rows = batch size x k)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-style", default="auto", choices=["auto", "chat", "completion"],
                        help="chat: ask an instruct model for the function; completion: continue the raw "
                        "prompt (auto: chat when the tokenizer has a chat template)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per test subprocess")
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    res = run_eval(
        model_path=args.model, limit=args.limit, k=args.k, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        device=args.device, dtype=dtype, seed=args.seed, prompt_style=args.prompt_style, timeout=args.timeout,
        static_batches=args.static_batches,
    )
    mib = 2**20
    print(f"HumanEval: {res['problems']} problems x {res['k']} samples ({res['prompt_style']} prompts, "
          f"T={args.temperature}, top_p={args.top_p}, max_new_tokens={args.max_new_tokens})")
    print(f"  pass@1 = {res['pass@1']:.3f}   pass@{res['k']} = {res['pass@k']:.3f}")
    print(f"  generation: {res['new_tokens']} new tokens in {res['wall_s']:.1f} s = {res['tokens_per_s']:.1f} tokens/s")
    engine = res.get("engine")
    if engine:
        rows, slots = engine["decode_rows"], engine["decode_slots"]
        print(f"  engine: {engine['steps']} steps, decode occupancy {100 * rows / max(slots, 1):.0f}% "
              f"({rows / max(engine['decode_steps'], 1):.1f} rows per decode step), {engine['preemptions']} preemption(s)")
        print(f"  KV cache (peak): {engine['peak_blocks']} blocks of {engine['block_size']} tokens = "
              f"{res['kv_bytes_used'] / mib:.1f} MiB (the k samples of a problem share its prompt's blocks)")
    else:
        print(f"  KV cache (peak over batches): paged {res['kv_bytes_used'] / mib:.1f} MiB "
              f"({res['blocks_shared']} blocks shared) vs stock dense {res['kv_bytes_dense'] / mib:.1f} MiB"
              + (f" -> {res['saving']:.2f}x less" if res["saving"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
