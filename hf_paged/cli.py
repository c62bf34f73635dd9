"""``hf-paged`` command line (also ``python -m hf_paged``).

    hf-paged                      # the demo: SmolLM2-135M-Instruct on the built-in prompts
    hf-paged generate --prompts questions.txt --max-new-tokens 64 --output out.jsonl
    hf-paged generate --prompts data.jsonl --field question --num-beams 4 --compare-stock

``generate`` loads a causal LM with ``attn_implementation="paged"``, runs ``model.generate`` over
batches of prompts (sorted by length, longest first, so that a batch holds similar lengths), writes
each finished batch's outputs to ``--output`` (see output_file.py: in the original prompt order once
the run completes) and closes with a report of speed and KV-cache memory: what the paged cache used
and what stock transformers' dense cache would have held.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .cache import DEFAULT_BLOCK_SIZE, _config_bytes_per_token, backend_name, cache_of
from .output_file import OutputFile, OutputFileError, check_output_path
from .testing import dense_cache_bytes

SUBCOMMANDS = ("generate",)

# The demo (no --prompts and no decoding options): three jobs on the built-in prompts.
DEMO_SAMPLE_TASK = "HumanEval/53"
DEMO_BEAM_QUESTION = 2  # index into prompts.CHAT_QUESTIONS ("Explain ... why the sky is blue.")


# =============================================================================== arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hf-paged",
        description="Paged KV cache (PagedAttention) for a plain transformers model.generate. "
        "Without a subcommand, runs 'generate' (with no options: the demo on SmolLM2-135M-Instruct).",
    )
    sub = parser.add_subparsers(dest="command", metavar="{generate}")
    g = sub.add_parser(
        "generate",
        help="generate text for a set of prompts with the paged KV cache",
        description="Generate for a set of prompts with attn_implementation='paged' and report speed "
        "and KV-cache memory. With neither --prompts nor decoding options (--num-beams, "
        "--num-return-sequences, --do-sample), runs the demo: a greedy batch of chat questions, "
        "4 samples of a HumanEval prompt, and a beam search (4 beams, 2 returned).",
    )
    m = g.add_argument_group("model")
    m.add_argument("--model", metavar="PATH", help="a local causal-LM checkpoint (default: the embedded SmolLM2-135M-Instruct)")
    m.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights' dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    m.add_argument("--device", default="auto", help="cuda, cuda:1, cpu ... (auto: cuda if available, else cpu)")
    m.add_argument("--attn-implementation", default="paged",
                   help="attention implementation (default: paged; 'sdpa' runs stock transformers)")
    p = g.add_argument_group("prompts")
    p.add_argument("--prompts", metavar="SOURCE",
                   help="a .txt file (one prompt per line), a .jsonl/.json file, or a local datasets "
                   "folder/cached name (default: the built-in prompts)")
    p.add_argument("--field", help="the JSON/dataset field holding the prompt (default: 'prompt', else 'text')")
    p.add_argument("--split", help="dataset split (default: train)")
    p.add_argument("--limit", type=int, help="use only the first N prompts")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="wrap prompts in the tokenizer's chat template (default: on when the tokenizer has one)")
    d = g.add_argument_group("decoding")
    d.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default: 8)")
    d.add_argument("--max-new-tokens", type=int, default=48, help="default: 48")
    d.add_argument("--num-beams", type=int, default=None, help="beam search with N beams")
    d.add_argument("--num-return-sequences", type=int, default=None, help="sequences returned per prompt")
    d.add_argument("--do-sample", action="store_true", default=None, help="sample instead of greedy/beam decoding")
    d.add_argument("--temperature", type=float, default=None, help="sampling temperature (default: 0.8 when sampling)")
    d.add_argument("--top-p", type=float, default=None, help="nucleus sampling (default: 0.95 when sampling)")
    d.add_argument("--seed", type=int, default=0, help="random seed, set before each batch (default: 0)")
    c = g.add_argument_group("paged cache")
    c.add_argument("--block-size", type=int, default=None,
                   help=f"tokens per KV block (default: {DEFAULT_BLOCK_SIZE}; a multiple of 16 for the Triton kernels)")
    c.add_argument("--max-memory", default=None, help="cap on the KV pool, e.g. 2GiB, 512MB")
    o = g.add_argument_group("output")
    o.add_argument("--output", metavar="FILE.jsonl",
                   help="write {index, prompt, outputs} per prompt as batches finish; in the original order at the end")
    existing = o.add_mutually_exclusive_group()
    existing.add_argument("--resume", action="store_true",
                          help="continue an existing --output file: skip the prompts it already holds")
    existing.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    o.add_argument("--compare-stock", action="store_true",
                   help="also run stock transformers (sdpa) on the same batches: token equality, time, memory")
    o.add_argument("--max-print-chars", type=int, default=160, help="truncate printed texts (0: print nothing)")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in SUBCOMMANDS and argv[0] not in ("-h", "--help")):
        argv = ["generate", *argv]
    args = build_parser().parse_args(argv)
    if args.command is None:
        args.command = "generate"
    _validate(args)
    return args


def _error(exc_or_msg) -> str:
    msg = str(exc_or_msg)
    return "hf-paged: error: " + (msg[len("hf_paged: "):] if msg.startswith("hf_paged: ") else msg)


def _validate(args) -> None:
    def err(msg):  # one line and exit status 2, as argparse's own errors
        print(_error(msg), file=sys.stderr)
        raise SystemExit(2)

    for name in ("batch_size", "max_new_tokens", "num_beams", "num_return_sequences", "block_size"):
        v = getattr(args, name)
        if v is not None and v < 1:
            err(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.limit is not None and args.limit < 0:
        err(f"--limit must be >= 0, got {args.limit}")
    if args.num_return_sequences and args.num_beams and args.num_return_sequences > args.num_beams:
        err(f"--num-return-sequences ({args.num_return_sequences}) cannot exceed --num-beams ({args.num_beams})")
    if args.num_return_sequences and args.num_return_sequences > 1 and not args.num_beams and not args.do_sample:
        err("--num-return-sequences > 1 needs --do-sample or --num-beams (greedy decoding returns one sequence)")
    if args.max_memory is not None:
        try:
            parse_memory(args.max_memory)
        except ValueError as e:
            err(str(e))
    if (args.resume or args.overwrite) and not args.output:
        err(f"--{'resume' if args.resume else 'overwrite'} applies to an --output file; none given")


def is_demo(args) -> bool:
    """No prompts and no decoding options given: run the three demo jobs."""
    return args.prompts is None and args.num_beams is None and args.num_return_sequences is None and not args.do_sample


def parse_memory(value) -> int:
    from .cache import parse_memory as _parse

    return _parse(value, name="--max-memory")


class InputError(ValueError):
    """Bad input found before the model is loaded (exit status 2)."""


def check_block_size(args, device) -> None:
    """The Triton kernels take multiples of 16 only; the PyTorch backend (the CPU's) any size."""
    if args.block_size is None or args.block_size % 16 == 0 or args.attn_implementation != "paged":
        return
    if backend_name(device) == "triton":
        raise InputError(
            f"--block-size {args.block_size} is not supported by the Triton kernels (used on CUDA devices and "
            "with HF_PAGED_BACKEND=triton): use a multiple of 16, e.g. 16 or 32"
        )


def read_model_config(path):
    """The model's config, read before its weights: a folder that is not a checkpoint fails in one
    line instead of a traceback from deep inside from_pretrained."""
    from transformers import AutoConfig

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise InputError(f"model folder '{path}' has no config.json: not a transformers checkpoint folder")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"cannot read the model config in '{path}': {reason}") from None


