"""Plain-PyTorch implementation of the paged KV-cache ops.

Memory layout (shared with the Triton kernels):
    key_cache, value_cache : [num_blocks, block_size, num_kv_heads, head_dim], any strides
    block_table            : int32 [B, max_blocks_per_row]; token p of row b lives at
                             (block_table[b, p // block_size], p % block_size)
    seq_lens               : int32 [B], tokens stored per row (new tokens included)
    slot_mapping           : int [B, Q], slot = block_id * block_size + offset, < 0 = skip
    query / key / value    : [B, heads, Q, head_dim] (transformers' layout), any strides
    out                    : [B, Q, num_q_heads, head_dim], contiguous

This is both the oracle for the Triton kernels and the production CPU path, so it is
vectorised over rows and tokens; the only Python loop is over query chunks, which bounds
the size of the fp32 score tensor for long prompts.
"""

from __future__ import annotations

import torch

from .arith import cdiv
from .checks import check_local_attention

# Upper bound (elements) on one fp32 score chunk [B, Hq, q_chunk, L]: 16M floats = 64 MiB,
# so a long CPU prefill does not materialise a quadratic score matrix at once.
_SCORE_CHUNK_ELEMS = 1 << 24


def store_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    pool_addresses: torch.Tensor | None = None,
) -> None:
    """Write key/value [B, H_kv, Q, D] into the paged caches at slot_mapping [B, Q]
    (``pool_addresses`` is the Triton kernels' device copy of the pools' addresses: the reference
    writes the tensors it is given)."""
    batch, num_kv_heads, num_tokens, _ = key.shape
    block_size = key_cache.shape[1]
    slots = slot_mapping.reshape(-1).to(torch.long)
    # [B, H, Q, D] -> [B*Q, H, D]: one row per token, matching the slot order (V's D may differ).
    k_rows = key.permute(0, 2, 1, 3).reshape(batch * num_tokens, num_kv_heads, key.shape[3])
    v_rows = value.permute(0, 2, 1, 3).reshape(batch * num_tokens, num_kv_heads, value.shape[3])
    keep = slots >= 0
    # Boolean indexing syncs on CUDA; this path is the CPU/oracle path, so that is fine.
    if not bool(keep.all()):
        slots, k_rows, v_rows = slots[keep], k_rows[keep], v_rows[keep]
    if slots.numel() == 0:
        return
    block_ids = torch.div(slots, block_size, rounding_mode="floor")
    offsets = slots - block_ids * block_size
    # Advanced-index assignment works for any cache strides.
    key_cache[block_ids, offsets] = k_rows.to(key_cache.dtype)
    value_cache[block_ids, offsets] = v_rows.to(value_cache.dtype)


