"""The fused collectives' one kernel: the owner's fixed-order sum of W partial products.

By the time it runs, the copy engine has pulled every peer's partial of this rank's rows into local stage slots
(`fused.matmul_reduce`), so the kernel reads local memory only and never waits: HBM bandwidth, not NVLink
latency, and no SM held while a GEMM needs it. It sums the W partials in rank order 0..W-1 in fp32 and rounds
once, so the result is the same bits on every rank and in every run (no atomics).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["rank"])
def reduce_slots_kernel(
    # pointers
    own_ptr, slots_ptr, out_ptr,
    # sizes (elements)
    elems, rank,
    # strides (elements)
    stride_own_seg, stride_slot, stride_slot_seg, stride_out_seg,
    # meta-parameters
    W: tl.constexpr, WRITE_BACK: tl.constexpr, BLOCK: tl.constexpr,
):
    """out[s, i] = sum over q = 0..W-1 of (own[s, i] if q == rank else slots[q, s, i]), fp32, in rank order.

    Grid (cdiv(elems, BLOCK), segments); each segment is `elems` contiguous elements. With WRITE_BACK the sum also
    overwrites own (the all-reduce's peers copy it from there).
    """
    pid = tl.program_id(0)
    seg = tl.program_id(1).to(tl.int64)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < elems
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for q in tl.static_range(W):
        if q == rank:
            part = tl.load(own_ptr + seg * stride_own_seg + offs, mask=mask, other=0.0)
        else:
            part = tl.load(slots_ptr + q * stride_slot + seg * stride_slot_seg + offs, mask=mask, other=0.0)
        acc += part.to(tl.float32)
    total = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + seg * stride_out_seg + offs, total, mask=mask)
    if WRITE_BACK:
        tl.store(own_ptr + seg * stride_own_seg + offs, total, mask=mask)


def reduce_slots(own, slots, out, rank: int, write_back: bool, block: int = 2048, warps: int = 8) -> None:
    """own [SEG, R, N] (row-strided view), slots [W, SEG, R, N] contiguous, out [SEG, R, N] (row-strided view);
    the rows of each segment are contiguous in all three."""
    seg, rows, n = own.shape
    elems = rows * n
    for t in (own, out):
        if t.stride(2) != 1 or t.stride(1) != n:
            raise ValueError(f"reduce_slots: each segment's rows must be contiguous, got strides {t.stride()}")
    if elems == 0:
        return
    grid = (triton.cdiv(elems, block), seg)
    reduce_slots_kernel[grid](own, slots, out, elems, rank, own.stride(0), slots.stride(0), slots.stride(1),
                              out.stride(0), W=slots.shape[0], WRITE_BACK=write_back, BLOCK=block, num_warps=warps)
