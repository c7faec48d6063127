"""autotp_kernels GEMM and TritonLinear against torch (on CPU under TRITON_INTERPRET=1, set in conftest.py).

Tolerance, argued from torch's own error: both results are compared with a float64 reference; the Triton
result may be off by at most twice what torch.matmul in the same dtype is off by, plus half an ulp of the
output (the single final rounding to fp16). Different summation orders give different but equally large
rounding errors, so anything beyond that is a bug, not noise.
"""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from autotp_kernels import matmul, triton_linear  # noqa: E402

SHAPES = [(5, 123, 123), (1, 1, 1), (64, 32, 48), (33, 257, 65), (128, 64, 96), (7, 300, 5)]


def _check(got: torch.Tensor, torch_result: torch.Tensor, exact: torch.Tensor):
    ours = (got.double() - exact).abs().max().item()
    theirs = (torch_result.double() - exact).abs().max().item()
    half_ulp = torch.finfo(got.dtype).eps * exact.abs().max().item() / 2
    assert ours <= 2 * theirs + half_ulp + 1e-12, (ours, theirs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_matmul_matches_torch(m, k, n, dtype):
    gen = torch.Generator().manual_seed(m * 1000 + k * 10 + n)
    a = torch.randn(m, k, generator=gen).to(dtype)
    b = torch.randn(k, n, generator=gen).to(dtype)
    _check(matmul(a, b), a @ b, a.double() @ b.double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_transposed_views_and_accumulate(dtype):
    gen = torch.Generator().manual_seed(3)
    a_t = torch.randn(123, 5, generator=gen).to(dtype)  # used as a_t.t(): a strided [5, 123] view
    b_t = torch.randn(77, 123, generator=gen).to(dtype)
    c = torch.randn(5, 77, generator=gen).to(dtype)
    exact = c.double() + a_t.t().double() @ b_t.t().double()
    expected = c + a_t.t() @ b_t.t()
    got = matmul(a_t.t(), b_t.t(), out=c.clone(), accumulate=True)
    _check(got, expected, exact)


def test_empty_inner_dimension_and_errors():
    a, b = torch.randn(4, 0), torch.randn(0, 3)
    assert torch.equal(matmul(a, b), torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"shapes \(4, 2\) and \(3, 3\)"):
        matmul(torch.randn(4, 2), torch.randn(3, 3))
    with pytest.raises(ValueError, match="dtypes differ"):
        matmul(torch.randn(2, 2), torch.randn(2, 2, dtype=torch.float16))


@pytest.mark.parametrize("bias", [True, False])
def test_triton_linear_forward_and_gradients(bias):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(3, 5, 40, generator=gen, requires_grad=True)
    w = torch.randn(24, 40, generator=gen, requires_grad=True)
    b = torch.randn(24, generator=gen, requires_grad=True) if bias else None
    dy = torch.randn(3, 5, 24, generator=gen)
    y = triton_linear(x, w, b)
    y.backward(dy)
    got = [y.detach(), x.grad, w.grad] + ([b.grad] if bias else [])
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = b.detach().double().requires_grad_() if bias else None
    y64 = torch.nn.functional.linear(x64, w64, b64)
    y64.backward(dy.double())
    exact = [y64.detach(), x64.grad, w64.grad] + ([b64.grad] if bias else [])
    x32, w32 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b32 = b.detach().clone().requires_grad_() if bias else None
    y32 = torch.nn.functional.linear(x32, w32, b32)
    y32.backward(dy)
    reference = [y32.detach(), x32.grad, w32.grad] + ([b32.grad] if bias else [])
    for g, r, e in zip(got, reference, exact):
        _check(g, r, e)
