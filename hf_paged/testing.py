"""Helpers for tests and benchmarks (no transformers import)."""

from __future__ import annotations

import torch


def left_pad(rows, device="cpu"):
    """Token rows (lists or 1D tensors of ids) left-padded with 0 into one batch:
    ``(input_ids, attention_mask)``, both int64 ``[len(rows), longest]``."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


def left_padded_batch(lengths, vocab: int, seed: int = 0, low: int = 3, device="cpu"):
    """Random prompts of the given real lengths, left-padded with 0: ``(input_ids, attention_mask)``.

    Tokens are drawn from ``[low, vocab)`` (``low`` keeps special ids such as pad/bos/eos out)."""
    g = torch.Generator().manual_seed(seed)
    return left_pad([torch.randint(low, vocab, (n,), generator=g) for n in lengths], device)
