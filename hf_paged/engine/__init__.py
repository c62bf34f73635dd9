"""``generate_many``: a data set of prompts through continuous batching over the paged cache.

    results = hf_paged.generate_many(model, prompts, max_new_tokens=64, do_sample=True, seed=0)
    results[i].sequences   # the generated token ids of prompt i, one list per returned sequence

Prompts are lists of token ids, or strings with ``tokenizer=``; a :class:`Request` gives one
prompt its own settings. Settings are ``GenerationConfig`` fields, resolved as ``generate`` does
(the model's generation config, transformers' defaults, then the arguments). The engine
(``engine.py``) applies greedy decoding, sampling with temperature / top-k / top-p / min-p /
repetition penalty, ``min_new_tokens``, end tokens, stop strings and ``num_return_sequences``;
any other setting (beam search, for one) sends that prompt through ``model.generate`` alone, said
once in a warning. Sampling is reproducible per request: the same ``seed`` gives the same tokens
whatever the other prompts, their order or the memory cap.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator

import torch
from transformers import GenerationConfig

from .. import compat
from ..cache import DEFAULT_BLOCK_SIZE
from ..prefix_cache import PrefixCache
from .engine import Engine
from .requests import ENGINE_FIELDS, EngineRequest, GenerationResult, Request
from .sampling import SamplingParams

__all__ = ["Engine", "GenerationResult", "Request", "generate_many", "iter_generate_many", "settings_beyond_the_engine"]

logger = logging.getLogger("hf_paged")

# model types whose every input the engine's forwards give as generate's do (tested for equality
# with generate); any other model's prompts go through model.generate, said once in a warning
ENGINE_MODEL_TYPES = {"llama", "llama4_text", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "gemma3n_text",
                      "phi3", "gpt2", "opt", "gpt_neox", "starcoder2", "olmo2", "deepseek_v2", "deepseek_v3"}


def generate_many(model, prompts, generation_config: GenerationConfig | None = None, *, tokenizer=None,
                  seed: int | None = None, max_memory=None, max_batch_tokens: int = 8192, progress=None,
                  block_size: int = DEFAULT_BLOCK_SIZE, prefix_cache=None, **generation_kwargs) -> list[GenerationResult]:
    """One :class:`GenerationResult` per prompt, in input order (see :func:`iter_generate_many`)."""
    results: list[GenerationResult | None] = [None] * len(prompts)
    for result in iter_generate_many(model, prompts, generation_config, tokenizer=tokenizer, seed=seed,
                                     max_memory=max_memory, max_batch_tokens=max_batch_tokens, progress=progress,
                                     block_size=block_size, prefix_cache=prefix_cache, **generation_kwargs):
        results[result.index] = result
    return results


def iter_generate_many(model, prompts, generation_config: GenerationConfig | None = None, *, tokenizer=None,
                       seed: int | None = None, max_memory=None, max_batch_tokens: int = 8192, progress=None,
                       block_size: int = DEFAULT_BLOCK_SIZE, prefix_cache=None,
                       **generation_kwargs) -> Iterator[GenerationResult]:
    """Each prompt's :class:`GenerationResult` as soon as it is finished (in completion order).

    ``max_memory`` caps the KV pool as ``PagedCache(max_memory=...)`` does (on CUDA, by default,
    80% of the memory free at the start); prompts wait for blocks, and the newest sequences are
    preempted and recomputed when the pool runs out, never an out-of-memory error.
    ``max_batch_tokens`` bounds the prompt tokens (padded) prefilled in one step; longer prompts are
    prefilled in chunks between decode steps. ``seed``: the run's seed (default: drawn from torch's
    global generator, so ``torch.manual_seed`` before the call makes it reproducible).
    ``block_size``: tokens per KV block, as ``PagedCache(block_size=...)``. ``prefix_cache``: a
    :class:`~hf_paged.PrefixCache` (default: the one attached to the model, if any) whose pool the
    run uses (its cap in place of ``max_memory``): prompts find the blocks earlier calls left there,
    and this run's prompt blocks stay there for later ones.
    ``progress``: called after every engine step with the engine's counters (:meth:`Engine.stats`:
    ``new_tokens``, ``finished_requests``, ``decode_rows`` / ``decode_slots``, ``preemptions``, ...);
    prompts run through ``model.generate`` alone are not counted there.
    """
    if seed is None:
        seed = int(torch.randint(0, 2 ** 62, (1,)).item())
    requests, alone = _requests(model, prompts, generation_config, generation_kwargs, tokenizer, seed)
    if requests:
        if prefix_cache is None:
            prefix_cache = PrefixCache.attached(model)
        elif not isinstance(prefix_cache, PrefixCache):
            raise TypeError(f"hf_paged: prefix_cache must be a hf_paged.PrefixCache, got {type(prefix_cache).__name__}")
        engine = Engine(model, max_memory=max_memory, max_batch_tokens=max_batch_tokens, tokenizer=tokenizer,
                        block_size=block_size, prefix_cache=prefix_cache)
        for request in requests:
            engine.add(request)
        failed = True
        try:
            for finished in engine.steps():
                if progress is not None:
                    progress(engine.stats())
                for request in finished:
                    yield _result(request, tokenizer)
            failed = False
        finally:
            if prefix_cache is not None:  # the rows' blocks go back to it (hashed ones stay findable)
                engine.cache.release_rows(failed=failed)
    for index, prompt, config, settings, request_seed in alone:
        yield _generate_alone(model, index, prompt, generation_config, settings, config, request_seed, tokenizer)


def settings_beyond_the_engine(model, generation_config: GenerationConfig | None = None,
                               **generation_kwargs) -> list[str]:
    """Why ``generate_many`` with these settings would run its prompts through ``model.generate``
    one at a time (the settings the engine does not apply, or the model's type); empty when the
    engine runs them. Lets a caller choose another path (the CLI's static batches) beforehand."""
    config, unknown = compat.resolve_generation_config(model, generation_config, dict(generation_kwargs))
    if unknown:
        raise ValueError(f"hf_paged: arguments that are not generation settings: {sorted(unknown)}")
    reasons = _settings_beyond_the_engine(config, compat.generation_defaults())
    model_type = getattr(compat.text_config(model.config), "model_type", None)
    if model_type not in ENGINE_MODEL_TYPES:
        reasons.append(f"model_type {model_type!r}")
    return reasons


def _requests(model, prompts, generation_config, generation_kwargs, tokenizer, seed):
    """The engine's requests, and the prompts that go through model.generate alone."""
    base, unknown = compat.resolve_generation_config(model, generation_config, dict(generation_kwargs))
    if unknown:
        raise ValueError(f"hf_paged: generate_many got arguments that are not generation settings: {sorted(unknown)}")
    engine_model = getattr(compat.text_config(model.config), "model_type", None) in ENGINE_MODEL_TYPES
    defaults = compat.generation_defaults()
    requests, alone, reasons = [], [], set()
    for index, item in enumerate(prompts):
        own = dict(item.settings) if isinstance(item, Request) else {}
        prompt = _prompt_ids(item.prompt if isinstance(item, Request) else item, tokenizer, index)
        request_seed = own.pop("seed", seed)
        config = copy.deepcopy(base)
        unknown = config.update(**own)
        if unknown:
            raise ValueError(f"hf_paged: prompt {index} has settings that are not generation settings: {sorted(unknown)}")
        other = _settings_beyond_the_engine(config, defaults)
        if other or not engine_model:
            reasons |= set(other) if other else {f"model_type {compat.text_config(model.config).model_type!r}"}
            alone.append((index, prompt, config, {**generation_kwargs, **own}, request_seed))
            continue
        requests.append(_engine_request(index, prompt, config, request_seed, tokenizer))
    if alone:
        logger.warning("hf_paged: generate_many runs %d prompt(s) through model.generate, one at a time: the engine "
                       "does not implement %s.", len(alone), ", ".join(sorted(reasons)))
    return requests, alone


def _prompt_ids(prompt, tokenizer, index: int) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError(f"hf_paged: prompt {index} is a string: pass tokenizer= to generate_many")
        prompt = tokenizer(prompt)["input_ids"]
    elif isinstance(prompt, torch.Tensor):
        prompt = prompt.reshape(-1).tolist()
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise ValueError(f"hf_paged: prompt {index} is empty")
    return prompt


def _settings_beyond_the_engine(config: GenerationConfig, defaults: dict) -> list[str]:
    """The settings of ``config`` the engine does not apply, where they differ from transformers'
    ``defaults``."""
    return sorted(name for name, value in config.to_dict().items()
                  if not name.startswith("_") and name not in ENGINE_FIELDS and name in defaults
                  and value is not None and value != defaults[name])


def _engine_request(index, prompt, config, seed, tokenizer) -> EngineRequest:
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    else:
        max_new = (config.max_length or 20) - len(prompt)
    if max_new < 1:
        raise ValueError(f"hf_paged: prompt {index} has {len(prompt)} tokens, max_length={config.max_length} leaves "
                         f"no room for new tokens: set max_new_tokens")
    eos = _eos_ids(config)
    stop = config.stop_strings
    stop = tuple([stop] if isinstance(stop, str) else stop or ())
    if stop and tokenizer is None:
        raise ValueError("hf_paged: stop_strings need tokenizer= (the stop strings are found in decoded text)")
    sampling = SamplingParams(
        do_sample=bool(config.do_sample), temperature=config.temperature if config.temperature is not None else 1.0,
        top_k=config.top_k or 0, top_p=config.top_p if config.top_p is not None else 1.0, min_p=config.min_p or 0.0,
        repetition_penalty=config.repetition_penalty or 1.0,
    )
    min_new = config.min_new_tokens or max(0, (config.min_length or 0) - len(prompt))
    return EngineRequest(index, prompt, max_new, min_new, eos, stop, sampling, config.num_return_sequences or 1, seed)


def _eos_ids(config: GenerationConfig) -> frozenset[int]:
    eos = config.eos_token_id
    return frozenset([] if eos is None else [eos] if isinstance(eos, int) else eos)


def _texts(sequences: list[list[int]], tokenizer) -> list[str] | None:
    return [tokenizer.decode(s, skip_special_tokens=True) for s in sequences] if tokenizer is not None else None


def _result(request: EngineRequest, tokenizer) -> GenerationResult:
    sequences = [seq.generated for seq in request.sequences]
    return GenerationResult(request.index, request.prompt, sequences, [s.finish_reason for s in request.sequences],
                            _texts(sequences, tokenizer))


def _generate_alone(model, index, prompt, generation_config, settings, config, seed, tokenizer) -> GenerationResult:
    """One prompt through model.generate, with the call's and the prompt's own settings as given
    (``config``: what generate resolves them to), cut after each sequence's end token."""
    torch.manual_seed(seed)
    ids = torch.tensor([prompt], device=model.device)
    if config.stop_strings:
        settings = dict(settings, tokenizer=tokenizer)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=generation_config,
                             **settings)
    eos = _eos_ids(config)
    sequences, reasons = [], []
    for row in out[:, len(prompt):].tolist():
        end = next((i + 1 for i, t in enumerate(row) if t in eos), None)
        sequences.append(row[:end] if end else row)
        reasons.append("eos" if end else "length")
    return GenerationResult(index, prompt, sequences, reasons, _texts(sequences, tokenizer))
