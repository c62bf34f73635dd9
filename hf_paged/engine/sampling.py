"""Next-token choice for the engine's rows, on the device and one row per request.

The usual processors of ``GenerationConfig`` (repetition penalty, temperature, top-k, top-p, min-p)
with a value per row, then greedy (argmax) or sampling. Sampling draws its noise from a counter-based
generator keyed on (the sequence's seed, the index of the token in its sequence): the same seed
gives the same tokens whatever the batch the row is in, its place there, the memory cap or a
preemption that recomputes it. A sample is the argmax of the processed logits plus Gumbel noise,
which is a draw from their softmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _int64(x: int) -> int:
    """An unsigned 64-bit constant as the signed int64 torch stores."""
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_GOLDEN = _int64(0x9E3779B97F4A7C15)
_MIX1 = _int64(0xBF58476D1CE4E5B9)
_MIX2 = _int64(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps around on every device torch runs on
    x = x + _GOLDEN
    x = (x ^ _shift_right(x, 30)) * _MIX1
    x = (x ^ _shift_right(x, 27)) * _MIX2
    return x ^ _shift_right(x, 31)


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (or list) on ``device`` without waiting for the work queued there: a plain
    copy from pageable memory synchronises the stream, which would let the GPU run dry while the
    host prepares the next step; a pinned buffer copies asynchronously."""
    t = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """float64 [R, vocab] in (0, 1): a pure function of (seed, counter, vocabulary index)."""
    index = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    key = _splitmix64(_splitmix64(seeds.to(torch.int64))[:, None] ^ counters.to(torch.int64)[:, None])
    bits = _shift_right(_splitmix64(key ^ index[None, :]), 11)  # 53 random bits
    return (bits.to(torch.float64) + 0.5) * 2.0 ** -53


def sequence_seed(seed: int, *parts: int) -> int:
    """A sequence's seed from the run's and what identifies the sequence (a pure function)."""
    x = torch.tensor([seed & _MASK64 if seed >= 0 else seed], dtype=torch.int64)
    for part in parts:
        x = _splitmix64(x ^ int(_int64(part)))
    return int(x.item())


@dataclass(frozen=True)
class SamplingParams:
    """One request's next-token choice (the fields of GenerationConfig the engine applies)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"hf_paged: temperature must be > 0 when sampling, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"hf_paged: top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"hf_paged: min_p must be in [0, 1], got {self.min_p}")
        if self.top_k < 0 or self.repetition_penalty <= 0:
            raise ValueError(f"hf_paged: top_k must be >= 0 and repetition_penalty > 0, got {self.top_k}, "
                             f"{self.repetition_penalty}")


def process_logits(logits: torch.Tensor, params: list[SamplingParams], history: torch.Tensor | None = None,
                   suppress: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``[R, vocab]``: each row's logits after its processors, in generate's order: repetition
    penalty (``history`` int64 ``[R, T]``, ``-1`` = none), then for sampled rows temperature,
    top-k, top-p and min-p (filtered tokens at ``-inf``); ``suppress`` bool ``[R, vocab]``: tokens
    that may not be chosen (an end token before ``min_new_tokens``)."""
    logits = logits.float()
    device, (rows, vocab) = logits.device, logits.shape
    if suppress is not None:
        logits = logits.masked_fill(suppress, float("-inf"))
    penalty = [p.repetition_penalty for p in params]
    if history is not None and any(p != 1.0 for p in penalty):
        seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(history >= 0, history, vocab), True)
        seen = seen[:, :vocab]
        pen = to_device(penalty, device)[:, None]
        logits = torch.where(seen, torch.where(logits < 0, logits * pen, logits / pen), logits)
    if not any(p.do_sample for p in params):
        return logits
    temperature = to_device([p.temperature if p.do_sample else 1.0 for p in params], device)
    scores = logits / temperature[:, None]
    top_k = [p.top_k if p.do_sample else 0 for p in params]
    if any(top_k):
        k = to_device([k if 0 < k < vocab else vocab for k in top_k], device)
        kth = scores.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
        scores = scores.masked_fill(scores < kth, float("-inf"))
    top_p = [p.top_p if p.do_sample else 1.0 for p in params]
    if any(p < 1.0 for p in top_p):
        sorted_scores, order = scores.sort(dim=-1)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        remove = cumulative <= (1 - to_device(top_p, device)[:, None])
        remove[:, -1] = False  # the most likely token stays
        scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    min_p = [p.min_p if p.do_sample else 0.0 for p in params]
    if any(min_p):
        probs = scores.softmax(-1)
        low = probs < to_device(min_p, device)[:, None] * probs.amax(-1, keepdim=True)
        low.scatter_(1, probs.argmax(-1, keepdim=True), False)
        scores = scores.masked_fill(low, float("-inf"))
    sampled = to_device([p.do_sample for p in params], device)
    return torch.where(sampled[:, None], scores, logits)


def next_tokens(logits: torch.Tensor, params: list[SamplingParams], seeds: torch.Tensor, counters: torch.Tensor,
                history: torch.Tensor | None = None, suppress: torch.Tensor | None = None) -> torch.Tensor:
    """The next token of each row, ``[R]``: the argmax of its processed logits (see
    :func:`process_logits`), plus Gumbel noise for sampled rows; ``seeds`` / ``counters`` int64
    ``[R]``: the sequence's seed and the index of the token being chosen."""
    scores = process_logits(logits, params, history, suppress)
    if not any(p.do_sample for p in params):
        return scores.argmax(-1)
    sampled = to_device([p.do_sample for p in params], scores.device)
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, counters, scores.shape[1])))
    noisy = scores.double() + torch.where(sampled[:, None], gumbel, torch.zeros((), dtype=torch.float64,
                                                                                  device=scores.device))
    return noisy.argmax(-1)
