"""The ``"paged"`` attention implementation: its registration, its mask function and dispatch.

transformers looks attention up by name (``AttentionInterface``) and builds masks with a function
registered under the same name (``AttentionMaskInterface``; without one, padded batches silently
lose their mask). Our mask function does not build a mask: when the forward uses a
:class:`~hf_paged.cache.PagedCache` it begins the cache's forward and returns its
:class:`~hf_paged.forward.PagedForward`, which every attention layer receives as its
``attention_mask``. Without a paged cache (a plain forward with the model's own DynamicCache, or
no cache) both fall back to a dense boolean mask and a dense attention in PyTorch.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from . import compat
from .compat import ATTN_NAME
from .forward import PagedForward
from .kernels import LayerAttention, cdiv, device_guard
from .kernels.reference import gather_context
from .kernels.reference import paged_attention as reference_attention


def paged_mask(*args, **kwargs):
    """Mask function registered as ``"paged"`` (called by transformers' create_*_mask)."""
    call = compat.read_mask_call(kwargs)
    if call.cache is not None:
        return call.cache.begin_forward(call.attention_mask, q_len=call.q_len, batch_size=call.batch_size,
                                        device=call.device, dtype=call.dtype, config=call.config)
    return sdpa_mask(*args, **compat.plain_mask_kwargs(kwargs))


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

    ``query`` is ``[B, Hq, Q, D]``; returns ``([B, Q, Hq, D], None)``. With a paged cache
    (``attention_mask`` is the forward's :class:`PagedForward`), the layer's new K/V (``key`` /
    ``value``, given to ``PagedCache.update``) are written to its pool and its whole context is read
    from there through the block table; a chunked-attention layer (Llama 4) attends within its
    chunk. Without one, a dense attention under transformers' mask.
    """
    if scaling is None:
        scaling = getattr(module, "scaling", None) or query.shape[-1] ** -0.5
    layer = LayerAttention(
        scale=float(scaling), sliding_window=kwargs.get("sliding_window", getattr(module, "sliding_window", None)),
        chunk_size=compat.layer_chunk_size(module), softcap=softcap,
        sinks=s_aux if s_aux is not None else kwargs.get("sinks"),
    )
    if not isinstance(attention_mask, PagedForward):
        dropout = dropout if module.training else 0.0
        return dense_attention(query, key, value, attention_mask, layer.scale, layer.softcap, layer.sinks,
                               dropout), None
    fwd = attention_mask.on(query.device)
    if fwd.packed_index is None:
        return _paged_attention(module, query, fwd, layer), None
    # the model runs the real tokens packed [1, N]; attention runs over the padded batch
    return fwd.pack(_paged_attention(module, fwd.unpack(query), fwd, layer)), None


def _paged_attention(module, query: torch.Tensor, fwd: PagedForward, layer: LayerAttention) -> torch.Tensor:
    """The paged attention of ``query`` [B, Hq, Q, D] (the forward's batch), ``[B, Q, Hq, Dv]``."""
    layer_idx = compat.kv_source_layer(module)
    k_pool, v_pool = fwd.pools.get(layer_idx)
    # the kernels read the pools' addresses from the device: a CUDA graph survives their growth
    addresses = fwd.pools.addresses[layer_idx]
    new = fwd.take_new_kv(layer_idx)  # None for a layer that reads another layer's K/V (Gemma3n)
    meta = fwd.meta_for(layer_idx)
    if meta is not fwd.meta and (layer.sliding_window is None or layer.sliding_window > fwd.window):
        # its blocks are released out of the cache's window: a wider view would read released blocks
        raise RuntimeError(
            f"hf_paged: layer {layer_idx} attends with sliding_window={layer.sliding_window}, but the cache keeps "
            f"its K/V for a window of {fwd.window} tokens (from the config's layer_types / sliding_window); "
            f"please report this model, and set HF_PAGED_WINDOW_BLOCKS=0 to keep every block meanwhile")
    with device_guard(query.device):
        if compat.latent_expander(module) is not None:
            return latent_attention(module, query, fwd, k_pool, v_pool, new, layer)
        if new is not None and meta.pads_after_start:
            # pad queries read the keys before them: store, then read every key from the pool
            fwd.backend.store_kv(new[0], new[1], k_pool, v_pool, meta.slot_mapping, addresses)
            new = None
        plans = fwd.plans if meta is fwd.meta else fwd.window_plans
        return fwd.backend.attend(query, k_pool, v_pool, meta, layer, new_key=None if new is None else new[0],
                                  new_value=None if new is None else new[1], plans=plans, pool_addresses=addresses)


def latent_attention(module, query, fwd: PagedForward, k_pool, v_pool, new, layer: LayerAttention) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-V2/V3): the pools hold the two compressed latents
    each token caches (``kv_lora_rank`` and ``qk_rope_head_dim`` wide, one head); every step
    expands the context's latents into per-head K/V with the layer's own ``expand_kv``, as stock
    does with its DynamicCache, and attends over them in PyTorch on every device."""
    meta = fwd.meta
    fwd.direct_pool_reads.add(compat.kv_source_layer(module))  # the gather below holds the pools' addresses
    if new is not None:
        fwd.backend.store_kv(new[0], new[1], k_pool, v_pool, meta.slot_mapping)
    block_size = k_pool.shape[1]
    context = min(meta.width, cdiv(meta.max_seq_len, block_size)) * block_size
    key, value = compat.latent_expander(module)(gather_context(k_pool, meta.block_table, meta.seq_lens, context),
                                                gather_context(v_pool, meta.block_table, meta.seq_lens, context))
    # The expanded K/V as one block of `context` positions per row.
    rows = torch.arange(query.shape[0], device=query.device, dtype=torch.int32)[:, None]
    return reference_attention(query, key.transpose(1, 2), value.transpose(1, 2), rows, meta.seq_lens, meta.query_pos,
                               layer.scale, layer.sliding_window, layer.softcap, layer.sinks, max_seq_len=context,
                               chunk_size=layer.chunk_size)


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
