"""Launch configurations of the Triton attention: fixed tile tables (no autotuning: no first-call
benchmarking, no sync), the split-KV choice, and what the GPU offers (SM count, TMA)."""

from __future__ import annotations

import torch

from .arith import cdiv, next_pow2

try:  # Triton >= 3.4: host-side TMA descriptors
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton: pointer loads only
    TensorDescriptor = None


# Keys a kernel may load before a sliding window's first key: its key tiles start at a multiple of
# BLOCK_N (at most 128 in every table below) at or before that key, and a tile is loaded whole,
# masked after loading. The cache keeps the blocks of those keys (block_table.py).
WINDOW_READ_MARGIN = 128


# Keyed on padded head_dim and dtype width; tuned for H100/H200 (figures in docs/performance.md).
def decode_config(block_d: int, elem_bytes: int) -> tuple[int, int, int]:
    """(BLOCK_N, warps, stages) of the decode kernel."""
    # H200 bf16 D=128: BLOCK_N 64 / 4 warps / 3 stages reads K/V at 97-99% of copy
    # bandwidth (BLOCK_N 32: 83-89%, 128: 91-94%, 8 warps: 67-85%).
    if block_d <= 128:
        return (64, 4, 3) if elem_bytes <= 2 else (32, 4, 3)
    return (32, 4, 3) if elem_bytes <= 2 else (16, 4, 2)


def shared_prefix_config(block_d: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the cascade decode's shared-prefix kernel: BLOCK_M
    query rows (members x heads of one kv head) read each K/V tile of the prefix once."""
    if elem_bytes <= 2 and block_d <= 128:
        return 64, 64, 4, 3
    # fp32 at D = 256: one stage (a K and a V tile are 32 KB each), as the multi-token kernel's
    return (32, 32, 4, 1) if elem_bytes > 2 and block_d > 128 else (32, 32, 4, 2)


def choose_shared_splits(tiles: int, num_kv_heads: int, max_shared_len: int, block_n: int, num_sms: int) -> int:
    """Split-KV factor of the shared-prefix kernel (host shapes only): the largest power of two
    that keeps the programs within one wave (two per SM) and gives each split >= 2 KV tiles. More
    splits mean more partials written and merged (a split writes one for each of its tile's
    rows: 16 members x 4 heads x D floats = 32 KB at D = 128) and a second wave.
    H200, 64 rows in 4 chunks over one 8k-token prefix (32 programs before splitting):
    8 splits 0.085 ms, 16 0.092, 4 0.104, 32 0.111 (docs/performance.md)."""
    programs = max(tiles, 1) * num_kv_heads
    if programs >= num_sms:
        return 1
    splits = max(1, min(cdiv(2 * num_sms, programs), max_shared_len // (2 * block_n), 64))
    return 1 << (splits.bit_length() - 1)


def multi_token_config(block_d: int, elem_bytes: int, kind: str = "pool") -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, warps, stages) of the multi-token kernel; kind is what it reads:
    "pool" (every key from the pool), "prompt" (every key from this forward's K/V) or "both"."""
    if elem_bytes > 2:
        return (64, 32, 4, 2) if block_d <= 128 else (32, 32, 4, 1)
    if block_d <= 64:
        return (128, 64, 4, 3)
    if block_d <= 128:
        # H200, Llama-8B 8 x 2k causal (BENCH_SWEEP=prefill, docs/performance.md), time / SDPA's:
        # prompt: m128/n64/w4/s2 1.21x (98 KB of shared memory: two CTAs per SM overlap one's
        #   softmax with the other's MMAs), m256/n64/w8/s3 1.31x, m128/n128/w8/s3 1.31x;
        # both (the pool phase compiled in): m128/n64/w4/s2 1.39x but spills in its pool loop,
        #   m256/n64/w16/s3 1.40x;
        # pool: m256/n64/w8/s3 1.45x (best), m256/n64/w16 1.45x, m128/n128/w8 1.61x.
        return {"prompt": (128, 64, 4, 2), "both": (256, 64, 16, 3)}.get(kind, (256, 64, 8, 3))
    return (64, 32, 8, 2)


_DEVICE_PROPERTIES: dict[int, object] = {}


def cuda_properties(device: torch.device):
    """torch.cuda.get_device_properties, read once per device (it costs microseconds per call)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _DEVICE_PROPERTIES:
        _DEVICE_PROPERTIES[index] = torch.cuda.get_device_properties(index)
    return _DEVICE_PROPERTIES[index]


# Whether the multi-token kernel reads this forward's K/V by TMA (tensor descriptors): None =
# where the GPU has it (compute capability >= 9.0, a Triton with tensor descriptors). Tests set
# True / False to run either path (the interpreter runs both).
NEW_KV_TMA: bool | None = None


def new_kv_tma(device: torch.device) -> bool:
    if TensorDescriptor is None:
        return False
    if NEW_KV_TMA is not None:
        return NEW_KV_TMA
    return device.type == "cuda" and cuda_properties(device).major >= 9


def tma_compatible(t: torch.Tensor) -> bool:
    # What a TMA descriptor needs: unit last stride, other strides and the base 16-byte aligned.
    size = t.element_size()
    return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all(st * size % 16 == 0 for st in t.stride()[:-1]))


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: small, but still exercises the split path when asked
    return cuda_properties(device).multi_processor_count


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, block_n: int, num_sms: int) -> int:
    """Split-KV factor from host-side shapes only (never reads device tensors).

    Splits only when the (row, kv head) programs cannot give every SM one (two programs fit
    on an SM at once, so up to 2 x SMs still run in one wave) and each split would still get
    a useful run of >= 4 KV tiles. Not splitting also saves the merge launch, which matters
    for the per-step host time of mid-sized batches (32 rows x 8 kv heads on 132 SMs).
    """
    programs = batch * num_kv_heads
    if programs >= num_sms:
        return 1
    # Power-of-two split counts measured best on H200 (8 x 32k: 16 splits 87% of copy
    # bandwidth, 9 splits 78%: uneven waves).
    want = next_pow2(cdiv(4 * num_sms, max(programs, 1)))
    by_length = max_context // (4 * block_n)
    splits = max(1, min(want, by_length, 128))
    return 1 << (splits.bit_length() - 1)
