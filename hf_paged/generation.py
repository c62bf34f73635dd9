"""Hooks into ``generate`` for models loaded with ``attn_implementation="paged"``.

transformers offers no public hook to choose the cache ``generate`` creates, so we wrap four of
its methods (``compat.WRAPPED``), each guarded by the attention name (every other model runs them
unchanged):

- ``PreTrainedModel._check_and_adjust_attn_implementation``: refuse, at load, the models the
  paged cache cannot serve (``support.py``).
- ``GenerationMixin._prepare_cache_for_generation``: create a :class:`PagedCache` when the user
  passed no cache.
- ``GenerationMixin.generate`` (public): for the duration of the call, ``model.forward`` is a
  :class:`~hf_paged.graphs.GraphedForward`, which runs decode steps as CUDA graphs, and the
  model's Llama-style RMSNorms run one Triton kernel each (:mod:`hf_paged.norms`); a user's cache
  left mid-generation by an exception is marked so (it refuses to continue until ``reset()``).
- ``GenerationMixin._prefill``: when ``generate`` has expanded prompts for beams or
  ``num_return_sequences``, run each distinct prompt's prefill once, then fork the rows (blocks by
  reference, logits broadcast); prompts sorted by length in groups of ``max_prefill_tokens``; and
  hand the prompt tokens to the cache for prefix sharing. Prompts that share leading full blocks
  (with each other, or with blocks a prefix cache kept from earlier calls) compute them once: the
  other rows prefill only their suffix over the stored blocks (:func:`prefill_phases`). A group
  trimmed to its longest prompt runs packed where the model allows it (:func:`can_pack`): the
  model runs the rows' real tokens only, as one row (``PagedCache.packed_group``).

And one question generate asks, ``DeferredStopCheck.is_supported``: over a PagedCache on CUDA the
answer is yes, so that the sampling loop reads "every row finished" one step late instead of
waiting for the GPU at every step; the host then plans and launches step t+1 while the GPU runs
step t. When the rows all stop (EOS) before ``max_new_tokens``, transformers undoes the one step
too many that this runs (its tokens and scores dropped, the cache cropped): the outputs are
stock's.
"""

from __future__ import annotations

import numpy as np
import torch

from . import compat, norms
from .block_table import chain_hashes_of_prompts
from .cache import PagedCache
from .graphs import GraphedForward, graphs_enabled
from .kernels.env import switch
from .prefix_cache import PrefixCache
from .support import check_supported, guard_media_inputs

# A batch whose prompts share prefixes of prefixes (a chain of ever longer common prefixes) would
# take one prefill round per level; past this many rounds the rest prefill together.
MAX_PREFILL_PHASES = 4
# Trimmed prefill groups run packed (the rows' real tokens only, as one row) unless this is 0.
PACKED_ENV_VAR = "HF_PAGED_PACKED_PREFILL"
# The decode loop reads its stop flag one step late over a PagedCache unless this is 0.
DEFERRED_STOP_ENV_VAR = "HF_PAGED_DEFERRED_STOP"
# transformers' deferred check waits on a device event (CPU tensors have none; tests add "cpu"
# with a stand-in event).
_DEFERRED_STOP_DEVICE_TYPES = ("cuda",)


def is_paged(model) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == compat.ATTN_NAME


def _wrap_check_attn(orig):
    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, *args, **kwargs):
        if attn_implementation == compat.ATTN_NAME:
            check_supported(type(self), self.config)
            guard_media_inputs(self)
        return orig(self, attn_implementation, is_init_check, *args, **kwargs)

    return _check_and_adjust_attn_implementation


