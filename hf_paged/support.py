"""Which models the paged cache serves: the check at load, and the refusal of inputs it cannot serve.

Served: decoder-only models whose attention goes through transformers' attention interface and
whose cache holds attention K/V only: full, sliding-window and chunked attention layers, layers
reading another layer's K/V (Gemma3n), DeepSeek-V2/V3's latent attention. Refused at load, with the
reason: encoder-decoder models, models with their own attention code, models with conv / SSM /
linear-attention state, other latent-attention models. A multimodal model loads and serves text
prompts; image, video and audio inputs are refused when they reach a forward with a paged cache.
"""

from __future__ import annotations

from . import compat
from .cache import PagedCache


class UnsupportedModelError(ValueError):
    """The model (or this input of it) cannot keep its KV cache in hf_paged's paged cache."""


# Model types whose attention does not go through transformers' attention interface. Most are
# caught by ``_supports_attention_backend``; this list also covers versions where the flag is set
# but the model still builds its own attention classes or ignores the name.
UNSUPPORTED_MODEL_TYPES = {"falcon", "gptj", "gpt_neo", "bloom", "mpt", "codegen", "xglm"}
# Layer types whose K/V the paged cache holds; any other type keeps state the cache has no room
# for (conv, SSM, linear attention) or attends in a way the kernels do not implement.
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
    if model_type in UNSUPPORTED_MODEL_TYPES or not compat.supports_attention_backend(model_cls):
        refuse("it does not route its attention through transformers' attention interface (supported families "
               "include Llama, Mistral, Qwen2/3, Gemma2/3/3n, Phi3, GPT-2, OPT, GPT-NeoX, Starcoder2, OLMo2, "
               "DeepSeek-V2/V3 and Llama 4)")
    other = sorted(set(compat.layer_types(config)) - ATTENTION_LAYER_TYPES)
    if other:
        refuse(f"it keeps conv/SSM/linear-attention state in its cache (layer_types include {other}), and the paged "
               f"cache holds attention K/V only")
    if compat.is_stateful(model_cls):
        refuse("it keeps recurrent state in its cache, and the paged cache holds attention K/V only")
    text = compat.text_config(config)
    if getattr(text, "kv_lora_rank", None) is not None and getattr(text, "model_type", None) \
            not in LATENT_ATTENTION_MODEL_TYPES:
        refuse(f"its multi-head latent attention is served for {sorted(LATENT_ATTENTION_MODEL_TYPES)} only")


def guard_media_inputs(model) -> None:
    """A multimodal model refuses image/video/audio inputs in a forward with a paged cache (a
    forward pre-hook, installed once)."""
    if compat.input_modalities(type(model)) - {"text"} and not getattr(model, "_hf_paged_media_hook", False):
        model.register_forward_pre_hook(_refuse_media_inputs, with_kwargs=True)
        model._hf_paged_media_hook = True


def _refuse_media_inputs(module, args, kwargs):
    if compat.cache_key(kwargs, PagedCache) is None:
        return None
    media = compat.media_inputs(kwargs)
    if media:
        raise UnsupportedModelError(
            f"{type(module).__name__} (model_type={getattr(module.config, 'model_type', '?')!r}) got {media} with "
            f"attn_implementation='paged': image, video and audio prompts are not supported (their tokens attend to "
            f"each other both ways, and prompts are shared by their token ids, which are the same for every image). "
            f"Text-only prompts work; load the model with attn_implementation='sdpa' for multimodal ones."
        )
    return None
