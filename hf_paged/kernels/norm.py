"""Triton kernel for the RMSNorm of Llama-style layers, one launch where PyTorch runs eight.

Memory layout:
    x      : [..., N], the last dim contiguous, the leading dims flattened to rows by one stride
             (any tensor whose ``view(-1, N)`` exists: rows may be padded apart, not interleaved)
    weight : [N], contiguous
    out    : [..., N], contiguous, dtype = promote(x.dtype, weight.dtype)
One program normalises one row: its N elements are read once into registers, squared and summed
in fp32, scaled by rsqrt(mean + eps), rounded to x's dtype and multiplied by the weight, the
rounding steps of ``reference.rms_norm`` (only the sum's order differs from PyTorch's).
A decode step of a 4,096-wide model normalises 32 rows: PyTorch's eight kernels (cast, square,
mean, add, rsqrt, multiply, cast, scale) cost ~20 us there, mostly launch gaps and a reduction
of 32 outputs over the whole GPU; this one reads and writes each row once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .arith import next_pow2
from .checks import SUPPORTED_DTYPES, check_device

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# Rows wider than this are left to PyTorch (a row lives in one program's registers).
MAX_WIDTH = 1 << 16


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    weight_ptr,
    out_ptr,
    width,  # N
    stride_xr,
    stride_or,
    inv_width,  # fp32 1 / N: torch's mean multiplies by it
    eps,
    X_DTYPE: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < width
    x = tl.load(x_ptr + row * stride_xr + cols, mask=mask, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=0) * inv_width
    normed = (x * tl.math.rsqrt(variance + eps)).to(X_DTYPE)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = weight.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_or + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` takes these tensors (else the caller runs the reference)."""
    width = x.shape[-1] if x.dim() else 0
    return (x.dtype in SUPPORTED_DTYPES and weight.dtype in SUPPORTED_DTYPES and weight.dim() == 1
            and weight.shape[0] == width and 0 < width <= MAX_WIDTH and x.numel() > 0
            and x.device == weight.device and x.stride(-1) == 1 and weight.stride(0) == 1
            and _row_stride(x) is not None)


def _row_stride(x: torch.Tensor) -> int | None:
    # The stride between consecutive rows when the leading dims flatten to one, else None.
    try:
        return x.view(-1, x.shape[-1]).stride(0)
    except RuntimeError:
        return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference.rms_norm(x, weight, eps)`` in one launch (see the module docstring)."""
    if not supports(x, weight):
        raise ValueError(f"rms_norm: unsupported input {tuple(x.shape)} {x.dtype} (last-dim stride "
                         f"{x.stride(-1) if x.dim() else None}) with weight {tuple(weight.shape)} {weight.dtype}")
    check_device(x, weight)
    width = x.shape[-1]
    rows = x.numel() // width
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _rms_norm_kernel[(rows,)](
        x, weight, out, width, _row_stride(x), width, 1.0 / width, float(eps),
        X_DTYPE=_TL_DTYPES[x.dtype], BLOCK_N=next_pow2(width),
        num_warps=4 if width <= 4096 else 8,
    )
    return out
