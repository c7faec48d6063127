"""`autotp_kernels.adam` against torch's fused Adam/AdamW on the same fp32 masters (Triton interpreter on CPU).

Tolerance: both compute the update in fp32 from the same inputs, with roundings in another order (FMA
contraction, bias corrections from exp2/log2 instead of pow): the update agrees to a few fp32 ulp of itself
(|update| <= lr * (1 + wd * |p|) here), and the master, p - update, can land one ulp of |p| apart after each step.
So after STEPS steps: |p - p_ref| <= STEPS * ulp(|p|) + 1e-5 * lr. exp_avg sums terms of both signs, so its
error is bounded by ulps of the terms' magnitude, not of its value: 4 fp32 ulp per step of the beta1-weighted sum
of |grad|. Adam's L2 gradient grad + wd * p cancels too (and a GPU computes it as one FMA), so exp_avg_sq gets the
same bound over the beta2-weighted sum of (|grad| + wd |p|)^2. The weight is the master rounded to its dtype, so it must equal `master.to(dtype)` bit for bit.
"""

from __future__ import annotations

import pytest
import torch

from autotp_kernels.adam import BLOCK, adam_step

STEPS, LR = 3, 1e-2
NUMEL = 2 * BLOCK + 77  # three programs, the last one masked


def _grads(seed: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(NUMEL, generator=gen) * 10.0 ** torch.randint(-4, 1, (NUMEL,), generator=gen)).to(dtype)
            for _ in range(STEPS)]


def _run(cls, grads, *, betas=(0.9, 0.95), weight_decay=0.1, grad_mul=1.0, scale=None, weight_dtype=torch.bfloat16):
    start = torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))
    ref = start.clone().requires_grad_()
    optimizer = cls([ref], lr=LR, betas=betas, eps=1e-8, weight_decay=weight_decay, fused=True)
    master, weight = start.clone(), torch.empty(NUMEL, dtype=weight_dtype)
    exp_avg, exp_avg_sq, step = torch.zeros(NUMEL), torch.zeros(NUMEL), torch.zeros(())
    magnitude = torch.zeros(NUMEL)  # the beta1-weighted sum of |grad| (with Adam's L2 term) exp_avg is made of
    sq_magnitude = torch.zeros(NUMEL)  # the same for exp_avg_sq's squares
    for grad in grads:
        grad_magnitude = grad.float().abs() * grad_mul / (scale or 1.0) + weight_decay * master.abs()
        magnitude = betas[0] * magnitude + (1 - betas[0]) * grad_magnitude
        sq_magnitude = betas[1] * sq_magnitude + (1 - betas[1]) * grad_magnitude ** 2
        ref.grad = grad.float() * grad_mul
        if scale is not None:
            optimizer.grad_scale = scale
        optimizer.step()
        step += 1
        adam_step(grad, master, exp_avg, exp_avg_sq, weight, step, lr=LR, beta1=betas[0], beta2=betas[1], eps=1e-8,
                  weight_decay=weight_decay, decoupled=cls is torch.optim.AdamW, grad_mul=grad_mul, grad_scale=scale)
    return ref.detach(), optimizer.state[ref], (magnitude, sq_magnitude), master, exp_avg, exp_avg_sq, weight


def _check(ref, state, magnitudes, master, exp_avg, exp_avg_sq, weight):
    ulp = torch.finfo(torch.float32).eps * ref.abs()
    bound = STEPS * ulp + 1e-5 * LR
    assert bool(((master - ref).abs() <= bound).all()), float(((master - ref).abs() / bound).max())
    for mine, key, magnitude in ((exp_avg, "exp_avg", magnitudes[0]), (exp_avg_sq, "exp_avg_sq", magnitudes[1])):
        assert bool(((mine - state[key]).abs() <= 4 * STEPS * torch.finfo(torch.float32).eps * magnitude).all()), key
    assert torch.equal(weight, master.to(weight.dtype))
    assert (master - ref).abs().max() < (master - _START).abs().max() * 1e-3, "the update must be visible"


_START = torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
def test_matches_torch_fused_adam(cls, grad_dtype):
    _check(*_run(cls, _grads(1, grad_dtype)))


def test_grad_mul_and_scale_as_torch_divides_by_grad_scale():
    """The DP mean (`grad_mul`) and the folded clipping (`grad_scale`, GradScaler's protocol) both reach the
    update; without either the masters move elsewhere (checked, so the comparison can fail)."""
    grads = _grads(2, torch.bfloat16)
    scale = torch.tensor(3.0)
    ref, *rest = _run(torch.optim.AdamW, grads, grad_mul=0.25, scale=scale)
    _check(ref, *rest)
    ref_plain = _run(torch.optim.AdamW, grads)[0]
    assert (ref_plain - ref).abs().max() > 1e-4


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32])
def test_other_weight_dtypes(weight_dtype):
    _check(*_run(torch.optim.AdamW, _grads(3, torch.bfloat16), weight_dtype=weight_dtype))


def test_beta1_zero_and_no_weight_decay():
    """beta1 = 0 makes log2(beta1) = -inf: beta1**step must read as 0, not NaN."""
    _check(*_run(torch.optim.AdamW, _grads(4, torch.bfloat16), betas=(0.0, 0.99), weight_decay=0.0))


def test_bf16_weight_rounds_to_nearest_even_with_nan_and_inf():
    """The bf16 store is integer rounding on the bits (the interpreter truncates the cast): ties, values near
    the largest bf16, inf and NaN all come out as torch's `.bfloat16()`."""
    master = torch.tensor([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -(1.0 + 2 ** -8), 3.3895314e38, 3.4e38,
                           float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40, 2.5e-45])
    n = master.numel()
    weight = torch.empty(n, dtype=torch.bfloat16)
    adam_step(torch.zeros(n, dtype=torch.bfloat16), master, torch.zeros(n), torch.zeros(n), weight,
              torch.ones(()), lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
    expected = master.bfloat16()  # lr = 0: the master is unchanged
    assert torch.equal(weight.view(torch.int16)[:7], expected.view(torch.int16)[:7])
    assert weight[7].isnan()  # torch keeps the NaN's sign and payload bits; any NaN will do
    assert torch.equal(weight.view(torch.int16)[8:], expected.view(torch.int16)[8:])


def test_bad_shapes_and_dtypes_name_the_tensor():
    f32 = torch.zeros(8)
    with pytest.raises(ValueError, match="'weight'"):
        adam_step(f32.bfloat16(), f32.clone(), f32.clone(), f32.clone(), torch.zeros(9, dtype=torch.bfloat16),
                  torch.ones(()), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
    with pytest.raises(ValueError, match="'exp_avg' must be contiguous fp32"):
        adam_step(f32.bfloat16(), f32.clone(), f32.bfloat16(), f32.clone(), f32.bfloat16(),
                  torch.ones(()), lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
