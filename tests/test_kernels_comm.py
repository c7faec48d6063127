"""The fused collectives' pieces that run without a GPU: the owner's reduction kernel under TRITON_INTERPRET=1,
the chunk plan, and the watchdog that turns a stalled op into an error.

The reduction is checked bit for bit against fp32 accumulation in rank order 0..W-1 rounded once: the kernel
promises exactly that order, and every rank must hold identical bits (no tolerance: same operations, same order).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from autotp_kernels import symm  # noqa: E402
from autotp_kernels.comm_kernels import reduce_slots  # noqa: E402
from autotp_kernels.fused import MAX_CHUNKS, chunks, issue_order, owner_range, piece_range  # noqa: E402
from autotp_kernels.watchdog import Watchdog  # noqa: E402


def _rank_ordered_sum(parts):
    acc = torch.zeros(parts[0].shape, dtype=torch.float32)
    for p in parts:
        acc += p.float()
    return acc.to(parts[0].dtype)


@pytest.mark.parametrize("world,seg,R,lo,hi,N", [(2, 1, 8, 2, 6, 5), (4, 2, 12, 3, 7, 33), (3, 1, 130, 5, 128, 123),
                                                 (8, 3, 9, 0, 9, 4), (4, 1, 6, 2, 2, 3)])
# No bfloat16 here: the Triton interpreter (numpy has no bfloat16) truncates the fp32 sum where the GPU rounds to
# nearest, so its bits differ by design; on the GPU tests/gpu/fused_check.py matches the CUDA and Triton kernels
# bit for bit in bfloat16, fp16 and fp32.
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("keep", [None, 1])
@pytest.mark.parametrize("programs", [2, 64])
def test_reduce_slots_is_the_rank_ordered_sum_of_every_slot(world, seg, R, lo, hi, N, dtype, keep, programs):
    """With 2 programs each strides over many blocks, with 64 each has at most one; `keep` stores the sum into
    that slot too (the all-reduce's copy for the peers) and nowhere else."""
    gen = torch.Generator().manual_seed(world * 100 + N)
    slots = torch.randn(world, seg, R, N, generator=gen).to(dtype)  # slot q: rank q's partial of these rows
    before = slots.clone()
    expected = _rank_ordered_sum([before[q, :, lo:hi] for q in range(world)])
    out = torch.full((seg, R + 3, N), float("nan"), dtype=dtype)  # larger than the piece: rows land at row 2
    reduce_slots(slots, (lo, hi), out, 2, keep=keep, block=16, programs=programs)
    assert torch.equal(out[:, 2:2 + hi - lo], expected)
    assert out[:, :2].isnan().all() and out[:, 2 + hi - lo:].isnan().all()
    for q in range(world):
        if q == keep:
            assert torch.equal(slots[q, :, lo:hi], expected)
        else:
            assert torch.equal(slots[q, :, lo:hi], before[q, :, lo:hi]), f"slot {q}"
        assert torch.equal(slots[q, :, :lo], before[q, :, :lo]) and torch.equal(slots[q, :, hi:], before[q, :, hi:])


def test_reduce_slots_rejects_an_output_whose_rows_are_not_contiguous():
    with pytest.raises(ValueError, match="contiguous rows"):
        reduce_slots(torch.zeros(2, 1, 4, 3), (0, 4), torch.zeros(1, 4, 6)[:, :, :3], 0)


@pytest.mark.parametrize("S,world,chunk_rows", [(8192, 4, 2048), (4096, 2, 1024), (100, 3, 7), (7, 4, 2048),
                                                (16384, 8, 128), (13, 8, 1)])
def test_pieces_give_every_row_to_exactly_one_owner_once(S, world, chunk_rows, monkeypatch):
    from autotp_kernels import fused

    monkeypatch.setattr(fused.TUNING, "chunk_rows", chunk_rows)
    pieces = chunks(S)
    assert 1 <= pieces <= MAX_CHUNKS
    covered = torch.zeros(S, dtype=torch.int32)
    for o in range(world):
        o_lo, o_hi = owner_range(o, S, world)
        assert o_hi - o_lo in (S // world, -(-S // world))  # owners differ by at most one row
        for p in range(pieces):
            lo, hi = piece_range(p, pieces, o_hi - o_lo)
            assert 0 <= lo <= hi <= o_hi - o_lo
            covered[o_lo + lo:o_lo + hi] += 1
    assert torch.equal(covered, torch.ones(S, dtype=torch.int32))


@pytest.mark.parametrize("world,pieces", [(2, 1), (4, 3), (8, 2)])
def test_issue_order_rotates_owners_and_keeps_own_rows_last(world, pieces):
    orders = [issue_order(me, world, pieces) for me in range(world)]
    for me, order in enumerate(orders):
        assert sorted(order) == [(p, o) for p in range(pieces) for o in range(world)]
        for p in range(pieces):
            owners = [o for q, o in order if q == p]
            assert owners[-1] == me and owners == [(me + i) % world for i in range(1, world + 1)]
    for step in range(world * pieces):  # at each step the W ranks push to W different owners
        assert len({order[step][1] for order in orders}) == world


class _Event:
    def __init__(self):
        self.finished = False

    def query(self):
        return self.finished


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _manual_watchdog():
    clock = _Clock()
    dog = Watchdog(clock=clock)
    dog._thread = object()  # polled by hand below: no thread
    return dog, clock


def test_watchdog_retires_finished_ops_without_firing():
    dog, clock = _manual_watchdog()
    fired = []
    events = [_Event() for _ in range(3)]
    for e in events:
        dog.watch(e, 5.0, fired.append)
    events[0].finished = events[1].finished = True
    clock.now = 1.0
    dog.poll()
    assert dog.pending() == 1 and fired == []
    events[2].finished = True
    clock.now = 100.0  # past the deadline, but finished: not a timeout
    dog.poll()
    assert dog.pending() == 0 and fired == []


def test_watchdog_fires_once_for_an_op_past_its_deadline():
    dog, clock = _manual_watchdog()
    fired = []
    stuck, later = _Event(), _Event()
    dog.watch(stuck, 5.0, fired.append)
    dog.watch(later, 5.0, fired.append)
    clock.now = 4.9
    dog.poll()
    assert fired == []
    clock.now = 5.1
    dog.poll()
    assert fired == [5.0]  # the stuck op; the next one is still within its own deadline
    later.finished = True  # its waits were released by the first timeout
    dog.poll()
    assert fired == [5.0] and dog.pending() == 0


def test_watchdog_thread_fires_on_its_own():
    import threading

    dog = Watchdog(poll_s=0.001)
    fired = threading.Event()
    dog.watch(_Event(), 0.01, lambda waited: fired.set())
    assert fired.wait(5.0), "the watchdog thread never fired"  # 5 s: generous for a loaded 2-core CI machine


def test_flag_words_do_not_overlap():
    ranges = [(symm.ready_index(0, 0), symm.ready_index(symm.MAX_RANKS - 1, MAX_CHUNKS - 1)),
              (symm.rdone_index(0, 0), symm.rdone_index(symm.MAX_RANKS - 1, MAX_CHUNKS - 1)),
              (symm.shard_index(0), symm.shard_index(symm.MAX_RANKS - 1)), (symm.PROBE_OFF, symm.PROBE_OFF)]
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:]):
        assert hi < next_lo
    assert symm.PROBE_OFF < symm.FLAG_WORDS and symm.FLAG_BYTES % 256 == 0


def test_wait_flags_returns_once_every_flag_reaches_the_epoch():
    import threading

    from autotp_kernels.comm_kernels import wait_flags

    flags = torch.tensor([7, 3, 9], dtype=torch.int32)
    addrs = torch.tensor([flags.data_ptr() + 4 * i for i in (0, 1, 2)], dtype=torch.int64)
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (wait_flags(addrs, 7), done.set()), daemon=True)
    waiter.start()
    assert not done.wait(0.5)  # flag 1 is behind: still polling
    flags[1] = 7
    assert done.wait(30)
    flags.copy_(torch.tensor([-2**31, -2**31 + 1, 2**31 - 1], dtype=torch.int32))
    wait_flags(addrs, 2**31 - 1)  # epochs compare cyclically: values just past the int32 wrap are ahead
