"""``hf-paged generate``: check the input, load the model, run the jobs, write and report."""

from __future__ import annotations

import os
import sys

import torch

from ..block_pool import OutOfBlocksError
from .args import InputError, _error, check_block_size, check_max_memory, parse_args, read_model_config, \
    resolve_device, resolve_dtype
from .engine_jobs import engine_reasons, run_job_engine
from .jobs import model_folder, plan_jobs, run_job
from .output_file import OutputFile, OutputFileError, check_output_path
from .prompts import PromptSourceError
from .report import format_report, merge_engine_figures, print_outputs, summarize
from .shards import current_shard, part_files, part_path


def load_model(path, *, dtype, device, attn_implementation):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .real_model import prepare_tokenizer

    if attn_implementation == "paged":
        import hf_paged  # noqa: F401  (registers "paged")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def main(argv=None) -> int:
    args = parse_args(argv)
    return cmd_generate(args)


def cmd_generate(args) -> int:
    try:
        shard = current_shard(args.device)  # one process, or this rank of an `accelerate launch` run
    except RuntimeError as e:  # a launch whose processes accelerate does not see
        print(_error(e), file=sys.stderr)
        return 2
    device = resolve_device(args.device)
    if shard.state is not None and args.device == "auto":
        device = shard.state.device  # each process on its own device
    dtype = resolve_dtype(args.dtype, device)
    # Everything that can be wrong with the input fails here, in one line, before the model loads;
    # the output path first, before the prompts are read.
    try:
        if shard.count > 1 and not args.output:
            raise InputError(f"a run on {shard.count} processes needs --output: each process writes its part "
                             "next to it, and rank 0 merges them into it")
        if args.output:
            check_output_path(args.output, resume=args.resume, overwrite=args.overwrite)
        check_block_size(args, device)
        jobs = plan_jobs(args)
        output = open_output(args, jobs, shard) if args.output else None
        if output is not None and all(len(output.done(job)) == len(job.prompts) for job in jobs):
            shard.wait()  # every process has read the earlier records
            if shard.is_main:
                print(f"all {output.resumed} prompt(s) are already in {args.output}: nothing to generate")
                print(f"wrote {merged_output(args, jobs, shard).finish()} record(s) to {args.output} "
                      "(in the original order)")
            return 0
        model_path = model_folder(args)
        check_max_memory(args, read_model_config(model_path), dtype)
    except (FileNotFoundError, PromptSourceError, InputError, OutputFileError) as e:
        print(_error(e), file=sys.stderr)
        return 2

    where = f", {shard.label}" if shard.count > 1 else ""
    print(f"Loading {model_path} ({str(dtype).replace('torch.', '')}, {device}, "
          f"attn_implementation={args.attn_implementation!r}{where})...", file=sys.stderr)
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
    if output is not None and args.overwrite and shard.is_main:
        remove_earlier_parts(args.output, several=shard.count > 1)
    shard.wait()  # every process has read the earlier records before any writes

    results = []
    try:
        for job in jobs:
            if shard.is_main or shard.count == 1:
                print(f"\n== {job.name}", flush=True)
            done = output.done(job) if output else frozenset()
            indices = shard.take([i for i in range(len(job.prompts)) if i not in done]) if shard.count > 1 else None
            common = dict(chat=chat, seed=args.seed, stock_model=stock_model, done=done, indices=indices,
                          progress=shard.is_main)
            static = static_reasons(args, job, model, tokenizer)
            if static is None:
                res = run_job_engine(job, model, tokenizer, max_memory=args.max_memory, block_size=args.block_size,
                                     on_result=output.write_batch if output else None, **common)
            else:
                if static and shard.is_main:
                    print(f"hf-paged: note: {static}", file=sys.stderr, flush=True)
                res = run_job(job, model, tokenizer, cache_kwargs=cache_kwargs,
                              on_batch=output.write_batch if output else None, **common)
            if shard.count == 1:
                print_outputs(res, args.max_print_chars)
                print(format_report(res.report), flush=True)
            else:
                print(format_report(res.report, title=f"{job.name} ({shard.label})"), flush=True)
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
        title = "all jobs" + (f" ({shard.label})" if shard.count > 1 else "")
        print("\n" + format_report(total, title=title), flush=True)
    if shard.count > 1:
        reports = shard.gather(summarize(results))  # every process waits here for the others
        if shard.is_main:
            print("\n" + format_report(combine_process_reports(reports), title=f"all {shard.count} processes"))
            kept = f" ({output.resumed} from the earlier run)" if output.resumed else ""
            print(f"\nwrote {merged_output(args, jobs, shard).finish()} record(s) to {args.output}{kept}, "
                  f"merged from {shard.count} part files")
        return 0
    if output is not None:
        kept = f" ({output.resumed} from the earlier run)" if output.resumed else ""
        print(f"\nwrote {output.finish()} record(s) to {args.output}{kept}")
    return 0


