"""The fused all-reduce / reduce-scatter's plan (`fused._reduce_plan`), executed on the CPU.

On the GPU each rank's GEMMs store into the owners' slots (peer memory), or into a local stage the copy engine
pushes, and flag words order the reduction and the all-reduce's pulls. Here W simulated ranks share one process:
their symmetric buffers are CPU tensors, the GEMMs write the very views the plan holds, each copy is a memmove
between the real addresses the plan computed, and pieces run in the order the flags enforce (a piece's
reduction after every rank's GEMMs of that piece, the pulls after every owner's reduction). Every rank must end
with the full sum (all-reduce) or its own sequence slice of it (reduce-scatter), and every flag a rank waits for
must be one a peer writes. Inputs are small integers, so every sum is exact in fp16 and fp32 whatever the order:
this checks where rows go; test_kernels_comm checks the reduction's order bit for bit.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

pytest.importorskip("triton")

from autotp_kernels import fused  # noqa: E402
from autotp_kernels.comm_kernels import reduce_slots  # noqa: E402
from autotp_kernels.symm import rdone_index, ready_index  # noqa: E402


class _FakeWorkspace:
    """What `_reduce_plan` reads from a `symm.Workspace`, over CPU tensors shared by the simulated ranks."""

    def __init__(self, world, rank, buffers):
        self.world, self.rank, self.buffers = world, rank, buffers

    def flag_addr(self, rank, index):
        return rank * 1_000_000 + index

    def region(self, rank, epoch):
        return self.buffers[epoch % 2][rank]

    def data_ptr(self, rank, epoch):
        return self.region(rank, epoch).data_ptr()


def _ints(*shape, gen):
    return torch.randint(-2, 3, shape, generator=gen).float()


def _run(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch, push, n_pairs, monkeypatch):
    monkeypatch.setattr(fused.TUNING, "chunk_rows", chunk_rows)
    gen = torch.Generator().manual_seed(world * 1000 + S)
    if not scatter:  # matmul_reduce flattens an all-reduce's segments
        S, seg = seg * S, 1
    nbytes = fused.reduce_bytes(seg, S, N, world, dtype.itemsize, push)
    # Both parities' buffers start as garbage (0xFF bytes are NaN): the plan must use only the current epoch's.
    buffers = [[torch.full((nbytes,), 0xFF, dtype=torch.uint8) for _ in range(world)] for _ in range(2)]
    pairs = [[(_ints(seg, S, K, gen=gen).to(dtype), _ints(K, N, gen=gen).to(dtype)) for _ in range(n_pairs)]
             for _ in range(world)]
    total = sum(a.float() @ b.float() for rank_pairs in pairs for a, b in rank_pairs).to(dtype)
    pieces = fused.chunks(S)
    plans = [fused._reduce_plan(_FakeWorkspace(world, r, buffers), seg, S, N, dtype, scatter, pieces, epoch, push)
             for r in range(world)]
    outs = [torch.full((seg, S // world if scatter else S, N), float("nan"), dtype=dtype) for _ in range(world)]
    for p in range(pieces):  # the order the flags enforce
        for r, plan in enumerate(plans):
            for (q, o), step in zip(fused.issue_order(r, world, pieces), plan.steps):
                if q == p:
                    fused._gemm_into(pairs[r], step.rows, step.outs, "cublas")
                    for dst, src, size in step.copies:
                        ctypes.memmove(dst, src, size)
        _assert_disjoint_writes(plans, world, pieces, p)
        for r, plan in enumerate(plans):
            reduce_slots(plan.slots, plan.mine[p], outs[r], plan.out_row0[p], keep=None if scatter else r, block=8,
                         programs=3)
        if not scatter:
            for r, plan in enumerate(plans):
                for dst, src, size in plan.collect[p]:
                    ctypes.memmove(outs[r].data_ptr() + dst, src, size)
    # The other parity's buffers are the previous op's, which a slower peer may still read: never touched.
    assert all(bool((b == 0xFF).all()) for b in buffers[(epoch + 1) % 2])
    return plans, outs, total, pieces


def _assert_disjoint_writes(plans, world, pieces, p):
    """Within piece p, no two ranks' GEMM outputs or pushes land on the same bytes (each owner slot q is written
    by rank q alone, each stage by its own rank)."""
    spans = []
    for r, plan in enumerate(plans):
        for (q, _), step in zip(fused.issue_order(r, world, pieces), plan.steps):
            if q != p:
                continue
            spans += [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in step.outs if t.numel()]
            spans += [(dst, dst + size) for dst, _, size in step.copies]
    spans.sort()
    assert all(a_hi <= b_lo for (_, a_hi), (b_lo, _) in zip(spans, spans[1:])), "overlapping writes"


@pytest.mark.parametrize("world,seg,S,K,N,chunk_rows", [(2, 1, 64, 8, 16, 16), (4, 2, 40, 5, 12, 8),
                                                        (3, 1, 13, 4, 7, 4), (4, 1, 6, 3, 5, 1),
                                                        (8, 2, 64, 4, 3, 16)])
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("dtype,epoch,push,n_pairs", [(torch.float32, 1, "epilogue", 1),
                                                      (torch.float16, 2, "copy", 1),
                                                      (torch.float32, 3, "copy", 2)])
def test_plan_moves_every_row_to_every_rank_that_needs_it(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch,
                                                           push, n_pairs, monkeypatch):
    if scatter and S % world:
        pytest.skip("reduce-scatter needs the sequence divisible by the ranks (matmul_reduce refuses it)")
    plans, outs, total, pieces = _run(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch, push, n_pairs,
                                      monkeypatch)
    assert pieces > 1 or S * (1 if scatter else seg) < 2 * chunk_rows
    assert all(bool(step.copies) == (push == "copy" and step.ready is not None) or not any(
        hi > lo for _, lo, hi in step.rows) for plan in plans for step in plan.steps)
    for r, out in enumerate(outs):
        rows = S * (1 if scatter else seg)
        want = total[:, r * (S // world):(r + 1) * (S // world)] if scatter else total
        assert out.shape[1] == (S // world if scatter else rows)
        assert torch.equal(out, want), f"rank {r} of {world}"


@pytest.mark.parametrize("scatter", [False, True])
def test_every_awaited_flag_is_written_by_the_peer_it_names(scatter, monkeypatch):
    world, S = 4, 32
    plans, _, _, pieces = _run(world, 1, S, 4, 8, 8, scatter, torch.float32, 1, "epilogue", 1, monkeypatch)
    addr = _FakeWorkspace(world, 0, None).flag_addr
    for p in range(pieces):
        written = sorted(step.ready for r, plan in enumerate(plans)
                         for (q, _), step in zip(fused.issue_order(r, world, pieces), plan.steps)
                         if q == p and step.ready is not None)
        awaited = sorted(a for plan in plans for a in plan.ready_waits[p])
        assert written == awaited == sorted(addr(o, ready_index(q, p)) for o in range(world) for q in range(world)
                                            if q != o)
        if not scatter:
            written = sorted(a for plan in plans for a in plan.rdone[p])
            awaited = sorted(a for plan in plans for a in plan.rdone_waits[p])
            assert written == awaited == sorted(addr(o, rdone_index(q, p)) for o in range(world)
                                                for q in range(world) if q != o)


class _RecordingNative:
    """Stands in for the C++ extension: keeps what `fused._issuer` hands to ReduceIssuer."""

    class ReduceIssuer:
        def __init__(self, steps, pieces, slots, scatter, me, pusher, reducer, collector, programs):
            self.args = dict(steps=steps, pieces=pieces, slots=slots, scatter=scatter, me=me, streams=(
                pusher, reducer, collector), programs=programs)


class _Stream:
    def __init__(self, handle):
        self.cuda_stream = handle


@pytest.mark.parametrize("scatter", [False, True])
def test_the_cpp_issuer_gets_the_plan_field_for_field(scatter, monkeypatch):
    """`_issuer`'s tuples are positional: each field of each step and piece must be the plan's (a swapped
    rdone / rdone_waits would hang the GPU until the watchdog fires)."""
    world, S, pieces = 4, 32, 0
    plans, _, _, pieces = _run(world, 1, S, 4, 8, 8, scatter, torch.float32, 1, "copy", 1, monkeypatch)
    ws = _FakeWorkspace(world, 2, None)
    ws.copy_stream, ws.reduce_stream, ws.collect_stream = _Stream(11), _Stream(12), _Stream(13)
    plan = plans[2]
    args = fused._issuer(_RecordingNative, ws, plan, pieces, scatter).args
    assert args["me"] == 2 and args["scatter"] == scatter and args["slots"] is plan.slots
    assert args["streams"] == (11, 12, 13) and args["programs"] == fused.TUNING.reduce_programs
    for (piece, _), step, passed in zip(fused.issue_order(2, world, pieces), plan.steps, args["steps"]):
        assert passed[0] == piece and passed[1] == [tuple(r) for r in step.rows]
        assert all(a is b for a, b in zip(passed[2], step.outs)) and passed[3] == step.copies
        assert passed[4] == (step.ready or 0)
    for p, passed in enumerate(args["pieces"]):
        assert passed[0] == plan.ready_waits[p] and passed[1:4] == (*plan.mine[p], plan.out_row0[p])
        if scatter:
            assert passed[4:] == ([], [], [])
        else:
            assert passed[4:] == (plan.rdone[p], plan.rdone_waits[p], plan.collect[p])
