"""Continuous batching over one paged cache: sequences join and leave the batch every step.

Each step of :meth:`Engine.steps`:

1. **prefill**: the sequences whose tokens are not all in the cache yet (new ones are admitted
   from the waiting queue while blocks and the step's token budget allow; an admitted sequence
   first takes the stored blocks of its prompt's leading full blocks, held by another row or
   freed but still hashed, and computes only the rest) run one chunk of their prompt each, in
   length-sorted groups of at most ``max_batch_tokens`` padded tokens, each group one forward
   over its cache rows (``PagedCache.row_subset``). A sequence whose prompt is all in the cache
   takes its first token from the chunk's last logits; a request that returns several sequences
   forks its row first (the prompt's blocks are shared, copy-on-write).
2. **decode**: every sequence with its prompt in the cache feeds its last token, one forward over
   those rows. Before it, the blocks the step takes are counted; when the pool cannot give them,
   the newest sequences are preempted (their rows freed, requeued first, recomputed later: the
   same tokens, since sampling is keyed on the token's index, not on the batch).
3. finished sequences (end token, ``max_new_tokens``, a stop string) leave the cache: their blocks
   return to the pool at once, and a waiting prompt takes their place at the next step.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import numpy as np
import torch

from .. import compat, norms
from ..block_pool import OutOfBlocksError
from ..block_table import chain_hashes
from ..cache import DEFAULT_BLOCK_SIZE, PagedCache
from ..generation import length_groups
from ..kernels import cdiv
from .graphs import DecodeGraphs, bucket, why_not
from .requests import EngineRequest, Sequence
from .sampling import next_tokens, to_device

# tokens decoded to look for a stop string at the end of a sequence
_STOP_WINDOW = 32


class Engine:
    """Runs :class:`EngineRequest` objects through ``model`` with continuous batching."""

    def __init__(self, model, *, max_memory=None, max_batch_tokens: int = 8192, tokenizer=None,
                 block_size: int = DEFAULT_BLOCK_SIZE, prefix_cache=None):
        if max_memory is None and model.device.type == "cuda" and prefix_cache is None:
            # admission by free blocks needs a cap: most of what the GPU has free now
            free, _ = torch.cuda.mem_get_info(model.device)
            max_memory = int(free * 0.8)
        self.model = model
        self.device = model.device
        self.tokenizer = tokenizer
        self.max_batch_tokens = max_batch_tokens
        if prefix_cache is not None:  # its pool, cap and block size, and the blocks earlier calls left
            self.cache = PagedCache(config=model.config, max_memory=max_memory, block_size=block_size,
                                    prefix_cache=prefix_cache)
            self.cache.bind_model(model)  # the hashes are this model's (weights, dtype, adapters)
        else:
            self.cache = PagedCache(config=model.config, max_memory=max_memory, block_size=block_size)
        self.cache.resolve_memory_cap(model.dtype)
        self.cache_kwarg = compat.forward_cache_kwarg(model)
        reason = why_not(model, self.cache)
        self.graphs = DecodeGraphs(model, self.cache, self.cache_kwarg) if reason is None else None
        self.graphs_off = reason  # why decode steps run eagerly (None: as CUDA graphs)
        self.max_row_tokens = 0  # the longest a row can get: its block tables' width for the graphs
        self.bound_blocks = 0  # blocks the requests added so far could use at most
        self.rows: list[Sequence] = []  # cache row i holds rows[i]
        self.inflight: _InFlight | None = None  # the decode step whose tokens are not read yet
        self.waiting: collections.deque[Sequence] = collections.deque()
        self._admitted = 0
        self.steps_run = 0
        self.decode_rows = 0  # decode rows whose token was taken (useful slots; a row decoded past its end is not)
        self.decode_slots = 0  # rows the decode forwards computed, padding rows included
        self.decode_steps = 0
        self.prompt_tokens = 0  # prompt tokens run through the model (recomputed ones included)
        self.tokens_reused = 0  # prompt tokens taken from stored blocks at admission, without compute
        self.new_tokens = 0  # tokens chosen
        self.preemptions = 0
        self.finished_requests = 0
        self.peak_blocks = 0

    def stats(self) -> dict:
        """Counters of the run so far (for progress bars and reports)."""
        return {"steps": self.steps_run, "decode_steps": self.decode_steps, "decode_rows": self.decode_rows,
                "decode_slots": self.decode_slots, "prompt_tokens": self.prompt_tokens,
                "tokens_prefilled": self.prompt_tokens, "tokens_reused": self.tokens_reused,
                "new_tokens": self.new_tokens, "preemptions": self.preemptions,
                "finished_requests": self.finished_requests, "waiting": len(self.waiting), "running": len(self.rows),
                "peak_blocks": self.peak_blocks, "block_size": self.cache.block_size,
                "max_blocks": self.cache.pool.max_blocks,
                "graph_captures": self.graphs.captures if self.graphs else 0,
                "graph_replays": self.graphs.replays if self.graphs else 0,
                "graphs_off": self.graphs_off or (self.graphs.disabled if self.graphs else None)}

    def add(self, request: EngineRequest) -> None:
        length = len(request.prompt) + request.max_new_tokens
        self.max_row_tokens = max(self.max_row_tokens, length)
        self.bound_blocks += cdiv(length, self.cache.block_size) * request.num_sequences
        self.waiting.append(Sequence(request, 0, list(request.prompt), request.sequence_seed(0), order=-1))

    @property
    def busy(self) -> bool:
        return bool(self.waiting or self.rows or self.inflight)

    def steps(self) -> Iterator[list[EngineRequest]]:
        """Run until every request is done; yields, after each step, the requests it finished."""
        # The pools' size for the whole run, at once (within the cap): pools that grow would be
        # reallocated, and every CUDA graph captured over them captured again.
        self.cache.pool.reserve(self.bound_blocks)
        sequences = sum(seq.request.num_sequences for seq in self.waiting)
        self.cache.reserve_window_blocks(sequences, self.max_batch_tokens, self.bound_blocks)
        # the model's Llama-style RMSNorms run one kernel each for the run (hf_paged.norms)
        with norms.fused(self.model):
            yield from self._steps()

    def _steps(self) -> Iterator[list[EngineRequest]]:
        while self.busy:
            finished: list[EngineRequest] = []
            progress = self._prefill(finished) + self._decode(finished)
            if not progress:  # a row that cannot take its next chunk even alone in the pool
                seq = self.rows[0] if self.rows else self.waiting[0]
                raise OutOfBlocksError(
                    self.cache.tables.blocks_needed([0], [1]) if self.rows else 1, self.cache.pool.available(),
                    self.cache.pool.max_blocks, hint=f"(request {seq.request.index} needs {len(seq.tokens)} tokens' "
                                                     f"blocks alone)")
            self.peak_blocks = max(self.peak_blocks, self.cache.pool.num_used)
            self._drop_finished()
            self.steps_run += 1
            self.finished_requests += len(finished)
            yield finished

    # ------------------------------------------------------------------ prefill
    def _prefill(self, finished: list) -> int:
        """Run this step's prompt chunks; returns how many ran."""
        decoding = sum(1 for s in self.rows if s.prefilled)
        chunks = self._plan_chunks(reserve=decoding)
        if not chunks:
            return 0
        for group in length_groups([n for _, n in chunks], self.max_batch_tokens):
            self._run_chunks([chunks[i] for i in group], finished)
        return len(chunks)

    def _plan_chunks(self, reserve: int) -> list[tuple[Sequence, int]]:
        """This step's prompt chunks: rows still prefilling first, then new sequences from the
        waiting queue, while the token budget lasts and the pool keeps ``reserve`` blocks for the
        decode step."""
        tables, budget, chunks = self.cache.tables, self.max_batch_tokens, []
        free = self.cache.pool.available() - reserve  # blocks this step's chunks may take
        computing: set[bytes] = set()  # hashes of the full blocks this step's chunks compute
        for row, seq in enumerate(self.rows):
            if not seq.prefilled and budget > 0:
                n = min(self._prefill_target(seq) - seq.stored, budget)
                need = tables.blocks_needed([row], [n])
                if need > free:
                    break
                chunks.append((seq, n))
                computing.update(self._chunk_block_hashes(row, seq, n))
                budget, free = budget - n, free - need
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            target = self._prefill_target(seq)
            # the prompt's leading full blocks already stored (one token is left to compute: its logits)
            hit = tables.cached_prefix(seq.tokens[:target], target - 1) if self.cache.share_prefixes else []
            hashes = self._block_hashes(seq.tokens[:target - 1])
            if len(hit) < len(hashes) and hashes[len(hit)] in computing:
                break  # a chunk of this step computes its next block: take it stored next step
            reused = len(hit) * self.cache.block_size
            n = min(target - reused, budget)
            need = cdiv(n, self.cache.block_size) + sum(1 for b in hit if b in self.cache.pool.cached)
            if need > free:
                if not self.rows:  # nothing to wait for: it can never fit
                    raise OutOfBlocksError(need, free, self.cache.pool.max_blocks,
                                           hint=f"(the prompt of request {seq.request.index} alone)")
                break
            free -= need
            self.waiting.popleft()
            seq.order, self._admitted = self._admitted, self._admitted + 1
            self.cache.add_rows(1)
            self.rows.append(seq)
            seq.stored = self.cache.reuse_prefix(len(self.rows) - 1, seq.tokens[:target], target - 1)
            self.tokens_reused += seq.stored
            chunks.append((seq, n))
            computing.update(hashes[len(hit):])
            budget -= n
        return chunks

    def _chunk_block_hashes(self, row: int, seq: Sequence, n: int) -> list[bytes]:
        """The chained hashes of the blocks a chunk of ``n`` more prompt tokens of cache row ``row``
        fills (its partial last block's included), chained on the row's stored hashes: a long
        prompt prefilled chunk after chunk is not hashed again from its start at every step."""
        tables, bs = self.cache.tables, self.cache.block_size
        known = tables.row_hashes[row]
        if tables.salt is None or not self.cache.share_prefixes or tables.row_tokens[row] is None \
                or len(known) != seq.stored // bs:
            return self._block_hashes(seq.tokens[:seq.stored + n])[seq.stored // bs:]
        parent = known[-1] if known else tables.salt
        return chain_hashes(np.asarray(seq.tokens[len(known) * bs:seq.stored + n], dtype=np.int64), bs, parent)

    def _block_hashes(self, tokens: list[int]) -> list[bytes]:
        """The chained hashes of the full blocks of ``tokens`` (as the cache's tables hash them)."""
        salt = self.cache.tables.salt
        if salt is None or not self.cache.share_prefixes:
            return []
        return chain_hashes(np.asarray(tokens, dtype=np.int64), self.cache.block_size, salt)

    @staticmethod
    def _prefill_target(seq: Sequence) -> int:
        """Tokens the cache must hold before the sequence decodes: all but the last generated one
        (a recomputed sequence's next input); a fresh prompt, all of it."""
        return len(seq.tokens) - (1 if seq.num_generated else 0)

    def _run_chunks(self, chunks: list[tuple[Sequence, int]], finished: list) -> None:
        """One forward over the rows of ``chunks``, left-padded to the longest chunk."""
        width = max(n for _, n in chunks)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        mask = torch.zeros(len(chunks), width, dtype=torch.long)
        positions = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, (seq, n) in enumerate(chunks):
            ids[b, width - n:] = torch.tensor(seq.tokens[seq.stored:seq.stored + n])
            mask[b, width - n:] = 1
            positions[b, width - n:] = torch.arange(seq.stored, seq.stored + n)
        rows = [self.rows.index(seq) for seq, _ in chunks]
        self.cache.set_prefill_tokens(ids)  # prompt tokens: their full blocks are hashed for reuse
        logits = self._forward(rows, ids, positions, mask)
        self.prompt_tokens += sum(n for _, n in chunks)
        starting = []
        for b, (seq, n) in enumerate(chunks):
            seq.stored += n
            if seq.prefilled and not seq.num_generated:
                starting.append((seq, logits[b]))
        if starting:
            self._start(starting, finished)

    def _start(self, starting: list, finished: list) -> None:
        """Sequences whose prompt is all in the cache: fork the requests that return several
        sequences (sharing the prompt's blocks), then choose every sequence's first token."""
        seqs, rows_logits = [], []
        for seq, row_logits in starting:
            request = seq.request
            request.sequences = [seq]
            if request.num_sequences > 1:
                row = self.rows.index(seq)
                self.cache.fork_rows(list(range(len(self.rows))) + [row] * (request.num_sequences - 1))
                for k in range(1, request.num_sequences):
                    fork = Sequence(request, k, list(seq.tokens), request.sequence_seed(k), seq.order, seq.stored)
                    self.rows.append(fork)
                    request.sequences.append(fork)
            seqs += request.sequences
            rows_logits += [row_logits] * len(request.sequences)
        self._choose(seqs, torch.stack(rows_logits), finished)

    # ------------------------------------------------------------------ decode
    def _decode(self, finished: list) -> int:
        """Launch one decode step over the rows whose prompt is in the cache, then read the tokens
        of the step launched before it (the GPU runs this one meanwhile); returns the rows
        launched plus the tokens read.

        A row whose token in flight may end it (an end token, a stop string) decodes one step on
        speculation: if it did end, that step's token is dropped. A row whose token in flight is
        its last (``max_new_tokens``) does not.
        """
        rows = self._decoding_rows()
        if self.inflight is not None and any(self.rows[i].request.sampling.repetition_penalty != 1.0 for i in rows):
            landed = self._land(finished)  # the penalty reads every token before the next one
            rows = self._decoding_rows()
        else:
            landed = 0
        while rows and self.cache.tables.blocks_needed(rows, [1] * len(rows)) > self.cache.pool.available():
            if self.inflight is not None:  # finished rows may free enough; a preempted row must be settled
                landed += self._land(finished)
                self._drop_finished()
            else:
                self._preempt(max((s for s in self.rows if not s.finished), key=lambda s: s.order))
            rows = self._decoding_rows()
        if not rows:
            return landed + self._land(finished)
        seqs = [self.rows[i] for i in rows]
        ids = self._decode_inputs(seqs)
        positions = torch.tensor([[s.stored] for s in seqs])
        if self.graphs is not None and self.graphs.disabled is None:
            width = cdiv(self.max_row_tokens, self.cache.block_size)
            logits = self.graphs.step(rows, ids, to_device(positions, self.device), width)
            self.decode_slots += bucket(len(seqs))  # the bucket's rows ran, pad rows included
        else:
            logits = self._forward(rows, ids, positions, None)
            self.decode_slots += len(seqs)
        for seq in seqs:
            seq.stored += 1
        self.decode_steps += 1
        launched = _InFlight(seqs, self._sample(seqs, logits))
        for seq in seqs:
            seq.pending += 1
        landed += self._land(finished)  # the previous step's tokens, while the GPU runs this one
        self.inflight = launched
        return len(seqs) + landed

    def _decoding_rows(self) -> list[int]:
        """The rows the next decode step feeds: prompt in the cache, not finished, and not about
        to finish by length with the token in flight."""
        return [i for i, s in enumerate(self.rows)
                if s.prefilled and not s.finished and s.num_generated + s.pending < s.request.max_new_tokens]

    def _decode_inputs(self, seqs: list[Sequence]) -> torch.Tensor:
        """``[B, 1]`` on the device: each row's last token, from the host or, when it is still in
        flight, from the previous step's tokens on the device (no synchronisation)."""
        host = torch.tensor([[s.tokens[-1]] for s in seqs])
        prev = self.inflight
        if prev is None or not any(s.pending for s in seqs):
            return to_device(host, self.device)
        where = {id(s): i for i, s in enumerate(prev.seqs)}
        index = to_device([[where.get(id(s), -1) if s.pending else -1] for s in seqs], self.device)
        return torch.where(index >= 0, prev.tokens[index.clamp(min=0)], to_device(host, self.device))

    def _land(self, finished: list) -> int:
        """Read the tokens of the decode step in flight (if any) and take them; returns how many."""
        step, self.inflight = self.inflight, None
        if step is None:
            return 0
        tokens = step.read()
        for seq in step.seqs:
            seq.pending -= 1
        live = [(seq, t) for seq, t in zip(step.seqs, tokens) if not seq.finished]  # else: speculated past its end
        self.decode_rows += len(live)
        self._accept(live, finished)
        return len(step.seqs)

    def _preempt(self, seq: Sequence) -> None:
        """Free ``seq``'s row; it waits first in line, to be recomputed from its tokens."""
        row = self.rows.index(seq)
        self.cache.drop_rows([row])
        del self.rows[row]
        seq.stored = 0
        self.preemptions += 1
        self.waiting.appendleft(seq)

    # ------------------------------------------------------------------ shared
    def _forward(self, rows: list[int], ids, positions, mask) -> torch.Tensor:
        """The model over cache rows ``rows``: the last position's logits, ``[len(rows), vocab]``."""
        kwargs = {self.cache_kwarg: self.cache, "input_ids": to_device(ids, self.device), "use_cache": True,
                  "position_ids": to_device(positions, self.device)}
        if mask is not None:
            kwargs["attention_mask"] = to_device(mask, self.device)
        if compat.takes_logits_to_keep(self.model):
            kwargs["logits_to_keep"] = 1
        # a chunk's leading pads only pad the batch (rows may hold tokens already)
        with torch.inference_mode(), self.cache.row_subset(rows, continued=mask is not None):
            return self.model(**kwargs).logits[:, -1]

    def _choose(self, seqs: list[Sequence], logits: torch.Tensor, finished: list) -> None:
        """Each sequence's next token from its row of ``logits``, read at once; then whether it is done."""
        self._accept(list(zip(seqs, self._sample(seqs, logits).tolist())), finished)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> torch.Tensor:
        """Each sequence's next token, ``[B]`` on the device (its index in the sequence counts the
        tokens still in flight)."""
        device = logits.device
        counters = to_device([s.num_generated + s.pending for s in seqs], device)
        seeds = to_device([s.seed for s in seqs], device)
        history = None
        if any(s.request.sampling.repetition_penalty != 1.0 for s in seqs):
            width = max(len(s.tokens) for s in seqs)
            history = torch.full((len(seqs), width), -1, dtype=torch.long)
            for i, s in enumerate(seqs):
                history[i, :len(s.tokens)] = torch.tensor(s.tokens)
            history = to_device(history, device)
        suppress = None
        early = [i for i, s in enumerate(seqs)
                 if s.num_generated + s.pending < s.request.min_new_tokens and s.request.eos]
        if early:
            suppress = torch.zeros(logits.shape, dtype=torch.bool)
            for i in early:
                suppress[i, list(seqs[i].request.eos)] = True
            suppress = to_device(suppress, device)
        return next_tokens(logits, [s.request.sampling for s in seqs], seeds, counters, history, suppress)

    def _accept(self, chosen: list[tuple[Sequence, int]], finished: list) -> None:
        """Append each sequence's token; then whether it is done."""
        self.new_tokens += len(chosen)
        for seq, token in chosen:
            seq.tokens.append(token)
            request = seq.request
            if token in request.eos:
                seq.finish_reason = "eos"
            elif seq.num_generated >= request.max_new_tokens:
                seq.finish_reason = "length"
            elif request.stop_strings and self._ends_with_stop_string(seq):
                seq.finish_reason = "stop_string"
            if seq.finished and request.done and request not in finished:
                finished.append(request)

    def _ends_with_stop_string(self, seq: Sequence) -> bool:
        tail = self.tokenizer.decode(seq.generated[-_STOP_WINDOW:], skip_special_tokens=False)
        return any(s in tail for s in seq.request.stop_strings)

    def _drop_finished(self) -> None:
        done = [i for i, s in enumerate(self.rows) if s.finished]
        if done:
            self.cache.drop_rows(done)  # their blocks return to the pool now
            self.rows = [s for s in self.rows if not s.finished]


class _InFlight:
    """A launched decode step: its sequences and their tokens on the device, copied to the host
    without blocking (read when the next step is launched)."""

    def __init__(self, seqs: list[Sequence], tokens: torch.Tensor):
        self.seqs = seqs
        self.tokens = tokens
        if tokens.is_cuda:
            self.host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self.host.copy_(tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host, self.done = tokens, None

    def read(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
