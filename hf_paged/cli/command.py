"""``hf-paged generate``: check the input, load the model, run the jobs, write and report."""

from __future__ import annotations

import sys

import torch

from ..block_pool import OutOfBlocksError
from .args import InputError, _error, check_block_size, check_max_memory, parse_args, read_model_config, \
    resolve_device, resolve_dtype
from .jobs import model_folder, plan_jobs, run_job
from .output_file import OutputFile, OutputFileError, check_output_path
from .prompts import PromptSourceError
from .report import format_report, print_outputs, summarize


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