def check_max_memory(args, config, dtype) -> None:
    """``--max-memory`` must hold one KV block at least; a block's bytes come from the config
    (layers x KV heads x head dims x dtype bytes per token), so the weights need not be loaded."""
    if args.max_memory is None or args.attn_implementation != "paged":
        return
    text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    per_token = _config_bytes_per_token(text_config, dtype)
    block_size = args.block_size or DEFAULT_BLOCK_SIZE
    cap = parse_memory(args.max_memory)
    if per_token and cap < per_token * block_size:  # per_token 0: the config does not say (the cache will)
        raise InputError(
            f"--max-memory {args.max_memory} is {cap} bytes, less than one KV block: {per_token * block_size} bytes "
            f"({per_token} bytes per token x block size {block_size}, {str(dtype).replace('torch.', '')}). "
            "Raise --max-memory or lower --block-size."
        )


# =============================================================================== jobs
@dataclass
class Job:
    """One set of prompts decoded with one set of generation options."""

    name: str
    prompts: list  # list[prompts.Prompt]
    gen_kwargs: dict
    batch_size: int = 8


@dataclass
class JobResult:
    job: Job
    outputs: list  # per prompt (original order): list of generated texts; None for a prompt skipped
    skipped: int = 0  # prompts not computed: already in the output file
    new_tokens: int = 0
    sequences: int = 0
    wall_s: float = 0.0
    batch_stats: list = field(default_factory=list)  # memory_stats() per batch
    stock: dict | None = None  # --compare-stock: wall_s, kv_bytes (peak), tokens_equal, mismatches
    report: dict = field(default_factory=dict)


