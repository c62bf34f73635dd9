"""Sizes: memory strings, the bytes one token's K/V take, argument checks of the cache's sizes.

No tensors are allocated here and nothing imports transformers: a config is read by attribute.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

_MEMORY_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_memory(value: int | float | str, name: str = "max_memory") -> int:
    """Bytes from a number or a string such as ``"2GiB"``, ``"512 MB"``; ``name`` is the argument
    named in the error."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"hf_paged: {name} must be a positive, finite number of bytes, got {value!r}")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value) if isinstance(value, str) else None
    if not m or m.group(2).lower() not in _MEMORY_UNITS:
        raise ValueError(
            f"hf_paged: cannot read {name}={value!r}; use bytes (a positive int) or a string such as "
            f"'2GiB', '1500MB'."
        )
    size = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"hf_paged: {name} must be a positive number of bytes, got {value!r}")
    return size


def check_count(value, name: str, minimum: int = 1) -> int | None:
    """``value`` as an int >= ``minimum`` (None passes), else a ValueError naming ``name``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"hf_paged: {name} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    return int(value)


def config_kv_shape(config) -> tuple[int, int, int, int] | None:
    """``(layers, kv_heads, key_dim, value_dim)`` of the K/V a model with this config stores per
    token, or None when the config does not say."""
    if config is None:
        return None
    try:
        layers = config.num_hidden_layers
        heads = config.num_attention_heads
        if getattr(config, "kv_lora_rank", None):
            # multi-head latent attention (DeepSeek-V2/V3): one head of two compressed latents
            return layers, 1, config.kv_lora_rank, config.qk_rope_head_dim
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        layers -= getattr(config, "num_kv_shared_layers", 0) or 0  # layers reading another's K/V (Gemma3n)
    except (AttributeError, TypeError):
        return None
    return layers, kv_heads, head_dim, head_dim


def config_bytes_per_token(config, dtype) -> int:
    """K+V bytes of one token over all layers, from the config (0 when it does not say)."""
    shape = config_kv_shape(config)
    if shape is None:
        return 0
    layers, kv_heads, key_dim, value_dim = shape
    dtype = dtype or getattr(config, "dtype", None) or torch.get_default_dtype()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return layers * kv_heads * (key_dim + value_dim) * torch.empty((), dtype=dtype).element_size()


def blocks_within(max_memory: int, bytes_per_token: int, block_size: int) -> int:
    """The number of blocks of ``block_size`` tokens that fit in ``max_memory`` bytes."""
    if not bytes_per_token:
        raise ValueError("hf_paged: max_memory needs the model config to size a block: pass "
                         "PagedCache(config=model.config, max_memory=...) or use max_blocks.")
    max_blocks = max_memory // (bytes_per_token * block_size)
    if max_blocks < 1:
        raise ValueError(f"hf_paged: max_memory={max_memory} bytes is less than one block "
                         f"({bytes_per_token * block_size} bytes at block_size={block_size})")
    return max_blocks
