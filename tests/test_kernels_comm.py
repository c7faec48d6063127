"""The fused collectives' reduction kernel under TRITON_INTERPRET=1, with W ranks simulated in one process.

Each simulated rank has its own flag words and partial buffer (plain CPU tensors; the kernel reaches peers
through the same address tables it uses on GPUs). Ranks run the reduce phase in turn, then the gather phase, so
no wait ever spins. The sum is checked bit for bit against fp32 accumulation in rank order 0..W-1 rounded once:
the kernel promises exactly that order, and every rank must hold identical bits.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from autotp_kernels import symm  # noqa: E402
from autotp_kernels.comm_kernels import reduce_chunks_kernel, ready_index  # noqa: E402
from autotp_kernels.fused import _chunk_rows, _pieces, alignment  # noqa: E402

EPOCH = 7


def _ranks(world, seg, S, N, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    partials = [torch.randn(seg, S, N, generator=gen).to(dtype) for _ in range(world)]
    flags = [torch.zeros(symm.FLAG_WORDS, dtype=torch.int32) for _ in range(world)]
    data_table = torch.tensor([p.data_ptr() for p in partials], dtype=torch.int64)
    flag_table = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    return partials, flags, data_table, flag_table


def _expected(partials):
    acc = torch.zeros(partials[0].shape, dtype=torch.float32)
    for p in partials:
        acc += p.float()
    return acc.to(partials[0].dtype)


def _run(world, seg, S, N, pieces, dtype, scatter, ctas=3, block=16, seed=0, ready=True):
    partials, flags, data_table, flag_table = _ranks(world, seg, S, N, dtype, seed)
    expected = _expected(partials)
    if ready:
        for f in flags:
            for q in range(world):
                for c in range(world * pieces):
                    f[ready_index(q, c)] = EPOCH
    rows = [((r + 1) * S) // world - (r * S) // world for r in range(world)]
    outs = [torch.full((seg, rows[r] if scatter else S, N), float("nan"), dtype=dtype) for r in range(world)]
    for do_reduce, do_gather in ((True, False), (False, True)):
        for rank in range(world):
            reduce_chunks_kernel[(ctas,)](data_table, outs[rank], flag_table, rank, EPOCH, 50, seg, S, N, pieces,
                                          0, world * pieces, W=world, SIGNAL_READY=ready, ALL_GATHER=not scatter,
                                          DO_REDUCE=do_reduce, DO_GATHER=do_gather, BLOCK=block,
                                          ALIGN=alignment(N, partials[0].element_size()), TIMER=False)
    return outs, expected, flags, rows


@pytest.mark.parametrize("world,seg,S,N,pieces", [(2, 1, 8, 5, 2), (4, 2, 12, 7, 3), (3, 1, 10, 33, 2),
                                                   (4, 1, 6, 3, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_all_reduce_is_the_rank_ordered_sum_on_every_rank(world, seg, S, N, pieces, dtype):
    outs, expected, flags, _ = _run(world, seg, S, N, pieces, dtype, scatter=False)
    for rank, out in enumerate(outs):
        assert torch.equal(out, expected), f"rank {rank}"
        assert int(flags[rank][symm.ERROR_OFF]) == 0


@pytest.mark.parametrize("world,seg,S,N,pieces", [(2, 1, 8, 5, 2), (4, 2, 12, 7, 3), (4, 3, 8, 9, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reduce_scatter_keeps_each_rank_its_sequence_slice(world, seg, S, N, pieces, dtype):
    outs, expected, _, rows = _run(world, seg, S, N, pieces, dtype, scatter=True)
    for rank, out in enumerate(outs):
        start = sum(rows[:rank])
        assert torch.equal(out, expected[:, start:start + rows[rank]]), f"rank {rank}"


def test_a_missing_peer_times_out_into_an_error_code_instead_of_hanging():
    outs, _, flags, _ = _run(2, 1, 4, 3, 1, torch.float32, scatter=False, ready=False)
    assert [int(f[symm.ERROR_OFF]) for f in flags] == [2, 2]  # the reduce wait (1) then the gather wait (2)


@pytest.mark.parametrize("S,world", [(8192, 4), (4096, 2), (100, 3), (7, 4), (16384, 8)])
def test_chunks_tile_the_rows_exactly_once(S, world):
    pieces = _pieces(S, world)
    covered = torch.zeros(S, dtype=torch.int32)
    for c in range(world * pieces):
        lo, hi = _chunk_rows(c, S, world, pieces)
        owner = c % world
        assert (owner * S) // world <= lo <= hi <= ((owner + 1) * S) // world
        covered[lo:hi] += 1
    assert torch.equal(covered, torch.ones(S, dtype=torch.int32))
    assert world * pieces <= symm.MAX_CHUNKS
