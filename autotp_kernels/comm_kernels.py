"""Triton kernels that move data between TP peers through the symmetric-memory workspace (see `symm`).

Flags are epoch-valued and polled with system-scope acquire loads; a wait that runs out of time records an
error code on this rank and lets the kernel finish (no hang): `symm.check_errors` turns it into an exception.
The error is sticky: once it is set, later launches on this rank wait no more, so a lost peer costs one timeout,
not one per remaining launch (a training step makes hundreds).
Each rank's reduction sums the W partials in rank order 0..W-1 in fp32 and every rank copies the owner's
rounded result, so the output is bit-identical on every rank and across runs (no atomics on data).

Chunks: the rows of the partial product [SEG, S, N] are cut into W owner slices (rank o owns rows
[o*S//W, (o+1)*S//W) of every segment, which is also the sequence-parallel layout) and each slice into J
pieces; chunk c = j*W + o, so chunks of all owners alternate and every owner can start reducing after the
first W chunks of GEMM.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import symm

# Kernels may read module globals only as constexpr.
ERROR_OFF = tl.constexpr(symm.ERROR_OFF)
MAX_CHUNKS = tl.constexpr(symm.MAX_CHUNKS)
MAX_CTAS = tl.constexpr(symm.MAX_CTAS)
RDONE_OFF = tl.constexpr(symm.RDONE_OFF)
READY_OFF = tl.constexpr(symm.READY_OFF)


@triton.jit
def _now(TIMER: tl.constexpr):
    """Nanoseconds of the GPU's global timer (TIMER), or 0 under the interpreter, where budgets count spins."""
    if TIMER:
        return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False,
                                         pack=1)
    else:
        return tl.zeros((), dtype=tl.int64)


@triton.jit
def _wait(flag_ptr, epoch, deadline, err_ptr, code, TIMER: tl.constexpr):
    """Spin until *flag_ptr >= epoch or the deadline passes (global-timer ns with TIMER, else a spin count that
    counts down). Returns the deadline, 0 after a timeout: a program that timed out once waits no more and
    signals nothing, so its peers time out too and every rank reports the failure."""
    v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    if TIMER:
        while (v < epoch) & (_now(TIMER) < deadline):
            v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
    else:
        while (v < epoch) & (deadline > 0):
            v = tl.atomic_add(flag_ptr, 0, sem="acquire", scope="sys")
            deadline -= 1
    if v < epoch:
        tl.atomic_max(err_ptr, code, sem="relaxed", scope="gpu")
        deadline = deadline * 0
    else:
        deadline = tl.maximum(deadline, 1)
    return deadline


@triton.jit
def _start(err_ptr, timeout, TIMER: tl.constexpr):
    """The deadline of a launch: now + timeout, or 0 (wait no more) when an earlier wait on this rank failed."""
    failed = tl.load(err_ptr, volatile=True) != 0
    return tl.where(failed, 0, _now(TIMER) + timeout)


@triton.jit
def _signal_all(flag_table, index, epoch, W: tl.constexpr):
    """flags[index] = epoch in every rank's workspace (release: this CTA's earlier writes are visible first)."""
    tl.debug_barrier()
    for q in tl.static_range(W):
        flags = tl.load(flag_table + q).to(tl.pointer_type(tl.int32))
        tl.atomic_xchg(flags + index, epoch, sem="release", scope="sys")


@triton.jit(do_not_specialize=["index", "epoch"])
def signal_kernel(flag_table, index, epoch, W: tl.constexpr):
    _signal_all(flag_table, index, epoch, W)


@triton.jit(do_not_specialize=["rank", "index", "epoch", "timeout"])
def wait_kernel(flag_table, rank, index, epoch, timeout, code, TIMER: tl.constexpr):
    flags = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32))
    deadline = _start(flags + ERROR_OFF, timeout, TIMER)
    if deadline > 0:
        _wait(flags + index, epoch, deadline, flags + ERROR_OFF, code, TIMER)


@triton.jit
def _chunk_rows(c, S, W: tl.constexpr, J):
    """Owner, owner slice start and size, and [lo, hi) rows of chunk c."""
    j = c // W
    o = c % W
    base = (o * S) // W
    size = ((o + 1) * S) // W - base
    lo = base + (j * size) // J
    hi = base + ((j + 1) * size) // J
    return o, base, size, lo, hi


