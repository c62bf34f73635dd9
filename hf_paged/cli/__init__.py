"""``hf-paged``, the command line (also ``python -m hf_paged``); the core package never imports it.

    hf-paged                      # the demo: SmolLM2-135M-Instruct on the built-in prompts
    hf-paged generate --prompts questions.txt --max-new-tokens 64 --output out.jsonl
    hf-paged generate --prompts data.jsonl --field question --num-beams 4 --compare-stock

``generate`` loads a causal LM with ``attn_implementation="paged"``, runs ``model.generate`` over
batches of prompts (sorted by length, longest first, so that a batch holds similar lengths), writes
each finished batch's outputs to ``--output`` (see output_file.py: in the original prompt order once
the run completes) and closes with a report of speed and KV-cache memory: what the paged cache used
and what stock transformers' dense cache would have held.

Modules: ``args`` (arguments and the checks before the model loads), ``jobs`` (batches of
generate), ``report``, ``output_file``, ``prompts`` (prompt sources), ``real_model`` (the
embedded SmolLM2), ``command`` (the command itself).
"""

from .args import is_demo, parse_args
from .jobs import DecodeProgress, Job, count_new_tokens, generation_kwargs, plan_batches, run_job
from .command import load_model, main
from .report import build_report, format_report

__all__ = ["DecodeProgress", "Job", "build_report", "count_new_tokens", "format_report", "generation_kwargs",
           "is_demo", "load_model", "main", "parse_args", "plan_batches", "run_job"]
