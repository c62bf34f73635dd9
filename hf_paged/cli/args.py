"""The command line's arguments, and the checks of its input that run before the model loads."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from ..cache import DEFAULT_BLOCK_SIZE
from ..compat import text_config
from ..kernels import backend_name
from ..memory import config_bytes_per_token
from ..memory import parse_memory as _parse_memory

SUBCOMMANDS = ("generate",)


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
    d.add_argument("--static-batches", action="store_true",
                   help="run length-sorted batches of model.generate (--batch-size prompts each) instead of the "
                   "continuous-batching engine (the default; beam search always runs in static batches)")
    d.add_argument("--batch-size", type=int, default=8,
                   help="prompts per generate call with --static-batches or beam search (default: 8)")
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
    return _parse_memory(value, name="--max-memory")


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
    per_token = config_bytes_per_token(text_config(config), dtype)
    block_size = args.block_size or DEFAULT_BLOCK_SIZE
    cap = parse_memory(args.max_memory)
    if per_token and cap < per_token * block_size:  # per_token 0: the config does not say (the cache will)
        raise InputError(
            f"--max-memory {args.max_memory} is {cap} bytes, less than one KV block: {per_token * block_size} bytes "
            f"({per_token} bytes per token x block size {block_size}, {str(dtype).replace('torch.', '')}). "
            "Raise --max-memory or lower --block-size."
        )


def resolve_device(name: str):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device):
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