def static_reasons(args, job, model, tokenizer) -> str | None:
    """None: run ``job`` on the engine. Else a note on why it runs in static batches ('' when asked
    for with --static-batches: nothing to say)."""
    if args.static_batches:
        return ""
    reasons = engine_reasons(job, model, tokenizer, args.attn_implementation)
    if not reasons:
        return None
    return (f"the engine does not do {', '.join(reasons)}: this job runs in static batches of "
            f"--batch-size {job.batch_size} prompts (model.generate)")


def open_output(args, jobs, shard) -> OutputFile:
    """This process's output: the --output file itself for one process, else its part file; the
    records of the output and of every part file of an earlier run count as done (--resume)."""
    if shard.count == 1:
        return OutputFile(args.output, jobs, resume=args.resume, others=part_files(args.output))
    own = part_path(args.output, shard.rank, shard.count)
    others = [args.output, *(p for p in part_files(args.output) if p != own)]
    return OutputFile(own, jobs, resume=args.resume, others=others)


def merged_output(args, jobs, shard) -> OutputFile:
    """Rank 0, once every process is done: the output with every part file's records (finish()
    writes it in input order and removes the part files)."""
    return OutputFile(args.output, jobs, resume=True, others=part_files(args.output))


def remove_earlier_parts(output_path: str, several: bool) -> None:
    """--overwrite: the part files of an earlier run go (and, on several processes, the output,
    which rank 0 writes anew at the end; one process replaces it at its first record)."""
    for path in [*part_files(output_path), *([output_path] if several and os.path.exists(output_path) else [])]:
        os.remove(path)


def combine_process_reports(reports: list[dict]) -> dict:
    """The processes ran side by side: tokens add up over the longest process's time."""
    total = dict(reports[0])
    for key in ("prompts", "skipped", "sequences", "new_tokens", "batches"):
        total[key] = sum(r[key] for r in reports)
    total["wall_s"] = max(r["wall_s"] for r in reports)
    total["tokens_per_s"] = total["new_tokens"] / total["wall_s"] if total["wall_s"] > 0 else 0.0
    for key in ("kv_bytes_used", "kv_bytes_reserved", "kv_bytes_dense", "blocks_used", "blocks_shared"):
        total[key] = max(r[key] for r in reports)  # per process (each has its own device)
    total["engine"] = merge_engine_figures([r["engine"] for r in reports if r.get("engine")])
    if total["engine"]:
        total["engine"]["per_process"] = True
    stocks = [r["stock"] for r in reports if r.get("stock")]
    if stocks:
        eqs = [s["tokens_equal"] for s in stocks if s.get("tokens_equal") is not None]
        total["stock"] = {**stocks[0], "wall_s": max(s["wall_s"] for s in stocks),
                          "new_tokens": sum(s.get("new_tokens", 0) for s in stocks),
                          "kv_bytes": max(s.get("kv_bytes", 0) for s in stocks),
                          "mismatches": sum(s.get("mismatches", 0) for s in stocks),
                          "tokens_equal": all(eqs) if eqs else None}
        total["stock"]["tokens_per_s"] = (total["stock"]["new_tokens"] / total["stock"]["wall_s"]
                                          if total["stock"]["wall_s"] else 0.0)
    return total


def _records_kept(output, separator: str) -> str:
    """The end of an interrupted run's error line: what its output file holds, and how to go on."""
    if output is None or not output.records:
        return ""
    return f"{separator}{len(output.records)} record(s) kept in {output.path}: rerun with --resume to continue."


def _warm_up(model, tokenizer) -> None:
    enc = tokenizer(["Hello"], return_tensors="pt").to(model.device)
    with torch.inference_mode():
        model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tokenizer.pad_token_id)
