"""What the end-to-end benchmarks share: the model shapes, the JSON-lines record, the versions line.

Imported by the scripts of this folder (``python benchmarks/<script>.py`` puts the folder on the
path); not part of the package.
"""

from __future__ import annotations

import json
import os
import random
import time

import torch
from transformers import LlamaConfig


def llama_config(tiny: bool) -> LlamaConfig:
    """The Llama-3.1-8B shape (random weights: speed does not depend on their values), or a tiny
    one for a CPU smoke run of a script."""
    if tiny:
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096)
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rope_theta=500000.0)


def few_shot_prompts(vocab_size: int, n_prompts: int, preamble_len: int, question_lengths: tuple[int, int],
                     seed: int = 0) -> tuple[list[int], list[list[int]]]:
    """prefix_bench.py's data set: one preamble and ``n_prompts`` questions of lengths drawn from
    ``question_lengths`` (inclusive), token ids >= 1 (0 is the pad); ``(preamble, questions)``."""
    rng = random.Random(seed)
    preamble = [rng.randrange(1, vocab_size) for _ in range(preamble_len)]
    questions = [[rng.randrange(1, vocab_size) for _ in range(rng.randint(*question_lengths))]
                 for _ in range(n_prompts)]
    return preamble, questions


class Record:
    """One JSON line per measurement on stdout, kept in ``results`` and written to ``$OUT/<name>``."""

    def __init__(self, dev: str):
        self.dev = dev
        self.results: list[dict] = []

    def emit(self, **kw) -> None:
        print(json.dumps(kw), flush=True)
        self.results.append(kw)

    def sync(self) -> None:
        if self.dev == "cuda":
            torch.cuda.synchronize()

    def versions(self, **extra) -> None:
        import hf_paged
        import transformers
        import triton

        self.emit(what="versions", torch=torch.__version__, transformers=transformers.__version__,
                  triton=getattr(triton, "__version__", "?"), hf_paged=hf_paged.__version__,
                  gpu=torch.cuda.get_device_name() if self.dev == "cuda" else "cpu", date=time.strftime("%Y-%m-%d"),
                  **extra)

    def write(self, name: str) -> None:
        with open(os.path.join(os.environ.get("OUT", "."), name), "w") as f:
            json.dump(self.results, f, indent=1)
