"""Helpers for tests and benchmarks (no transformers import)."""

from __future__ import annotations

import torch


def left_padded_batch(lengths, vocab: int, seed: int = 0, low: int = 3, device="cpu"):
    """Random prompts of the given real lengths, left-padded with 0: ``(input_ids, attention_mask)``.

    Tokens are drawn from ``[low, vocab)`` (``low`` keeps special ids such as pad/bos/eos out)."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(low, vocab, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids.to(device), mask.to(device)
