"""A paged model's RMSNorm layers on the kernels' backend while hf-paged generates.

Why: a decode step of a Llama-shaped model runs two RMSNorms per layer, and transformers' RMSNorm
is eight PyTorch kernels (cast, square, mean, add, rsqrt, multiply, cast, scale), each a few
microseconds of work over 32 rows of 4,096: ~500 of an 8B model's ~1,500 kernels per step. The
Triton kernel (``kernels/norm.py``) does a norm in one; the step went from 9.2 to 7.8 ms on an
H200 (docs/performance.md).

What: for the duration of a paged ``generate`` call (:mod:`hf_paged.generation`) or an engine run,
each RMSNorm module whose own forward computes ``kernels.reference.rms_norm`` bit for bit gets an
instance ``forward`` calling the Triton backend's ``rms_norm`` (on the PyTorch backend, the CPU's
default, nothing is placed: the reference is the module's own arithmetic). The formula is checked once per class, on the
CPU, in bf16 and fp32 with a random weight: Gemma's ``(1 + weight)``, OLMo 2's scaling before the
cast, a LayerNorm or a class that changed in a transformers release keep their own forward.
Nothing stays on the model after the call. ``HF_PAGED_FUSED_NORMS=0`` turns it off.
"""

from __future__ import annotations

import contextlib

import torch

from .kernels import backend_for, backend_name, device_guard, reference
from .kernels.env import switch

ENV_VAR = "HF_PAGED_FUSED_NORMS"

# class -> whether its forward is reference.rms_norm (checked once per class and process)
_COMPUTES_REFERENCE: dict[type, bool] = {}


def enabled() -> bool:
    return bool(switch(ENV_VAR, default=True))


def _epsilon(module: torch.nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _shaped_like_rms_norm(module: torch.nn.Module) -> bool:
    # Cheap structural test before the numeric one: a leaf named ...RMSNorm holding one 1-D
    # parameter "weight", no buffers, and an epsilon attribute.
    if not type(module).__name__.endswith("RMSNorm") or next(module.children(), None) is not None:
        return False
    params = module._parameters
    weight = params.get("weight")
    return (len(params) == 1 and weight is not None and weight.dim() == 1 and not module._buffers
            and _epsilon(module) is not None)


def computes_reference(module: torch.nn.Module) -> bool:
    """Whether ``module``'s class's forward gives ``reference.rms_norm`` bit for bit (bf16 and
    fp32 inputs, a random weight swapped in for the check; cached per class)."""
    cls = type(module)
    known = _COMPUTES_REFERENCE.get(cls)
    if known is None:
        known = _COMPUTES_REFERENCE[cls] = _check_formula(module)
    return known


def _check_formula(module: torch.nn.Module) -> bool:
    width, eps = 48, _epsilon(module)
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        x = (3 * torch.randn(2, 5, width, generator=generator)).to(dtype)
        weight = (1 + torch.randn(width, generator=generator)).to(dtype)
        try:
            with torch.no_grad():
                got = torch.func.functional_call(module, {"weight": weight}, (x,))
        except Exception:  # a forward that needs more than hidden states: not ours to replace
            return False
        want = reference.rms_norm(x, weight, eps)
        if not (isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want)):
            return False
    return True


def _fusable(module: torch.nn.Module) -> bool:
    return "forward" not in module.__dict__ and _shaped_like_rms_norm(module) and computes_reference(module)


def fusable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that :func:`fused` would give the backend's ``rms_norm``: RMSNorms
    computing the reference's formula, without an instance ``forward`` (someone else's, such as
    accelerate's device_map hooks, or an enclosing call's)."""
    return [m for m in model.modules() if _fusable(m)]


class FusedRMSNorm:
    """The instance ``forward`` that :func:`fused` gives an RMSNorm module: the backend's
    ``rms_norm`` over the module's weight and epsilon (read at each call)."""

    __slots__ = ("module",)

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self.module
        if args or kwargs:  # a call with more than the hidden states was checked by nobody
            return type(module).forward(module, hidden_states, *args, **kwargs)
        with device_guard(hidden_states.device):
            return backend_for(hidden_states.device).rms_norm(hidden_states, module.weight, _epsilon(module))


def _on_triton(model: torch.nn.Module) -> bool:
    param = next(model.parameters(), None)
    return param is not None and backend_name(param.device) == "triton"


@contextlib.contextmanager
def fused(model: torch.nn.Module):
    """Within the block, ``model``'s fusable RMSNorms (:func:`fusable`) run the backend's
    ``rms_norm``; yields how many run it in the block, those an enclosing call placed included
    (decode graphs are keyed on it). None are placed when ``HF_PAGED_FUSED_NORMS=0`` or where the
    model's backend is the PyTorch one (the CPU's by default: the reference is the modules' own
    arithmetic, so there is nothing to gain). Removed on exit, error or not; a module whose
    ``forward`` someone replaced meanwhile keeps theirs."""
    place = enabled() and _on_triton(model)
    placed, enclosing = [], 0
    try:
        for module in model.modules():
            if isinstance(module.__dict__.get("forward"), FusedRMSNorm):
                enclosing += 1
            elif place and _fusable(module):
                forward = FusedRMSNorm(module)
                module.forward = forward
                placed.append((module, forward))
        yield enclosing + len(placed)
    finally:
        for module, forward in placed:
            if module.__dict__.get("forward") is forward:
                del module.__dict__["forward"]
