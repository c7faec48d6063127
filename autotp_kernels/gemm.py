"""C = A @ B (+ C) for 2-D operands of any strides, fp32 accumulation: kernel -> launcher.

Transposed operands are strided views (the wgrad product reads dy^T and x without copies). Tiles are visited in
groups of GROUP_M rows so that consecutive programs share B tiles in L2. The autotune list is for H200 (SM90,
228 KB shared memory per SM); under the interpreter a single small tile keeps CPU tests fast.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_GPU_CONFIGS = [
    # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages): large tiles for the 4096-16384-token projections, smaller ones
    # for ragged and skinny shapes.
    # 128 x 256 x 64 in bf16 takes 48 KB of shared memory per stage, so four stages fit in H200's 228 KB.
    (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3), (256, 128, 64, 8, 4), (128, 128, 64, 4, 4),
    (128, 128, 64, 8, 5), (128, 128, 32, 4, 4), (64, 256, 32, 4, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (64, 64, 32, 4, 4),
]
_INTERPRET_CONFIGS = [(16, 32, 32, 1, 1)]
# Below 1 GFLOP (under 2 us at H200's bf16 peak) the tile barely matters, while autotuning compiles every one of the
# _GPU_CONFIGS per specialization: a tiny model's training on a cold Triton cache spent over 150 s doing that on H200.
SMALL_FLOPS = 1 << 30
_SMALL_CONFIG = (64, 64, 32, 4, 3)


def _configs():
    chosen = _INTERPRET_CONFIGS if INTERPRET else _GPU_CONFIGS
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
            for m, n, k, w, s in chosen]


@triton.autotune(configs=_configs(), key=["M", "N", "K", "ACCUMULATE", "PRECISION"])
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                   ACCUMULATE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    # Grouped ordering: GROUP_M tile rows advance together across N.
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_size = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_size
    pid_n = (pid % (GROUP_M * grid_n)) // group_size

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rm[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # every projection shape: no K mask, so the loads pipeline as plain async copies
            a = tl.load(a_ptrs, mask=rm[:, None] < M, other=0.0)
            b = tl.load(b_ptrs, mask=rn[None, :] < N, other=0.0)
        else:
            k_ok = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    c_ptrs = c_ptr + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c_ptrs, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _precision(dtype: torch.dtype) -> str:
    """fp32 operands follow torch's TF32 switch, so `kernels: triton` matches cuBLAS's arithmetic."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def matmul(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None, accumulate: bool = False,
           out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """`a @ b` (2-D, any strides) into a new tensor or `out` (`out += a @ b` with `accumulate`)."""
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul: shapes {tuple(a.shape)} and {tuple(b.shape)} do not multiply")
    if a.dtype != b.dtype:
        raise ValueError(f"matmul: operand dtypes differ ({a.dtype}, {b.dtype})")
    if a.device != b.device:
        raise ValueError(f"matmul: operands on {a.device} and {b.device}")
    M, K = a.shape
    N = b.shape[1]
    if out is None:
        if accumulate:
            raise ValueError("matmul: accumulate=True needs out=")
        out = torch.empty((M, N), dtype=out_dtype or a.dtype, device=a.device)
    elif tuple(out.shape) != (M, N):
        raise ValueError(f"matmul: out has shape {tuple(out.shape)}, expected {(M, N)}")
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out if accumulate else out.zero_()

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    args = (a, b, out, M, N, K, a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1))
    if INTERPRET or 2 * M * N * K >= SMALL_FLOPS:
        _matmul_kernel[grid](*args, ACCUMULATE=accumulate, PRECISION=_precision(a.dtype))
    else:
        m, n, k, warps, stages = _SMALL_CONFIG
        _matmul_kernel.fn[grid](*args, ACCUMULATE=accumulate, PRECISION=_precision(a.dtype), BLOCK_M=m, BLOCK_N=n,
                                BLOCK_K=k, GROUP_M=8, num_warps=warps, num_stages=stages)
    return out