def _wrap_prepare_cache(orig):
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if not is_paged(self):
            return orig(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        check_supported(type(self), self.config)
        impl = generation_config.cache_implementation
        user_cache = next((model_kwargs[k] for k in compat.CACHE_KEYS if model_kwargs.get(k) is not None), None)
        if impl not in (None, "dynamic") and user_cache is None:
            raise ValueError(
                f"hf_paged: the model was loaded with attn_implementation='paged', which keeps its KV cache "
                f"in a PagedCache; cache_implementation={impl!r} cannot be combined with it. Drop "
                f"cache_implementation (or pass past_key_values=hf_paged.PagedCache(...) to set the block "
                f"size or a memory cap)."
            )
        out = orig(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        if user_cache is None:
            call = self.__dict__.get("_hf_paged_call")
            prefix_cache = call["prefix_cache"] if call is not None else None

            def make():
                cache = PagedCache(config=self.config, prefix_cache=prefix_cache)
                if prefix_cache is not None:
                    call["created"].append(cache)  # its rows go back to the prefix cache after the call
                return cache

            compat.replace_dynamic_cache(model_kwargs, make)
        return out

    return _prepare_cache_for_generation


def _wrap_generate(orig):
    def generate(self, *args, **kwargs):
        if not is_paged(self):
            if kwargs.get("prefix_cache") is not None:
                raise ValueError("hf_paged: prefix_cache= needs a model loaded with attn_implementation='paged'")
            return orig(self, *args, **kwargs)
        prefix_cache = kwargs.pop("prefix_cache", None)
        key = compat.cache_key(kwargs, PagedCache)
        user_cache = kwargs[key] if key is not None else None
        if prefix_cache is not None and not isinstance(prefix_cache, PrefixCache):
            raise TypeError(f"hf_paged: prefix_cache must be a hf_paged.PrefixCache, got {type(prefix_cache).__name__}")
        if prefix_cache is not None and user_cache is not None:
            raise ValueError("hf_paged: pass prefix_cache= or a cache, not both (build the cache over it: "
                             "PagedCache(config=model.config, prefix_cache=prefix_cache))")
        if prefix_cache is None and user_cache is None:
            prefix_cache = PrefixCache.attached(self)
        forwards_before = user_cache.forwards if user_cache is not None else 0
        if user_cache is not None:
            user_cache.model_key = None  # bound again by this call (its prefill, or its first decode step)
        # An instance attribute "forward" already there is someone else's (accelerate's device_map
        # hooks): leave the model as it is. Installed for this call only, removed by its owner.
        graphed = None
        if graphs_enabled() and "forward" not in self.__dict__:
            graphed = self.forward = GraphedForward(self)
        outer_call = self.__dict__.get("_hf_paged_call")
        call = self.__dict__["_hf_paged_call"] = {"prefix_cache": prefix_cache, "created": []}
        failed = True
        try:
            with norms.fused(self) as fused_norms:
                call["fused_norms"] = fused_norms  # part of a decode graph's key (graphs.py)
                out = orig(self, *args, **kwargs)
            failed = False
            return out
        except BaseException as exc:
            # The user's cache holds whatever the interrupted generation had written: refuse to
            # continue from it (a later call would build on incomplete rows) until reset().
            if user_cache is not None and user_cache.forwards != forwards_before and user_cache.interrupted is None:
                user_cache.interrupted = f"{type(exc).__name__}: {exc}"[:300]
            raise
        finally:
            if graphed is not None and self.__dict__.get("forward") is graphed:
                del self.__dict__["forward"]
            if outer_call is None:
                self.__dict__.pop("_hf_paged_call", None)
            else:
                self.__dict__["_hf_paged_call"] = outer_call
            for cache in call["created"]:
                # the blocks go back to the prefix cache (hashed prompt blocks stay findable)
                cache.release_rows(failed=failed)

    return generate


def _wrap_prefill(orig):
    def _prefill(self, input_ids, generation_config, model_kwargs, is_first_iteration=True, *args, **kwargs):
        key = compat.cache_key(model_kwargs, PagedCache) if is_paged(self) else None
        if key is None:
            return orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        cache: PagedCache = model_kwargs[key]
        cache.bind_model(self)
        if generation_config.output_attentions:
            raise ValueError(
                "hf_paged: output_attentions=True cannot be served by attn_implementation='paged': its kernels never "
                "materialise attention weights. Load the model with attn_implementation='eager' to get them."
            )
        mask = model_kwargs.get("attention_mask")
        fresh = (
            cache.get_seq_length() == 0
            and not cache.is_initialized
            and model_kwargs.get("inputs_embeds") is None
            and getattr(generation_config, "prefill_chunk_size", None) is None
            and (mask is None or mask.dim() == 2)
        )
        if not fresh:
            cache.set_prefill_tokens(None)  # prompt tokens (counted), not hashed
            return orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)

        batch = input_ids.shape[0]
        host_ids, host_mask = _to_host(input_ids, mask)  # one copy each, for both readers below
        rep, inverse, lengths, left_padded = _distinct_rows(host_ids, host_mask)
        if not cache.share_prefixes:
            rep, inverse = list(range(batch)), list(range(batch))
        prompt_lengths = [lengths[r] for r in rep]
        copies = [inverse.count(d) for d in range(len(rep))]
        max_new = generation_config.max_new_tokens
        if max_new is None and generation_config.max_length is not None:
            max_new = generation_config.max_length - input_ids.shape[1]
        cache.resolve_memory_cap(self.dtype)

        groups = length_groups(prompt_lengths, cache.max_prefill_tokens)
        phases = None
        # Compute sharing needs the prompt step's per-position outputs unasked for (hidden states:
        # the rows' skipped positions would be missing), pads first, and positions it can give
        # (position_ids: the suffix starts past the reused tokens).
        if (cache.share_prefixes and left_padded and not generation_config.output_hidden_states
                and model_kwargs.get("position_ids") is not None and model_kwargs["position_ids"].dim() == 2):
            phases = prefill_phases(cache, _prompt_tokens(host_ids, host_mask, rep))
        if phases is not None:
            # the prompts' distinct blocks not stored yet (each computed once), not every row's
            cache.pool.reserve(phases.new_blocks)
        else:
            cache.reserve_for_generation(prompt_lengths, copies, 0)
        if phases is not None:
            outputs = _shared_prefill(orig, self, cache, input_ids, generation_config, model_kwargs,
                                      is_first_iteration, rep, lengths, phases, args, kwargs)
        elif len(groups) == 1 and len(rep) == batch:
            # one forward over the batch as given: exactly stock's prefill
            cache.set_prefill_tokens(input_ids)
            outputs = orig(self, input_ids, generation_config, model_kwargs, is_first_iteration, *args, **kwargs)
        else:
            # Groups are trimmed to their longest prompt, which needs pads first in every row, and
            # per-position outputs (hidden states) keep stock's [rows, width] shapes.
            trim = left_padded and not generation_config.output_hidden_states
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


def length_groups(lengths: list[int], max_tokens: int | None) -> list[list[int]]:
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


def _grouped_prefill(orig, model, cache: PagedCache, input_ids, generation_config, model_kwargs, is_first_iteration,
                     rep, lengths, groups, trim, args, kwargs):
    """Prefill the distinct prompts ``rep`` group by group, each trimmed to its longest prompt
    when ``trim`` (left-padded rows only), else over the batch's whole width.

    Cache row ``d`` holds prompt ``rep[d]``. Only the last position's logits leave the prefill
    (that is all generate reads of it), so they are gathered into one ``[len(rep), 1, vocab]``;
    one group gives its other outputs (hidden states) whole.
    """
    width = input_ids.shape[1]
    cache.add_rows(len(rep))
    merged = None
    outputs = None
    pack = trim and can_pack(model, model_kwargs, input_ids)
    for group in groups:
        rows = [rep[d] for d in group]
        w = max(1, max(lengths[r] for r in rows)) if trim else width
        outputs = _prefill_forward(orig, model, cache, input_ids, generation_config, model_kwargs, is_first_iteration,
                                   args, kwargs, rows, group, w, [lengths[r] for r in rows], pack=pack)
        merged = _gather_last_logits(merged, outputs, group, len(rep))
    cache.end_grouped_prefill(width, left_padded=trim)
    outputs["logits"] = merged
    return outputs


def packed_prefill_enabled() -> bool:
    return switch(PACKED_ENV_VAR)


def can_pack(model, model_kwargs: dict, input_ids: torch.Tensor) -> bool:
    """Whether a trimmed prefill group of this call may run packed (:func:`_prefill_forward`):
    the model takes positions (generate gave one per prompt token) and a tensor
    ``logits_to_keep``, and no per-row input other than the mask and the positions
    (``token_type_ids``, ...) would need packing too."""
    if not packed_prefill_enabled() or not compat.takes_logits_to_keep(model) \
            or not compat.takes_position_ids(model):
        return False
    pos = model_kwargs.get("position_ids")
    if not isinstance(pos, torch.Tensor) or pos.shape != input_ids.shape:
        return False
    return not any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == input_ids.shape[0]
                   and k not in ("attention_mask", "position_ids") for k, v in model_kwargs.items())


