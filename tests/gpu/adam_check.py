"""GPU check of autotp_kernels.adam against torch's fused AdamW/Adam on CUDA (not collected by CI: it needs CUDA).

The tolerances are `tests/test_kernels_adam.py`'s, argued there; here the compiled kernel (FMA contraction, the
GPU's own sqrt/div) runs instead of the interpreter, against torch's CUDA kernel (bias corrections in fp32). The
bf16 weight must be the master rounded by `.bfloat16()` for every fp32 bit pattern class (ties, near-overflow,
subnormals, inf, NaN), and one run must give the same bits as the next. Prints one line per case and 'adam: OK' or
raises.
"""

import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from autotp_kernels.adam import BLOCK, _adam_kernel, adam_step  # noqa: E402

STEPS, LR = 3, 1e-2
EPS32 = torch.finfo(torch.float32).eps


def run(cls, numel, grad_dtype, weight_dtype, weight_decay, grad_mul, scale, beta2=0.95):
    gen = torch.Generator(device="cuda").manual_seed(numel)
    start = torch.randn(numel, generator=gen, device="cuda")
    ref = start.clone().requires_grad_()
    opt = cls([ref], lr=LR, betas=(0.9, beta2), eps=1e-8, weight_decay=weight_decay, fused=True)
    master, weight = start.clone(), torch.empty(numel, dtype=weight_dtype, device="cuda")
    exp_avg, exp_avg_sq = torch.zeros_like(start), torch.zeros_like(start)
    magnitude, sq_magnitude, update_bound = torch.zeros_like(start), torch.zeros_like(start), torch.zeros_like(start)
    for step in range(1, STEPS + 1):
        before = ref.detach().clone()
        grad = (torch.randn(numel, generator=gen, device="cuda") * 1e-2).to(grad_dtype)
        grad_magnitude = grad.float().abs() * grad_mul / (scale or 1.0) + weight_decay * master.abs()
        magnitude = 0.9 * magnitude + 0.1 * grad_magnitude
        sq_magnitude = beta2 * sq_magnitude + (1 - beta2) * grad_magnitude ** 2
        ref.grad = grad.float() * grad_mul
        if scale is not None:
            opt.grad_scale = torch.tensor(scale, device="cuda")
        opt.step()
        update_bound += (ref.detach() - before).abs() * EPS32 * (4 + 1 / (1 - 0.9 ** step) + 1 / (1 - beta2 ** step))
        adam_step(grad, master, exp_avg, exp_avg_sq, weight, step, lr=LR, beta1=0.9, beta2=beta2, eps=1e-8,
                  weight_decay=weight_decay, decoupled=cls is torch.optim.AdamW, grad_mul=grad_mul,
                  grad_scale=None if scale is None else torch.tensor(scale, device="cuda"))
        if cls is torch.optim.Adam and step < STEPS:
            # L2 decay feeds the master into the next gradient, so the two runs' master difference would come back
            # through the moments: Adam (L2) is compared step by step from the same state (AdamW over all steps).
            with torch.no_grad():
                ref.copy_(master)
                optimizer_state = opt.state[ref]
                optimizer_state["exp_avg"].copy_(exp_avg)
                optimizer_state["exp_avg_sq"].copy_(exp_avg_sq)
    ref = ref.detach()
    state = opt.state[opt.param_groups[0]["params"][0]]
    master_err = float(((master - ref).abs() / (STEPS * EPS32 * ref.abs() + update_bound)).max())
    avg_err = float(((exp_avg - state["exp_avg"]).abs() / (4 * STEPS * EPS32 * magnitude).clamp_min(1e-30)).max())
    sq_bound = (4 * STEPS * EPS32 * sq_magnitude).clamp_min(1e-30)
    sq_err = float(((exp_avg_sq - state["exp_avg_sq"]).abs() / sq_bound).max())
    rounded = torch.equal(weight, master.to(weight_dtype))
    name = (f"{cls.__name__} n={numel} grad={grad_dtype} weight={weight_dtype} wd={weight_decay} mul={grad_mul} "
            f"scale={scale} beta2={beta2}")
    print(f"{name}: master {master_err:.3f} exp_avg {avg_err:.3f} exp_avg_sq {sq_err:.3f} of bound, "
          f"weight rounded {rounded}", flush=True)
    assert master_err <= 1 and avg_err <= 1 and sq_err <= 1 and rounded, name
    return master, exp_avg, exp_avg_sq, weight


