"""A job run on the continuous-batching engine (``hf_paged.iter_generate_many``), the default.

Every prompt is one request; the engine admits them as blocks allow and each prompt's record is
handed to ``on_result`` (the output file) as soon as that prompt is finished, not at the end of a
batch. The progress bar moves after every engine step. jobs.py keeps the static batches of
``model.generate`` (``--static-batches``, and beam search, which the engine does not do).
"""

from __future__ import annotations

import sys
import time

import torch

from ..compat import cache_of, text_config
from ..memory import config_bytes_per_token
from .jobs import JobResult, dense_cache_bytes, format_prompt
from .report import build_report


def engine_reasons(job, model, tokenizer, attn_implementation: str) -> list[str]:
    """Why ``job`` cannot run on the engine (empty: it can): the engine needs the paged cache, and
    runs only the settings it applies itself (beam search, for one, it does not)."""
    if attn_implementation != "paged":
        return [f"attn_implementation={attn_implementation!r} (it needs 'paged')"]
    from ..engine import settings_beyond_the_engine

    return settings_beyond_the_engine(model, pad_token_id=tokenizer.pad_token_id, **job.gen_kwargs)


class EngineProgress:
    """The job's bar (prompts done of the job's total, tokens, tokens/s), moved by the engine's
    ``progress(stats)`` callback after every step; redrawn at most every ``bar.mininterval`` s."""

    def __init__(self, bar):
        self.bar = bar
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def __call__(self, stats: dict, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self.last_draw < self.bar.mininterval:
            return
        tokens, seconds = stats["new_tokens"], now - self.start
        self.bar.set_postfix_str(f"{tokens} tokens, {tokens / seconds if seconds > 0 else 0.0:.1f} tokens/s",
                                 refresh=False)
        self.bar.n = stats["finished_requests"]
        self.bar.refresh()
        self.last_draw = now


def run_job_engine(job, model, tokenizer, *, chat: bool, max_memory=None, block_size=None, seed: int = 0,
                   stock_model=None,
                   progress: bool = True, done=frozenset(), on_result=None, indices=None) -> JobResult:
    """Generate for the prompts of ``job`` (those of ``indices``, default all) not in ``done`` with
    the engine; outputs in original order (None for the others). ``on_result(result, [index])``
    follows each finished prompt. The report holds the engine's counters (``report["engine"]``)."""
    from tqdm.auto import tqdm

    from ..engine import iter_generate_many

    todo = [i for i in (range(len(job.prompts)) if indices is None else indices) if i not in done]
    result = JobResult(job, outputs=[None] * len(job.prompts), skipped=len(job.prompts) - len(todo))
    if indices is not None:  # another process's prompts are not "skipped" here
        result.skipped = sum(1 for i in indices if i in done)
    texts = [format_prompt(job.prompts[i], tokenizer, chat) for i in todo]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if todo else []
    kwargs = dict(job.gen_kwargs, pad_token_id=tokenizer.pad_token_id)
    stats: dict = {}

    def on_step(s):
        stats.update(s)
        if bar_progress is not None:
            bar_progress(s)

    bar = tqdm(total=len(todo), desc=job.name[:40], unit="prompt", disable=not progress, file=sys.stderr, leave=False)
    bar_progress = EngineProgress(bar) if progress else None
    generated = {}  # prompt index -> its sequences' token ids (for --compare-stock)
    sync(model.device)
    t0 = time.perf_counter()
    try:
        cache_kwargs = {"block_size": block_size} if block_size is not None else {}
        for res in iter_generate_many(model, ids, tokenizer=tokenizer, seed=seed, max_memory=max_memory,
                                      progress=on_step, **cache_kwargs, **kwargs):
            index = todo[res.index]
            result.outputs[index] = res.texts
            result.sequences += len(res.sequences)
            result.new_tokens += sum(len(s) for s in res.sequences)
            generated[index] = res.sequences
            if on_result is not None:
                on_result(result, [index])
        sync(model.device)
        result.wall_s = time.perf_counter() - t0
        if bar_progress is not None and stats:
            bar_progress(stats, force=True)
    finally:
        bar.close()
    engine = engine_figures(stats, model) if todo else None
    if engine is not None:
        nrs = int(job.gen_kwargs.get("num_return_sequences") or 1)
        gen_lens = [max(len(s) for s in generated[i]) for i in todo]
        engine["dense_bytes"] = dense_equivalent([len(x) for x in ids], gen_lens, nrs, job.batch_size,
                                                 engine["block_bytes"] // max(engine.get("block_size", 1), 1))
        engine["dense_batch_size"] = job.batch_size
    if stock_model is not None and todo:
        result.stock = compare_alone(stock_model, tokenizer, todo, ids, generated, kwargs, seed)
    result.report = build_report([], prompts=len(todo), sequences=result.sequences, new_tokens=result.new_tokens,
                                 wall_s=result.wall_s, stock=result.stock, skipped=result.skipped, engine=engine)
    return result


def engine_figures(stats: dict, model) -> dict:
    """The engine's counters of one run, with its peak KV blocks in bytes (blocks x block size x the
    config's K+V bytes per token at the model's dtype)."""
    figures = dict(stats)
    per_token = config_bytes_per_token(text_config(model.config), model.dtype)
    figures["block_bytes"] = per_token * stats.get("block_size", 0)
    figures["peak_bytes"] = figures["block_bytes"] * stats.get("peak_blocks", 0)
    return figures


def dense_equivalent(prompt_lens: list[int], gen_lens: list[int], nrs: int, batch_size: int, per_token: int) -> int:
    """What stock's dense cache holds at the end of ``generate`` over the same prompts and outputs in
    length-sorted batches of ``batch_size`` (as --static-batches runs them): per batch, rows x the
    padded length (longest prompt + longest output, less the last token, never fed back); the peak
    over batches. The same measure as ``bytes_dense`` of ``PagedCache.memory_stats()``."""
    from .jobs import plan_batches

    peak = 0
    for batch in plan_batches(prompt_lens, batch_size):
        width = max(prompt_lens[i] for i in batch) + max(gen_lens[i] for i in batch) - 1
        peak = max(peak, len(batch) * nrs * width * per_token)
    return peak


def compare_alone(stock_model, tokenizer, todo, ids, generated, kwargs, seed) -> dict:
    """``--compare-stock`` on the engine: stock ``generate`` on each prompt alone (no padding: the
    engine's own contract is equality with that), its tokens compared up to the end token."""
    from ..compat import resolve_generation_config

    config, _ = resolve_generation_config(stock_model, None, dict(kwargs))
    eos = config.eos_token_id
    eos = set([] if eos is None else [eos] if isinstance(eos, int) else eos)
    stock = {"wall_s": 0.0, "kv_bytes": 0, "new_tokens": 0, "mismatches": 0, "mode": "one prompt per generate call"}
    for k, index in enumerate(todo):
        prompt = torch.tensor([ids[k]], device=stock_model.device)
        torch.manual_seed(seed)
        sync(stock_model.device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = stock_model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                       return_dict_in_generate=True, **kwargs)
        sync(stock_model.device)
        stock["wall_s"] += time.perf_counter() - t0
        stock["kv_bytes"] = max(stock["kv_bytes"], dense_cache_bytes(cache_of(out)))
        rows = [_cut(row, eos) for row in out.sequences[:, prompt.shape[1]:].tolist()]
        stock["new_tokens"] += sum(len(r) for r in rows)
        if rows != generated[index]:
            stock["mismatches"] += sum(1 for a, b in zip(rows, generated[index]) if a != b) or 1
    stock["tokens_equal"] = (stock["mismatches"] == 0) if not kwargs.get("do_sample") else None
    return stock


def _cut(row: list[int], eos: set) -> list[int]:
    end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
    return row[:end] if end else row


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
