"""Every contact with transformers' internals, in one module.

Each function here relies on something transformers does not promise; each has a test in
``tests/test_compat.py`` named after the internal it relies on, so that a transformers release
that changes one fails there first, by name. Supported: transformers 5.17 to the newest release.

- generate's private methods we wrap, with the leading parameters we wrap them with;
- the cache's keyword: ``cache`` from 5.2x, ``past_key_values`` before (generate's kwargs, the
  model kwargs, the output's field);
- ``crop``'s convention (5.23+: ``crop(-n)`` drops n tokens; 5.17 keeps ``max_length``);
- ``DeferredStopCheck.is_supported``: whether ``_sample`` reads its stop flag one step late (no
  host-device synchronisation per step) and undoes the one extra step (``crop(-1)``);
- the mask builders: ``get_mask_sizes`` (5.17 passes a cache_position tensor in older code
  paths) and the ``kv_offset`` it returns, which they hand to the mask function untouched; the
  mask function's keyword arguments;
- what models say of themselves: the attention-interface flag, recurrent state, layer types,
  Gemma3n's K/V-sharing layers, DeepSeek's latent expansion, Llama 4's attention chunks, the
  input modalities and the names of multimodal inputs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import NamedTuple

import torch
import transformers
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache

ATTN_NAME = "paged"

# ----------------------------------------------------------------------------- wrapped methods
# name -> (owner class, the leading parameters our wrapper passes through by position)
WRAPPED = {
    "_prepare_cache_for_generation": (
        GenerationMixin,
        ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"],
    ),
    "_prefill": (GenerationMixin, ["self", "input_ids", "generation_config", "model_kwargs", "is_first_iteration"]),
    "_check_and_adjust_attn_implementation": (PreTrainedModel, ["self", "attn_implementation", "is_init_check"]),
    "generate": (GenerationMixin, ["self"]),
}


def check_signatures() -> None:
    """ImportError naming the transformers version when a wrapped method's parameters changed."""
    for name, (owner, expected) in WRAPPED.items():
        fn = getattr(owner, name, None)
        fn = getattr(fn, "__wrapped__", fn)
        params = list(inspect.signature(fn).parameters) if fn is not None else None
        if params is None or params[: len(expected)] != expected:
            raise ImportError(
                f"hf_paged supports transformers 5.17 and newer releases with "
                f"{owner.__name__}.{name}{tuple(expected)}; transformers {transformers.__version__} has "
                f"{params}. Install a supported transformers version (pip install 'transformers>=5.17')."
            )


def install_wrappers(factories: dict) -> None:
    """Replace each method ``name`` of ``WRAPPED`` by ``factories[name](original)``, once (a
    method we already wrapped is left alone: importing twice is harmless)."""
    check_signatures()
    for name, make in factories.items():
        owner = WRAPPED[name][0]
        setattr(owner, name, _wrap_once(getattr(owner, name), make))


def _wrap_once(current, make):
    """``make(current)``, marked as ours, or ``current`` itself when it is already ours."""
    if getattr(current, "_hf_paged", False):
        return current
    wrapped = functools.wraps(current)(make(current))
    wrapped._hf_paged = True
    return wrapped


# ----------------------------------------------------------------------------- deferred stop check
# generate's sampling loop asks this (device, cache, cache_is_returned, is_assistant) whether it
# may read "every row finished" one step late, from an event it does not wait for at once, and
# undo the one step too many it may then run (the cache through crop(-1)). Off but for Apple's
# "mps" in transformers; a PagedCache opts in (generation.py).
DEFERRED_STOP_PARAMS = ["device", "cache", "cache_is_returned", "is_assistant"]


def deferred_stop_check():
    """transformers' ``DeferredStopCheck`` class, or None where a release has none (the decode
    loop then synchronises every step, as before: only speed is lost)."""
    from transformers.generation import utils

    cls = getattr(utils, "DeferredStopCheck", None)
    method = inspect.getattr_static(cls, "is_supported", None) if cls is not None else None
    if not isinstance(method, staticmethod):
        return None
    params = list(inspect.signature(method.__func__).parameters)
    return cls if params[: len(DEFERRED_STOP_PARAMS)] == DEFERRED_STOP_PARAMS else None


def install_deferred_stop(make) -> bool:
    """Replace ``DeferredStopCheck.is_supported`` by ``make(original)`` (a staticmethod), once;
    False where the release has no such method of the expected parameters."""
    cls = deferred_stop_check()
    if cls is None:
        return False
    cls.is_supported = staticmethod(_wrap_once(cls.is_supported, make))
    return True