for cls in (torch.optim.AdamW, torch.optim.Adam):
    for grad_dtype in (torch.bfloat16, torch.float32):
        for beta2 in (0.95, 0.999, 0.9999):  # 0.999: torch's default, where 1 - beta2**t cancels most
            run(cls, 3 * 2 ** 22 + 77, grad_dtype, torch.bfloat16, 0.1, 0.5, 2.5, beta2)
run(torch.optim.AdamW, BLOCK - 3, torch.bfloat16, torch.float16, 0.0, 1.0, None)
run(torch.optim.AdamW, BLOCK + 3, torch.bfloat16, torch.float32, 0.1, 1.0, None)
# WRITE_WEIGHT=False (weight=None, FSDP2's fp32 shards): nothing stored through the weight pointer (a sentinel
# here, where the launcher passes a dummy), and the same master and moments as the weight-writing launch
n = 2 ** 22
grad, start = torch.randn(n, device="cuda").bfloat16(), torch.randn(n, device="cuda")
written = [start.clone(), torch.zeros_like(start), torch.zeros_like(start)]
adam_step(grad, *written, torch.empty(n, dtype=torch.bfloat16, device="cuda"), 1, lr=LR, beta1=0.9, beta2=0.999,
          eps=1e-8, weight_decay=0.1, decoupled=True)
unwritten = [start.clone(), torch.zeros_like(start), torch.zeros_like(start)]
sentinel = torch.full((n,), 7.0, dtype=torch.bfloat16, device="cuda")
_adam_kernel[(triton.cdiv(n, BLOCK),)](
    grad, *unwritten, sentinel, unwritten[0], n, LR / (1 - 0.9), math.sqrt(1 - 0.999), LR * 0.1, 0.1, 0.9, 0.999,
    1e-8, 1.0, DECOUPLED=True, HAS_DECAY=True, HAS_SCALE=False, WRITE_WEIGHT=False, WEIGHT_BF16=True, BLOCK=BLOCK)
assert bool((sentinel == 7.0).all()), "WRITE_WEIGHT=False wrote the weight"
assert all(torch.equal(a, b) for a, b in zip(written, unwritten)), "WRITE_WEIGHT=False changed the update"
print("no weight: nothing written, same master and moments", flush=True)
first = run(torch.optim.AdamW, 2 ** 24, torch.bfloat16, torch.bfloat16, 0.1, 0.5, 3.0)
again = run(torch.optim.AdamW, 2 ** 24, torch.bfloat16, torch.bfloat16, 0.1, 0.5, 3.0)
assert all(torch.equal(a, b) for a, b in zip(first, again)), "two runs must give the same bits"

# The bf16 store against torch's `.bfloat16()`, for fp32 values around every bf16 rounding case.
bits = torch.randint(-2 ** 31, 2 ** 31 - 1, (2 ** 24,), dtype=torch.int64, device="cuda").to(torch.int32)
ties = (torch.arange(2 ** 16, device="cuda", dtype=torch.int32) << 16) | 0x8000  # exact ties, every bf16 prefix
values = torch.cat([bits, ties, ties + 1, ties - 1]).view(torch.float32)
n = values.numel()
master, weight = values.clone(), torch.empty(n, dtype=torch.bfloat16, device="cuda")
zeros = torch.zeros(n, device="cuda")
adam_step(torch.zeros(n, dtype=torch.bfloat16, device="cuda"), master, zeros.clone(), zeros.clone(), weight,
          1, lr=0.0, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0, decoupled=True)
expected = values.bfloat16()
nan = expected.isnan()
assert torch.equal(weight.isnan(), nan), "NaN must stay NaN and nothing else become NaN"
assert torch.equal(weight.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), "bf16 rounding"
print(f"bf16 rounding of {n} fp32 patterns: as torch's .bfloat16()", flush=True)
print("adam: OK", flush=True)
