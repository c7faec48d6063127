"""Adam/AdamW on fp32 master weights in one pass over memory, writing the model-dtype weight as it goes.

With bf16 weights and fp32 masters, torch's route to an updated bf16 weight is three passes: widen the reduced
bf16 gradient to fp32 (2 + 4 bytes per element), the fused Adam kernel (reads grad, master and both moments,
writes them back, grad included once the clipping is folded in: 32 bytes), then the master -> bf16 copy (4 + 2):
44 bytes per element. This kernel reads the gradient in its own dtype and the fp32 state, and writes the state and
the weight: 28 bytes from a bf16 gradient (30 from an fp32 one). On the Llama-3-8B-shape TP=1 step (2.8 B elements per
step) that is ~45 GB less traffic, ~10 ms at H200's ~4.5 TB/s (bench/results/profile_tp1_autotp_fold*).

The update follows torch's fused Adam (`aten/src/ATen/native/cuda/fused_adam_utils.cuh`) in fp32: gradient
divided by `grad_scale`, decoupled (AdamW) or L2 (Adam) weight decay, moments, `p -= lr / bc1 * m / (sqrt(v) /
sqrt(bc2) + eps)`. Divisions and square roots are IEEE (`div_rn`, `sqrt_rn`), as in torch. The bias corrections
are computed on the host in fp64 from the caller's step count (torch's CUDA kernel computes them in fp32 on the
device), and FMA contraction may differ, so results agree with torch's to a few ulp of the update, not bit for
bit.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

BLOCK = 2048  # elements per program: 8 per thread at 8 warps, 8 streams of 8-16 KB each in flight


@triton.jit
def _to_bf16_rtne(x):
    """fp32 -> bf16 rounded to nearest even by integer arithmetic on the bits, as torch's `.bfloat16()` and the
    GPU's `cvt.rn.bf16.f32`; written out because Triton's interpreter truncates this cast (the CPU tests check
    the weight bit for bit against torch)."""
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN stays NaN (the carry could turn its payload into inf)
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _adam_kernel(grad_ptr, master_ptr, exp_avg_ptr, exp_avg_sq_ptr, weight_ptr, scale_ptr, numel,
                 step_size, bias_correction2_sqrt, lr_wd, weight_decay, beta1, beta2, eps, grad_mul,
                 DECOUPLED: tl.constexpr, HAS_DECAY: tl.constexpr, HAS_SCALE: tl.constexpr,
                 WRITE_WEIGHT: tl.constexpr, WEIGHT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: a bucket partition can pass 2**31 elements
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel

    grad = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32) * grad_mul
    if HAS_SCALE:
        grad = tl.div_rn(grad, tl.load(scale_ptr))
    param = tl.load(master_ptr + offsets, mask=mask)
    exp_avg = tl.load(exp_avg_ptr + offsets, mask=mask)
    exp_avg_sq = tl.load(exp_avg_sq_ptr + offsets, mask=mask)

    if HAS_DECAY:  # skipped at 0 as torch skips it (0 * inf would turn an inf weight into NaN)
        if DECOUPLED:
            param = param - lr_wd * param
        else:
            grad = grad + param * weight_decay
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad * grad
    denom = tl.div_rn(tl.sqrt_rn(exp_avg_sq), bias_correction2_sqrt) + eps
    param = param - tl.div_rn(step_size * exp_avg, denom)

    tl.store(master_ptr + offsets, param, mask=mask)
    tl.store(exp_avg_ptr + offsets, exp_avg, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, exp_avg_sq, mask=mask)
    if WRITE_WEIGHT:
        if WEIGHT_BF16:
            tl.store(weight_ptr + offsets, _to_bf16_rtne(param), mask=mask)
        else:
            tl.store(weight_ptr + offsets, param.to(weight_ptr.dtype.element_ty), mask=mask)


def adam_step(grad: torch.Tensor, master: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
              weight: Optional[torch.Tensor], step: int, *, lr: float, beta1: float, beta2: float, eps: float,
              weight_decay: float, decoupled: bool, grad_mul: float = 1.0,
              grad_scale: Optional[torch.Tensor] = None) -> None:
    """One Adam (L2 weight decay) or AdamW (`decoupled`) update of `master` and its moments in place, from
    `grad * grad_mul / grad_scale`; `weight` receives the new master in its own dtype (None: no weight, as for
    FSDP2's fp32 shards, which it casts when it gathers them). `step` is the step count after this step's
    increment (1 on the first). All tensors contiguous, on one device, with `master`'s numel;
    the state fp32, `grad` bf16, fp16 or fp32."""
    if step < 1:
        raise ValueError(f"adam_step: 'step' counts from 1, got {step}")
    numel = master.numel()
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq), ("weight", weight)):
        if t is None:
            continue
        if t.numel() != numel or not t.is_contiguous() or t.device != master.device:
            raise ValueError(f"adam_step: '{name}' must be contiguous with {numel} elements on {master.device}, "
                             f"got {tuple(t.shape)} on {t.device} (contiguous={t.is_contiguous()})")
    for name, t in (("master", master), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"adam_step: '{name}' must be contiguous fp32, got {t.dtype}")
    if not numel:
        return
    # Bias corrections in fp64 on the host: in fp32, 1 - beta2**step loses ~eps / (1 - beta2**step) of itself to
    # cancellation (3e-5 at beta2 = 0.999, step 2). An in-kernel exp2(step * log2(beta)) (the GPU's approximate
    # exp2) put the masters 250-420 ulp of the update from torch's fused AdamW on H200 at beta2 = 0.999; this form
    # is within 0.02-0.82 of tests/gpu/adam_check.py's argued bound at beta2 = 0.95, 0.999 and 0.9999.
    step_size = lr / (1.0 - beta1 ** step)
    bias_correction2_sqrt = math.sqrt(1.0 - beta2 ** step)
    _adam_kernel[(triton.cdiv(numel, BLOCK),)](
        grad, master, exp_avg, exp_avg_sq, master if weight is None else weight,
        grad_scale if grad_scale is not None else master, numel,
        step_size, bias_correction2_sqrt, lr * weight_decay, weight_decay, beta1, beta2, eps, grad_mul,
        DECOUPLED=decoupled, HAS_DECAY=weight_decay != 0, HAS_SCALE=grad_scale is not None,
        WRITE_WEIGHT=weight is not None, WEIGHT_BF16=weight is not None and weight.dtype == torch.bfloat16,
        BLOCK=BLOCK, num_warps=8)
