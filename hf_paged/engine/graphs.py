"""CUDA graphs of the engine's decode step, over a few bucketed batch sizes.

Why: an 8B model's eager decode step spends most of its time in Python and kernel launches (see
``hf_paged/graphs.py``); a replay launches the whole forward at once. The engine's decode batch
changes at almost every step (rows finish, prompts join), so a step of ``B`` rows runs in the
graph of the smallest bucket ``>= B`` (:data:`BUCKETS`): the rows past ``B`` are pad rows (no
blocks, a pad query that reads and writes nothing; their logits are dropped). The other parts of
a graph's key stay fixed for a run: the block table's width is the longest request's (prompt plus
``max_new_tokens``), and the engine sizes the pools once before the first step.

Capture and its checks are those of generate's graphs (``hf_paged/graphs.py``): the run's first
graph is captured after an eager step and its first replay is compared with an eager run of the
same step; once one replay passed, a new bucket's first step is its capture's dry run and its
first replay (a new bucket costs two forwards, not four). A model whose step cannot be captured
decodes eagerly (one warning).
``HF_PAGED_CUDA_GRAPHS=0`` turns them off here too.
"""

from __future__ import annotations

import bisect
import logging

import torch

from .. import compat, graphs
from ..cache import PagedCache
from ..kernels import backend_name, cdiv

logger = logging.getLogger("hf_paged")

# Batch sizes with a graph: a step of B rows computes bucket(B) rows. Fine-grained up to 64 (where
# a padded row costs most relatively), then steps of 32, then of 64.
BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


def bucket(batch: int) -> int:
    """The graph batch size a decode step of ``batch`` rows runs in."""
    i = bisect.bisect_left(BUCKETS, batch)
    return BUCKETS[i] if i < len(BUCKETS) else cdiv(batch, 128) * 128


def why_not(model, cache: PagedCache) -> str | None:
    """Why the engine's decode steps of ``model`` cannot run as graphs (None: they can)."""
    if not graphs.graphs_enabled():
        return f"{graphs.ENV_VAR}=0"
    device = model.device
    if device.type not in graphs._DEVICE_TYPES:
        return "not a CUDA device"
    if getattr(model, "_hf_paged_graphs_off", None):
        return model._hf_paged_graphs_off
    if len({p.device for p in model.parameters()}) > 1:
        return "the model is spread over several devices"
    if graphs._distributed():
        return "torch.distributed with several ranks"
    if device.type == "cuda" and backend_name(device) != "triton":
        return "the PyTorch backend"
    return None