def generation_kwargs(args) -> dict:
    kw = {"max_new_tokens": args.max_new_tokens}
    if args.num_beams is not None:
        kw["num_beams"] = args.num_beams
    if args.num_return_sequences is not None:
        kw["num_return_sequences"] = args.num_return_sequences
    kw["do_sample"] = bool(args.do_sample)
    if args.do_sample:
        kw["temperature"] = args.temperature if args.temperature is not None else 0.8
        kw["top_p"] = args.top_p if args.top_p is not None else 0.95
    return kw


def demo_jobs(args) -> list[Job]:
    from .prompts import builtin_prompts

    prompts = builtin_prompts()
    chat = [p for p in prompts if p.kind == "chat"]
    code = {p.name: p for p in prompts if p.kind == "code"}
    n = args.max_new_tokens
    return [
        Job(f"greedy: {len(chat)} chat questions", chat, {"max_new_tokens": n, "do_sample": False}, args.batch_size),
        Job(
            f"sampling: 4 completions of {DEMO_SAMPLE_TASK} (num_return_sequences=4)",
            [code[DEMO_SAMPLE_TASK]],
            {"max_new_tokens": n, "do_sample": True, "temperature": 0.8, "top_p": 0.95, "num_return_sequences": 4},
        ),
        Job(
            "beam search: num_beams=4, num_return_sequences=2",
            [chat[DEMO_BEAM_QUESTION]],
            {"max_new_tokens": n, "do_sample": False, "num_beams": 4, "num_return_sequences": 2},
        ),
    ]


CODE_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"


