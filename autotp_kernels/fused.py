"""GEMM + TP collective with the collective hidden under the GEMM: launchers over `comm_kernels` and `symm`.

  matmul_reduce(pairs, group, scatter=False)  sum_i a_i @ b_i, all-reduced over the group (row layer forward,
                                              column layer input gradient)
  matmul_reduce(pairs, group, scatter=True)   the same, reduce-scattered over the sequence (sequence-parallel
                                              row layer forward, column layer input gradient)
  all_gather_matmul(x_shard, weights, group)  all-gather the sequence shards, multiply by each weight
                                              (sequence-parallel column layer forward, row layer backward)

How the overlap works: the GEMM runs on the compute stream in chunks of rows (cuBLAS or the Triton GEMM). After
each chunk, a reduction launch on a high-priority stream, `TUNING.ctas` programs wide (the rest of the SMs keep
the GEMM going), raises that chunk's flag on every peer, waits for the chunk on all ranks, sums its owner's rows
in fixed rank order in fp32 and, for the all-reduce, hands the result to the others. For the all-gather the copy
engine pulls peer shards in rank-shifted order while the GEMM multiplies the shards already here. Activations
are [SEG, S, K] (batch, sequence, features); 2-D inputs are one segment.

`sequential_*` are the cuBLAS-then-NCCL paths: the fallback below `TUNING.min_bytes` and the reference in tests
and benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import symm
from .comm_kernels import reduce_chunks_kernel, shard_index, signal_kernel, wait_kernel
from .gemm import matmul
from .symm import MAX_CHUNKS, MAX_CTAS


@dataclass
class FusedTuning:
    ctas: int = int(os.environ.get("AUTOTP_FUSED_CTAS", "16"))
    """Programs of the reduction kernel; each holds one SM while the GEMM runs."""
    block: int = 4096
    """Elements per program per step: with W peers in flight, 16 KB x W bytes per SM hide NVLink latency."""
    warps: int = 8
    chunk_rows: int = int(os.environ.get("AUTOTP_FUSED_CHUNK_ROWS", "1024"))
    """Target rows per GEMM chunk: smaller chunks shorten the exposed tail, larger ones keep the GEMM efficient."""
    min_bytes: int = int(os.environ.get("AUTOTP_FUSED_MIN_BYTES", str(1 << 62)))
    """`kernels: auto` fuses (with cuBLAS chunks) when the collective moves at least this many bytes; below,
    cuBLAS then NCCL. No crossover has been measured yet (bench/bench_tp_overlap.py), so by default `auto` never
    fuses; `kernels: triton` always does."""
    emulate: bool = os.environ.get("AUTOTP_FUSED_EMULATE") == "1"
    """Let the TP layers take their fused code paths without CUDA peer memory: the ops then run cuBLAS (or CPU
    BLAS) then NCCL (or gloo). For debugging and for CPU tests of the layers' wiring."""
    timeout_s: float = float(os.environ.get("AUTOTP_FUSED_TIMEOUT_S", "300"))
    """An op whose peers have not all arrived after this long (GPU global timer) gives up with an error code."""

    @property
    def timeout_ns(self) -> int:
        return max(1, int(self.timeout_s * 1e9))


TUNING = FusedTuning()


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


