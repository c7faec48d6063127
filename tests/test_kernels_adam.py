"""`autotp_kernels.adam` against torch's fused Adam/AdamW on the same fp32 masters (Triton interpreter on CPU).

Tolerance: both compute the update in fp32 from the same inputs with roundings in another order (FMA contraction,
the bias corrections rounded to fp32 from fp64 here; torch's CUDA kernel computes them in fp32, where 1 - beta**t
loses eps * beta**t / (1 - beta**t) of itself to cancellation): so each step's update agrees to 4 eps + eps / (1 -
beta1**t) + eps / (1 - beta2**t) of itself, and the master, p - update, can land one ulp of |p| apart after each
step. After STEPS steps: |p - p_ref| <= STEPS * ulp(|p|) + the sum of those update bounds. exp_avg sums terms of
both signs, so its error is bounded by ulps of the terms' magnitude, not of its value: 4 fp32 ulp per step of the
beta1-weighted sum of |grad|. Adam's L2 gradient grad + wd * p cancels too (and a GPU computes it as one FMA), so
exp_avg_sq gets the same bound over the beta2-weighted sum of (|grad| + wd |p|)^2. The weight is the master rounded
to its dtype, so it must equal `master.to(dtype)` bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch
import triton

from autotp_kernels.adam import BLOCK, _adam_kernel, adam_step

STEPS, LR = 3, 1e-2
EPS32 = torch.finfo(torch.float32).eps
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
    exp_avg, exp_avg_sq = torch.zeros(NUMEL), torch.zeros(NUMEL)
    magnitude = torch.zeros(NUMEL)  # the beta1-weighted sum of |grad| (with Adam's L2 term) exp_avg is made of
    sq_magnitude = torch.zeros(NUMEL)  # the same for exp_avg_sq's squares
    update_bound = torch.zeros(NUMEL)
    for step, grad in enumerate(grads, start=1):
        before = ref.detach().clone()
        grad_magnitude = grad.float().abs() * grad_mul / (scale or 1.0) + weight_decay * master.abs()
        magnitude = betas[0] * magnitude + (1 - betas[0]) * grad_magnitude
        sq_magnitude = betas[1] * sq_magnitude + (1 - betas[1]) * grad_magnitude ** 2
        ref.grad = grad.float() * grad_mul
        if scale is not None:
            optimizer.grad_scale = scale
        optimizer.step()
        relative = EPS32 * (4 + 1 / (1 - betas[0] ** step) + 1 / (1 - betas[1] ** step))
        update_bound += (ref.detach() - before).abs() * relative
        adam_step(grad, master, exp_avg, exp_avg_sq, weight, step, lr=LR, beta1=betas[0], beta2=betas[1], eps=1e-8,
                  weight_decay=weight_decay, decoupled=cls is torch.optim.AdamW, grad_mul=grad_mul, grad_scale=scale)
        if cls is torch.optim.Adam and step < STEPS:
            # L2 decay feeds the master into the next gradient, so the two runs' master difference would come back
            # through the moments: Adam (L2) is compared step by step from the same state (AdamW over all steps).
            with torch.no_grad():
                ref.copy_(master)
                optimizer_state = optimizer.state[ref]
                optimizer_state["exp_avg"].copy_(exp_avg)
                optimizer_state["exp_avg_sq"].copy_(exp_avg_sq)
    bounds = (magnitude, sq_magnitude, update_bound)
    return ref.detach(), optimizer.state[ref], bounds, master, exp_avg, exp_avg_sq, weight


def _check(ref, state, bounds, master, exp_avg, exp_avg_sq, weight):
    magnitude, sq_magnitude, update_bound = bounds
    bound = STEPS * EPS32 * ref.abs() + update_bound
    assert bool(((master - ref).abs() <= bound).all()), float(((master - ref).abs() / bound).max())
    for mine, key, size in ((exp_avg, "exp_avg", magnitude), (exp_avg_sq, "exp_avg_sq", sq_magnitude)):
        assert bool(((mine - state[key]).abs() <= 4 * STEPS * EPS32 * size).all()), key
    assert torch.equal(weight, master.to(weight.dtype))


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam])
@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("beta2", [0.95, 0.999, 0.9999])  # 0.999 is torch's default; 1 - beta2**t cancels most there
def test_matches_torch_fused_adam(cls, grad_dtype, beta2):
    _check(*_run(cls, _grads(1, grad_dtype), betas=(0.9, beta2)))


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
              1, lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
    expected = master.bfloat16()  # lr = 0: the master is unchanged
    assert torch.equal(weight.view(torch.int16)[:7], expected.view(torch.int16)[:7])
    assert weight[7].isnan()  # torch keeps the NaN's sign and payload bits; any NaN will do
    assert torch.equal(weight.view(torch.int16)[8:], expected.view(torch.int16)[8:])


def test_bad_shapes_and_dtypes_name_the_tensor():
    f32 = torch.zeros(8)
    with pytest.raises(ValueError, match="'weight'"):
        adam_step(f32.bfloat16(), f32.clone(), f32.clone(), f32.clone(), torch.zeros(9, dtype=torch.bfloat16),
                  1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
    with pytest.raises(ValueError, match="'exp_avg' must be contiguous fp32"):
        adam_step(f32.bfloat16(), f32.clone(), f32.bfloat16(), f32.clone(), f32.bfloat16(),
                  1, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
    with pytest.raises(ValueError, match="'step' counts from 1"):
        adam_step(f32.bfloat16(), f32.clone(), f32.clone(), f32.clone(), f32.bfloat16(),
                  0, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)


def test_no_weight_writes_no_weight():
    """WRITE_WEIGHT=False (`adam_step(weight=None)`, FSDP2's fp32 shards) stores nothing through the weight pointer
    and updates the master as the weight-writing launch does. Called at the kernel, so a sentinel can sit behind
    the pointer the launcher would fill with a dummy."""
    grad, numel = _grads(5, torch.bfloat16)[0], NUMEL
    written = [_START.clone(), torch.zeros(numel), torch.zeros(numel)]
    adam_step(grad, *written, torch.empty(numel, dtype=torch.bfloat16), 1, lr=LR, beta1=0.9, beta2=0.999, eps=1e-8,
              weight_decay=0.1, decoupled=True)
    sentinel = torch.full((numel,), 7.0, dtype=torch.bfloat16)
    unwritten = [_START.clone(), torch.zeros(numel), torch.zeros(numel)]
    _adam_kernel[(triton.cdiv(numel, BLOCK),)](
        grad, *unwritten, sentinel, unwritten[0], numel, LR / (1 - 0.9), math.sqrt(1 - 0.999), LR * 0.1, 0.1,
        0.9, 0.999, 1e-8, 1.0, DECOUPLED=True, HAS_DECAY=True, HAS_SCALE=False, WRITE_WEIGHT=False,
        WEIGHT_BF16=True, BLOCK=BLOCK)
    assert bool((sentinel == 7.0).all())
    assert not torch.equal(written[0], _START)
    assert all(torch.equal(a, b) for a, b in zip(written, unwritten))


_START = torch.randn(NUMEL, generator=torch.Generator().manual_seed(7))
