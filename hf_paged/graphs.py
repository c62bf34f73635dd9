"""CUDA graphs of generate's decode step: one graph replay per step instead of hundreds of launches.

Why: on an H200, stock generate's decode step of an 8B model is host-bound (about 9 ms of GPU
work in a 26-43 ms step, the rest Python and kernel launches of the model's own layers). A
DynamicCache cannot be captured (it grows by concatenation, so its addresses change every step);
the paged cache can: its pools are allocated once for the whole generate
(``reserve_for_generation``), and a step's metadata (block table padded to a fixed width,
seq_lens, query positions, slot mapping) is copied into fixed buffers, so the kernels of every
step read the same addresses with new contents.

One decode step (``input_ids`` of shape ``[B, 1]``) through :class:`GraphedForward`:

1. host bookkeeping exactly as in eager mode: ``PagedCache.begin_forward`` allocates blocks and
   builds the metadata; the step's copy-on-write block copies (their number varies) run eagerly.
2. the inputs and the packed metadata are copied into the graph's static buffers.
3. the graph for (batch, table width, pools, input shapes) replays the whole forward, from the
   embedding to the LM head, and the logits are copied out.

The first step of a graph runs eagerly, with the model's real inputs (it is the step's result, and
it compiles the kernels); then the same step runs over the static buffers with synchronising CUDA
calls made errors (a forward that reads a device value on the host cannot be captured), and is
captured. A model's first replay (and its first over padded rows) is checked against an eager
run of the same step (a decode step is idempotent: it writes the same K/V to the same slots), so a model whose
forward keeps a host value between steps is caught. A forward that synchronises or disagrees turns
graphs off for that model (one warning naming the cause); any other capture failure, for that
generate call only. Graphs live with their cache, or with its ``PrefixCache``, whose tensors outlive
the call: later calls replay them (:class:`GraphStore`). What is not
a plain single-device decode step (prefill, ``inputs_embeds``, attentions or hidden states
requested, ``device_map`` over several devices, tensor parallelism, the PyTorch backend) runs
eagerly.
``HF_PAGED_CUDA_GRAPHS=0`` turns graphs off. A step is captured as ``HF_PAGED_GRAPH_SEGMENTS``
graphs (default 4) split at decoder layers and replayed in order, so that the GPU starts on the
first while the host launches the others (:func:`_cuda_capture`).
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from typing import NamedTuple

import torch

from . import compat
from .cache import PagedCache
from .forward import ForwardMetadata, PagedForward
from .kernels import backend_name, cdiv, next_pow2
from .kernels.env import switch

logger = logging.getLogger("hf_paged")

ENV_VAR = "HF_PAGED_CUDA_GRAPHS"
SEGMENTS_ENV_VAR = "HF_PAGED_GRAPH_SEGMENTS"
DEFAULT_SEGMENTS = 4

# Tensor inputs of a decode step that are copied into static buffers; any other tensor input
# (inputs_embeds, pixel values, ...) sends the step down the eager path.
_STATIC_INPUTS = ("input_ids", "position_ids", "cache_position", "token_type_ids")
# Plain inputs that are part of a graph's key (a different value is a different graph).
_PLAIN_INPUTS = ("use_cache", "return_dict", "logits_to_keep")
_OFF_IF_TRUE = ("output_attentions", "output_hidden_states")
_KNOWN_INPUTS = frozenset(
    _STATIC_INPUTS + _PLAIN_INPUTS + compat.CACHE_KEYS + _OFF_IF_TRUE + ("attention_mask", "inputs_embeds"))
_DEVICE_TYPES = ("cuda",)  # tests add "cpu" together with an eager stand-in for the capture


def graphs_enabled() -> bool:
    return switch(ENV_VAR)


def graph_segments() -> int:
    """How many graphs one decode step is captured as (``HF_PAGED_GRAPH_SEGMENTS``, default
    ``DEFAULT_SEGMENTS``). The host launches a graph of ~1,500 kernels in about a millisecond
    before the GPU starts it; in parts, the GPU runs the first while the host launches the rest."""
    raw = os.environ.get(SEGMENTS_ENV_VAR, str(DEFAULT_SEGMENTS)).strip()
    try:
        segments = int(raw)
    except ValueError:
        segments = 0
    if segments < 1:
        raise ValueError(f"hf_paged: {SEGMENTS_ENV_VAR}={raw!r}: expected a whole number of graphs per decode step, "
                         f">= 1 (1: one graph; default {DEFAULT_SEGMENTS})")
    return segments


def segment_starts(model, segments: int) -> tuple:
    """The decoder layers at which the decode step's later graphs begin: ``segments - 1`` of them,
    spread evenly (at most one graph per layer; none when the model's layers are not found)."""
    layers = compat.decoder_layers(model)
    segments = min(segments, len(layers))
    return tuple(layers[len(layers) * i // segments] for i in range(1, segments))


def _cuda_capture(run, pool, starts=()):
    """Capture ``run()`` into CUDA graphs; returns ``replay() -> the outputs of run()``, whose
    tensors are overwritten by the next replay.

    ``starts``: modules (decoder layers) at whose call the capture ends one graph and begins the
    next, in the same memory pool (tensors cross from one to the next: the graphs are always
    replayed together, in capture order). ``replay.segments`` says how many graphs a step is.

    ``run`` is first run eagerly with synchronising CUDA calls made errors: a forward that reads a
    device value on the host (which a capture cannot hold) fails here, before any capture. It runs
    at every capture, even for a model whose graphs passed before: some forwards synchronise only
    on some inputs (DeepSeek's MoE routing). Should a capture fail anyway, the default CUDA
    generator, which every capture enrols, gets back its state from before it (else every later
    sampling step would fail with "Offset increment outside graph capture").
    """
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()  # a decode step is idempotent: the same K/V again at the same slots
    except RuntimeError as exc:
        if "synchronizing" in str(exc):
            raise NotCapturable(f"the model's forward reads a device value on the host: {exc}") from exc
        raise
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    generator = torch.cuda.default_generators[torch.cuda.current_device()]
    saved = generator.clone_state() if hasattr(generator, "clone_state") else None
    graphs: list[torch.cuda.CUDAGraph] = []
    capturing = [False]

    def begin():
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads of the process cannot invalidate this capture
        graph.capture_begin(pool, capture_error_mode="thread_local")
        graphs.append(graph)
        capturing[0] = True

    def end():
        capturing[0] = False
        graphs[-1].capture_end()

    def next_segment(module, args):
        end()
        begin()

    torch.cuda.synchronize()
    hooks = [m.register_forward_pre_hook(next_segment) for m in starts]
    try:
        # on a side stream, as torch.cuda.graph captures (the legacy default stream cannot be)
        with torch.cuda.stream(_capture_stream(torch.cuda.current_device())):
            begin()
            try:
                outputs = run()
            finally:
                if capturing[0]:
                    end()
    except Exception:
        if saved is not None:
            generator.graphsafe_set_state(saved)
        raise
    finally:
        for hook in hooks:
            hook.remove()
    torch.cuda.current_stream().wait_stream(_capture_stream(torch.cuda.current_device()))

    def replay():
        for graph in graphs:
            graph.replay()
        return outputs

    replay.segments = len(graphs)
    return replay


_CAPTURE_STREAMS: dict = {}


def _capture_stream(device: int) -> torch.cuda.Stream:
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = torch.cuda.Stream(device)
    return _CAPTURE_STREAMS[device]


_CAPTURE = _cuda_capture


class NotCapturable(RuntimeError):
    """The model's decode step can never be captured (it synchronises with the GPU)."""


# Process-wide counts (benchmarks report them): graphs captured, decode steps served by a replay,
# caches whose graphs were turned off.
STATS = {"captures": 0, "replays": 0, "disabled": 0}


class _GraphKey(NamedTuple):
    """What a captured decode step depends on besides its static buffers' contents."""

    batch: int
    width: int  # of the block table
    # the layers' tensors as created (LayerPools.layout_version): the graph holds the addresses of
    # their LayerPools.addresses, which the kernels read the pools' addresses from, so enlarged
    # pools keep it valid (a graph that read pools directly also checks pools_version: _DecodeGraph)
    pools_layout: int
    inputs: tuple  # (name, shape, dtype) of the static inputs
    plain: tuple  # (name, value) of the plain inputs
    # the model whose forward is captured (its weights' addresses and versions, dtype, adapters: a
    # cache reset and reused by another model, or a prefix cache's store shared by calls and models)
    model: bytes
    window_layers: tuple  # the layers read through the window tables
    segments: int  # graphs per step (graph_segments())
    fused_norms: int  # RMSNorms running hf-paged's kernel in the captured forward (hf_paged.norms)


# Graphs a PrefixCache keeps for the calls that borrow its pools (each holds its static buffers
# and the activations of one decode step in the store's memory pool).
SHARED_GRAPHS_LIMIT = 4


class GraphStore:
    """Captured decode graphs and the memory pool they share, keyed by what a replay depends on.

    A cache's own store holds at most one graph (a new width or new pools replace it) and dies
    with the cache. A :class:`~hf_paged.prefix_cache.PrefixCache`'s store (``shared``) outlives
    the calls: its pools' tensors live on, and the kernels find them through their addresses
    tensors even after the pools grew, so the next ``generate`` over them replays the graphs an
    earlier call captured, instead of capturing its own (about 0.1 s per call for an 8B model, and
    the GPU idle meanwhile). Its keys carry the model's key (weights, dtype, adapters) and the
    pools' layout, and it keeps the ``SHARED_GRAPHS_LIMIT`` most recently used.
    """

    def __init__(self, shared: bool = False):
        self.shared = shared
        self.graphs: dict = {}  # insertion order = least recently used first
        self.pool = None  # CUDA memory pool shared by the graphs (they never run at once)

    def get(self, key):
        graph = self.graphs.pop(key, None)
        if graph is not None:
            self.graphs[key] = graph  # most recently used last
        return graph

    def add(self, key: _GraphKey, graph) -> None:
        if not self.shared:
            self.graphs = {key: graph}  # older graphs held an older width or older pools
            return
        # a graph over dropped pools' addresses would write freed memory: never kept
        self.graphs = {k: g for k, g in self.graphs.items() if k.pools_layout == key.pools_layout}
        self.graphs[key] = graph
        while len(self.graphs) > SHARED_GRAPHS_LIMIT:
            del self.graphs[next(iter(self.graphs))]

    def drop_model(self, model_id: bytes) -> None:
        """Forget the graphs of a model whose graphs are off."""
        self.graphs = {k: g for k, g in self.graphs.items() if k.model != model_id}

    def clear(self) -> None:
        self.graphs = {}
        self.pool = None


class _GraphState:
    """A cache's decode graphs: where they are kept (its own store, or its prefix cache's), and
    what happened to them in this cache's life."""

    def __init__(self, store: GraphStore):
        self.store = store
        self.disabled: str | None = None  # why graphs are off for this cache
        self.replays = 0  # steps served by a replay (tests and benchmarks read it)
        self.captures = 0

    @property
    def graphs(self) -> dict:
        return self.store.graphs


class _DecodeGraph:
    """Static buffers of one captured decode step, and its replay.

    The model's forward runs over them with ``attention_mask=None`` (the 2D mask grows every
    step; the paged metadata carries what attention needs) and, where the model derives positions
    from ``cache.get_seq_length()``, with that length as a device tensor rather than a host int.

    Nothing here holds the cache strongly: the cache holds its graphs (``cache.graph_state``), so
    a strong reference back would make a cycle that only Python's cyclic garbage collector frees,
    and a loop of generate calls would hold the previous call's pools while the next one runs.
    """

    def __init__(self, fwd: PagedForward, inputs: dict, device: torch.device):
        # Normal tensors even when captured under torch.inference_mode: a prefix cache's graph
        # serves later calls, which may run outside it, and refresh() updates these in place.
        with torch.inference_mode(False):
            self._make_buffers(fwd, inputs, device)
        self.step = [0]  # the logical length the step ends at (read by the static step in Python)
        self.replay = None  # () -> (output class, output fields without the cache)
        self.cache_fields: tuple = ()  # output fields that hold the cache (set again at each replay)
        self.cache_ref: list = [None]  # [weakref to the cache of the step]: see bind()
        self.verified = False
        # Whether the captured step read a pool other than through LayerPools.addresses (latent
        # attention), and the pools' allocation it saw: such a graph is captured again after growth.
        self.direct_pool_reads = [False]
        self.pools_version = fwd.pools.version  # grown before the step's graph is made, never inside it

    def _make_buffers(self, fwd: PagedForward, inputs: dict, device: torch.device) -> None:
        meta = fwd.meta
        # the static copy of the step's packed metadata, and the metadata over it
        # (shared-prefix decode: the capture step's choice holds for the graph's life; its arrays
        # are part of the packed buffer, refreshed every step, and the kernels' grids depend on
        # the batch only, so any later step's groups replay correctly)
        self.meta = ForwardMetadata.over(torch.empty_like(meta.packed), meta.batch, meta.width, 1,
                                         max_seq_len=meta.max_seq_len, max_context_len=meta.max_context_len,
                                         pads_after_start=False, cascade_sizes=meta.cascade_sizes,
                                         window_copies=None if meta.window is None else (None, None))
        self.inputs = {name: torch.empty_like(t) for name, t in inputs.items()}
        self.seq_length = torch.zeros((), dtype=torch.long, device=device)  # tokens before this step

    @property
    def width(self) -> int:
        return self.meta.width

    def refresh(self, fwd: PagedForward, inputs: dict) -> None:
        """This step's metadata and inputs into the static buffers."""
        self.meta.packed.copy_(fwd.meta.packed)
        for name, t in inputs.items():
            self.inputs[name].copy_(t)
        self.seq_length.fill_(fwd.new_logical_len - 1)
        self.step[0] = fwd.new_logical_len

    def bind(self, cache: PagedCache) -> None:
        """The cache whose step runs next (a graph kept by a prefix cache serves later calls'
        caches: what the static step's Python would see, were it run again)."""
        self.cache_ref[0] = weakref.ref(cache)

    def static_step(self, forward, cache: PagedCache, kwargs: dict):
        """The step over the static buffers (what is captured), as a closure that refers to the
        cache only weakly and to the buffers, not to this object."""
        cache_ref = self.cache_ref = [weakref.ref(cache)]
        cache_keys = [k for k in compat.CACHE_KEYS if k in kwargs]
        plain = {k: v for k, v in kwargs.items() if k not in cache_keys and k not in self.inputs}
        plain["attention_mask"] = None
        meta, inputs, seq_length, step, direct = self.meta, self.inputs, self.seq_length, self.step, self.direct_pool_reads

        def run():
            cache = cache_ref[0]()
            with cache.replaying(meta, seq_length, new_logical_len=step[0]) as fwd:
                outputs = forward(**plain, **{k: cache for k in cache_keys}, **inputs)
                direct[0] = bool(fwd.direct_pool_reads)
            return type(outputs), {k: v for k, v in outputs.items() if v is not cache}

        return run

    def holds_pools_of(self, pools) -> bool:
        """Whether a replay reads ``pools`` as they are now: through their addresses tensors
        (always, unless the step read a pool directly), or at the addresses it was captured with."""
        return not self.direct_pool_reads[0] or self.pools_version == pools.version

    def outputs(self, result, cache: PagedCache):
        """A replay's outputs: the logits copied out of the graph's buffer, the live cache."""
        cls, fields = result
        fields = {k: (v.clone() if k == "logits" else v) for k, v in fields.items()}
        return cls(**fields, **{k: cache for k in self.cache_fields})


def _decode_step_cache(model, kwargs: dict) -> PagedCache | None:
    """The PagedCache of a forward that can run as a graph, else None (run it eagerly)."""
    key = compat.cache_key(kwargs, PagedCache)
    cache = kwargs[key] if key is not None else None
    if cache is None or cache.in_row_subset or not cache.is_initialized:
        return None
    if getattr(model, "_hf_paged_graphs_off", None):
        return None  # an earlier generate found this model's decode step not capturable
    if _distributed():
        # Tensor parallelism: a capture that failed on one rank and not on another would leave the
        # ranks running different collectives, so every rank decodes eagerly.
        return None
    state = cache.graph_state
    if state is not None and state.disabled:
        return None
    input_ids = kwargs.get("input_ids")
    if (
        not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1
        or input_ids.device.type not in _DEVICE_TYPES or model.training
        or kwargs.get("inputs_embeds") is not None
        or any(kwargs.get(k) for k in _OFF_IF_TRUE)
    ):
        return None
    if any(k not in _KNOWN_INPUTS for k in kwargs):
        return None
    if any(isinstance(kwargs.get(k), torch.Tensor) and kwargs[k].device != input_ids.device for k in _STATIC_INPUTS):
        return None
    if not cache.key_cache or any(k is None or k.device != input_ids.device for k in cache.key_cache):
        return None  # a layer without a pool yet, or pools on several devices (device_map)
    if input_ids.device.type == "cuda" and backend_name(input_ids.device) != "triton":
        return None  # the PyTorch backend (HF_PAGED_BACKEND=torch) is not capturable
    return cache


def _distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _table_width(cache: PagedCache, shared: bool = False) -> int:
    """Block table width of this step's graph: the generate call's bound when known (one graph per
    generate), else the next power of two over the longest row after this step. ``shared``: the
    graph may serve later calls (a prefix cache's store): the bound is rounded up (by at most an
    eighth of its power of two), so that calls of similar lengths get the same width."""
    need = max(cdiv(n + 1, cache.block_size) for n in cache.seq_lens)
    if cache.max_row_blocks is not None and cache.max_row_blocks >= need:
        width = cache.max_row_blocks
        if shared:
            step = max(16, next_pow2(width) // 8)
            width = cdiv(width, step) * step
        return width
    return max(16, next_pow2(need))


def _state_of(cache: PagedCache) -> _GraphState:
    """The cache's graph state, over its prefix cache's store when it has one, else over a store
    of its own."""
    state = cache.graph_state
    if state is None:
        prefix = cache.prefix_cache
        if prefix is None:
            store = GraphStore()
        else:
            store = prefix.graph_store
            if store is None:
                store = prefix.graph_store = GraphStore(shared=True)
        state = cache.graph_state = _GraphState(store)
    return state


class GraphedForward:
    """Stands in for ``model.forward`` during ``generate``: decode steps through CUDA graphs kept
    on the cache (:mod:`hf_paged.graphs`), every other forward through the model's own forward."""

    def __init__(self, model):
        self.model_ref = weakref.ref(model)
        self.forward = type(model).forward.__get__(model)
        self.segments = graph_segments()  # once per generate call (a bad value fails it at once)
        # generate reads forward's signature to decide which inputs to pass (position_ids, ...)
        self.__signature__ = inspect.signature(self.forward)
        self.__doc__ = self.forward.__doc__

    def __call__(self, *args, **kwargs):
        model = self.model_ref()
        cache = None if args else _decode_step_cache(model, kwargs)
        if cache is None:
            return self.forward(*args, **kwargs)
        return _graphed_step(model, self.forward, cache, kwargs, self.segments)


def _graphed_step(model, forward, cache: PagedCache, kwargs: dict, segments: int):
    if cache.model_key is None:  # generate's prefill binds it; a decode step reached otherwise does here
        cache.bind_model(model)
    model_id = cache.model_key
    state = _state_of(cache)
    store = state.store
    input_ids = kwargs["input_ids"]
    device = input_ids.device
    batch = input_ids.shape[0]
    width = _table_width(cache, shared=store.shared)
    # one launch configuration (the table's width) for the eager and the replayed steps
    fwd = cache.begin_forward(kwargs.get("attention_mask"), q_len=1, batch_size=batch, device=device,
                              dtype=model.dtype, table_width=width, config=model.config)
    try:
        cache.grow_layer_pools()  # now, so that no pool is reallocated inside a graph
        fwd.copy_blocks(cache.pools)  # copy-on-write of shared tail blocks: a varying number per step
        inputs = {k: kwargs[k] for k in _STATIC_INPUTS if isinstance(kwargs.get(k), torch.Tensor)}
        key = _GraphKey(batch, width, cache.pools.layout_version,
                        tuple((k, tuple(t.shape), t.dtype) for k, t in inputs.items()),
                        tuple((k, kwargs.get(k)) for k in _PLAIN_INPUTS), model_id,
                        tuple(sorted(cache.window_layers)), segments,
                        model.__dict__.get("_hf_paged_call", {}).get("fused_norms", 0))
        # Rows with pads: the replay runs without the 2D mask, so a forward that reads it beyond
        # attention (and not the paged metadata) differs from its eager step only then.
        kind = "padded" if any(cache.tables.left_pads) or any(cache.tables.inner_pads) else "unpadded"
        graph = store.get(key)
        if graph is not None and not graph.holds_pools_of(cache.pools):
            graph = None  # captured again over the enlarged pools (replaces the old one in the store)
        if graph is None:
            # The real step runs eagerly, as the model defines it (it also compiles the kernels);
            # then the same step is captured over the static buffers. A model's first replay over
            # padded rows, and its first over unpadded ones, is checked against the eager step
            # (below); a model whose replay has agreed there is not checked again (a host value
            # kept from the capture step is a property of its forward's code).
            outputs = forward(**kwargs)
            graph = _DecodeGraph(fwd, inputs, device)
            graph.cache_fields = tuple(k for k, v in outputs.items() if v is cache)
            graph.refresh(fwd, inputs)
            try:
                graph.replay = _CAPTURE(graph.static_step(forward, cache, kwargs), _graph_pool(store, device),
                                        segment_starts(model, key.segments))
            except NotCapturable as exc:  # the forward itself cannot be captured: not tried again
                _disable(model, state, f"capturing the decode step failed ({exc})", for_model=True, model_id=model_id)
                return outputs
            except Exception as exc:  # noqa: BLE001 - whatever failed, the eager path stays correct
                _disable(model, state, f"capturing the decode step failed ({type(exc).__name__}: {exc})",
                         for_model=False)
                return outputs
            store.add(key, graph)
            state.captures += 1
            STATS["captures"] += 1
            return outputs
        graph.refresh(fwd, inputs)
        graph.bind(cache)
        if kind not in model.__dict__.get("_hf_paged_graphs_verified", ()):
            # The model's first replay over rows of this kind (any graph's, a prefix cache's kept
            # one too): checked against the eager step with the model's real inputs. Both write
            # the same K/V to the same slots, so running both leaves the cache as one would.
            outputs = forward(**kwargs)  # the eager step's mask function takes this step's metadata
            eager = outputs["logits"]
            replayed = graph.replay()[1]["logits"]
            diff = (replayed.float() - eager.float()).abs().max().item()
            scale = eager.float().abs().max().item() + 1.0
            # The same kernels on the same inputs: equal but for rounding (a position or length
            # kept from the capture step moves the logits far more than this).
            if diff <= (1e-4 if eager.dtype == torch.float32 else 1e-2) * scale:
                model.__dict__.setdefault("_hf_paged_graphs_verified", set()).add(kind)
            else:
                _disable(model, state, for_model=True, model_id=model_id,
                         reason=f"the replayed decode step gave logits up to {diff:.3g} away from the eager step's "
                                f"(the model's forward depends on a host-side value or on the 2D attention mask)")
            return outputs
        state.replays += 1
        STATS["replays"] += 1
        outputs = graph.outputs(graph.replay(), cache)
        cache.end_forward(replayed=True)  # a replay runs no Python: nothing else commits the step
        return outputs
    finally:
        cache.end_forward()


def _graph_pool(store: GraphStore, device: torch.device):
    if store.pool is None and device.type == "cuda":
        store.pool = torch.cuda.graph_pool_handle()
    return store.pool


def _disable(model, state: _GraphState, reason: str, for_model: bool, model_id: bytes | None = None) -> None:
    """Graphs off for this cache and, when the cause is the model's forward (it will not change),
    for every later generate of this model (its graphs kept by a prefix cache go too)."""
    state.disabled = reason
    if not state.store.shared:
        state.store.clear()
    elif for_model and model_id is not None:
        state.store.drop_model(model_id)
    STATS["disabled"] += 1
    if for_model:
        model._hf_paged_graphs_off = reason
    logger.warning("hf_paged: CUDA graphs are off for this %s: %s. Its decode steps run eagerly, with the same "
                   "results (set %s=0 to skip the attempt).", "model" if for_model else "generate call",
                   reason, ENV_VAR)