def format_prompt(prompt, tokenizer, chat: bool) -> str:
    """The text fed to the tokenizer. With ``chat`` (and a chat template): chat and file prompts
    become a user message; code prompts (HumanEval) a request for the function, with the
    assistant's answer opened by a python fence so that the model writes code. Without: as is."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return prompt.text
    if prompt.kind == "code":
        message = [{"role": "user", "content": CODE_INSTRUCTION.format(prompt=prompt.text)}]
        return tokenizer.apply_chat_template(message, tokenize=False, add_generation_prompt=True) + "```python\n"
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}], tokenize=False, add_generation_prompt=True
    )


def plan_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prompt indices grouped into batches, sorted by length, longest first (ties keep order)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def count_new_tokens(generated, stop_ids) -> int:
    """Tokens generated per row up to and including the first stop token (later pads not counted)."""
    total = 0
    stop = set(stop_ids)
    for row in generated.tolist():
        n = len(row)
        for j, tok in enumerate(row):
            if tok in stop:
                n = j + 1
                break
        total += n
    return total


def _stop_ids(model, tokenizer) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    return sorted(set(int(i) for i in ids))


def cache_kwarg_name() -> str:
    """generate's keyword for a user cache: ``cache`` from transformers 5.2x (``past_key_values``
    still works there but warns), ``past_key_values`` before."""
    import dataclasses

    from transformers.generation.utils import GenerateDecoderOnlyOutput

    names = {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)}
    return "cache" if "cache" in names else "past_key_values"


def kv_stats(cache) -> dict:
    """``memory_stats()`` of a PagedCache; for a stock cache, its measured bytes as both used and dense."""
    if cache is not None and hasattr(cache, "memory_stats"):
        return dict(cache.memory_stats())
    n = dense_cache_bytes(cache) if cache is not None else 0
    return {"bytes_used": n, "bytes_dense": n, "bytes_reserved": n, "blocks_shared": 0, "blocks_used": 0,
            "paged": False}


def build_report(batch_stats: list[dict], *, prompts: int, sequences: int, new_tokens: int, wall_s: float,
                 stock: dict | None = None, skipped: int = 0) -> dict:
    """The closing report of one job: ``prompts`` computed in this run, ``skipped`` ones already in
    the output file. Memory figures are peaks over batches (batches run one after another; each
    batch's cache is freed before the next)."""

    def peak(key):
        return max((int(s.get(key, 0)) for s in batch_stats), default=0)

    used, dense = peak("bytes_used"), peak("bytes_dense")
    report = {
        "prompts": prompts,
        "skipped": skipped,
        "sequences": sequences,
        "batches": len(batch_stats),
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": new_tokens / wall_s if wall_s > 0 else 0.0,
        "kv_bytes_used": used,
        "kv_bytes_reserved": peak("bytes_reserved"),
        "kv_bytes_dense": dense,
        "blocks_used": peak("blocks_used"),
        "blocks_shared": peak("blocks_shared"),
        "saving": dense / used if used else 0.0,
        "paged": all(s.get("paged", True) for s in batch_stats),
    }
    if stock is not None:
        report["stock"] = dict(stock)
        if stock.get("wall_s"):
            report["stock"]["tokens_per_s"] = stock.get("new_tokens", new_tokens) / stock["wall_s"]
    return report


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def format_report(report: dict, title: str = "") -> str:
    lines = []
    if title:
        lines.append(f"-- report: {title}")
    lines.append(
        f"   {report['prompts']} prompt(s), {report['sequences']} sequence(s), {report['batches']} batch(es): "
        f"{report['new_tokens']} new tokens in {report['wall_s']:.1f} s = {report['tokens_per_s']:.1f} tokens/s"
        + (f"; {report['skipped']} skipped (already in the output file)" if report.get("skipped") else "")
    )
    if not report["batches"]:  # every prompt was skipped: nothing ran, no memory to report
        return "\n".join(lines)
    if not report.get("paged", True):
        lines.append(f"   KV cache (peak over batches): stock dense cache {fmt_bytes(report['kv_bytes_used'])} "
                     "(not a paged cache: attn_implementation is not 'paged')")
    else:
        lines.append(
            f"   KV cache (peak over batches): paged used {fmt_bytes(report['kv_bytes_used'])} "
            f"({report['blocks_used']} blocks, {report['blocks_shared']} shared; pool reserved "
            f"{fmt_bytes(report['kv_bytes_reserved'])}) vs stock dense {fmt_bytes(report['kv_bytes_dense'])}"
            + _saving_text(report["saving"])
        )
    stock = report.get("stock")
    if stock:
        eq = stock.get("tokens_equal")
        verdict = (
            "n/a (sampling)" if eq is None
            else "identical tokens" if eq
            else f"DIFFERENT tokens in {stock.get('mismatches')} of {report['sequences']} sequence(s)"
        )
        lines.append(
            f"   stock transformers (sdpa): {stock['wall_s']:.1f} s = {stock.get('tokens_per_s', 0):.1f} tokens/s, "
            f"KV cache measured {fmt_bytes(stock.get('kv_bytes', 0))}; paged vs stock: {verdict}"
        )
    return "\n".join(lines)


def _saving_text(saving: float) -> str:
    if not saving:
        return ""
    if saving >= 1:
        return f" -> {saving:.2f}x less"
    return f" -> {1 / saving:.2f}x more (short rows in partly filled blocks)"


def _short(text: str, limit: int) -> str:
    text = text.replace("\r", "").replace("\n", "\\n")
    return text if len(text) <= limit else text[: max(0, limit - 3)] + "..."


class DecodeProgress(StoppingCriteria):
    """Moves a job's progress bar (prompts done, tokens generated, tokens/s) at every decode step,
    not only between batches: added to generate's stopping criteria, it is called once per step in
    every decoding mode (greedy, sampling, beam search), and it stops nothing.

    Greedy and sampled rows count until their stop token, as the report counts them. Beam search
    calls it with its candidate beams, reordered at every step: there each sequence the batch
    returns counts one token per step, an estimate that the exact count replaces when the batch
    ends. The count stays on the device and is read only when the bar is redrawn (at most every
    ``bar.mininterval`` s): on CUDA, generate avoids a host sync per step, and so does this."""

    def __init__(self, bar, stop_ids: list[int], device, beam_search: bool):
        self.bar = bar
        self.stop_ids = torch.tensor(stop_ids, dtype=torch.long, device=device)
        self.beam_search = beam_search
        self.tokens = 0  # exact, over the batches done
        self.seconds = 0.0  # in generate, over the batches done
        self.sequences = 0  # this batch returns
        self.batch_tokens = 0  # this batch's so far (a device tensor once counted)
        self.generating = None  # per row: not stopped yet (greedy and sampling)
        self.batch_start = None
        self.last_draw = 0.0

    def start_batch(self, sequences: int) -> None:
        self.sequences, self.batch_tokens, self.generating = sequences, 0, None
        self.batch_start = time.perf_counter()

    def __call__(self, input_ids, scores, **kwargs):
        if self.beam_search:
            self.batch_tokens = self.batch_tokens + self.sequences
        else:
            last = input_ids[:, -1]
            if self.generating is None:
                self.generating = torch.ones_like(last, dtype=torch.bool)
            self.batch_tokens = self.generating.sum() + self.batch_tokens
            self.generating &= ~torch.isin(last, self.stop_ids)
        if time.perf_counter() - self.last_draw >= self.bar.mininterval:
            self.draw()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def end_batch(self, prompts: int, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds
        self.batch_tokens, self.batch_start = 0, None
        self.draw(prompts_done=prompts)

    def draw(self, prompts_done: int = 0) -> None:
        now = time.perf_counter()
        tokens = self.tokens + int(self.batch_tokens)
        seconds = self.seconds + (now - self.batch_start if self.batch_start is not None else 0.0)
        # the new count first: bar.update may redraw, and must not show the previous one
        self.bar.set_postfix_str(f"{tokens} tokens, {tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s",
                                 refresh=False)
        self.bar.update(prompts_done)
        self.bar.refresh()
        self.last_draw = now


def run_job(job: Job, model, tokenizer, *, chat: bool, cache_kwargs: dict | None = None, seed: int = 0,
            stock_model=None, progress: bool = True, done=frozenset(), on_batch=None) -> JobResult:
    """Generate for the prompts of ``job`` whose indices are not in ``done``, in batches sorted by
    length; outputs in original order (None for those in ``done``). ``on_batch(result, indices)``
    follows each batch, given the indices of the prompts it finished. With ``progress``, a bar on
    stderr counts the prompts and the tokens (see DecodeProgress)."""
    from tqdm.auto import tqdm

    todo = [i for i in range(len(job.prompts)) if i not in done]
    texts = {i: format_prompt(job.prompts[i], tokenizer, chat) for i in todo}
    lengths = [len(ids) for ids in tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]] if todo else []
    batches = [[todo[k] for k in batch] for batch in plan_batches(lengths, job.batch_size)]
    nrs = int(job.gen_kwargs.get("num_return_sequences") or 1)
    stop = _stop_ids(model, tokenizer)
    device = model.device
    result = JobResult(job, outputs=[None] * len(job.prompts), skipped=len(job.prompts) - len(todo))
    stock = {"wall_s": 0.0, "kv_bytes": 0, "new_tokens": 0, "mismatches": 0} if stock_model is not None else None
    greedy_like = not job.gen_kwargs.get("do_sample")

    def generate(m, enc, with_cache, criteria=()):
        kw = dict(job.gen_kwargs)
        if criteria:
            kw["stopping_criteria"] = StoppingCriteriaList([*kw.get("stopping_criteria", ()), *criteria])
        if with_cache and cache_kwargs:
            from . import PagedCache

            kw[cache_kwarg_name()] = PagedCache(config=m.config, **cache_kwargs)
        torch.manual_seed(seed)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = m.generate(**enc, **kw, pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - t0

    bar = tqdm(total=len(todo), desc=job.name[:40], unit="prompt", disable=not progress, file=sys.stderr,
               leave=False)
    decode_progress = DecodeProgress(bar, stop, device, beam_search=int(job.gen_kwargs.get("num_beams") or 1) > 1)
    try:
        for batch in batches:
            enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            prompt_len = enc["input_ids"].shape[1]
            decode_progress.start_batch(len(batch) * nrs)
            out, dt = generate(model, enc, with_cache=True, criteria=[decode_progress] if progress else [])
            result.wall_s += dt
            gen = out.sequences[:, prompt_len:]
            tokens = count_new_tokens(gen, stop)
            result.new_tokens += tokens
            result.sequences += gen.shape[0]
            result.batch_stats.append(kv_stats(cache_of(out)))
            decoded = tokenizer.batch_decode(gen, skip_special_tokens=True)
            for j, i in enumerate(batch):
                result.outputs[i] = decoded[j * nrs : (j + 1) * nrs]
            if on_batch is not None:
                on_batch(result, batch)
            if stock is not None:
                ref, sdt = generate(stock_model, enc, with_cache=False)
                stock["wall_s"] += sdt
                ref_gen = ref.sequences[:, prompt_len:]
                stock["new_tokens"] += count_new_tokens(ref_gen, stop)
                stock["kv_bytes"] = max(stock["kv_bytes"], dense_cache_bytes(cache_of(ref)))
                stock["mismatches"] += _count_mismatches(gen, ref_gen, stop)
            del out
            decode_progress.end_batch(len(batch), tokens, dt)
    finally:
        bar.close()
    if stock is not None:
        stock["tokens_equal"] = (stock["mismatches"] == 0) if greedy_like else None
    result.stock = stock
    result.report = build_report(
        result.batch_stats, prompts=len(todo), sequences=result.sequences,
        new_tokens=result.new_tokens, wall_s=result.wall_s, stock=stock, skipped=result.skipped,
    )
    return result


def _count_mismatches(a, b, stop_ids) -> int:
    """Rows whose generated tokens differ (compared up to the first stop token)."""

    def trim(row):
        for j, t in enumerate(row):
            if t in stop_ids:
                return row[: j + 1]
        return row

    a, b = a.tolist(), b.tolist()
    if len(a) != len(b):
        return max(len(a), len(b))
    return sum(1 for x, y in zip(a, b) if trim(x) != trim(y))


def print_outputs(result: JobResult, limit: int, file=None) -> None:
    file = file or sys.stdout
    if limit <= 0:
        return
    for i, (prompt, outs) in enumerate(zip(result.job.prompts, result.outputs)):
        if outs is None:  # skipped: already in the output file
            continue
        label = prompt.name if prompt.name else str(i)
        print(f"[{label}] {_short(prompt.text.strip(), limit // 2)}", file=file)
        for k, text in enumerate(outs):
            prefix = f"  -> ({k + 1}) " if len(outs) > 1 else "  -> "
            print(prefix + _short(text.strip(), limit), file=file)


# =============================================================================== model loading
def resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(path, *, dtype, device, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import prepare_tokenizer

    if attn_implementation == "paged":
        from . import generation  # noqa: F401  (import hf_paged registers "paged")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


# =============================================================================== main
def main(argv=None) -> int:
    args = parse_args(argv)
    return cmd_generate(args)


def cmd_generate(args) -> int:
    from .block_pool import OutOfBlocksError
    from .prompts import PromptSourceError

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    # Everything that can be wrong with the input fails here, in one line, before the model loads;
    # the output path first, before the prompts are read.
    try:
        if args.output:
            check_output_path(args.output, resume=args.resume, overwrite=args.overwrite)
        check_block_size(args, device)
        jobs = plan_jobs(args)
        output = OutputFile(args.output, jobs, resume=args.resume) if args.output else None
        if output is not None and all(len(output.done(job)) == len(job.prompts) for job in jobs):
            print(f"all {output.resumed} prompt(s) are already in {args.output}: nothing to generate")
            print(f"wrote {output.finish()} record(s) to {args.output} (in the original order)")
            return 0
        model_path = model_folder(args)
        check_max_memory(args, read_model_config(model_path), dtype)
    except (FileNotFoundError, PromptSourceError, InputError, OutputFileError) as e:
        print(_error(e), file=sys.stderr)
        return 2

    print(f"Loading {model_path} ({str(dtype).replace('torch.', '')}, {device}, "
          f"attn_implementation={args.attn_implementation!r})...", file=sys.stderr)
    model, tokenizer = load_model(model_path, dtype=dtype, device=device, attn_implementation=args.attn_implementation)
    stock_model = None
    if args.compare_stock:
        stock_model, _ = load_model(model_path, dtype=dtype, device=device, attn_implementation="sdpa")

    chat = args.chat if args.chat is not None else bool(getattr(tokenizer, "chat_template", None))
    cache_kwargs = {}
    if args.block_size is not None:
        cache_kwargs["block_size"] = args.block_size
    if args.max_memory is not None:
        cache_kwargs["max_memory"] = args.max_memory
    if cache_kwargs and args.attn_implementation != "paged":
        print("hf-paged: note: --block-size/--max-memory apply to the paged cache only; ignored.", file=sys.stderr)
        cache_kwargs = {}

    # One tiny untimed generate per model first, so the first job's timing excludes warm-up.
    _warm_up(model, tokenizer)
    if stock_model is not None:
        _warm_up(stock_model, tokenizer)

    results = []
    try:
        for job in jobs:
            print(f"\n== {job.name}", flush=True)
            res = run_job(job, model, tokenizer, chat=chat, cache_kwargs=cache_kwargs, seed=args.seed,
                          stock_model=stock_model, done=output.done(job) if output else frozenset(),
                          on_batch=output.write_batch if output else None)
            print_outputs(res, args.max_print_chars)
            print(format_report(res.report), flush=True)
            results.append(res)
    except OutOfBlocksError as e:
        print(_error(f"{e}{_records_kept(output, ' ')}"), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(_error(f"interrupted{_records_kept(output, '; ')}"), file=sys.stderr)
        return 130
    finally:
        if output is not None:
            output.close()

    if len(results) > 1:
        total = summarize(results)
        print("\n" + format_report(total, title="all jobs"))
    if output is not None:
        kept = f" ({output.resumed} from the earlier run)" if output.resumed else ""
        print(f"\nwrote {output.finish()} record(s) to {args.output}{kept}")
    return 0


def _records_kept(output, separator: str) -> str:
    """The end of an interrupted run's error line: what its output file holds, and how to go on."""
    if output is None or not output.records:
        return ""
    return f"{separator}{len(output.records)} record(s) kept in {output.path}: rerun with --resume to continue."


def _warm_up(model, tokenizer) -> None:
    enc = tokenizer(["Hello"], return_tensors="pt").to(model.device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)


def plan_jobs(args) -> list[Job]:
    """The demo's three jobs, or one job over the prompts (``--prompts``, else the built-in ones)."""
    from .prompts import load_prompts

    if is_demo(args):
        jobs = demo_jobs(args)
        if args.limit is not None:
            for job in jobs:
                job.prompts = job.prompts[: args.limit] or job.prompts[:1]
        return jobs
    prompts = (
        load_prompts(args.prompts, split=args.split, field=args.field, limit=args.limit)
        if args.prompts is not None
        else _builtin_for_options(args)
    )
    return [Job("generate", prompts, generation_kwargs(args), args.batch_size)]


def model_folder(args) -> str:
    """``--model``, else the embedded SmolLM2 (converted on first use)."""
    if args.model is None:
        from .real_model import smollm2_path

        return str(smollm2_path())
    if not os.path.exists(args.model):
        raise InputError(f"model folder not found: '{args.model}' (there is no HuggingFace hub access here: give a "
                         "local checkpoint folder)")
    return args.model


def _builtin_for_options(args):
    """Built-in prompts for a non-demo run (decoding options given, no --prompts)."""
    from .prompts import builtin_prompts

    prompts = builtin_prompts()
    return prompts[: args.limit] if args.limit is not None else prompts


def summarize(results: list[JobResult]) -> dict:
    """One report over several jobs (run one after another: memory is the peak over all)."""
    stats = [s for r in results for s in r.batch_stats]
    stocks = [r.stock for r in results if r.stock is not None]
    stock = None
    if stocks:
        eqs = [s["tokens_equal"] for s in stocks if s.get("tokens_equal") is not None]
        stock = {
            "wall_s": sum(s["wall_s"] for s in stocks),
            "new_tokens": sum(s["new_tokens"] for s in stocks),
            "kv_bytes": max(s["kv_bytes"] for s in stocks),
            "mismatches": sum(s["mismatches"] for s in stocks if s.get("tokens_equal") is not None),
            "tokens_equal": all(eqs) if eqs else None,
        }
    return build_report(
        stats,
        prompts=sum(r.report["prompts"] for r in results),
        skipped=sum(r.skipped for r in results),
        sequences=sum(r.sequences for r in results),
        new_tokens=sum(r.new_tokens for r in results),
        wall_s=sum(r.wall_s for r in results),
        stock=stock,
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
