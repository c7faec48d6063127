"""`autotp.step`'s clipping folded into a fused optimizer's step: which optimizers take it, and that the folded
step equals clipping then stepping (single process; the ZeRO tests run it against the dense model)."""

import pytest
import torch

from autotp.step import clip_coef, clip_scale, step_with_scale, takes_grad_scale


def _params(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((16, 8), (8,), (3, 5))]


def test_only_an_all_fused_optimizer_takes_the_scale():
    assert takes_grad_scale(torch.optim.AdamW(_params(0), fused=True))
    assert takes_grad_scale(torch.optim.SGD(_params(0), lr=0.1, fused=True))
    assert not takes_grad_scale(torch.optim.AdamW(_params(0)))  # foreach: no grad_scale in its step
    assert not takes_grad_scale(torch.optim.AdamW(_params(0), foreach=False))
    assert not takes_grad_scale(None)
    mixed = torch.optim.AdamW(_params(0), fused=True)
    mixed.add_param_group({"params": _params(1), "fused": False})
    assert not takes_grad_scale(mixed)
    taken = torch.optim.AdamW(_params(0), fused=True)
    taken.grad_scale = torch.tensor(2.0)  # a GradScaler's step in flight: not ours to replace
    assert not takes_grad_scale(taken)


@pytest.mark.parametrize("norm", [3.0, 0.2, float("inf")])
def test_folded_clipping_equals_clip_then_step(norm):
    max_norm = 1.0
    folded, plain = _params(0), _params(0)
    gen = torch.Generator().manual_seed(1)
    for a, b in zip(folded, plain):
        a.grad = torch.randn(a.shape, generator=gen)
        b.grad = a.grad.clone()
    coef, scale = clip_coef(torch.tensor(norm), max_norm), clip_scale(torch.tensor(norm), max_norm)
    assert float(coef) == (1.0 if norm <= max_norm or norm == float("inf") else pytest.approx(max_norm / norm))
    assert float(coef * scale) == pytest.approx(1.0)
    opt_folded = torch.optim.AdamW(folded, lr=0.1, fused=True)
    opt_plain = torch.optim.AdamW(plain, lr=0.1, fused=True)
    for _ in range(2):
        step_with_scale(opt_folded, scale)
        torch._foreach_mul_([p.grad for p in plain], coef)
        opt_plain.step()
        assert not hasattr(opt_folded, "grad_scale")
        for a, b in zip(folded, plain):
            # x / s against x * c with s c = 1 up to a rounding (fp32), and Adam's update is a ratio of them.
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)  # the fused step writes the clipped grad
            b.grad = a.grad.clone()


def test_folded_clipping_scales_an_sgd_step():
    """SGD's update is linear in the gradient (Adam's is nearly scale-free), so the scale must reach the update."""
    params = _params(0)
    before = [p.detach().clone() for p in params]
    grads = [torch.ones_like(p) for p in params]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    step_with_scale(torch.optim.SGD(params, lr=0.5, fused=True), clip_scale(torch.tensor(4.0), 1.0))  # ~4
    for p, b in zip(params, before):
        torch.testing.assert_close(p.detach(), b - 0.5 * 0.25, rtol=0, atol=1e-6)
