"""The ``"paged"`` attention implementation: its registration, its mask function and dispatch.

transformers looks attention up by name (``AttentionInterface``) and builds masks with a function
registered under the same name (``AttentionMaskInterface``; without one, padded batches silently
lose their mask). Our mask function does not build a mask: when the forward uses a
:class:`~hf_paged.cache.PagedCache` it returns that forward's :class:`~hf_paged.cache.PagedForward`
(block table, seq_lens, query positions), which the attention function receives as its
``attention_mask``. Without a paged cache (a plain forward with the model's own DynamicCache, or
no cache) both fall back to a dense boolean mask and a dense attention in PyTorch.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .cache import PagedForward, cache_from_mask_offset, device_guard
from .kernels.reference import gather_context
from .kernels.reference import paged_attention as reference_attention

ATTN_NAME = "paged"


def paged_mask(*args, **kwargs):
    """Mask function registered as ``"paged"`` (called by transformers' create_*_mask)."""
    cache = cache_from_mask_offset(kwargs.get("kv_offset"))
    attention_mask = kwargs.get("attention_mask")
    if cache is not None:
        device = kwargs.get("device")
        if device is None:
            device = attention_mask.device if attention_mask is not None else torch.device("cpu")
        return cache.begin_forward(
            attention_mask if (attention_mask is None or attention_mask.dim() == 2) else None,
            q_len=kwargs["q_length"],
            batch_size=kwargs["batch_size"],
            device=torch.device(device),
            dtype=kwargs.get("dtype"),
            config=kwargs.get("config"),
        )
    kwargs["allow_is_causal_skip"] = False  # the dense fallback always wants an explicit mask
    if "kv_offset" in kwargs:
        kwargs["kv_offset"] = int(kwargs["kv_offset"])
    return sdpa_mask(*args, **kwargs)


def layer_chunk_size(module: torch.nn.Module) -> int | None:
    """The attention chunk of a chunked-attention layer (Llama 4), None for any other layer.

    transformers gives the attention function no chunk (no kwarg, no module attribute): the stock
    path applies it through the mask (create_chunked_causal_mask) of the layers whose
    ``config.layer_types[layer_idx]`` is ``"chunked_attention"``, which the paged mask does not build.
    """
    config = getattr(module, "config", None)
    layer_types = getattr(config, "layer_types", None)
    layer_idx = getattr(module, "layer_idx", None)
    if layer_types is None or layer_idx is None or not 0 <= layer_idx < len(layer_types):
        return None
    if layer_types[layer_idx] != "chunked_attention":
        return None
    return getattr(config, "attention_chunk_size", None)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention function registered as ``"paged"``.

    ``query`` is ``[B, Hq, Q, D]``; returns ``([B, Q, Hq, D], None)``. With a paged cache, K/V are
    read from the layer's block pool through the block table (``key``/``value`` are only this
    forward's new tokens, already stored by ``PagedCache.update``). A chunked-attention layer
    (Llama 4) attends within its chunk (see :func:`layer_chunk_size`); without a paged cache the
    mask from transformers already says so.
    """
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    sliding_window = kwargs.get("sliding_window", getattr(module, "sliding_window", None))
    sinks = s_aux if s_aux is not None else kwargs.get("sinks")
    if isinstance(attention_mask, PagedForward):
        fwd = attention_mask.on(query.device)
        layer_idx = kv_layer_of(module)
        k_pool, v_pool = fwd.cache.layer_pools(layer_idx)
        if callable(getattr(module, "expand_kv", None)):
            return latent_attention(module, query, fwd, layer_idx, k_pool, v_pool, float(scaling), sliding_window,
                                    softcap, sinks), None
        # This layer's new K/V (taken by PagedCache.update) are written by this launch.
        new = fwd.pending.pop(layer_idx, None)
        new_key, new_value, slots = (None, None, None) if new is None else (new[0], new[1], fwd.slot_mapping)
        with device_guard(query.device):
            if new is not None and fwd.pads_after_start:
                # pad queries read the keys before them: store, then read every key from the pool
                fwd.backend.store_kv(new_key, new_value, k_pool, v_pool, slots)
                new_key = new_value = slots = None
            out = fwd.backend.paged_attention(
                query, k_pool, v_pool, fwd.block_table, fwd.seq_lens, fwd.query_pos, float(scaling),
                sliding_window, softcap, sinks, None, fwd.max_seq_len, new_key, new_value, slots, plans=fwd.plans,
                max_context_len=fwd.max_context_len, chunk_size=layer_chunk_size(module),
            )
        return out, None
    dropout = dropout if module.training else 0.0
    return dense_attention(query, key, value, attention_mask, scaling, softcap, sinks, dropout), None


def latent_attention(module, query, fwd: PagedForward, layer_idx: int, k_pool, v_pool, scaling, sliding_window,
                     softcap, sinks) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-V2/V3): the pools hold the two compressed latents
    each token caches (``kv_lora_rank`` and ``qk_rope_head_dim`` wide, one head); every step
    expands the context's latents into per-head K/V with the layer's own ``expand_kv``, as stock
    does with its DynamicCache, and attends over them in PyTorch on every device."""
    new = fwd.pending.pop(layer_idx, None)
    with device_guard(query.device):
        if new is not None:
            fwd.backend.store_kv(new[0], new[1], k_pool, v_pool, fwd.slot_mapping)
        block_size = k_pool.shape[1]
        context = min(fwd.block_table.shape[1], -(-fwd.max_seq_len // block_size)) * block_size
        key, value = module.expand_kv(gather_context(k_pool, fwd.block_table, fwd.seq_lens, context),
                                      gather_context(v_pool, fwd.block_table, fwd.seq_lens, context))
    # The expanded K/V as one block of `context` positions per row.
    rows = torch.arange(query.shape[0], device=query.device, dtype=torch.int32)[:, None]
    return reference_attention(query, key.transpose(1, 2), value.transpose(1, 2), rows, fwd.seq_lens, fwd.query_pos,
                               scaling, sliding_window, softcap, sinks, max_seq_len=context)


def kv_layer_of(module) -> int:
    """The layer whose pools an attention layer reads: its own, or for a layer that reuses an
    earlier layer's K/V (Gemma3n's last ``num_kv_shared_layers``), the last earlier layer of its
    type, which stores them (the rule transformers applies, in 5.17 and later releases alike)."""
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


def dense_attention(query, key, value, mask, scaling, softcap=None, sinks=None, dropout=0.0):
    """Plain attention over contiguous K/V ``[B, Hkv, K, D]`` with a 4D boolean mask (True = keep)."""
    b, hq, q, d = query.shape
    groups = hq // key.shape[1]
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(-1, -2)).float() * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.float()
    if sinks is not None:
        sink = sinks.float().view(1, hq, 1, 1).expand(b, hq, q, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    probs = torch.nan_to_num(probs)  # fully masked rows (pad queries) give zeros, not NaN
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs.to(value.dtype), value)
    return out.transpose(1, 2).contiguous()


def register() -> None:
    """Register ``"paged"`` with transformers (idempotent: registering again replaces the same entries)."""
    AttentionInterface.register(ATTN_NAME, paged_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, paged_mask)
