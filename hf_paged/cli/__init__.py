"""``hf-paged``, the command line (also ``python -m hf_paged``); the core package never imports it.

    hf-paged                      # the demo: SmolLM2-135M-Instruct on the built-in prompts
    hf-paged generate --prompts questions.txt --max-new-tokens 64 --output out.jsonl
    hf-paged generate --prompts data.jsonl --field question --num-beams 4 --compare-stock

``generate`` loads a causal LM with ``attn_implementation="paged"``, runs the prompts through the
continuous-batching engine (``hf_paged.iter_generate_many``; with ``--static-batches``, and for beam
search, through ``model.generate`` over batches sorted by length), writes each prompt's outputs to
``--output`` as it finishes (see output_file.py: in the original prompt order once the run
completes) and closes with a report of speed and KV-cache memory. ``accelerate launch`` of the same
command splits the prompts between processes (shards.py).

Modules: ``args`` (arguments and the checks before the model loads), ``engine_jobs`` (a job on the
engine), ``jobs`` (static batches of generate), ``report``, ``output_file``, ``shards`` (several
processes), ``prompts`` (prompt sources), ``real_model`` (the embedded SmolLM2), ``command`` (the
command itself).
"""

from .args import is_demo, parse_args
from .jobs import DecodeProgress, Job, count_new_tokens, generation_kwargs, plan_batches, run_job
from .engine_jobs import EngineProgress, run_job_engine
from .command import load_model, main
from .report import build_report, format_report

__all__ = ["DecodeProgress", "EngineProgress", "Job", "run_job_engine", "build_report", "count_new_tokens", "format_report", "generation_kwargs",
           "is_demo", "load_model", "main", "parse_args", "plan_batches", "run_job"]
