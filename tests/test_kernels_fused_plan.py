"""The fused all-reduce / reduce-scatter's address plan (`fused._reduce_plan`), executed on the CPU.

On the GPU each rank's reduction kernel reaches the W ranks' symmetric buffers through the plan's address table
and the collect copies are local copy-engine transfers, ordered by flag words. Here W simulated ranks share one
process: their buffers are CPU tensors, the kernel runs under TRITON_INTERPRET=1 over the same table, each copy
is a memmove between the real addresses the plan computed, and chunks run in the order the flags enforce
(reductions after every GEMM, collects after every owner's reduction). Every rank must end with the exact rank-ordered sum (all-reduce) or its own sequence
slice of it (reduce-scatter), and every flag a rank waits for must be one a peer writes. No tolerance: the
reduction sums in fp32 in rank order on every path, so the bits are fixed.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

pytest.importorskip("triton")

from autotp_kernels import fused  # noqa: E402
from autotp_kernels.comm_kernels import reduce_peers  # noqa: E402
from autotp_kernels.symm import rdone_index, ready_index  # noqa: E402


class _FakeWorkspace:
    """What `_reduce_plan` reads from a `symm.Workspace`, over CPU tensors shared by the simulated ranks."""

    def __init__(self, world, rank, buffers):
        self.world, self.rank, self.buffers = world, rank, buffers

    def flag_addr(self, rank, index):
        return rank * 1_000_000 + index

    def data_ptr(self, rank, epoch):
        return self.buffers[epoch % 2][rank].data_ptr()


def _run(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch, monkeypatch):
    monkeypatch.setattr(fused.TUNING, "chunk_rows", chunk_rows)
    gen = torch.Generator().manual_seed(world * 1000 + S)
    nbytes = seg * S * N * dtype.itemsize
    # Both parities' buffers start as garbage (0xFF bytes are NaN): the plan must use only the current epoch's.
    buffers = [[torch.full((nbytes,), 0xFF, dtype=torch.uint8) for _ in range(world)] for _ in range(2)]
    views = [b.view(dtype).view(seg, S, N) for b in buffers[epoch % 2]]
    total = torch.zeros(seg, S, N)
    for view in views:  # each rank's GEMM; the sum in rank order, fp32, rounded once: the kernel's promise
        view.copy_(torch.randn(seg, S, K, generator=gen) @ torch.randn(K, N, generator=gen))
        total += view.float()
    total = total.to(dtype)
    pieces = fused.chunks(S)
    plans = [fused._reduce_plan(_FakeWorkspace(world, r, buffers), views[r], S, N, scatter, pieces, epoch)
             for r in range(world)]
    outs = [torch.full((seg, S // world if scatter else S, N), float("nan"), dtype=dtype) for _ in range(world)]
    for j in range(pieces):  # the order the flags enforce
        for r, plan in enumerate(plans):
            out_row0 = plan.mine[j][0] - r * (S // world)
            reduce_peers(plan.table, views[r], N, plan.mine[j], seg, S * N, out=outs[r] if scatter else None,
                         out_row0=out_row0, block=8, programs=3)
        if not scatter:
            for r, plan in enumerate(plans):
                for dst, src, size in plan.collect[j]:
                    ctypes.memmove(outs[r].data_ptr() + dst, src, size)
    return plans, outs, total, pieces


@pytest.mark.parametrize("world,seg,S,K,N,chunk_rows", [(2, 1, 64, 8, 16, 16), (4, 2, 40, 5, 12, 8),
                                                        (3, 1, 13, 4, 7, 4), (4, 1, 6, 3, 5, 1),
                                                        (8, 2, 64, 4, 3, 16)])
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("dtype,epoch", [(torch.float32, 1), (torch.float16, 2)])
def test_plan_moves_every_row_to_every_rank_that_needs_it(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch,
                                                           monkeypatch):
    if scatter and S % world:
        pytest.skip("reduce-scatter needs the sequence divisible by the ranks (matmul_reduce refuses it)")
    _, outs, total, pieces = _run(world, seg, S, K, N, chunk_rows, scatter, dtype, epoch, monkeypatch)
    assert pieces > 1 or S < 2 * chunk_rows
    for r, out in enumerate(outs):
        want = total[:, r * (S // world):(r + 1) * (S // world)] if scatter else total
        assert torch.equal(out, want), f"rank {r} of {world}"


@pytest.mark.parametrize("scatter", [False, True])
def test_every_awaited_flag_is_written_by_the_peer_it_names(scatter, monkeypatch):
    world, S = 4, 32
    plans, _, _, pieces = _run(world, 1, S, 4, 8, 8, scatter, torch.float32, 1, monkeypatch)
    addr = _FakeWorkspace(world, 0, None).flag_addr
    for j in range(pieces):
        written = sorted(a for plan in plans for a in plan.ready[j])
        awaited = sorted(a for plan in plans for a in plan.ready_waits[j])
        assert written == awaited == sorted(addr(o, ready_index(q, j)) for o in range(world) for q in range(world)
                                            if q != o)
        if not scatter:
            written = sorted(a for plan in plans for a in plan.rdone[j])
            awaited = sorted(a for plan in plans for a in plan.rdone_waits[j])
            assert written == awaited == sorted(addr(o, rdone_index(q, j)) for o in range(world)
                                                for q in range(world) if q != o)
