"""Hooks into ``generate`` for models loaded with ``attn_implementation="paged"``.

transformers offers no public hook to choose the cache ``generate`` creates, so we wrap three
private methods, each guarded by the attention name (every other model runs them unchanged):

- ``PreTrainedModel._check_and_adjust_attn_implementation``: refuse, at load, models whose
  attention does not go through transformers' attention interface and encoder-decoder models.
- ``GenerationMixin._prepare_cache_for_generation``: create a :class:`PagedCache` when the user
  passed no cache.
- ``GenerationMixin.generate`` (public): for the duration of the call, ``model.forward`` is a
  :class:`~hf_paged.graphs.GraphedForward`, which runs decode steps as CUDA graphs.
- ``GenerationMixin._prefill``: when ``generate`` has expanded prompts for beams or
  ``num_return_sequences``, run each distinct prompt's prefill once, then fork the rows (blocks by
  reference, logits broadcast); and hand the prompt tokens to the cache for prefix sharing.

At import we check that each wrapped method still has the signature we wrap, and fail with the
transformers version in the message if not.
"""

from __future__ import annotations

import functools
import inspect

import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache

from .attention import ATTN_NAME
from .cache import PagedCache
from .graphs import GraphedForward, graphs_enabled

# Model types whose attention does not go through transformers' attention interface. Most are
# caught by ``_supports_attention_backend``; this list also covers versions where the flag is set
# but the model still builds its own attention classes or ignores the name.
UNSUPPORTED_MODEL_TYPES = {"falcon", "gptj", "gpt_neo", "bloom", "mpt", "codegen", "xglm"}

_EXPECTED = {
    "_prepare_cache_for_generation": (
        GenerationMixin,
        ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"],
    ),
    "_prefill": (GenerationMixin, ["self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration"]),
    "_check_and_adjust_attn_implementation": (PreTrainedModel, ["self", "attn_implementation", "is_init_check"]),
    "generate": (GenerationMixin, ["self"]),
}


class UnsupportedModelError(ValueError):
    """The model cannot keep its KV cache in hf_paged's paged cache."""


def _check_signatures() -> None:
    for name, (owner, expected) in _EXPECTED.items():
        fn = getattr(owner, name, None)
        fn = getattr(fn, "__wrapped__", fn)
        params = list(inspect.signature(fn).parameters) if fn is not None else None
        if params is None or params[: len(expected)] != expected:
            raise ImportError(
                f"hf_paged supports transformers 5.17 and newer releases with "
                f"{owner.__name__}.{name}{tuple(expected)}; transformers {transformers.__version__} has "
                f"{params}. Install a supported transformers version (pip install 'transformers>=5.17')."
            )


