"""The RMSNorm kernel (hf_paged/kernels/norm.py) against its reference, and hf_paged/norms.py:
which modules get it, for how long, and generate's tokens with it.

On CPU the kernel runs under Triton's interpreter, which rounds fp32 -> bf16 by truncation (the
GPU rounds to nearest): bf16 is checked there to two bf16 steps, fp32 and fp16 to rounding; on
CUDA bf16 to one step, with under 1% of the elements off PyTorch's. test_cuda.py's generate tests
(fp32 models, stock's tokens) run the kernel in every norm of every family that has Llama's.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.mistral.modeling_mistral import MistralRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm  # noqa: E402

from tiny_models import left_padded_batch, make_pair  # noqa: E402

from hf_paged import norms  # noqa: E402
from hf_paged.kernels import get_backend, reference  # noqa: E402
from hf_paged.kernels.checks import interpreter_usable  # noqa: E402

DEVICES = (["cpu"] if interpreter_usable() else []) + (["cuda"] if torch.cuda.is_available() else [])
if not DEVICES:
    pytest.skip("no device can run the Triton kernels (no CUDA, interpreter unavailable)", allow_module_level=True)


def _norm_module():
    from hf_paged.kernels import norm

    return norm


def _check(got, want, precision=None, steps=1):
    # ``steps`` of ``precision`` (default: the output's dtype; the normalised row is rounded to the
    # input's) at each element's magnitude (bf16: 2^-7, fp16: 2^-10; fp32: room for the sum's order)
    precision = precision or want.dtype
    step = steps * {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10, torch.float32: 2 ** -20}[precision]
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs()
    assert (err <= step * want.float().abs()).all(), err.max()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,weight_dtype,shape", [
    (torch.float32, torch.float32, (3, 7, 64)),
    (torch.float16, torch.float16, (5, 100)),  # a width that is no power of two: masked lanes
    (torch.bfloat16, torch.bfloat16, (2, 3, 4, 48)),
    (torch.bfloat16, torch.float32, (4, 64)),  # a norm kept in fp32: the output is fp32
])
def test_rms_norm_kernel_matches_reference(device, dtype, weight_dtype, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (3 * torch.randn(shape, generator=g)).to(dtype).to(device)
    weight = (1 + torch.randn(shape[-1], generator=g)).to(weight_dtype).to(device)
    got = _norm_module().rms_norm(x, weight, 1e-6)
    want = reference.rms_norm(x, weight, 1e-6)
    assert got.dtype == torch.promote_types(dtype, weight_dtype)
    # the interpreter truncates both bf16 roundings (the normalised row, then the output)
    _check(got, want, precision=dtype, steps=2 if device == "cpu" and dtype == torch.bfloat16 else 1)
    if device == "cuda" and dtype == torch.bfloat16:
        # the GPU rounds as PyTorch does: only the fp32 sum's order may move an element one step
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_kernel_reads_rows_apart_and_writes_fresh_rows(device):
    """Rows padded apart (a slice of a wider tensor) are read through their stride; the output is
    a new contiguous tensor; a strided last dim is not the kernel's and the backend hands it to the
    reference."""
    g = torch.Generator().manual_seed(1)
    wide = torch.randn(6, 80, generator=g).to(device)
    x, weight = wide[:, :64], torch.randn(64, generator=g).to(device)
    norm = _norm_module()
    assert norm.supports(x, weight)
    got = norm.rms_norm(x, weight, 1e-5)
    assert got.is_contiguous()
    _check(got, reference.rms_norm(x, weight, 1e-5))
    strided = torch.randn(64, 6, generator=g).to(device).t()
    assert not norm.supports(strided, weight)
    with pytest.raises(ValueError, match="unsupported input"):
        norm.rms_norm(strided, weight, 1e-5)
    assert torch.equal(get_backend("triton").rms_norm(strided, weight, 1e-5), reference.rms_norm(strided, weight, 1e-5))
    assert torch.equal(get_backend("torch").rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5))


def test_llama_rms_norm_forward_is_the_reference_formula():
    """``LlamaRMSNorm.forward`` (and its copies in Mistral, Qwen 2 and 3) computes
    ``reference.rms_norm`` bit for bit: hf_paged.norms replaces only such modules. Gemma's
    ``(1 + weight)`` in fp32 and OLMo 2's scaling before the cast are other formulas: they keep
    their own forward. A transformers release that changes Llama's breaks this test first."""
    for cls in (LlamaRMSNorm, MistralRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm):
        module = cls(32, eps=1e-5)
        assert norms._shaped_like_rms_norm(module) and norms.computes_reference(module), cls.__name__
        x = torch.randn(3, 32, dtype=torch.bfloat16)
        module.weight.data = torch.randn(32).to(torch.bfloat16)
        assert torch.equal(module(x), reference.rms_norm(x, module.weight, 1e-5)), cls.__name__
    for cls in (Gemma2RMSNorm, Olmo2RMSNorm):
        assert not norms.computes_reference(cls(32)), cls.__name__


