"""A widening copy (bf16/fp16 -> fp32) at HBM speed, for the ZeRO store's reduced gradients.

torch's `copy_` / `.float()` between these dtypes runs its generic unrolled elementwise kernel: on H200 the
bf16 -> fp32 copies of a Llama-3-8B-shape step's gradients (2.8 B elements in 35 buckets) took 8.7 ms, about
1.9 TB/s of the ~4.8 the card moves (bench/results/profile_tp1_autotp_norm*). Both widenings are exact, so the
result equals torch's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  # elements per program: 8 KB of bf16 in, 16 KB of fp32 out, 16 elements per thread at 8 warps


@triton.jit
def _widen_kernel(src_ptr, dst_ptr, numel, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK  # int64: buckets can pass 2**31 elements
    offsets = start + tl.arange(0, BLOCK)
    mask = offsets < numel
    values = tl.load(src_ptr + offsets, mask=mask)
    tl.store(dst_ptr + offsets, values.to(tl.float32), mask=mask)


def widen(t_lo: torch.Tensor) -> torch.Tensor:
    """A new contiguous fp32 tensor equal to `t_lo` (contiguous bf16 or fp16)."""
    if t_lo.dtype not in (torch.bfloat16, torch.float16) or not t_lo.is_contiguous():
        raise ValueError(f"widen takes a contiguous bf16/fp16 tensor, got {t_lo.dtype} "
                         f"(contiguous={t_lo.is_contiguous()})")
    out = torch.empty(t_lo.shape, dtype=torch.float32, device=t_lo.device)
    numel = t_lo.numel()
    if numel:
        _widen_kernel[(triton.cdiv(numel, BLOCK),)](t_lo, out, numel, BLOCK=BLOCK, num_warps=8)
    return out
