"""What the engine is asked and what it returns: requests, the sequences it schedules, results.

A request is one prompt with its generation settings; it becomes ``num_return_sequences``
sequences (forked after one prefill, sharing the prompt's blocks). A sequence is what occupies a
cache row: its tokens (prompt, then generated), how much of them the cache holds, and its state.
"""

from __future__ import annotations

import hashlib
from array import array
from dataclasses import dataclass, field

from .sampling import SamplingParams, sequence_seed

# the GenerationConfig fields the engine applies itself; any other field away from its default
# sends the request to model.generate (one warning names the fields)
ENGINE_FIELDS = {
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k", "top_p",
    "min_p", "repetition_penalty", "eos_token_id", "pad_token_id", "bos_token_id", "stop_strings",
    "num_return_sequences", "use_cache", "return_dict_in_generate", "cache_implementation",
}


@dataclass
class Request:
    """One prompt and, optionally, its own generation settings (any ``GenerationConfig`` field, plus
    ``seed``) over those of the call: ``hf_paged.Request([1, 2, 3], max_new_tokens=8, eos_token_id=2)``."""

    prompt: list[int] | str
    settings: dict = field(default_factory=dict)

    def __init__(self, prompt, **settings):
        self.prompt = prompt
        self.settings = settings


@dataclass
class GenerationResult:
    """The outcome of one prompt of ``generate_many``: ``sequences`` holds one list of generated
    token ids per returned sequence (ending with the end token when one ended it; no padding),
    ``finish_reasons`` why each ended (``"eos"``, ``"length"``, ``"stop_string"``), ``texts`` their
    decoded text when a tokenizer was given."""

    index: int  # the prompt's position in the input
    prompt: list[int]
    sequences: list[list[int]]
    finish_reasons: list[str]
    texts: list[str] | None = None


@dataclass
class EngineRequest:
    """A request as the engine runs it: its prompt ids and its resolved settings."""

    index: int
    prompt: list[int]
    max_new_tokens: int
    min_new_tokens: int
    eos: frozenset[int]
    stop_strings: tuple[str, ...]
    sampling: SamplingParams
    num_sequences: int
    seed: int
    sequences: list[Sequence] = field(default_factory=list)

    def sequence_seed(self, k: int) -> int:
        """Sequence ``k``'s seed: from the request's seed, its prompt and ``k`` (not its position
        in the input, so that the order of the prompts does not change a sample)."""
        digest = hashlib.blake2b(array("q", self.prompt).tobytes(), digest_size=8).digest()
        return sequence_seed(self.seed, int.from_bytes(digest, "little") >> 2, k)

    @property
    def done(self) -> bool:
        return len(self.sequences) == self.num_sequences and all(s.finished for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    """One sequence: prompt then generated tokens; ``stored`` of them are in its cache row."""

    request: EngineRequest
    k: int  # which of the request's sequences
    tokens: list[int]  # prompt, then generated
    seed: int
    order: int  # admission order (preemption takes the newest first)
    stored: int = 0
    finish_reason: str | None = None
    pending: int = 0  # tokens chosen on the device and not read yet (decode steps in flight)

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt):]

    @property
    def num_generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)

    @property
    def prefilled(self) -> bool:
        """Every token but the last (the next forward's input) is in the cache."""
        return self.stored >= len(self.tokens) - (1 if self.num_generated else 0)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
