"""The fused collectives' one kernel: the owner's fixed-order sum of W partial products, read from every rank.

`fused.matmul_reduce` launches it per chunk on a side stream, after stream waits saw every peer's READY for that
chunk, so it never waits inside: each program loads its block of this rank's rows from the W ranks' symmetric
buffers (peers over NVLink, through a table of their addresses), sums them in rank order 0..W-1 in fp32, rounds
once, and stores the result back into all W buffers (all-reduce: each peer then copies it locally) or into the
local output (reduce-scatter). Same bits on every rank and in every run (no atomics).

Why SM loads and stores instead of the copy engine (bench/results/fused_notes.md, 4 x H200): copy-engine pulls
of the peers' rows into a stage, a local reduction and copy-engine pulls of the result moved an 8192 x 4096
bf16 all-reduce in ~0.5 ms, against 0.33 ms for NCCL; here the peers' rows are read once and the result written
once, with enough programs in flight to fill the links, and no stage round trip.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def reduce_peers_kernel(
    # pointers
    table_ptr, out_ptr,
    # sizes and offsets (elements)
    offset, elems, out_offset,
    # strides (elements)
    stride_seg, stride_out_seg,
    # meta-parameters
    W: tl.constexpr, STORE_ALL: tl.constexpr, BLOCK: tl.constexpr,
):
    """sum = sum over q = 0..W-1 of buf_q[s * stride_seg + offset + i], fp32, in rank order, where buf_q is the
    address in table[q]. STORE_ALL: buf_q[same place] = sum for every q; else out[s * stride_out_seg +
    out_offset + i] = sum. Grid (programs, segments): each program strides over its segment's `elems` contiguous
    elements BLOCK at a time, so the grid stays as small as the caller wants (see `reduce_peers`)."""
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    seg = tl.program_id(1).to(tl.int64)
    for start in range(pid * BLOCK, elems, programs * BLOCK):
        offs = start + tl.arange(0, BLOCK)  # int32: a chunk has under 2^31 elements per segment
        mask = offs < elems
        at = seg * stride_seg + offset + offs
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for q in tl.static_range(W):
            buf = tl.load(table_ptr + q).to(tl.pointer_type(out_ptr.dtype.element_ty))
            acc += tl.load(buf + at, mask=mask, other=0.0).to(tl.float32)
        total = acc.to(out_ptr.dtype.element_ty)
        if STORE_ALL:
            for q in tl.static_range(W):
                buf = tl.load(table_ptr + q).to(tl.pointer_type(out_ptr.dtype.element_ty))
                tl.store(buf + at, total, mask=mask)
        else:
            tl.store(out_ptr + seg * stride_out_seg + out_offset + offs, total, mask=mask)


def reduce_peers(table, like, row_elems: int, rows: tuple, seg: int, seg_elems: int, out=None,
                 out_row0: int = 0, block: int = 8192, programs: int = 32, warps: int = 16) -> None:
    """Rows [lo, hi) of the W buffers in `table` (int64 addresses of [seg, S, N] buffers, `seg_elems` = S * N
    per segment, `row_elems` = N): summed and stored back into every buffer, or, given `out` ([seg, R, N],
    contiguous rows), stored at out rows [out_row0, out_row0 + hi - lo). `like` is a tensor of the data's dtype
    (the kernel's store type when `out` is None).

    `programs` bounds the SMs the reduction takes from the GEMM it overlaps (a grid of one program per block
    took every SM the GEMM freed, at high priority, and the two ran no faster than one after the other:
    bench/results/fused_notes.md); `block` elements per rank per step keep W x 16 KB (bf16) of loads in flight
    per program, which NVLink's microseconds of latency need."""
    lo, hi = rows
    elems = (hi - lo) * row_elems
    if elems == 0:
        return
    if elems + programs * block >= 2**31:  # the kernel's in-segment offsets are int32
        raise ValueError(f"reduce_peers: {elems} elements in one chunk of one segment; at most "
                         f"{2**31 - programs * block - 1} (use more chunks: AUTOTP_FUSED_CHUNK_ROWS)")
    target = like if out is None else out
    if out is not None and (out.stride(2) != 1 or out.stride(1) != row_elems):
        raise ValueError(f"reduce_peers: the output's rows must be contiguous, got strides {out.stride()}")
    grid = (max(1, min(triton.cdiv(elems, block), programs // seg)), seg)
    reduce_peers_kernel[grid](table, target, lo * row_elems, elems, out_row0 * row_elems, seg_elems,
                              target.stride(0) if out is not None else 0, W=table.numel(), STORE_ALL=out is None,
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