class DecodeGraphs:
    """The captured decode steps of one engine run (one per bucket), and their replay."""

    def __init__(self, model, cache: PagedCache, cache_kwarg: str):
        self.model = model
        self.cache = cache
        self.cache_kwarg = cache_kwarg
        # the model's own forward: hooks are Python, which a replay does not run
        self.forward = type(model).forward.__get__(model)
        self.logits_to_keep = compat.takes_logits_to_keep(model)
        self.graphs: dict = {}
        self.pool = None
        self.disabled: str | None = None
        self.verified = False  # a replay of this run was checked against the eager step
        self.captures = 0
        self.replays = 0
        self.padded_rows = 0  # pad rows computed by the steps (the buckets' waste)
        # benchmarks set a list here: (start, end) CUDA events around every replay (its GPU time)
        self.replay_events: list | None = None

    def step(self, rows: list[int], input_ids: torch.Tensor, position_ids: torch.Tensor,
             table_width: int) -> torch.Tensor:
        """One decode step over cache rows ``rows`` (``input_ids`` / ``position_ids`` ``[B, 1]`` on
        the model's device): the logits ``[B, vocab]``. They live in the graph's buffer: use them
        before the next step."""
        batch, device, cache = len(rows), self.model.device, self.cache
        size = bucket(batch)
        ids = torch.zeros(size, 1, dtype=input_ids.dtype, device=device)
        ids[:batch] = input_ids
        positions = torch.zeros(size, 1, dtype=position_ids.dtype, device=device)
        positions[:batch] = position_ids
        inputs = {"input_ids": ids, "position_ids": positions}
        kwargs = {self.cache_kwarg: cache, "use_cache": True, "attention_mask": None, **inputs}
        if self.logits_to_keep:
            kwargs["logits_to_keep"] = 1
        with torch.inference_mode(), cache.row_subset(rows):
            fwd = cache.begin_forward(None, q_len=1, batch_size=batch, device=device, dtype=self.model.dtype,
                                      table_width=table_width, config=self.model.config, pad_rows_to=size)
            cache.grow_layer_pools()  # now, so that no pool is reallocated inside a graph
            fwd.copy_blocks(cache.pools)  # copy-on-write of forked rows' shared tail blocks
            self.padded_rows += size - batch
            key = (size, fwd.meta.width, cache.pools.version)
            graph = self.graphs.get(key)
            if graph is None and not self.verified:
                # the run's first graph: the step runs eagerly, the graph's first replay is checked
                logits = self.forward(**kwargs).logits
                self._capture(key, fwd, inputs, kwargs)
                return logits[:batch, -1]
            if graph is None:
                # Another bucket of a model whose replay was checked: what the check guards against
                # (a forward that keeps host values between steps) does not depend on the batch
                # size. The capture's dry run computes this step over the static buffers, the
                # replay again (the same K/V to the same slots) and gives its logits.
                graph = self._capture(key, fwd, inputs, kwargs)
                if graph is None:
                    return self.forward(**kwargs).logits[:batch, -1]
                graph.verified = True
            else:
                graph.refresh(fwd, inputs)
            if not graph.verified:
                logits = self.forward(**kwargs).logits  # the eager step, with the same metadata
                self._verify(graph, logits[:batch], graph.replay()[1]["logits"][:batch])
                return logits[:batch, -1]
            if self.replay_events is not None:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                logits = graph.replay()[1]["logits"]
                end.record()
                self.replay_events.append((start, end))
            else:
                logits = graph.replay()[1]["logits"]
            self.replays += 1
            graphs.STATS["replays"] += 1
            cache.end_forward(replayed=True)  # a replay runs no Python: nothing else commits the step
            return logits[:batch, -1]

    def _capture(self, key, fwd, inputs: dict, kwargs: dict):
        """The graph of this step's bucket, captured over static buffers holding this step (None:
        the capture failed, graphs are off)."""
        graph = graphs._DecodeGraph(fwd, inputs, self.model.device)
        graph.refresh(fwd, inputs)
        if self.pool is None and self.model.device.type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        try:
            graph.replay = graphs._CAPTURE(graph.static_step(self.forward, self.cache, kwargs), self.pool,
                                           graphs.segment_starts(self.model, graphs.graph_segments()))
        except graphs.NotCapturable as exc:  # the forward itself cannot be captured: never again
            self._disable(f"capturing the decode step failed ({exc})", for_model=True)
            return None
        except Exception as exc:  # noqa: BLE001 - whatever failed, the eager path stays correct
            self._disable(f"capturing the decode step failed ({type(exc).__name__}: {exc})", for_model=False)
            return None
        self.graphs[key] = graph
        self.captures += 1
        graphs.STATS["captures"] += 1
        return graph

    def _verify(self, graph, eager: torch.Tensor, replayed: torch.Tensor) -> None:
        """The first replay of a graph against the eager step (the same kernels on the same
        inputs: equal but for rounding)."""
        diff = (replayed.float() - eager.float()).abs().max().item()
        scale = eager.float().abs().max().item() + 1.0
        if diff <= (1e-4 if eager.dtype == torch.float32 else 1e-2) * scale:
            graph.verified = self.verified = True
        else:
            self._disable(f"the replayed decode step gave logits up to {diff:.3g} away from the eager step's (the "
                          f"model's forward depends on a host-side value)", for_model=True)

    def _disable(self, reason: str, for_model: bool) -> None:
        self.disabled = reason
        self.graphs = {}
        graphs.STATS["disabled"] += 1
        if for_model:
            self.model._hf_paged_graphs_off = reason
        logger.warning("hf_paged: CUDA graphs are off for this %s: %s. Its decode steps run eagerly, with the same "
                       "results (set %s=0 to skip the attempt).", "model" if for_model else "generate_many call",
                       reason, graphs.ENV_VAR)