# ----------------------------------------------------------------------------- the cache keyword
CACHE_KEYS = ("cache", "past_key_values")  # "cache" from transformers 5.2x, "past_key_values" before


def cache_key(kwargs: dict, cls: type) -> str | None:
    """The key under which ``kwargs`` (generate's or the model's) hold an instance of ``cls``."""
    for key in CACHE_KEYS:
        if isinstance(kwargs.get(key), cls):
            return key
    return None


def generate_cache_kwarg() -> str:
    """generate's keyword for a user cache: ``cache`` from transformers 5.2x (``past_key_values``
    still works there but warns), ``past_key_values`` before."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in {f.name for f in dataclasses.fields(GenerateDecoderOnlyOutput)} else "past_key_values"


def cache_of(generate_output):
    """The cache a ``generate(..., return_dict_in_generate=True)`` output holds: ``cache`` from
    transformers 5.2x, ``past_key_values`` before (reading the old name on 5.2x would warn)."""
    if "cache" in generate_output:
        return generate_output["cache"]
    return getattr(generate_output, "past_key_values", None)


def forward_cache_kwarg(model) -> str:
    """The model forward's keyword for the cache: ``cache`` from transformers 5.2x,
    ``past_key_values`` before."""
    return "cache" if "cache" in _forward_parameters(type(model)) else "past_key_values"


def takes_logits_to_keep(model) -> bool:
    """The forward computes the LM head for the last ``logits_to_keep`` positions only."""
    return "logits_to_keep" in _forward_parameters(type(model))


def takes_position_ids(model) -> bool:
    """The forward takes ``position_ids`` (a packed prefill gives each token its position)."""
    return "position_ids" in _forward_parameters(type(model))


@functools.lru_cache(maxsize=None)
def _forward_parameters(model_cls) -> frozenset[str]:
    return frozenset(inspect.signature(model_cls.forward).parameters)


def resolve_generation_config(model, generation_config, kwargs: dict):
    """``(config, unknown)``: the generation config generate would use (the model's own settings,
    transformers' defaults, then ``kwargs``), and the kwargs that are not generation settings."""
    return model._prepare_generation_config(generation_config, **kwargs)


def generation_defaults() -> dict:
    """transformers' values for the generation settings a model and a call leave unset."""
    from transformers import GenerationConfig

    return GenerationConfig._get_default_generation_params()


def replace_dynamic_cache(model_kwargs: dict, make) -> None:
    """Swap the DynamicCache ``_prepare_cache_for_generation`` just made for ``make()``."""
    for key in CACHE_KEYS:
        if type(model_kwargs.get(key)) is DynamicCache:
            model_kwargs[key] = make()


def crop_length(current: int, max_length) -> int | None:
    """The logical length ``crop(max_length)`` asks for, or None for no change: transformers 5.23+
    calls ``crop(-n)`` to drop n tokens and ``crop(0)`` as a no-op; 5.17 passes the length to keep
    (assisted decoding as a tensor)."""
    max_length = int(max_length)
    if max_length == 0:
        return None
    if max_length < 0:
        max_length = max(0, current + max_length)
    return max_length if max_length < current else None


# ----------------------------------------------------------------------------- masks
def mask_query_length(query_length) -> int:
    """``get_mask_sizes``'s first argument as an int (older paths pass a cache_position tensor)."""
    return query_length.shape[0] if isinstance(query_length, torch.Tensor) else int(query_length)


class MaskOffset(int):
    """The ``kv_offset`` (always 0) a PagedCache's ``get_mask_sizes`` returns, carrying the cache
    to our mask function.

    transformers' mask builders call ``cache.get_mask_sizes`` and hand the offset it returns to
    the mask function registered for the attention implementation, which is not given the cache
    itself. The handle lives exactly as long as that one call's arguments: nothing outlives it
    (another model's mask function, an exception) to be picked up by a later forward. Any other
    mask function sees a plain 0.
    """

    def __new__(cls, cache):
        offset = super().__new__(cls, 0)
        offset.paged_cache = cache
        return offset


class MaskCall(NamedTuple):
    """What our mask function reads of its keyword arguments."""

    cache: object | None  # the PagedCache of the forward (None: no paged cache)
    attention_mask: torch.Tensor | None  # the 2D padding mask (None: none, or a 4D mask given)
    q_len: int
    batch_size: int
    device: torch.device
    dtype: torch.dtype | None
    config: object | None


def read_mask_call(kwargs: dict) -> MaskCall:
    attention_mask = kwargs.get("attention_mask")
    device = kwargs.get("device")
    if device is None:
        device = attention_mask.device if attention_mask is not None else torch.device("cpu")
    return MaskCall(
        cache=getattr(kwargs.get("kv_offset"), "paged_cache", None),
        attention_mask=attention_mask if attention_mask is None or attention_mask.dim() == 2 else None,
        q_len=kwargs["q_length"], batch_size=kwargs["batch_size"], device=torch.device(device),
        dtype=kwargs.get("dtype"), config=kwargs.get("config"),
    )


def plain_mask_kwargs(kwargs: dict) -> dict:
    """The mask function's kwargs for transformers' own ``sdpa_mask``, always materialised."""
    kwargs = dict(kwargs, allow_is_causal_skip=False)
    if "kv_offset" in kwargs:
        kwargs["kv_offset"] = int(kwargs["kv_offset"])
    return kwargs


# ----------------------------------------------------------------------------- models
def text_config(config):
    """The decoder's config (a multimodal model's text config; the config itself otherwise)."""
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def decoder_layers(model) -> list:
    """The model's decoder layers in order: the ``ModuleList`` as long as the text config's
    ``num_hidden_layers`` (one named ``layers`` or ``h`` first: Llama's ``model.layers``, GPT-2's
    ``transformer.h``); [] when there is none."""
    n = getattr(text_config(model.config), "num_hidden_layers", None)
    if not n:
        return []
    lists = [(name, m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n]
    named = [m for name, m in lists if name.rsplit(".", 1)[-1] in ("layers", "h")]
    return list((named or [m for _, m in lists] or [[]])[0])


def layer_types(config) -> list[str]:
    return list(getattr(text_config(config), "layer_types", None) or ())


def supports_attention_backend(model_cls) -> bool:
    return bool(getattr(model_cls, "_supports_attention_backend", False))


def is_stateful(model_cls) -> bool:
    """The model keeps recurrent state (RNN-like layers) beside or instead of a K/V cache (up to
    transformers 5.24; 5.25 dropped the flag and names such layers in the config's layer_types,
    which support.check_supported reads too)."""
    return bool(getattr(model_cls, "_is_stateful", False))


def input_modalities(model_cls) -> set[str]:
    modalities = getattr(model_cls, "input_modalities", "text")
    return {modalities} if isinstance(modalities, str) else set(modalities)


# Names of generate's / forward's multimodal inputs (transformers' VLMs and audio models).
MEDIA_INPUT_PREFIXES = ("pixel_", "image_", "video_", "audio_", "input_features", "mm_encoder_outputs")


def media_inputs(kwargs: dict) -> list[str]:
    """The multimodal inputs of a forward's kwargs that carry something (generate passes empty
    encoder outputs with text prompts)."""
    return sorted(k for k, v in kwargs.items() if k.startswith(MEDIA_INPUT_PREFIXES) and _holds_media(v))


def _holds_media(value) -> bool:
    if isinstance(value, dict):
        return any(_holds_media(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_media(v) for v in value)
    return value is not None


def kv_source_layer(module) -> int:
    """The layer whose K/V an attention layer reads: its own, or for a layer that reuses an
    earlier layer's K/V (Gemma3n's last ``num_kv_shared_layers``, ``is_kv_shared_layer``), the last
    earlier layer of its type, which stores them (transformers' rule in 5.17 and later alike)."""
    layer = module.__dict__.get("_hf_paged_kv_layer")
    if layer is None:
        layer = module.layer_idx
        if getattr(module, "is_kv_shared_layer", False):
            config = module.config
            first_shared = config.num_hidden_layers - config.num_kv_shared_layers
            kind = config.layer_types[layer]
            layer = max(i for i in range(first_shared) if config.layer_types[i] == kind)
        module.__dict__["_hf_paged_kv_layer"] = layer
    return layer


def latent_expander(module):
    """A multi-head latent attention layer's ``expand_kv(latent, rope_key) -> (key, value)``
    (DeepSeek-V2/V3 cache the compressed latents and expand them after reading the cache), or None."""
    expand = getattr(module, "expand_kv", None)
    return expand if callable(expand) else None


def layer_chunk_size(module) -> int | None:
    """The attention chunk of a chunked-attention layer (Llama 4), None for any other layer.

    transformers gives the attention function no chunk (no kwarg, no module attribute): the stock
    path applies it through the mask (create_chunked_causal_mask) of the layers whose
    ``config.layer_types[layer_idx]`` is ``"chunked_attention"``, which the paged mask does not build.
    """
    config = getattr(module, "config", None)
    types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if types is None or layer_idx is None or not 0 <= layer_idx < len(types):
        return None
    if types[layer_idx] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)