def _prefill_forward(orig, model, cache: PagedCache, input_ids, generation_config, model_kwargs, is_first_iteration,
                     args, kwargs, rows: list[int], cache_rows: list[int], w: int, lengths: list[int],
                     continued: bool = False, pack: bool = False):
    """One prefill forward over the batch rows ``rows`` (cache rows ``cache_rows``), trimmed to
    their last ``w`` columns, of which each row's last ``lengths[i]`` are its tokens to compute.
    ``continued``: the rows already hold their leading tokens (reused blocks): the forward's mask
    marks only those last tokens; else it is the batch's mask, trimmed.

    ``pack`` (the group may run packed, :func:`can_pack`): the model runs those tokens only, one
    row after another as one row of ``sum(lengths)`` tokens, and never computes a pad
    (:meth:`PagedCache.packed_group`); its logits are the rows' last tokens', ``[rows, 1, vocab]``.
    """
    batch, width = input_ids.shape
    rows_t = torch.tensor(rows, device=input_ids.device)
    sub = {k: _take_rows(v, rows_t, batch) for k, v in model_kwargs.items()}
    for k in ("attention_mask", "position_ids", "token_type_ids"):
        v = sub.get(k)
        if isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[1] == width:
            sub[k] = v[:, width - w:]
    ids = input_ids.index_select(0, rows_t)[:, width - w:]
    lengths = np.asarray(lengths)
    real = np.arange(w)[None, :] >= (w - lengths)[:, None]  # each row's last lengths[i] columns
    if not pack or lengths.min() == w or lengths.min() < 1:  # nothing to pack away (or an empty row)
        if continued:  # the columns before a row's tokens (pads, or its reused tokens) pad this forward
            sub["attention_mask"] = torch.from_numpy(real).long().to(input_ids.device)
        with cache.prefill_group(cache_rows, continued=continued):
            cache.set_prefill_tokens(ids)
            return orig(model, ids, generation_config, sub, is_first_iteration, *args, **kwargs)
    sub["attention_mask"] = None  # the cache plans the padded group from `real`
    sub["logits_to_keep"] = torch.from_numpy(np.cumsum(lengths) - 1).to(input_ids.device)  # each row's last token
    with cache.packed_group(cache_rows, real, continued=continued, device=input_ids.device) as index:
        sub["position_ids"] = sub["position_ids"].reshape(-1).index_select(0, index)[None]
        cache.set_prefill_tokens(ids)  # hashed in the padded layout the cache plans
        outputs = orig(model, ids.reshape(-1).index_select(0, index)[None], generation_config, sub,
                       is_first_iteration, *args, **kwargs)
    logits = outputs["logits"]
    if logits.shape[:2] != (1, len(rows)):
        raise RuntimeError(f"hf_paged: a packed prefill of {len(rows)} rows got logits of shape {tuple(logits.shape)} "
                           f"(the model ignored logits_to_keep); set {PACKED_ENV_VAR}=0 and report the model")
    outputs["logits"] = logits.transpose(0, 1)
    return outputs


