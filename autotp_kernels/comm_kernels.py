"""The fused collectives' kernels: the owner's fixed-order sum of its W incoming slots, and a polling wait.

`fused.matmul_reduce` launches `reduce_slots` per piece on a side stream, after stream waits saw every peer's
READY for that piece, so it never waits inside. The peers' partial products were already pushed into this
rank's slots by their GEMMs, so it reads local memory only: each program sums its block over the W slots in
rank order 0..W-1 in fp32, rounds once, and stores into the output (and for an all-reduce into this rank's own
slot, which the peers' copy engines read). Same bits on every rank and in every run (no atomics).

Why local slots instead of reading the peers' buffers here (bench/results/fused_notes.md): a reduction that
pulled peers' rows through SM loads needed the SMs a persistent cuBLAS GEMM holds, so the two ran one after
the other (fused 0.66-0.97 ms against 0.43-0.89 ms for cuBLAS then NCCL, 2 x H200, M=8192); pushed from the
GEMM's epilogue, the bytes cross NVLink while the GEMM runs and this kernel only touches local HBM.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def reduce_slots_kernel(
    # pointers
    slots_ptr, out_ptr,
    # sizes and offsets (elements)
    offset, elems, out_offset,
    # strides (elements)
    stride_slot, stride_seg, stride_out_seg,
    # which slot keeps the sum (KEEP)
    keep,
    # meta-parameters
    W: tl.constexpr, KEEP: tl.constexpr, BLOCK: tl.constexpr,
):
    """sum = sum over q = 0..W-1 of slots[q * stride_slot + s * stride_seg + offset + i], fp32, in rank order;
    out[s * stride_out_seg + out_offset + i] = sum, and with KEEP slots[keep * stride_slot + same] = sum.
    Grid (programs, segments): each program strides over its segment's `elems` contiguous elements BLOCK at a
    time, so the grid stays as small as the caller wants (see `reduce_slots`)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seg = tl.program_id(1).to(tl.int64)
    slot = stride_slot.to(tl.int64)  # W slots span more than 2^31 elements before one slot does
    for start in range(pid * BLOCK, elems, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)  # int32: a piece has under 2^31 elements per segment
        mask = offs < elems
        at = seg * stride_seg + offset + offs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for q in tl.static_range(W):
            acc += tl.load(slots_ptr + q * slot + at, mask=mask, other=0.0).to(tl.float32)
        total = acc.to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + seg * stride_out_seg + out_offset + offs, total, mask=mask)
        if KEEP:
            tl.store(slots_ptr + keep * slot + at, total, mask=mask)


def reduce_slots(slots, rows: tuple, out, out_row0: int, keep=None, block: int = 4096, programs: int = 132,
                 warps: int = 8) -> None:
    """Rows [lo, hi) of every segment of the W slots `slots` [W, SEG, R, N] (contiguous), summed in rank order
    and stored at out [SEG, *, N] rows [out_row0, out_row0 + hi - lo), and into slots[keep] when `keep` is a
    rank. `programs` bounds the SMs it takes from the GEMM it runs under."""
    lo, hi = rows
    W, seg, R, N = slots.shape
    elems = (hi - lo) * N
    if elems == 0:
        return
    if elems + programs * block >= 2**31:  # the kernel's in-segment offsets are int32
        raise ValueError(f"reduce_slots: {elems} elements in one piece of one segment; at most "
                         f"{2**31 - programs * block - 1} (use more pieces: AUTOTP_FUSED_CHUNK_ROWS)")
    if not slots.is_contiguous():
        raise ValueError(f"reduce_slots: the slots must be contiguous, got strides {slots.stride()}")
    if out.dtype != slots.dtype or out.stride(2) != 1 or out.stride(1) != N:
        raise ValueError(f"reduce_slots: the output must be {slots.dtype} with contiguous rows of {N}, got "
                         f"{out.dtype} strides {out.stride()}")
    grid = (max(1, min(triton.cdiv(elems, block), max(1, programs // seg))), seg)
    reduce_slots_kernel[grid](slots, out, lo * N, elems, out_row0 * N, slots.stride(0), slots.stride(1),
                              out.stride(0), 0 if keep is None else keep, W=W, KEEP=keep is not None,
                              BLOCK=block, num_warps=warps)


@triton.jit(do_not_specialize=["count", "epoch"])
def wait_flags_kernel(addrs_ptr, count, epoch):
    """Return once every int32 flag at the `count` addresses in addrs_ptr reads at least `epoch` (cyclic signed
    comparison, as the stream waits): one program, one flag at a time, volatile loads (never a cached value)."""
    for i in range(count):
        flag = tl.load(addrs_ptr + i).to(tl.pointer_type(tl.int32))
        seen = tl.load(flag, volatile=True)
        while seen - epoch < 0:
            seen = tl.load(flag, volatile=True)


def wait_flags(addrs, epoch: int) -> None:
    """The current stream waits, in a one-warp kernel, for the flags at `addrs` (int64 tensor of addresses) to
    reach `epoch`. The alternative to `cuda_driver.wait_value` (TUNING.wait = "kernel"): a satisfied stream
    wait may still cost the stream a scheduling round trip, a polling warp notices a flag within a load's
    latency. It holds one warp of one SM while it polls; a timeout releases it the same way (the watchdog
    sets the flags past every epoch)."""
    if addrs.numel():
        wait_flags_kernel[(1,)](addrs, addrs.numel(), epoch, num_warps=1)
