"""Jobs: a set of prompts and generation options, run as length-sorted batches of ``generate``."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..compat import cache_of, generate_cache_kwarg
from .args import InputError, is_demo
from .report import build_report

# The demo (no --prompts and no decoding options): three jobs on the built-in prompts.
DEMO_SAMPLE_TASK = "HumanEval/53"
DEMO_BEAM_QUESTION = 2  # index into prompts.CHAT_QUESTIONS ("Explain ... why the sky is blue.")
CODE_INSTRUCTION = "Complete the following Python function.\n```python\n{prompt}```"


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


def dense_cache_bytes(cache) -> int:
    """Bytes of the K/V tensors a stock (dense) cache such as a DynamicCache holds."""
    total = 0
    seen = set()
    for layer in getattr(cache, "layers", []) or []:
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "numel") and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def kv_stats(cache) -> dict:
    """``memory_stats()`` of a PagedCache; for a stock cache, its measured bytes as both used and dense."""
    if cache is not None and hasattr(cache, "memory_stats"):
        return dict(cache.memory_stats())
    n = dense_cache_bytes(cache) if cache is not None else 0
    return {"bytes_used": n, "bytes_dense": n, "bytes_reserved": n, "blocks_shared": 0, "blocks_used": 0,
            "paged": False}


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
            stock_model=None, progress: bool = True, done=frozenset(), on_batch=None, indices=None) -> JobResult:
    """Generate for the prompts of ``job`` (those of ``indices``, default all: a process's share of
    a run on several) whose indices are not in ``done``, in batches sorted by length; outputs in original order (None for those in ``done``). ``on_batch(result, indices)``
    follows each batch, given the indices of the prompts it finished. With ``progress``, a bar on
    stderr counts the prompts and the tokens (see DecodeProgress)."""
    from tqdm.auto import tqdm

    todo = [i for i in (range(len(job.prompts)) if indices is None else indices) if i not in done]
    texts = {i: format_prompt(job.prompts[i], tokenizer, chat) for i in todo}
    lengths = [len(ids) for ids in tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"]] if todo else []
    batches = [[todo[k] for k in batch] for batch in plan_batches(lengths, job.batch_size)]
    nrs = int(job.gen_kwargs.get("num_return_sequences") or 1)
    stop = _stop_ids(model, tokenizer)
    device = model.device
    result = JobResult(job, outputs=[None] * len(job.prompts), skipped=len(job.prompts) - len(todo))
    if indices is not None:  # another process's prompts are not "skipped" here
        result.skipped = sum(1 for i in indices if i in done)
    stock = {"wall_s": 0.0, "kv_bytes": 0, "new_tokens": 0, "mismatches": 0} if stock_model is not None else None
    greedy_like = not job.gen_kwargs.get("do_sample")

    def generate(m, enc, with_cache, criteria=()):
        kw = dict(job.gen_kwargs)
        if criteria:
            kw["stopping_criteria"] = StoppingCriteriaList([*kw.get("stopping_criteria", ()), *criteria])
        if with_cache and cache_kwargs:
            from ..cache import PagedCache

            kw[generate_cache_kwarg()] = PagedCache(config=m.config, **cache_kwargs)
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