def is_paged(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == ATTN_NAME


# Layer types whose K/V the paged cache holds; any other type keeps state the cache has no room
# for (conv, SSM, linear-attention) or attends in a way the kernels do not implement.
ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
# Multi-head latent attention models known to cache the compressed latents and expand them with
# ``module.expand_kv`` after reading the cache (what the paged attention's latent path serves).
LATENT_ATTENTION_MODEL_TYPES = {"deepseek_v2", "deepseek_v3"}


def check_supported(model_cls, config) -> None:
    """Raise :class:`UnsupportedModelError` for models the paged cache cannot serve."""
    model_type = getattr(config, "model_type", "?")
    name = getattr(model_cls, "__name__", str(model_cls))

    def refuse(reason: str):
        raise UnsupportedModelError(
            f"{name} (model_type={model_type!r}) is not supported by attn_implementation='paged': {reason}. Load it "
            f"with attn_implementation='sdpa' or 'eager'."
        )

    if getattr(config, "is_encoder_decoder", False):
        refuse("it is an encoder-decoder model (the paged cache keeps decoder-only self-attention caches)")
    if model_type in UNSUPPORTED_MODEL_TYPES or not getattr(model_cls, "_supports_attention_backend", False):
        refuse("it does not route its attention through transformers' attention interface (supported families "
               "include Llama, Mistral, Qwen2/3, Gemma2/3, Phi3, GPT-2, OPT, GPT-NeoX, Starcoder2 and OLMo2)")
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    layer_types = set(getattr(text, "layer_types", None) or ())
    if getattr(model_cls, "_is_stateful", False) or layer_types - ATTENTION_LAYER_TYPES:
        other = sorted(layer_types - ATTENTION_LAYER_TYPES)
        refuse(f"it keeps conv/SSM/linear-attention state in its cache (layer_types include {other}), and the paged "
               f"cache holds attention K/V only" if other else
               "it keeps recurrent state in its cache, and the paged cache holds attention K/V only")
    if getattr(text, "kv_lora_rank", None) is not None and getattr(text, "model_type", None) \
            not in LATENT_ATTENTION_MODEL_TYPES:
        refuse(f"its multi-head latent attention is served for {sorted(LATENT_ATTENTION_MODEL_TYPES)} only")


def _refuse_media_inputs(module, args, kwargs):
    """Forward pre-hook of multimodal models: image/audio/video inputs with a paged cache."""
    if not any(isinstance(kwargs.get(k), PagedCache) for k in ("cache", "past_key_values")):
        return None
    media = sorted(k for k, v in kwargs.items() if k.startswith(MEDIA_INPUT_PREFIXES) and _holds_media(v))
    if media:
        raise UnsupportedModelError(
            f"{type(module).__name__} (model_type={getattr(module.config, 'model_type', '?')!r}) got {media} with "
            f"attn_implementation='paged': image, video and audio prompts are not supported (their tokens attend to "
            f"each other both ways, and prompts are shared by their token ids, which are the same for every image). "
            f"Text-only prompts work; load the model with attn_implementation='sdpa' for multimodal ones."
        )
    return None


def _holds_media(value) -> bool:
    """A multimodal input that carries something (generate passes empty encoder outputs for text)."""
    if isinstance(value, dict):
        return any(_holds_media(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_media(v) for v in value)
    return value is not None


# Names of generate's/forward's multimodal inputs (transformers' VLMs and audio models).
MEDIA_INPUT_PREFIXES = ("pixel_", "image_", "video_", "audio_", "input_features", "mm_encoder_outputs")


def _paged_cache_key(model_kwargs: dict) -> str | None:
    for key in ("cache", "past_key_values"):  # "cache" from transformers 5.2x, "past_key_values" before
        if isinstance(model_kwargs.get(key), PagedCache):
            return key
    return None


def _wrap_check_attn(orig):
    @functools.wraps(orig)
    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, *args, **kwargs):
        if attn_implementation == ATTN_NAME:
            check_supported(type(self), self.config)
            modalities = getattr(type(self), "input_modalities", "text")
            if set([modalities] if isinstance(modalities, str) else modalities) - {"text"} and \
                    not getattr(self, "_hf_paged_media_hook", False):
                self.register_forward_pre_hook(_refuse_media_inputs, with_kwargs=True)
                self._hf_paged_media_hook = True
        return orig(self, attn_implementation, is_init_check, *args, **kwargs)

    return _check_and_adjust_attn_implementation


def _wrap_prepare_cache(orig):
    @functools.wraps(orig)
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if not is_paged(self):
            return orig(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        check_supported(type(self), self.config)
        impl = generation_config.cache_implementation
        user_cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if impl not in (None, "dynamic") and user_cache is None:
            raise ValueError(
                f"hf_paged: the model was loaded with attn_implementation='paged', which keeps its KV cache "
                f"in a PagedCache; cache_implementation={impl!r} cannot be combined with it. Drop "
                f"cache_implementation (or pass past_key_values=hf_paged.PagedCache(...) to set the block "
                f"size or a memory cap)."
            )
        out = orig(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if user_cache is None:
            # Replace the DynamicCache transformers just made, under whatever key this version uses.
            for key in ("cache", "past_key_values"):
                if type(model_kwargs.get(key)) is DynamicCache:
                    model_kwargs[key] = PagedCache(config=self.config)
        return out

    return _prepare_cache_for_generation


def _wrap_prefill(orig):
    @functools.wraps(orig)
    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kwargs):
        key = _paged_cache_key(model_kwargs) if is_paged(self) else None
        if key is None:
            return orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        cache: PagedCache = model_kwargs[key]
        if generation_config.output_attentions:
            raise ValueError(
                "hf_paged: output_attentions=True cannot be served by attn_implementation='paged': its kernels never "
                "materialise attention weights. Load the model with attn_implementation='eager' to get them."
            )
        mask = model_kwargs.get("attention_mask")
        fresh = (
            cache.get_seq_length() == 0
            and not cache.block_tables
            and model_kwargs.get("inputs_embeds") is None
            and getattr(generation_config, "prefill_chunk_size", None) is None
            and (mask is None or mask.dim() == 2)
        )
        if not fresh:
            return orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)

        batch = input_ids.shape[0]
        rep, inverse, lengths, left_padded = _distinct_rows(input_ids, mask)
        if not cache.share_prefixes:
            rep, inverse = list(range(batch)), list(range(batch))
        prompt_lengths = [lengths[r] for r in rep]
        copies = [inverse.count(d) for d in range(len(rep))]
        max_new = generation_config.max_new_tokens
        if max_new is None and generation_config.max_length is not None:
            max_new = generation_config.max_length - input_ids.shape[1]
        cache._resolve_memory_cap(self.dtype)
        cache.reserve_for_generation(prompt_lengths, copies, 0)

        groups = _prefill_groups(prompt_lengths, cache.max_prefill_tokens)
        if len(groups) == 1 and len(rep) == batch:
            # one forward over the batch as given: exactly stock's prefill
            cache.set_prefill_tokens(input_ids)
            outputs = orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        else:
            # Groups are trimmed to their longest prompt, which needs pads first in every row, and
            # per-position outputs (hidden states, attentions) keep stock's [rows, width] shapes.
            per_position = generation_config.output_hidden_states or generation_config.output_attentions
            trim = left_padded and not per_position
            if not trim:
                groups = [list(range(len(rep)))]
            outputs = _grouped_prefill(orig, self, cache, input_ids, generation_config, model_kwargs,
                                       is_first_iteration, rep, lengths, groups, trim, args, kwargs)
            if len(rep) < batch:
                # generate expanded the prompts (beams / num_return_sequences): each distinct prompt
                # was prefilled once; fork the rows, sharing blocks copy-on-write.
                cache.fork_rows(inverse)
                inv_t = torch.tensor(inverse, device=input_ids.device)
                for name, value in list(outputs.items()):
                    if value is not cache:
                        outputs[name] = _broadcast_rows(value, inv_t, len(rep))
        if max_new is not None:
            cache.reserve_for_generation(prompt_lengths, copies, max_new)
        return outputs

    return _prefill


def _prefill_groups(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
    """Rows sorted by length (longest first) in groups of at most ``max_tokens`` padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    if max_tokens is None or len(lengths) * max(lengths, default=0) <= max_tokens:
        return [order]
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * lengths[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _grouped_prefill(orig, model, cache, input_ids, generation_config, model_kwargs, is_first_iteration,
                     rep, lengths, groups, trim, args, kwargs):
    """Prefill the distinct prompts ``rep`` group by group, each trimmed to its longest prompt
    when ``trim`` (left-padded rows only), else over the batch's whole width.

    Cache row ``d`` holds prompt ``rep[d]``. Only the last position's logits leave the prefill
    (that is all generate reads of it), so they are gathered into one ``[len(rep), 1, vocab]``;
    one group gives its other outputs (hidden states) whole.
    """
    batch, width = input_ids.shape
    cache._add_rows(len(rep))
    merged = None
    outputs = None
    try:
        for group in groups:
            rows = [rep[d] for d in group]
            rows_t = torch.tensor(rows, device=input_ids.device)
            w = max(1, max(lengths[r] for r in rows)) if trim else width
            sub = {k: _take_rows(v, rows_t, batch) for k, v in model_kwargs.items()}
            for k in ("attention_mask", "position_ids", "token_type_ids"):
                v = sub.get(k)
                if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width:
                    sub[k] = v[:, width - w:]
            ids = input_ids.index_select(0, rows_t)[:, width - w:]
            cache._end_forward()  # the previous group's forward is over
            cache._group_rows = group
            cache._logical_len = 0
            cache.set_prefill_tokens(ids)
            outputs = orig(model, ids, generation_config, sub, is_first_iteration, *args, **kwargs)
            logits = outputs["logits"][:, -1:, :]
            if merged is None:
                merged = logits.new_empty((len(rep),) + tuple(logits.shape[1:]))
            merged[torch.tensor(group, device=logits.device)] = logits
        cache._end_forward()
    finally:
        cache._group_rows = None
        cache._forward = None
    cache._logical_len = width
    if trim:
        for d in range(len(rep)):  # logically every row is as wide as the batch: its pads come first
            cache.pad_lens[d] = width - cache.seq_lens[d]
    outputs["logits"] = merged
    return outputs


def _distinct_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
    """First row of each distinct (tokens, mask) prompt, each row's index among them, each row's
    real (non-pad) length, and whether every row has its pads first (left padding)."""
    ids = input_ids.cpu().numpy()
    mask = attention_mask.cpu().numpy() if attention_mask is not None and attention_mask.dim() == 2 else None
    first: dict[bytes, int] = {}
    rep: list[int] = []
    inverse: list[int] = []
    for b in range(ids.shape[0]):
        k = ids[b].tobytes() + (mask[b].tobytes() if mask is not None else b"")
        if k not in first:
            first[k] = len(rep)
            rep.append(b)
        inverse.append(first[k])
    lengths = mask.sum(axis=1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
    left_padded = mask is None or bool((mask[:, 1:] >= mask[:, :-1]).all())
    return rep, inverse, lengths, left_padded


def _take_rows(value, rows: torch.Tensor, batch: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch:
        return value.index_select(0, rows.to(value.device))
    return value


def _broadcast_rows(value, inverse: torch.Tensor, n_distinct: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_distinct:
        return value.index_select(0, inverse.to(value.device))
    if isinstance(value, tuple):
        return tuple(_broadcast_rows(v, inverse, n_distinct) for v in value)
    return value


def _wrap_generate(orig):
    @functools.wraps(orig)
    def generate(self, *args, **kwargs):
        if not is_paged(self):
            return orig(self, *args, **kwargs)
        user_cache = _paged_cache_key(kwargs)
        user_cache = kwargs[user_cache] if user_cache is not None else None
        forwards_before = user_cache.forwards if user_cache is not None else 0
        # An instance attribute "forward" already there is someone else's (accelerate's device_map
        # hooks): leave the model as it is. Installed for this call only, removed by its owner.
        graphed = None
        if graphs_enabled() and "forward" not in self.__dict__:
            graphed = self.forward = GraphedForward(self)
        try:
            return orig(self, *args, **kwargs)
        except BaseException as exc:
            # The user's cache holds whatever the interrupted generation had written: refuse to
            # continue from it (a later call would build on incomplete rows) until reset().
            if user_cache is not None and user_cache.forwards != forwards_before and user_cache.interrupted is None:
                user_cache.interrupted = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            if graphed is not None and self.__dict__.get("forward") is graphed:
                del self.__dict__["forward"]

    return generate


_WRAPPERS = {
    "generate": _wrap_generate,
    "_prepare_cache_for_generation": _wrap_prepare_cache,
    "_prefill": _wrap_prefill,
    "_check_and_adjust_attn_implementation": _wrap_check_attn,
}


def install() -> None:
    """Wrap the private methods (idempotent: a method already wrapped by us is left alone)."""
    _check_signatures()
    for name, wrap in _WRAPPERS.items():
        owner = _EXPECTED[name][0]
        current = getattr(owner, name)
        if getattr(current, "_hf_paged", False):
            continue
        wrapped = wrap(current)
        wrapped._hf_paged = True
        setattr(owner, name, wrapped)