def _pieces(S: int, world: int) -> int:
    """Chunks per owner slice: about TUNING.chunk_rows rows each, at most MAX_CHUNKS chunks in all."""
    return max(1, min(MAX_CHUNKS // world, round((S // world) / TUNING.chunk_rows)))


def _chunk_rows(c: int, S: int, world: int, pieces: int):
    """Host twin of comm_kernels._chunk_rows: [lo, hi) rows of chunk c."""
    j, o = divmod(c, world)
    base = (o * S) // world
    size = ((o + 1) * S) // world - base
    return base + (j * size) // pieces, base + ((j + 1) * size) // pieces


def alignment(n: int, element_size: int) -> int:
    """Largest power of two up to 16 bytes' worth of elements that divides the row length `n`."""
    align = 16 // element_size
    while n % align:
        align //= 2
    return align


def _check_pairs(pairs):
    a0, b0 = pairs[0]
    for a, b in pairs:
        if a.dim() != 3 or b.dim() != 2 or a.shape[2] != b.shape[0] or b.shape[1] != b0.shape[1]:
            raise ValueError(f"fused matmul: operands {tuple(a.shape)} @ {tuple(b.shape)} do not fit "
                             f"[SEG, S, K] @ [K, {b0.shape[1]}]")
        if a.shape[:2] != a0.shape[:2] or a.dtype != a0.dtype or b.dtype != a0.dtype:
            raise ValueError("fused matmul: all operand pairs need the same [SEG, S] and dtype")


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
    if TUNING.ctas > MAX_CTAS:
        raise ValueError(f"fused kernels: TUNING.ctas={TUNING.ctas} exceeds {MAX_CTAS}")
    epoch = ws.next_epoch()
    partial = ws.data_view(me, epoch, (seg, S, N), a0.dtype)
    out = torch.empty((seg, S // world if scatter else S, N), dtype=a0.dtype, device=a0.device)
    pieces = _pieces(S, world)
    compute = torch.cuda.current_stream(a0.device)
    align = alignment(N, a0.element_size())
    for c in range(world * pieces):
        _gemm_rows(pairs, partial, *_chunk_rows(c, S, world, pieces), gemm)
        # One reduction launch per chunk, stream-ordered after this chunk's GEMM: a spinning kernel then only
        # ever waits for GEMMs that are already running or done on every rank. A reduction that spanned the
        # whole op would hold SMs that a later chunk's persistent cuBLAS GEMM (one CTA per SM) needs to finish,
        # and wait for that very chunk: on H200 that stalled until the timeout at 2 GPUs (M=8192, 16 programs)
        # and at 4 GPUs (32 programs, 2048-row chunks).
        chunk_done = torch.cuda.Event()
        chunk_done.record(compute)
        ws.comm_stream.wait_event(chunk_done)
        with torch.cuda.stream(ws.comm_stream):
            reduce_chunks_kernel[(TUNING.ctas,)](
                ws.data_tables[epoch % 2], out, ws.flag_table, me, epoch, TUNING.timeout_ns, seg, S, N, pieces, c,
                c + 1, W=world, SIGNAL_READY=True, ALL_GATHER=not scatter, DO_REDUCE=True, DO_GATHER=True,
                BLOCK=TUNING.block, ALIGN=align, TIMER=True, num_warps=TUNING.warps)
    out.record_stream(ws.comm_stream)
    done = torch.cuda.Event()
    done.record(ws.comm_stream)
    ws.defer_join(done)
    if not defer_join:
        ws.join()
    return out


def all_gather_matmul(x_shard: torch.Tensor, weights, group, gemm: str = "cublas"):
    """Gather [SEG, S/W, K] sequence shards into x_full [SEG, S, K] and return (x_full, [x_full @ b for b])."""
    if not x_shard.is_cuda:  # no peer memory: the same function, unfused
        return sequential_all_gather_matmul(x_shard, weights, group, gemm=gemm)
    seg, s_own, K = x_shard.shape
    for b in weights:
        if b.dim() != 2 or b.shape[0] != K or b.dtype != x_shard.dtype:
            raise ValueError(f"all_gather_matmul: weight {tuple(b.shape)} {b.dtype} does not fit [{K}, N] "
                             f"{x_shard.dtype}")
    ws = symm.workspace(group, x_shard.device, x_shard.numel() * x_shard.element_size())
    world, me = ws.world, ws.rank
    epoch = ws.next_epoch()
    ws.data_view(me, epoch, (seg, s_own, K), x_shard.dtype).copy_(x_shard)
    signal_kernel[(1,)](ws.flag_table, shard_index(me), epoch, W=world)
    x_full = torch.empty((seg, world * s_own, K), dtype=x_shard.dtype, device=x_shard.device)
    x_full[:, me * s_own:(me + 1) * s_own].copy_(x_shard)
    ys = [torch.empty((seg, world * s_own, b.shape[1]), dtype=x_shard.dtype, device=x_shard.device)
          for b in weights]
    compute = torch.cuda.current_stream(x_shard.device)
    ws.copy_stream.wait_stream(compute)

    def multiply(src):
        rows = slice(src * s_own, (src + 1) * s_own)
        for s in range(seg):
            for y, b in zip(ys, weights):
                _mm(x_full[s, rows], b, y[s, rows], False, gemm)

    # Enqueued before the spinning waits: with CUDA's lazy module loading, a kernel loaded for the first time
    # while a spinning kernel runs waits for it to end (seen on H200: first calls stalled until the timeout).
    multiply(me)
    arrived = {}
    with torch.cuda.stream(ws.copy_stream):
        # Rank-shifted order: at step i every rank reads a different peer, spreading the links' load.
        for i in range(1, world):
            src = (me + i) % world
            wait_kernel[(1,)](ws.flag_table, me, shard_index(src), epoch, TUNING.timeout_ns, 3, TIMER=True)
            x_full[:, src * s_own:(src + 1) * s_own].copy_(ws.data_view(src, epoch, (seg, s_own, K), x_shard.dtype))
            arrived[src] = torch.cuda.Event()
            arrived[src].record(ws.copy_stream)
    x_full.record_stream(ws.copy_stream)
    for i in range(1, world):
        src = (me + i) % world
        compute.wait_event(arrived[src])
        multiply(src)
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
    dist.reduce_scatter_tensor(piece, seq_first, group=group)
    return piece.transpose(0, 1).contiguous()


def sequential_all_gather_matmul(x_shard, weights, group, gemm: str = "cublas"):
    world = dist.get_world_size(group)
    seq_first = x_shard.transpose(0, 1).contiguous()
    gathered = seq_first.new_empty((seq_first.shape[0] * world,) + tuple(seq_first.shape[1:]))
    dist.all_gather_into_tensor(gathered, seq_first, group=group)
    x_full = gathered.transpose(0, 1).contiguous()
    return x_full, [_gemm_sum([(x_full, b)], gemm) for b in weights]