def test_only_rms_norms_of_the_reference_formula_are_fusable():
    class ScaledRMSNorm(torch.nn.Module):  # the name and shape of one, another formula
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))
            self.eps = 1e-6

        def forward(self, x):
            return self.weight * x / x.float().pow(2).mean(-1, keepdim=True).add(self.eps).sqrt().to(x.dtype)

    class NeedsMoreRMSNorm(LlamaRMSNorm):  # a forward that takes more than hidden states
        def forward(self, x, gate):
            return super().forward(x) * gate

    model = torch.nn.Sequential(LlamaRMSNorm(16), torch.nn.LayerNorm(16), ScaledRMSNorm(), NeedsMoreRMSNorm(16),
                                Gemma2RMSNorm(16), LlamaRMSNorm(16))
    assert norms.fusable(model) == [model[0], model[5]]
    model[5].forward = lambda x: x  # someone else's instance forward (accelerate's hooks): kept
    assert norms.fusable(model) == [model[0]]


def test_a_call_with_more_than_hidden_states_runs_the_modules_own_forward():
    class GatedRMSNorm(LlamaRMSNorm):  # passes the formula check; its extra argument is not checked
        def forward(self, x, gate=None):
            out = super().forward(x)
            return out if gate is None else out * gate

    module = GatedRMSNorm(16)
    assert norms.fusable(torch.nn.Sequential(module)) == [module]
    fused = norms.FusedRMSNorm(module)
    x = torch.randn(3, 16)
    assert torch.equal(fused(x, gate=torch.zeros(16)), torch.zeros(3, 16))
    assert torch.equal(fused(x, torch.full((16,), 2.0)), 2 * module(x))


def test_fused_installs_for_the_block_only(monkeypatch):
    """On the Triton backend the model's Llama norms get the kernel inside the block and lose it on
    exit, an exception included; none with the switch off or on the PyTorch backend."""
    model = make_pair("llama")[0]
    expected = 2 * model.config.num_hidden_layers + 1
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    with norms.fused(model) as count:
        assert count == expected
        assert sum(isinstance(m.__dict__.get("forward"), norms.FusedRMSNorm) for m in model.modules()) == expected
        # a call within the call (the count keys decode graphs): the outer call's norms are counted,
        # and stay when the inner call ends
        with norms.fused(model) as inner:
            assert inner == expected
        assert isinstance(model.model.norm.__dict__.get("forward"), norms.FusedRMSNorm)
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RuntimeError, match="boom"):
        with norms.fused(model):
            raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in model.modules())
    monkeypatch.setenv("HF_PAGED_FUSED_NORMS", "0")
    with norms.fused(model) as count:
        assert count == 0
    monkeypatch.delenv("HF_PAGED_FUSED_NORMS")
    monkeypatch.setenv("HF_PAGED_BACKEND", "torch")
    with norms.fused(model) as count:
        assert count == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_generate_runs_the_kernel_in_every_norm_and_keeps_stocks_tokens(family, device, monkeypatch):
    """A paged generate on the Triton backend (interpreted on CPU) runs each fusable RMSNorm through
    the kernel (Qwen 3's per-head q/k norms too), gives stock's tokens, and leaves the model as it
    was. On CUDA the decode steps after the first are graph replays, which call no Python: the
    count covers the prefill and the eager step."""
    paged, stock = (m.to(device) for m in make_pair(family))
    norm = _norm_module()
    calls = []
    real = norm.rms_norm

    def counting(x, weight, eps):
        calls.append(tuple(x.shape))
        return real(x, weight, eps)

    monkeypatch.setattr(norm, "rms_norm", counting)
    monkeypatch.setenv("HF_PAGED_BACKEND", "triton")
    ids, mask = (t.to(device) for t in left_padded_batch([5, 9]))
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None)
    out = paged.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, stock.generate(input_ids=ids, attention_mask=mask, **kw))
    per_forward = len(norms.fusable(paged))
    per_layer = 4 if family == "qwen3" else 2  # Qwen 3 normalises each head's queries and keys too
    assert per_forward == per_layer * paged.config.num_hidden_layers + 1
    assert len(calls) >= (4 if device == "cpu" else 2) * per_forward  # the prefill and the (eager) decode steps
    assert not any("forward" in m.__dict__ for m in paged.modules())