def _gather_last_logits(merged: torch.Tensor | None, outputs, cache_rows: list[int], total: int) -> torch.Tensor:
    """The last position's logits of a prefill forward over ``cache_rows`` into ``merged``
    (``[total, 1, vocab]``, made at the first forward)."""
    logits = outputs["logits"][:, -1:, :]
    if merged is None:
        merged = logits.new_empty((total,) + tuple(logits.shape[1:]))
    merged[torch.tensor(cache_rows, device=logits.device)] = logits
    return merged


def _to_host(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray | None]:
    """The prompts' ids and 2D mask (None without one) as numpy arrays: the prefill's only reads
    of them on the host."""
    mask = attention_mask.cpu().numpy() if attention_mask is not None and attention_mask.dim() == 2 else None
    return input_ids.cpu().numpy(), mask


def _prompt_tokens(ids: np.ndarray, mask: np.ndarray | None, rep: list[int]) -> list[np.ndarray]:
    """The real (non-pad) token ids of the prompts ``rep`` (rows of ``ids``, their 2D ``mask``), int64."""
    ids = ids.astype(np.int64)
    keep = mask.astype(bool) if mask is not None else np.ones(ids.shape, bool)
    return [ids[r][keep[r]] for r in rep]


class PrefillPhases(list):
    """The rounds of :func:`prefill_phases` (lists of prompt indices), with ``new_blocks``: the
    blocks their prompts need that are not stored yet (distinct full blocks, partial tails), and
    ``prompts``: the prompts' tokens they were planned from (read from the device once), and
    ``hashes``: the chained hashes of each prompt's full blocks but its last token (what
    :meth:`PagedCache.reuse_prefix` would compute again)."""

    new_blocks: int = 0
    prompts: list | None = None
    hashes: list | None = None


