"""GEMM + TP collective with the collective hidden under the GEMM: launchers over `comm_kernels` and `symm`.

  matmul_reduce(pairs, group, scatter=False)  sum_i a_i @ b_i, all-reduced over the group (row layer forward,
                                              column layer input gradient)
  matmul_reduce(pairs, group, scatter=True)   the same, reduce-scattered over the sequence (sequence-parallel
                                              row layer forward, column layer input gradient)
  all_gather_matmul(x_shard, weights, group)  all-gather the sequence shards, multiply by each weight
                                              (sequence-parallel column layer forward, row layer backward)

How the overlap works (nothing spins; ranks synchronise with stream waits, `cuda_driver`):
  all-reduce       The GEMM runs on the compute stream in J chunks of rows into this rank's symmetric buffer;
                   chunk j's rows are split among the W ranks. After chunk j, a stream write raises READY(me, j) on
                   every peer. On a side stream each rank waits for every peer's READY(q, j), then one kernel
                   (`comm_kernels.reduce_peers`) reads its rows of chunk j from all W buffers (peers over NVLink),
                   sums them in rank order in fp32 and stores the sum back into all W buffers; RDONE(me, j) tells
                   the peers. A collect stream waits for every owner's RDONE(o, j) and copies the chunk's rows
                   from the local buffer into the output.
  reduce-scatter   The same reduction, stored into the local output only, no RDONE; rank o's rows are its
                   sequence shard, chunk j being piece j of every shard.
  all-gather+GEMM  Every rank puts its shard in its buffer and raises XREADY; the copy engine pulls peer shards in
                   rank-shifted order while the GEMM multiplies the shards already here.
Concurrency contract: an op's side streams (reduce, collect, copy) start after everything the compute stream had
queued when the op was called, and the compute stream waits for them at `join` (the end of the op, or with
`defer_join` the next fused op or `join(group)`). Every op is watched: one that outlives `TUNING.timeout_s`
releases its waits and turns into FusedCommError (`watchdog`). Activations are [SEG, S, K] (batch, sequence,
features); 2-D inputs are one segment.

`sequential_*` are the cuBLAS-then-NCCL paths: the fallback below `TUNING.min_bytes` and the reference in tests
and benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import cuda_driver, symm
from .comm_kernels import reduce_peers, wait_flags
from .gemm import matmul
from .symm import MAX_CHUNKS, rdone_index, ready_index, shard_index
from .watchdog import WATCHDOG


@dataclass
class FusedTuning:
    """Defaults from bench/bench_tp_overlap.py --sweep on 4 x H200 (bench/results/tp_overlap_sweep_w4.csv, Llama-3-8B
    down projection at TP=4, M=8192): no chunking, carveout or grid size overlapped the reduction with the GEMM
    (every setting took about GEMM + reduction, 0.76-0.94 ms; more chunks or a carveout only added time), so the
    defaults are the fastest single settings measured: 4096-row chunks, no carveout, a full-size grid."""
    chunk_rows: int = int(os.environ.get("AUTOTP_FUSED_CHUNK_ROWS", "4096"))
    """Target rows per GEMM chunk (all ranks' rows together): smaller chunks shorten the exposed tail, larger ones
    keep the GEMM efficient and cost less host time (~120 us of host time per chunk at W=4)."""
    block: int = 8192
    """Elements per rank each reduction program loads per step (16 KB of bf16: W x 16 KB in flight)."""
    reduce_programs: int = int(os.environ.get("AUTOTP_FUSED_REDUCE_PROGRAMS", "132"))
    """Programs of the reduction kernel (H200 has 132 SMs): what it may take from a GEMM it runs under. 32
    programs reduced no faster under the GEMM and 16 were too few to keep the links busy (1.19 vs 0.87 ms)."""
    min_bytes: int = int(os.environ.get("AUTOTP_FUSED_MIN_BYTES", str(1 << 62)))
    """`kernels: auto` fuses (with cuBLAS chunks) when the collective moves at least this many bytes; below,
    cuBLAS then NCCL. By default `auto` never fuses: on 4 and 2 H200s the fused all-reduce and reduce-scatter
    were slower than cuBLAS then NCCL at every measured size (bench/results/README.md); `kernels: triton` always
    fuses."""
    emulate: bool = os.environ.get("AUTOTP_FUSED_EMULATE") == "1"
    """Let the TP layers take their fused code paths without CUDA peer memory: the ops then run cuBLAS (or CPU
    BLAS) then NCCL (or gloo). For debugging and for CPU tests of the layers' wiring."""
    sm_carveout: int = int(os.environ.get("AUTOTP_FUSED_SM_CARVEOUT", "0"))
    """SMs that cuBLAS leaves free during chunks 1..J-1 of a fused all-reduce / reduce-scatter for the previous
    chunk's reduction (torch's `_set_sm_carveout_experimental`). A persistent cuBLAS GEMM holds every SM until
    it ends; 16 or 32 SMs left free did not make the two overlap on H200 and slowed the GEMM (0.88-0.91 ms
    against 0.87 at 2048-row chunks, 4 GPUs; 1.31 against 1.00 ms at 2 GPUs), so off by default."""
    wait: str = os.environ.get("AUTOTP_FUSED_WAIT", "stream")
    """How the all-reduce / reduce-scatter side streams wait for peers' flags: `stream` (cuStreamWaitValue32,
    holds nothing) or `kernel` (`comm_kernels.wait_flags`, a one-warp polling kernel)."""
    timeout_s: float = float(os.environ.get("AUTOTP_FUSED_TIMEOUT_S", "300"))
    """An op not complete this long after it was issued releases its waits and raises FusedCommError."""


TUNING = FusedTuning()
# torch 2.13's names for the flat collectives (the old ones warn on every call); torch 2.11 has only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_CAN_CARVE_OUT = hasattr(torch._C, "_set_sm_carveout_experimental")


def _mm(a, b, out, accumulate: bool, gemm: str):
    if gemm == "triton":
        matmul(a, b, out=out, accumulate=accumulate)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


def _gemm_rows(pairs, out, lo: int, hi: int, gemm: str):
    """out[:, lo:hi] = sum_i a_i[:, lo:hi] @ b_i, segment by segment (each a contiguous row range)."""
    for s in range(out.shape[0]):
        for i, (a, b) in enumerate(pairs):
            _mm(a[s, lo:hi], b, out[s, lo:hi], i > 0, gemm)
    return out


def chunks(S: int) -> int:
    """Chunks of an op over S rows: about TUNING.chunk_rows rows each, at most MAX_CHUNKS."""
    return max(1, min(MAX_CHUNKS, round(S / TUNING.chunk_rows)))


def owner_rows(j: int, S: int, world: int, pieces: int, scatter: bool) -> list:
    """[(lo, hi)] per owner rank of chunk j of `pieces`. All-reduce: chunk j is rows [j*S/J, (j+1)*S/J), split
    evenly among the ranks. Reduce-scatter: a rank owns its sequence shard [o*S/W, (o+1)*S/W), and chunk j is
    piece j of every shard."""
    if scatter:
        rows = []
        for o in range(world):
            base, size = (o * S) // world, ((o + 1) * S) // world - (o * S) // world
            rows.append((base + (j * size) // pieces, base + ((j + 1) * size) // pieces))
        return rows
    lo, hi = (j * S) // pieces, ((j + 1) * S) // pieces
    return [(lo + (o * (hi - lo)) // world, lo + ((o + 1) * (hi - lo)) // world) for o in range(world)]


def _check_pairs(pairs):
    a0, b0 = pairs[0]
    for a, b in pairs:
        if a.dim() != 3 or b.dim() != 2 or a.shape[2] != b.shape[0] or b.shape[1] != b0.shape[1]:
            raise ValueError(f"fused matmul: operands {tuple(a.shape)} @ {tuple(b.shape)} do not fit "
                             f"[SEG, S, K] @ [K, {b0.shape[1]}]")
        if a.shape[:2] != a0.shape[:2] or a.dtype != a0.dtype or b.dtype != a0.dtype:
            raise ValueError("fused matmul: all operand pairs need the same [SEG, S] and dtype")


@dataclass
class _ReducePlan:
    """What one (shape, epoch parity) of `matmul_reduce` issues, precomputed: row ranges, flag and copy
    addresses and the table of the W ranks' buffer addresses. Built on the first call of a shape and reused, so
    a call's host time is the launches and driver calls themselves."""
    table: torch.Tensor  # int64 [W]: every rank's partial-product buffer of this parity (peers' are mapped)
    gemm_rows: list      # [chunk] -> [(lo, hi)] rows of the partial product the compute stream writes
    ready: list          # [chunk] -> flag addresses on the peers: READY(me, j)
    ready_waits: list    # [chunk] -> flag addresses here: READY(q, j) of every peer
    mine: list           # [chunk] -> (lo, hi): the rows this rank reduces
    rdone: list          # [chunk] -> flag addresses on the peers: RDONE(me, j)       (all-reduce only)
    rdone_waits: list    # [chunk] -> flag addresses here: RDONE(o, j) of every peer  (all-reduce only)
    collect: list        # [chunk] -> [(dst offset in out, src, bytes)]: the chunk's reduced rows, local copy
    ready_table: list    # [chunk] -> int64 tensor of ready_waits (for TUNING.wait == "kernel")
    rdone_table: list    # [chunk] -> int64 tensor of rdone_waits


def _reduce_plan(ws, partial, S: int, N: int, scatter: bool, pieces: int, epoch: int) -> _ReducePlan:
    world, me = ws.world, ws.rank
    seg, elem = partial.shape[0], partial.element_size()
    seg_bytes, row_bytes = S * N * elem, N * elem
    peers = [(me + i) % world for i in range(1, world)]
    table = torch.tensor([ws.data_ptr(q, epoch) for q in range(world)], dtype=torch.int64, device=partial.device)
    plan = _ReducePlan(table, [], [], [], [], [], [], [], [], [])
    for j in range(pieces):
        r = owner_rows(j, S, world, pieces, scatter)
        plan.gemm_rows.append(list(r) if scatter else [(r[0][0], r[-1][1])])
        plan.ready.append([ws.flag_addr(o, ready_index(me, j)) for o in peers])
        plan.ready_waits.append([ws.flag_addr(me, ready_index(q, j)) for q in peers])
        plan.mine.append(r[me])
        plan.ready_table.append(torch.tensor(plan.ready_waits[-1], dtype=torch.int64, device=partial.device))
        if scatter:
            continue
        plan.rdone.append([ws.flag_addr(o, rdone_index(me, j)) for o in peers])
        plan.rdone_waits.append([ws.flag_addr(me, rdone_index(o, j)) for o in peers])
        plan.rdone_table.append(torch.tensor(plan.rdone_waits[-1], dtype=torch.int64, device=partial.device))
        lo, hi = r[0][0], r[-1][1]
        plan.collect.append([(s * seg_bytes + lo * row_bytes, ws.data_ptr(me, epoch) + s * seg_bytes + lo * row_bytes,
                              (hi - lo) * row_bytes) for s in range(seg) if hi > lo])
    return plan


def matmul_reduce(pairs, group, scatter: bool = False, gemm: str = "cublas", defer_join: bool = False):
    """sum_i a_i @ b_i over the group: all-reduced [SEG, S, N], or with `scatter` this rank's sequence slice
    [SEG, S/W, N]. With `defer_join` the compute stream is free to run more work (a weight gradient) before
    `join(group)` waits for the reduction's tail."""
    _check_pairs(pairs)
    a0, b0 = pairs[0]
    if not a0.is_cuda:  # no peer memory: the same function, unfused
        return sequential_matmul_reduce(pairs, group, scatter=scatter, gemm=gemm)
    seg, S, N = a0.shape[0], a0.shape[1], b0.shape[1]
    ws = symm.workspace(group, a0.device, seg * S * N * a0.element_size())
    world, me = ws.world, ws.rank
    if scatter and S % world:
        raise ValueError(f"fused reduce-scatter: sequence {S} is not divisible by {world} ranks")
    epoch = ws.next_epoch()
    partial = ws.data_view(me, epoch, (seg, S, N), a0.dtype)
    out = torch.empty((seg, S // world if scatter else S, N), dtype=a0.dtype, device=a0.device)
    pieces = chunks(S)
    key = ("reduce", seg, S, N, a0.dtype, scatter, pieces, epoch % 2)
    plan = ws.plans.get(key)
    if plan is None:
        plan = ws.plans[key] = _reduce_plan(ws, partial, S, N, scatter, pieces, epoch)
    compute = torch.cuda.current_stream(a0.device).cuda_stream
    reducer, collector = ws.reduce_stream.cuda_stream, ws.collect_stream.cuda_stream
    start = ws.events("start", 1)[0]
    start.record(compute)  # the side streams start here: after the inputs and the previous op's join
    start.wait(reducer)
    if not scatter:
        start.wait(collector)
    # Phase 1, compute stream: every chunk's GEMM, each followed by its READY on every peer. All of a rank's
    # signals are issued before any of its waits, so no wait can sit in a hardware queue ahead of a signal that
    # some peer needs (CUDA maps streams onto a few queues: CUDA_DEVICE_MAX_CONNECTIONS).
    chunk_done = ws.events("chunk", pieces)
    carveout = TUNING.sm_carveout if gemm == "cublas" and pieces > 1 and _CAN_CARVE_OUT else 0
    before = torch._C._get_sm_carveout_experimental() if carveout else None
    try:
        for j in range(pieces):
            if j == 1 and carveout:  # chunk 0 has no reduction to share the GPU with
                torch._C._set_sm_carveout_experimental(carveout)
            for lo, hi in plan.gemm_rows[j]:
                _gemm_rows(pairs, partial, lo, hi, gemm)
            for addr in plan.ready[j]:
                cuda_driver.write_value(compute, addr, epoch)
            chunk_done[j].record(compute)
    finally:
        if carveout:
            torch._C._set_sm_carveout_experimental(before)
    # Phase 2, per chunk: once every peer's READY is here, reduce this rank's rows from all W buffers (the
    # kernel reads the peers over NVLink) and, for an all-reduce, store the sum back into all W buffers and raise
    # RDONE; the collect stream copies the chunk's rows, reduced by their W owners, into the output locally.
    reduced = ws.events("reduced", pieces)
    with torch.cuda.stream(ws.reduce_stream):
        for j in range(pieces):
            chunk_done[j].wait(reducer)
            _await_flags(reducer, plan.ready_waits[j], plan.ready_table[j], epoch)
            # Reduce-scatter: into the output, whose row 0 is this rank's first sequence row.
            reduce_peers(plan.table, partial, N, plan.mine[j], seg, S * N, out=out if scatter else None,
                         out_row0=plan.mine[j][0] - me * (S // world), block=TUNING.block,
                         programs=TUNING.reduce_programs)
            if scatter:
                continue
            for addr in plan.rdone[j]:
                cuda_driver.write_value(reducer, addr, epoch)
            reduced[j].record(reducer)
    if not scatter:
        out_ptr = out.data_ptr()
        with torch.cuda.stream(ws.collect_stream):
            for j in range(pieces):
                reduced[j].wait(collector)
                _await_flags(collector, plan.rdone_waits[j], plan.rdone_table[j], epoch)
                for dst, src, nbytes in plan.collect[j]:
                    cuda_driver.copy(collector, out_ptr + dst, src, nbytes)
    side = [ws.reduce_stream] + ([] if scatter else [ws.collect_stream])
    _finish(ws, side, keep=[out], defer_join=defer_join, pieces=pieces)
    return out


def _await_flags(stream: int, flags: list, table: torch.Tensor, epoch: int) -> None:
    """`stream` (the current torch stream too) waits for the flags at `flags` (`table`: the same addresses on
    the device) to reach `epoch`, with stream waits or a polling kernel (TUNING.wait)."""
    if TUNING.wait == "kernel":
        wait_flags(table, epoch)
    else:
        for flag in flags:
            cuda_driver.wait_value(stream, flag, epoch)


def _finish(ws, side, keep, defer_join: bool, pieces: int = 1) -> None:
    """One event after every side stream's work: the compute stream's join point and the watchdog's marker."""
    first = side[0].cuda_stream
    for stream, tail in zip(side[1:], ws.events("tail", len(side))):
        tail.record(stream.cuda_stream)
        tail.wait(first)
    done = torch.cuda.Event()
    done.record(side[0])
    epoch = ws.epoch
    WATCHDOG.watch(done, TUNING.timeout_s, lambda waited: ws.fail(waited, epoch, pieces))
    ws.defer_join(done, keep)
    if not defer_join:
        ws.join()


def all_gather_matmul(x_shard: torch.Tensor, weights, group, gemm: str = "cublas"):
    """Gather [SEG, S/W, K] sequence shards into x_full [SEG, S, K] and return (x_full, [x_full @ b for b])."""
    if not x_shard.is_cuda:  # no peer memory: the same function, unfused
        return sequential_all_gather_matmul(x_shard, weights, group, gemm=gemm)
    seg, s_own, K = x_shard.shape
    for b in weights:
        if b.dim() != 2 or b.shape[0] != K or b.dtype != x_shard.dtype:
            raise ValueError(f"all_gather_matmul: weight {tuple(b.shape)} {b.dtype} does not fit [{K}, N] "
                             f"{x_shard.dtype}")
    elem = x_shard.element_size()
    ws = symm.workspace(group, x_shard.device, x_shard.numel() * elem)
    world, me = ws.world, ws.rank
    epoch = ws.next_epoch()
    compute = torch.cuda.current_stream(x_shard.device)
    ws.data_view(me, epoch, (seg, s_own, K), x_shard.dtype).copy_(x_shard)
    for q in range(world):
        if q != me:
            cuda_driver.write_value(compute.cuda_stream, ws.flag_addr(q, shard_index(me)), epoch)
    x_full = torch.empty((seg, world * s_own, K), dtype=x_shard.dtype, device=x_shard.device)
    x_full[:, me * s_own:(me + 1) * s_own].copy_(x_shard)
    ys = [torch.empty((seg, world * s_own, b.shape[1]), dtype=x_shard.dtype, device=x_shard.device)
          for b in weights]
    handle, copy = compute.cuda_stream, ws.copy_stream.cuda_stream
    start = ws.events("start", 1)[0]
    start.record(handle)  # the shard is in the buffer and x_full allocated
    start.wait(copy)

    def multiply(src):
        rows = slice(src * s_own, (src + 1) * s_own)
        for s in range(seg):
            for y, b in zip(ys, weights):
                _mm(x_full[s, rows], b, y[s, rows], False, gemm)

    multiply(me)
    arrived = ws.events("arrived", world)
    shard_bytes = s_own * K * elem
    # Rank-shifted order: at step i every rank reads a different peer, spreading the links' load; one stream,
    # so the shard the GEMM needs next arrives first.
    for i in range(1, world):
        src = (me + i) % world
        cuda_driver.wait_value(copy, ws.flag_addr(me, shard_index(src)), epoch)
        for s in range(seg):
            cuda_driver.copy(copy, x_full[s, src * s_own].data_ptr() if s_own else 0,
                             ws.data_ptr(src, epoch) + s * shard_bytes, shard_bytes)
        arrived[src].record(copy)
    x_full.record_stream(ws.copy_stream)
    for i in range(1, world):
        src = (me + i) % world
        arrived[src].wait(handle)
        multiply(src)
    _finish(ws, [ws.copy_stream], keep=[], defer_join=False)
    return x_full, ys


def join(group, device: torch.device) -> None:
    """Make the compute stream wait for the tail of the group's last deferred reduction."""
    ws = symm.existing(group, device)
    if ws is not None:
        ws.join()


# --- cuBLAS then NCCL: fallback and reference ---------------------------------------------------------------

def _gemm_sum(pairs, gemm: str):
    a0, b0 = pairs[0]
    out = torch.empty((a0.shape[0], a0.shape[1], b0.shape[1]), dtype=a0.dtype, device=a0.device)
    return _gemm_rows(pairs, out, 0, a0.shape[1], gemm)


def sequential_matmul_reduce(pairs, group, scatter: bool = False, gemm: str = "cublas"):
    out = _gemm_sum(pairs, gemm)
    if not scatter:
        dist.all_reduce(out, group=group)
        return out
    world = dist.get_world_size(group)
    seq_first = out.transpose(0, 1).contiguous()
    piece = seq_first.new_empty((seq_first.shape[0] // world,) + tuple(seq_first.shape[1:]))
    _reduce_scatter_flat(piece, seq_first, group=group)
    return piece.transpose(0, 1).contiguous()


def sequential_all_gather_matmul(x_shard, weights, group, gemm: str = "cublas"):
    world = dist.get_world_size(group)
    seq_first = x_shard.transpose(0, 1).contiguous()
    gathered = seq_first.new_empty((seq_first.shape[0] * world,) + tuple(seq_first.shape[1:]))
    _all_gather_flat(gathered, seq_first, group=group)
    x_full = gathered.transpose(0, 1).contiguous()
    return x_full, [_gemm_sum([(x_full, b)], gemm) for b in weights]