def gather_context(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, context: int) -> torch.Tensor:
    """The first ``context`` stored positions of every row, ``[B, H, context, D]`` (``context`` a
    multiple of the block size, at most the table's width), zeros at or past ``seq_lens``."""
    batch = block_table.shape[0]
    _, block_size, heads, dim = cache.shape
    blocks = block_table[:, : context // block_size].to(device=cache.device, dtype=torch.long)
    rows = cache[blocks].reshape(batch, context, heads, dim)
    # Blocks past seq_lens may be recycled and hold NaN: zero them so 0-probabilities times V stay
    # 0 (0 * NaN = NaN would otherwise leak into every row).
    valid = torch.arange(context, device=cache.device)[None, :] < seq_lens.to(cache.device, torch.long)[:, None]
    rows = torch.where(valid[:, :, None, None], rows, torch.zeros((), dtype=rows.dtype, device=cache.device))
    return rows.permute(0, 2, 1, 3)


def copy_blocks(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
) -> None:
    """Copy whole blocks src[i] -> dst[i] in both caches (dst must not overlap src)."""
    if src.numel() == 0:
        return
    src = src.to(device=key_cache.device, dtype=torch.long)
    dst = dst.to(device=key_cache.device, dtype=torch.long)
    key_cache[dst] = key_cache[src]
    value_cache[dst] = value_cache[src]


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    query_pos: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    max_seq_len: int | None = None,
    new_key: torch.Tensor | None = None,
    new_value: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
    *,
    plans: dict | None = None,
    max_context_len: int | None = None,
    chunk_size: int | None = None,
    cascade=None,
    pool_addresses: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of query [B, Hq, Q, D] over the paged cache; returns [B, Q, Hq, D].

    max_seq_len is an optional host-side upper bound on seq_lens; it must be >= max(seq_lens)
    when given. Without it the CPU path reads seq_lens (free on CPU) and a CUDA caller
    gathers the whole block table.
    new_key / new_value [B, Hkv, Q, D] with slot_mapping [B, Q]: stored first (store_kv), then
    attended to. plans, max_context_len, cascade, pool_addresses: accepted for the Triton
    backend's signature (this path reads the tensors it is given; nothing is captured); nothing
    to plan here (a shared-prefix plan changes which reads the Triton kernels share, not
    the result: this is its reference too). chunk_size: chunked attention (Llama 4): a query at position p sees only the
    keys of its own chunk, n // chunk_size == p // chunk_size; not with sliding_window.
    """
    check_local_attention(sliding_window, chunk_size)
    if new_key is not None:
        store_kv(new_key, new_value, key_cache, value_cache, slot_mapping)
    batch, num_q_heads, num_queries, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    value_dim = value_cache.shape[3]  # may differ from the keys' (latent attention expands to two widths)
    group = num_q_heads // num_kv_heads
    device = query.device
    if out is None:
        out = torch.empty(batch, num_queries, num_q_heads, value_dim, dtype=query.dtype, device=device)
    if batch == 0 or num_queries == 0:
        return out

    max_blocks = block_table.shape[1]
    if max_seq_len is not None:
        context = int(max_seq_len)
    elif seq_lens.device.type == "cpu":
        context = int(seq_lens.max())
    else:
        context = max_blocks * block_size
    num_blocks_used = max(1, min(max_blocks, cdiv(context, block_size)))
    context = num_blocks_used * block_size

    key_index = torch.arange(context, device=device)
    kv_valid = key_index[None, :] < seq_lens.to(device=device, dtype=torch.long)[:, None]  # [B, L]
    keys = gather_context(key_cache, block_table, seq_lens, context).float()
    values = gather_context(value_cache, block_table, seq_lens, context).float()

    qpos = query_pos.to(device=device, dtype=torch.long)  # [B, Q]
    if sliding_window is not None:
        # Keys before every query's window may sit in blocks the cache has released (their table
        # entries point anywhere, possibly at NaN): zero them as the keys past seq_lens are.
        first_query = torch.where(qpos >= 0, qpos, torch.iinfo(torch.long).max).min(dim=1).values
        seen = key_index[None, :] > first_query[:, None] - sliding_window
        keys = torch.where(seen[:, None, :, None], keys, 0.0)
        values = torch.where(seen[:, None, :, None], values, 0.0)
    if sinks is not None:
        sink_logits = sinks.to(device=device, dtype=torch.float32).reshape(1, num_kv_heads, group, 1, 1)

    chunk = max(1, _SCORE_CHUNK_ELEMS // max(1, batch * num_q_heads * context))
    for q0 in range(0, num_queries, chunk):
        q1 = min(num_queries, q0 + chunk)
        nq = q1 - q0
        # [B, Hq, nq, D] -> [B, Hkv, G*nq, D]: GQA without repeating K/V.
        q = query[:, :, q0:q1].float().reshape(batch, num_kv_heads, group * nq, head_dim)
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale  # [B, Hkv, G*nq, L]
        scores = scores.view(batch, num_kv_heads, group, nq, context)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        pos = qpos[:, q0:q1, None]  # [B, nq, 1]
        allowed = (key_index[None, None, :] <= pos) & kv_valid[:, None, :] & (pos >= 0)
        if sliding_window is not None:
            allowed &= key_index[None, None, :] > pos - sliding_window
        if chunk_size is not None:  # the query's own chunk (pad rows, pos < 0, see nothing anyway)
            allowed &= key_index[None, None, :] >= pos - pos % chunk_size
        allowed = allowed[:, None, None]  # [B, 1, 1, nq, L]
        scores = scores.masked_fill(~allowed, float("-inf"))
        if sinks is not None:
            sink_col = sink_logits.expand(batch, num_kv_heads, group, nq, 1)
            probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :context]
        else:
            probs = torch.softmax(scores, dim=-1)
        # Rows without any visible key (pad queries) softmax to NaN: define them as 0.
        probs = torch.where(allowed.any(-1, keepdim=True), probs, torch.zeros((), device=device))
        o = torch.matmul(probs.view(batch, num_kv_heads, group * nq, context), values)
        o = o.view(batch, num_kv_heads, group, nq, value_dim).permute(0, 3, 1, 2, 4)
        out[:, q0:q1] = o.reshape(batch, nq, num_q_heads, value_dim).to(out.dtype)
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation over the last dim, as Llama's ``LlamaRMSNorm.forward``
    computes it: in fp32, the result cast back to ``x``'s dtype, then scaled by ``weight`` (so the
    output's dtype is ``x``'s and ``weight``'s promoted). The order of casts is part of the
    contract: ``hf_paged.norms`` replaces only modules whose own forward gives this bit for bit."""
    input_dtype = x.dtype
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return weight * hidden.to(input_dtype)
