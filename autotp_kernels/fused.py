"""GEMM + TP collective with the collective hidden under the GEMM: launchers over `comm_kernels` and `symm`.

  matmul_reduce(pairs, group, scatter=False)  sum_i a_i @ b_i, all-reduced over the group (row layer forward,
                                              column layer input gradient)
  matmul_reduce(pairs, group, scatter=True)   the same, reduce-scattered over the sequence (sequence-parallel
                                              row layer forward, column layer input gradient)
  all_gather_matmul(x_shard, weights, group)  all-gather the sequence shards, multiply by each weight
                                              (sequence-parallel column layer forward, row layer backward)

How the overlap works (nothing spins; ranks synchronise with stream writes and waits, `cuda_driver`):
  reduce-scatter   Two-shot and pushed. Rank o owns rows [o*S/W, (o+1)*S/W) (its sequence shard) and every
                   rank's symmetric buffer has W incoming slots, slot q for rank q's partial of the owner's rows.
                   Each rank multiplies the owners' rows piece by piece in rank-rotated order (`issue_order`),
                   and each GEMM stores straight into the owner's slot (over NVLink, from cuBLAS's own epilogue;
                   with TUNING.push = "copy", into a local stage the copy engine then pushes), then raises
                   READY(me, piece) on the owner. So the data moves while the next GEMMs run, and no SM is spent
                   moving it. The owner, once its own piece and every peer's READY are in, sums its W slots in
                   rank order in fp32 (`comm_kernels.reduce_slots`, local HBM only) into the output.
  all-reduce       The same over the flattened rows (reduce-scatter, then all-gather): the owner also keeps the
                   sum in its own slot and raises RDONE on every peer, whose copy engine pulls those rows into
                   its output. Each rank moves 2(W-1)/W of the output, not the W-1 whole partials of a one-shot.
  all-gather+GEMM  Every rank puts its shard in its buffer and raises XREADY; the copy engine pulls peer shards in
                   rank-shifted order while the GEMM multiplies the shards already here.
Every row is summed by one rank in a fixed order with no atomics: the same bits on every rank and in every run.
Concurrency contract: an op's side streams (reduce, collect, copy) start after everything the compute stream had
queued when the op was called, and the compute stream waits for them at `join` (the end of the op, or with
`defer_join` the next fused op or `join(group)`). Every op is watched: one that outlives `TUNING.timeout_s`
releases its waits and turns into FusedCommError (`watchdog`). Activations are [SEG, S, K] (batch, sequence,
features); 2-D inputs are one segment.

`sequential_*` are the cuBLAS-then-NCCL paths: the fallback where `kernels: auto` does not fuse and the
reference in tests and benchmarks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from . import cuda_driver, symm
from .comm_kernels import reduce_slots, wait_flags
from .gemm import matmul
from .symm import MAX_CHUNKS, rdone_index, ready_index, shard_index
from .watchdog import WATCHDOG


@dataclass
class FusedTuning:
    """Knobs of the fused ops; the defaults are the fastest settings bench/bench_tp_overlap.py --sweep measured
    (bench/results/README.md)."""
    chunk_rows: int = int(os.environ.get("AUTOTP_FUSED_CHUNK_ROWS", "8192"))
    """Target rows per piece (all owners' rows together): smaller pieces shorten the exposed tail (the last
    piece's reduction and gather), larger ones keep the GEMM efficient and cost fewer stream operations. 8192:
    one piece at M=8192 was the fastest setting on 2 x H200 (2048 and 4096 rows took 5-15% longer,
    bench/results/tp_overlap_sweep_w2.csv)."""
    push: str = os.environ.get("AUTOTP_FUSED_PUSH", "copy")
    """How a partial product reaches its owner: `epilogue` (the GEMM stores into the owner's slot over NVLink)
    or `copy` (the GEMM stores locally, the copy engine pushes). Several operand pairs always use `copy`:
    accumulating into a peer's slot would read it back over the links. `copy` measured faster on 2 x H200
    (8B o / down all-reduce at M=8192: 0.39-0.41 / 0.84-0.85 ms against 0.46-0.52 / 0.87-1.11 ms with the
    epilogue push, bench/results/tp_overlap_sweep_w2.csv): cuBLAS's remote stores slow the GEMM more than a
    local store plus a copy-engine transfer that runs beside the next GEMM."""
    reduce_programs: int = int(os.environ.get("AUTOTP_FUSED_REDUCE_PROGRAMS", "132"))
    """Programs of the slot reduction (H200 has 132 SMs): what it may take from a GEMM it runs under. 132 is
    unmeasured against fewer: the one sweep that varied it reused the first value in the C++ path (a plan-key bug,
    fixed since), so its 32- and 132-program rows are the same setting."""
    always: bool = os.environ.get("AUTOTP_FUSED_ALWAYS") == "1"
    """`kernels: auto` fuses every shape instead of consulting the measured table (`auto_table`): for tests and
    benchmarks of the fused path in a whole model."""
    emulate: bool = os.environ.get("AUTOTP_FUSED_EMULATE") == "1"
    """Let the TP layers take their fused code paths without CUDA peer memory: the ops then run cuBLAS (or CPU
    BLAS) then NCCL (or gloo). For debugging and for CPU tests of the layers' wiring."""
    native: bool = os.environ.get("AUTOTP_FUSED_NATIVE", "1") != "0"
    """Issue a cuBLAS all-reduce / reduce-scatter from C++ (the `fused` extension, `csrc/fused_issue.cpp`: built
    ahead of time or on first use with nvcc) instead of Python: the Python path cost 0.3-0.4 ms of host time per
    op on the H200 machines, as long as the op itself. Without the extension, the Python path runs."""
    wait: str = os.environ.get("AUTOTP_FUSED_WAIT", "stream")
    """How side streams wait for peers' flags: `stream` (cuStreamWaitValue32, holds nothing) or `kernel`
    (`comm_kernels.wait_flags`, a one-warp polling kernel)."""
    timeout_s: float = float(os.environ.get("AUTOTP_FUSED_TIMEOUT_S", "300"))
    """An op not complete this long after it was issued releases its waits and raises FusedCommError."""

    def __post_init__(self):
        for name, value, allowed in (("AUTOTP_FUSED_PUSH", self.push, ("copy", "epilogue")),
                                     ("AUTOTP_FUSED_WAIT", self.wait, ("stream", "kernel"))):
            if value not in allowed:
                raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
        for name, value in (("AUTOTP_FUSED_CHUNK_ROWS", self.chunk_rows),
                            ("AUTOTP_FUSED_REDUCE_PROGRAMS", self.reduce_programs)):
            if value < 1:
                raise ValueError(f"{name}={value}: must be at least 1")


TUNING = FusedTuning()
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PLAN_CACHE = 128
"""Address plans a workspace keeps (least recently used dropped): variable-length batches make a plan per length."""
# torch 2.13's names for the flat collectives (the old ones warn on every call); torch 2.11 has only the old ones.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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
    """Pieces an op splits every owner's rows into: about TUNING.chunk_rows rows per piece over all owners
    together, at most MAX_CHUNKS."""
    return max(1, min(MAX_CHUNKS, round(S / TUNING.chunk_rows)))


def owner_range(o: int, S: int, world: int) -> tuple:
    """Rows [lo, hi) of the S rows that rank o reduces: its sequence shard (reduce-scatter) or its 1/W of the
    flattened rows (all-reduce)."""
    return (o * S) // world, ((o + 1) * S) // world


def piece_range(p: int, pieces: int, size: int) -> tuple:
    """Rows [lo, hi) of piece p of an owner's `size` rows, relative to the owner's first row."""
    return (p * size) // pieces, ((p + 1) * size) // pieces


def issue_order(me: int, world: int, pieces: int) -> list:
    """(piece, owner) in the order rank `me` computes them: piece by piece, and within a piece the owners
    rank-rotated from me + 1, its own rows last. At a given moment every rank pushes to a different peer (no two
    ranks write the same links' far end at once), and a piece's own rows, which only need the local store, come
    after the rows whose transfer then runs under them."""
    return [(p, (me + i) % world) for p in range(pieces) for i in range(1, world + 1)]


def _check_pairs(pairs):
    a0, b0 = pairs[0]
    for a, b in pairs:
        if a.dim() != 3 or b.dim() != 2 or a.shape[2] != b.shape[0] or b.shape[1] != b0.shape[1]:
            raise ValueError(f"fused matmul: operands {tuple(a.shape)} @ {tuple(b.shape)} do not fit "
                             f"[SEG, S, K] @ [K, {b0.shape[1]}]")
        if a.shape[:2] != a0.shape[:2] or a.dtype != a0.dtype or b.dtype != a0.dtype:
            raise ValueError("fused matmul: all operand pairs need the same [SEG, S] and dtype")
    if a0.dtype not in _DTYPES:
        raise ValueError(f"fused matmul: {a0.dtype} is not one of the fused ops' dtypes (float32, float16, bfloat16)")
    if a0.shape[0] > 65535:  # the reduction's grid has one row of programs per segment
        raise ValueError(f"fused matmul: {a0.shape[0]} segments; at most 65535")


@dataclass
class _Step:
    """One (piece, owner) of this rank's partial product: the GEMM rows and where they land."""
    rows: list      # [(segment, lo, hi)]: rows of the inputs a_i (absolute)
    outs: list      # [segment] -> the tensor the GEMM writes: the owner's slot for this rank (a peer's memory
                    # when pushed by the epilogue) or the local stage (pushed by the copy engine)
    copies: list    # [(dst, src, nbytes)]: copy-engine pushes of the stage into the owner's slot (copy mode)
    ready: Optional[int]  # the owner's READY(me, piece) flag address, None for this rank's own rows


@dataclass
class _ReducePlan:
    """What one (shape, epoch parity, push mode) of `matmul_reduce` issues, precomputed on its first call: GEMM
    targets, flag and copy addresses. A call's host time is then the launches and driver calls themselves."""
    steps: list          # [(piece, owner) in issue_order] -> _Step
    slots: torch.Tensor  # [W, SEG, R, N]: this rank's incoming slots, slot q = rank q's partial of my rows
    ready_waits: list    # [piece] -> flag addresses here: READY(q, piece) for every peer q
    ready_table: list    # [piece] -> the same, an int64 tensor (TUNING.wait == "kernel")
    mine: list           # [piece] -> (lo, hi): rows of my slots to reduce (relative to my first row)
    rdone: list          # [piece] -> flag addresses on the peers: RDONE(me, piece)        (all-reduce only)
    rdone_waits: list    # [piece] -> flag addresses here: RDONE(o, piece) of every peer  (all-reduce only)
    rdone_table: list
    collect: list        # [piece] -> [(dst byte offset in out, src, nbytes)]: peers' reduced rows (all-reduce)
    out_row0: list       # [piece] -> the output row where the piece's reduced rows start
    issuer: object = None  # the C++ ReduceIssuer over this plan (TUNING.native), made on first use


def slot_rows(S: int, world: int) -> int:
    return -(-S // world)


def reduce_bytes(seg: int, S: int, N: int, world: int, elem: int, push: str) -> int:
    """Per-parity data bytes of an op: W incoming slots, and in copy mode a local stage of the same size."""
    return (2 if push == "copy" else 1) * world * seg * slot_rows(S, world) * N * elem


def _reduce_plan(ws, seg: int, S: int, N: int, dtype: torch.dtype, scatter: bool, pieces: int, epoch: int,
                 push: str) -> _ReducePlan:
    world, me, elem = ws.world, ws.rank, dtype.itemsize
    R = slot_rows(S, world)
    slot_bytes = seg * R * N * elem
    row_bytes = N * elem

    def slots_of(rank, base):
        view = ws.region(rank, epoch)[base:base + world * slot_bytes]
        return view.view(dtype).view(world, seg, R, N)

    peers_slots = [slots_of(o, 0) for o in range(world)]
    stage = slots_of(me, world * slot_bytes) if push == "copy" else None
    plan = _ReducePlan([], peers_slots[me], [], [], [], [], [], [], [], [])
    for p, o in issue_order(me, world, pieces):
        o_lo, o_hi = owner_range(o, S, world)
        lo, hi = piece_range(p, pieces, o_hi - o_lo)
        rows = [(s, o_lo + lo, o_lo + hi) for s in range(seg)]
        copies = []
        if o == me or push == "epilogue":
            outs = [peers_slots[o][me, s, lo:hi] for s in range(seg)]
        else:
            outs = [stage[o, s, lo:hi] for s in range(seg)]
            offset = me * slot_bytes  # slot `me` of the owner
            copies = [(ws.data_ptr(o, epoch) + offset + (s * R + lo) * row_bytes,
                       ws.data_ptr(me, epoch) + world * slot_bytes + o * slot_bytes + (s * R + lo) * row_bytes,
                       (hi - lo) * row_bytes) for s in range(seg) if hi > lo]
        plan.steps.append(_Step(rows, outs, copies, None if o == me else ws.flag_addr(o, ready_index(me, p))))
    peers = [(me + i) % world for i in range(1, world)]
    m_lo, m_hi = owner_range(me, S, world)
    for p in range(pieces):
        plan.ready_waits.append([ws.flag_addr(me, ready_index(q, p)) for q in peers])
        plan.ready_table.append(torch.tensor(plan.ready_waits[-1], dtype=torch.int64, device=plan.slots.device))
        plan.mine.append(piece_range(p, pieces, m_hi - m_lo))
        plan.out_row0.append(plan.mine[-1][0] + (0 if scatter else m_lo))
        if scatter:
            continue
        plan.rdone.append([ws.flag_addr(o, rdone_index(me, p)) for o in peers])
        plan.rdone_waits.append([ws.flag_addr(me, rdone_index(o, p)) for o in peers])
        plan.rdone_table.append(torch.tensor(plan.rdone_waits[-1], dtype=torch.int64, device=plan.slots.device))
        collect = []
        for o in peers:  # all-reduce: one segment (matmul_reduce flattens), rank o's reduced rows in its slot o
            o_lo, o_hi = owner_range(o, S, world)
            lo, hi = piece_range(p, pieces, o_hi - o_lo)
            if hi > lo:
                collect.append(((o_lo + lo) * row_bytes, ws.data_ptr(o, epoch) + o * slot_bytes + lo * row_bytes,
                                (hi - lo) * row_bytes))
        plan.collect.append(collect)
    return plan


def _cached(ws, key, build):
    """ws.plans[key], built on first use; the least recently used plan goes past PLAN_CACHE. An evicted plan's
    ops are done with it: each op's side streams join the compute stream before the next op is issued."""
    plan = ws.plans.pop(key, None)
    if plan is None:
        plan = build()
    ws.plans[key] = plan  # most recent last
    while len(ws.plans) > PLAN_CACHE:
        ws.plans.pop(next(iter(ws.plans)))
    return plan


def _gemm_into(pairs, rows, outs, gemm: str):
    for (s, lo, hi), out in zip(rows, outs):
        for i, (a, b) in enumerate(pairs):
            _mm(a[s, lo:hi], b, out, i > 0, gemm)


def matmul_reduce(pairs, group, scatter: bool = False, gemm: str = "cublas", defer_join: bool = False):
    """sum_i a_i @ b_i over the group: all-reduced [SEG, S, N], or with `scatter` this rank's sequence slice
    [SEG, S/W, N]. With `defer_join` the compute stream is free to run more work (a weight gradient) before
    `join(group)` waits for the reduction's tail."""
    _check_pairs(pairs)
    a0, b0 = pairs[0]
    if not a0.is_cuda:  # no peer memory: the same function, unfused
        return sequential_matmul_reduce(pairs, group, scatter=scatter, gemm=gemm)
    shape = a0.shape
    if not scatter:  # an all-reduce's rows are rows, whatever the segments: one segment, fewest GEMM calls
        pairs = [(a.reshape(1, -1, a.shape[2]), b) for a, b in pairs]
        a0 = pairs[0][0]
    seg, S, N = a0.shape[0], a0.shape[1], b0.shape[1]
    # Accumulating into a peer's memory would read it back over NVLink: several products go through the stage.
    push = "copy" if len(pairs) > 1 else TUNING.push
    world = dist.get_world_size(group)
    if scatter and S % world:
        raise ValueError(f"fused reduce-scatter: sequence {S} is not divisible by {world} ranks")
    ws = symm.workspace(group, a0.device, reduce_bytes(seg, S, N, world, a0.element_size(), push))
    me = ws.rank
    epoch = ws.next_epoch()
    m_lo, m_hi = owner_range(me, S, world)
    out = torch.empty((seg, m_hi - m_lo if scatter else S, N), dtype=a0.dtype, device=a0.device)
    pieces = chunks(S)
    # Everything the issuer bakes in is in the key, the reduction's programs too (a sweep changes them in place).
    key = ("reduce", seg, S, N, a0.dtype, scatter, pieces, epoch % 2, push, TUNING.reduce_programs)
    plan = _cached(ws, key, lambda: _reduce_plan(ws, seg, S, N, a0.dtype, scatter, pieces, epoch, push))
    compute = torch.cuda.current_stream(a0.device).cuda_stream
    native = _native() if gemm == "cublas" and TUNING.wait == "stream" and TUNING.native else None
    try:
        if native is not None:
            if plan.issuer is None:
                plan.issuer = _issuer(native, ws, plan, pieces, scatter)
            plan.issuer.run([a for a, _ in pairs], [b for _, b in pairs], out, epoch, compute)
        else:
            _issue_python(ws, plan, pairs, out, epoch, compute, pieces, scatter, gemm)
    finally:  # even an op that failed half-issued is joined before the next one (its peers time out)
        _finish(ws, _side_streams(ws, plan, scatter), keep=[out], defer_join=defer_join, pieces=pieces)
    return out if scatter else out.view(*shape[:2], N)


def _side_streams(ws, plan: _ReducePlan, scatter: bool) -> list:
    """The streams an op of `plan` puts work on besides the compute stream, the reduction's first."""
    side = [ws.reduce_stream] + ([] if scatter else [ws.collect_stream])
    return side + ([ws.copy_stream] if any(step.copies for step in plan.steps) else [])


def _issue_python(ws, plan: _ReducePlan, pairs, out, epoch: int, compute: int, pieces: int, scatter: bool,
                  gemm: str) -> None:
    """The Python host path of `matmul_reduce` (the C++ one, `csrc/fused_issue.cpp`, issues the same work)."""
    world, me = ws.world, ws.rank
    pusher, reducer = ws.copy_stream.cuda_stream, ws.reduce_stream.cuda_stream
    collector = ws.collect_stream.cuda_stream
    start = ws.events("start", 1)[0]
    start.record(compute)  # the side streams start here: after the inputs and the previous op's join
    for stream in (reducer, collector) if not scatter else (reducer,):
        start.wait(stream)
    # Phase 1: every step's GEMM on the compute stream, each followed by its READY on the owner (epilogue push:
    # the GEMM stored straight into the owner's slot; copy push: the copy engine moves the stage first, on the
    # push stream). All of a rank's signals are issued before any of its waits, so no wait can sit in a
    # hardware queue ahead of a signal some peer needs (CUDA maps streams onto few queues).
    gemm_done = ws.events("gemm", len(plan.steps))
    own_done = ws.events("own", pieces)
    for index, (p, o) in enumerate(issue_order(me, world, pieces)):
        step = plan.steps[index]
        _gemm_into(pairs, step.rows, step.outs, gemm)
        if step.ready is None:
            own_done[p].record(compute)
        elif not step.copies:
            cuda_driver.write_value(compute, step.ready, epoch)
        else:
            gemm_done[index].record(compute)
            gemm_done[index].wait(pusher)
            for dst, src, nbytes in step.copies:
                cuda_driver.copy(pusher, dst, src, nbytes)
            cuda_driver.write_value(pusher, step.ready, epoch)
    # Phase 2, per piece: once this rank's own rows and every peer's READY are here, sum the W slots in rank
    # order (local memory only) into the output; an all-reduce also keeps the sum in slot `me` and raises RDONE,
    # and the collect stream pulls each owner's reduced rows with the copy engine.
    with torch.cuda.stream(ws.reduce_stream):
        for p in range(pieces):
            own_done[p].wait(reducer)
            _await_flags(reducer, plan.ready_waits[p], plan.ready_table[p], epoch)
            lo, hi = plan.mine[p]
            reduce_slots(plan.slots, (lo, hi), out, plan.out_row0[p], keep=None if scatter else me,
                         programs=TUNING.reduce_programs)
            if scatter:
                continue
            for addr in plan.rdone[p]:
                cuda_driver.write_value(reducer, addr, epoch)
    if not scatter:
        out_ptr = out.data_ptr()
        with torch.cuda.stream(ws.collect_stream):
            for p in range(pieces):
                _await_flags(collector, plan.rdone_waits[p], plan.rdone_table[p], epoch)
                for dst, src, nbytes in plan.collect[p]:
                    cuda_driver.copy(collector, out_ptr + dst, src, nbytes)


_NATIVE: dict = {}


def _native():
    """The `fused` C++ extension, or None (reported once) where it cannot be built or loaded."""
    if "module" not in _NATIVE:
        from autotp import _ext  # the extension loader; autotp imports this package only lazily

        try:
            _NATIVE["module"] = _ext.load("fused")
        except ImportError as error:
            import warnings

            warnings.warn(f"autotp fused ops: the C++ host path is unavailable ({error}); issuing from Python, "
                          "with several times the host time per op", stacklevel=3)
            _NATIVE["module"] = None
    return _NATIVE["module"]


def _issuer(native, ws, plan: _ReducePlan, pieces: int, scatter: bool):
    steps = [(p, [tuple(r) for r in step.rows], list(step.outs), list(step.copies), step.ready or 0)
             for (p, _), step in zip(issue_order(ws.rank, ws.world, pieces), plan.steps)]
    per_piece = [(plan.ready_waits[p], plan.mine[p][0], plan.mine[p][1], plan.out_row0[p],
                  [] if scatter else plan.rdone[p], [] if scatter else plan.rdone_waits[p],
                  [] if scatter else plan.collect[p]) for p in range(pieces)]
    return native.ReduceIssuer(steps, per_piece, plan.slots, scatter, ws.rank, ws.copy_stream.cuda_stream,
                               ws.reduce_stream.cuda_stream, ws.collect_stream.cuda_stream, TUNING.reduce_programs)


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
    if not x_shard.is_contiguous():
        raise ValueError(f"all_gather_matmul: the shard must be contiguous, got strides {x_shard.stride()}")
    seg, s_own, K = x_shard.shape
    for b in weights:
        if b.dim() != 2 or b.shape[0] != K or b.dtype != x_shard.dtype:
            raise ValueError(f"all_gather_matmul: weight {tuple(b.shape)} {b.dtype} does not fit [{K}, N] "
                             f"{x_shard.dtype}")
    if x_shard.dtype not in _DTYPES:
        raise ValueError(f"all_gather_matmul: {x_shard.dtype} is not one of the fused ops' dtypes (float32, "
                         "float16, bfloat16)")
    elem = x_shard.element_size()
    ws = symm.workspace(group, x_shard.device, x_shard.numel() * elem)
    world, me = ws.world, ws.rank
    epoch = ws.next_epoch()
    compute = torch.cuda.current_stream(x_shard.device)
    x_full = torch.empty((seg, world * s_own, K), dtype=x_shard.dtype, device=x_shard.device)
    ys = [torch.empty((seg, world * s_own, b.shape[1]), dtype=x_shard.dtype, device=x_shard.device)
          for b in weights]
    handle, copy = compute.cuda_stream, ws.copy_stream.cuda_stream
    native = _native() if gemm == "cublas" and TUNING.native else None
    try:
        if native is not None:
            issuer = _cached(ws, ("gather", epoch % 2), lambda: native.GatherIssuer(
                me, [ws.data_ptr(q, epoch) for q in range(world)],
                [0 if q == me else ws.flag_addr(q, shard_index(me)) for q in range(world)],
                [0 if q == me else ws.flag_addr(me, shard_index(q)) for q in range(world)], copy,
                x_shard.device.index))
            issuer.run(x_shard, x_full, list(weights), ys, epoch, handle)
        else:
            _gather_python(ws, x_shard, x_full, ys, weights, epoch, handle, copy, gemm)
    finally:
        _finish(ws, [ws.copy_stream], keep=[x_full], defer_join=False)
    return x_full, ys


def _gather_python(ws, x_shard, x_full, ys, weights, epoch: int, handle: int, copy: int, gemm: str) -> None:
    """The Python host path of `all_gather_matmul` (the C++ one, `GatherIssuer`, issues the same work)."""
    world, me = ws.world, ws.rank
    seg, s_own, K = x_shard.shape
    elem = x_shard.element_size()
    ws.data_view(me, epoch, (seg, s_own, K), x_shard.dtype).copy_(x_shard)
    for q in range(world):
        if q != me:
            cuda_driver.write_value(handle, ws.flag_addr(q, shard_index(me)), epoch)
    x_full[:, me * s_own:(me + 1) * s_own].copy_(x_shard)
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
    for i in range(1, world):
        src = (me + i) % world
        arrived[src].wait(handle)
        multiply(src)


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