@triton.jit(do_not_specialize=["rank", "epoch", "timeout", "SEG", "S", "N", "J", "C0", "C1"])
def reduce_chunks_kernel(data_table, out_ptr, flag_table, rank, epoch, timeout, SEG, S, N, J, C0, C1,
                         W: tl.constexpr, SIGNAL_READY: tl.constexpr, ALL_GATHER: tl.constexpr, DO_REDUCE: tl.constexpr,
                         DO_GATHER: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr, TIMER: tl.constexpr):
    """Reduce (and with ALL_GATHER, share) the partial products [SEG, S, N] of W ranks, chunk by chunk.

    Reduce-scatter: out is [SEG, size_rank, N], this rank's rows of the sum. All-reduce: out is [SEG, S, N]; the
    owner also writes its reduced chunk back into its own buffer and raises RDONE, and the other ranks copy it.
    Chunks [C0, C1) are handled. With SIGNAL_READY, program 0 first raises READY for this rank's partial of each
    chunk (the launch is stream-ordered after that chunk's GEMM). A chunk is one contiguous run of rows x N per segment, walked in BLOCK-element blocks; block set k (blocks
    k, k+P, ... for P programs) is handled by program k on every rank, so a reader waits only for the same
    program on the owner. ALIGN: N is a multiple of it (elements), so blocks load in 16-byte vectors. `timeout`:
    nanoseconds for the whole op with TIMER, else spins.
    DO_REDUCE / DO_GATHER split the phases for tests that simulate all ranks in one process.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    my_flags = tl.load(flag_table + rank).to(tl.pointer_type(tl.int32))
    err_ptr = my_flags + ERROR_OFF
    my_data = tl.load(data_table + rank).to(tl.pointer_type(out_ptr.dtype.element_ty))
    offs = tl.arange(0, BLOCK)
    budget = _start(err_ptr, timeout, TIMER)
    for c in range(C0, C1):
        if SIGNAL_READY:
            if pid == 0:
                _signal_all(flag_table, READY_OFF + rank * MAX_CHUNKS + c, epoch, W)
        o, base, size, lo, hi = _chunk_rows(c, S, W, J)
        seg_elems = tl.multiple_of((hi - lo).to(tl.int64) * N, ALIGN)
        seg_blocks = tl.cdiv(seg_elems, BLOCK)
        if o == rank:
            if DO_REDUCE:
                for q in tl.static_range(W):
                    budget = _wait(my_flags + READY_OFF + q * MAX_CHUNKS + c, epoch, budget, err_ptr, 1, TIMER)
                tl.debug_barrier()
                for f in range(pid, SEG * seg_blocks, nprog):
                    b = f // seg_blocks
                    idx = (f - b * seg_blocks) * BLOCK + offs
                    mask = idx < seg_elems
                    addr = tl.multiple_of((b * S + lo) * N, ALIGN) + idx
                    acc = tl.zeros((BLOCK,), dtype=tl.float32)
                    for q in tl.static_range(W):
                        src = tl.load(data_table + q).to(tl.pointer_type(out_ptr.dtype.element_ty))
                        src = tl.multiple_of(src, 16)
                        acc += tl.load(src + addr, mask=mask, other=0.0, cache_modifier=".cv").to(tl.float32)
                    val = acc.to(out_ptr.dtype.element_ty)
                    if ALL_GATHER:
                        tl.store(out_ptr + addr, val, mask=mask)
                        tl.store(tl.multiple_of(my_data, 16) + addr, val, mask=mask)
                    else:
                        out_addr = tl.multiple_of((b * size + (lo - base)) * N, ALIGN) + idx
                        tl.store(out_ptr + out_addr, val, mask=mask)
                if ALL_GATHER and budget > 0:
                    _signal_all(flag_table, RDONE_OFF + c * MAX_CTAS + pid, epoch, W)
        else:
            if ALL_GATHER and DO_GATHER:
                budget = _wait(my_flags + RDONE_OFF + c * MAX_CTAS + pid, epoch, budget, err_ptr, 2, TIMER)
                tl.debug_barrier()
                src = tl.multiple_of(tl.load(data_table + o).to(tl.pointer_type(out_ptr.dtype.element_ty)), 16)
                for f in range(pid, SEG * seg_blocks, nprog):
                    b = f // seg_blocks
                    idx = (f - b * seg_blocks) * BLOCK + offs
                    mask = idx < seg_elems
                    addr = tl.multiple_of((b * S + lo) * N, ALIGN) + idx
                    tl.store(out_ptr + addr, tl.load(src + addr, mask=mask, cache_modifier=".cv"), mask=mask)


def ready_index(rank: int, chunk: int) -> int:
    return symm.READY_OFF + rank * symm.MAX_CHUNKS + chunk


def shard_index(rank: int) -> int:
    return symm.XREADY_OFF + rank