def prefill_phases(cache: PagedCache, prompts: list[np.ndarray]) -> PrefillPhases | None:
    """Rounds of prefill in which every distinct full prompt block is computed once: prompt ``d``
    runs in the first round where no other prompt of that round computes the block it would start
    with (its first full block not stored yet); it then takes its stored leading blocks and
    prefills the rest. None when nothing would be reused (the batch prefills as before).

    Rows of one round cannot compute the same block: their hash chains differ at their first
    block not stored, so at every later block too. A prompt keeps its last token to compute (its
    logits start generation)."""
    bs, salt, tables = cache.block_size, cache.tables.salt, cache.tables
    if salt is None:
        return None
    hashes = chain_hashes_of_prompts([p[: max(0, len(p) - 1) // bs * bs] for p in prompts], bs, salt)
    known: set[bytes] = set()

    def stored(h: bytes) -> bool:
        return h in known or tables.lookup(h) is not None

    phases = PrefillPhases()
    remaining = list(range(len(prompts)))
    reused = False
    while remaining:
        if len(phases) == MAX_PREFILL_PHASES - 1:
            phases.append(remaining)
            break
        phase, starts, wait = [], set(), []
        for d in remaining:
            hs = hashes[d]
            k = 0
            while k < len(hs) and stored(hs[k]):
                k += 1
            reused |= k > 0
            if k < len(hs) and hs[k] in starts:
                wait.append(d)
                continue
            phase.append(d)
            if k < len(hs):
                starts.add(hs[k])
        for d in phase:
            known.update(hashes[d])
        phases.append(phase)
        remaining = wait
    stored_before = {h for hs in hashes for h in hs if tables.lookup(h) is not None}
    phases.new_blocks = len({h for hs in hashes for h in hs} - stored_before) + sum(
        -(-len(p) // bs) - len(hs) for p, hs in zip(prompts, hashes))
    phases.prompts = prompts
    phases.hashes = hashes
    return phases if reused or len(phases) > 1 else None


def _shared_prefill(orig, model, cache: PagedCache, input_ids, generation_config, model_kwargs, is_first_iteration,
                    rep, lengths, phases, args, kwargs):
    """Prefill the distinct prompts ``rep`` round by round (``phases``): each prompt first takes
    the stored blocks of its leading full blocks (``cache.reuse_prefix``), then runs only its
    suffix, over those blocks as context, in length-sorted groups trimmed to their longest
    suffix. Cache row ``d`` holds prompt ``rep[d]``; the last positions' logits are gathered into
    one ``[len(rep), 1, vocab]`` (all that generate reads of the prompt step)."""
    width = input_ids.shape[1]
    cache.add_rows(len(rep))
    prompts = phases.prompts
    merged = None
    outputs = None
    pack = can_pack(model, model_kwargs, input_ids)
    for phase in phases:
        suffix = {}
        for d in phase:
            n = len(prompts[d])
            suffix[d] = n - cache.reuse_prefix(d, prompts[d], max_tokens=n - 1, hashes=phases.hashes[d])
        for group in length_groups([suffix[d] for d in phase], cache.max_prefill_tokens):
            ds = [phase[i] for i in group]
            w = max(1, max(suffix[d] for d in ds))
            # each row's suffix is its last tokens, over its reused ones
            outputs = _prefill_forward(orig, model, cache, input_ids, generation_config, model_kwargs,
                                       is_first_iteration, args, kwargs, [rep[d] for d in ds], ds, w,
                                       [suffix[d] for d in ds], continued=True, pack=pack)
            merged = _gather_last_logits(merged, outputs, ds, len(rep))
    cache.end_grouped_prefill(width, left_padded=True)
    outputs["logits"] = merged
    return outputs


def _distinct_rows(ids: np.ndarray, mask: np.ndarray | None):
    """First row of each distinct (tokens, mask) prompt, each row's index among them, each row's
    real (non-pad) length, and whether every row has its pads first (left padding); ``ids`` and
    ``mask`` from :func:`_to_host`."""
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


def deferred_stop_enabled() -> bool:
    return switch(DEFERRED_STOP_ENV_VAR)


def _wrap_deferred_stop(orig):
    def is_supported(device, cache, cache_is_returned, is_assistant=False, *args, **kwargs):
        # A PagedCache can drop the extra step's token at any point (crop(-1); windowed layers
        # keep a margin of blocks behind their window), and its decode step reads no device value
        # on the host, so nothing else in the step waits for the GPU either.
        if (isinstance(cache, PagedCache) and not is_assistant
                and torch.device(device).type in _DEFERRED_STOP_DEVICE_TYPES and deferred_stop_enabled()):
            return True
        return orig(device, cache, cache_is_returned, is_assistant, *args, **kwargs)

    return is_supported


def install() -> None:
    """Wrap transformers' methods (idempotent: a method already wrapped by us is left alone)."""
    compat.install_wrappers({
        "generate": _wrap_generate,
        "_prepare_cache_for_generation": _wrap_prepare_cache,
        "_prefill": _wrap_prefill,
        "_check_and_adjust_attn_implementation": _wrap_check_attn,
    })
    compat.install_deferred_stop(_wrap_deferred_stop)
