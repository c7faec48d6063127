"""Peer-to-peer workspace for the fused GEMM + collective ops: one per (TP group, device).

One symmetric-memory allocation per rank (PyTorch `symm_mem`, peer-to-peer mappings only, no multicast) holds
  [ flags: FLAG_WORDS int32 | data, parity 0 | data, parity 1 ]
and every rank maps every peer's allocation: a GEMM stores into a peer's slot and the copy engine reads a
peer's data at its mapped address, and a stream writes a peer's flag word with `cuda_driver.write_value`. Ranks wait with stream
waits (or, with TUNING.wait = "kernel", a one-warp polling kernel on the side stream).

Synchronisation is by epochs, never by resets: each fused op takes the next epoch e, writes its flags with the
value e and waits for `flag >= e`. Data buffers alternate by the parity of e. That is safe without an extra
barrier because during op e+1 every rank waits for a flag from every peer that the peer wrote after it finished
all of op e (each op's side streams join the compute stream before the next op starts), so when op e+2
overwrites parity e % 2 nobody still reads it.

Flag words (int32, in each rank's own allocation; written by the rank named):
  READY[q * MAX_CHUNKS + j]  rank q's partial product of this rank's piece j is in this rank's slot q
  RDONE[o * MAX_CHUNKS + j]  rank o reduced its rows of piece j into its own slot o (all-reduce: the others
                             copy them)
  XREADY[q]                  rank q's input shard is in its data buffer (all-gather + GEMM)

A failure is recorded on the host (`fail`, called by the watchdog when an op outlives its timeout): the flags of
this rank are set past every epoch so queued waits (stream or polling) drain, and `check_errors` raises.
"""

from __future__ import annotations

import importlib.util
import math
import threading
import warnings
from typing import Optional

import torch
import torch.distributed as dist

from . import cuda_driver

MAX_RANKS = 8
MAX_CHUNKS = 64
READY_OFF = 0
RDONE_OFF = READY_OFF + MAX_RANKS * MAX_CHUNKS
XREADY_OFF = RDONE_OFF + MAX_RANKS * MAX_CHUNKS
PROBE_OFF = XREADY_OFF + MAX_RANKS
FLAG_WORDS = -(-(PROBE_OFF + 1) // 64) * 64  # padded: data starts 256-byte aligned
FLAG_BYTES = FLAG_WORDS * 4
POISON_AHEAD = 1 << 30  # a failed rank's flags read as this many epochs ahead: every later wait passes

_HAS_SYMM_MEM = importlib.util.find_spec("torch.distributed._symmetric_memory") is not None
_workspaces: dict = {}
_retired: list = []  # outgrown workspaces stay mapped: a slower peer may still read them


def ready_index(rank: int, chunk: int) -> int:
    return READY_OFF + rank * MAX_CHUNKS + chunk


def rdone_index(rank: int, chunk: int) -> int:
    return RDONE_OFF + rank * MAX_CHUNKS + chunk


def shard_index(rank: int) -> int:
    return XREADY_OFF + rank


class FusedCommError(RuntimeError):
    """A fused TP collective timed out waiting for a peer (the peer failed or never reached the same op)."""


class Workspace:
    def __init__(self, group, device: torch.device, data_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem

        self.group = group
        self.group_name = group.group_name
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if self.world > MAX_RANKS:
            raise ValueError(f"fused TP kernels support up to {MAX_RANKS} ranks per TP group, got {self.world}")
        self.device = device
        self.data_bytes = -(-data_bytes // 256) * 256
        total = FLAG_BYTES + 2 * self.data_bytes
        self.buffer = symm_mem.empty(total, dtype=torch.uint8, device=device)
        self.buffer[:FLAG_BYTES].zero_()
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed by torch <= 2.8, a deprecated no-op later
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                symm_mem.enable_symm_mem_for_group(self.group_name)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        peers = self._peer_views(total)
        self._check_mapping(peers)
        self.flags = [p[:FLAG_BYTES].view(torch.int32) for p in peers]
        self.flag_ptrs = [f.data_ptr() for f in self.flags]
        self.data = [[p[FLAG_BYTES + i * self.data_bytes:FLAG_BYTES + (i + 1) * self.data_bytes] for p in peers]
                     for i in range(2)]
        self.data_ptrs = [[d.data_ptr() for d in self.data[i]] for i in range(2)]
        self.epoch = 0
        # High priority: the reduction's programs start ahead of the GEMM's next tiles, so chunk j's sum runs
        # under chunk j+1's GEMM instead of after the whole GEMM.
        self.reduce_stream = torch.cuda.Stream(device=device, priority=-1)
        self.collect_stream = torch.cuda.Stream(device=device, priority=-1)
        self.copy_stream = torch.cuda.Stream(device=device, priority=-1)
        self.rescue_stream = torch.cuda.Stream(device=device)
        self.pending: Optional[torch.cuda.Event] = None
        self.keep: list = []  # tensors the side streams still write until `join`
        self._events: dict = {}
        self.plans: dict = {}  # fused.py's per-shape address plans, keyed by shape and epoch parity
        self.error: Optional[str] = None

    def _peer_views(self, total: int) -> list:
        """Every rank's copy of this buffer. The tensor may sit at an offset inside its symmetric allocation
        (pooled allocators), and torch versions differ in which API accounts for it: take the first view whose
        own-rank copy is this rank's tensor."""
        handle, mine = self.handle, self.buffer.data_ptr()
        candidates = []
        if hasattr(handle, "get_remote_tensor"):
            candidates.append(lambda q: handle.get_remote_tensor(q, (total,), torch.uint8))
        offset = mine - handle.buffer_ptrs[self.rank]
        candidates.append(lambda q: handle.get_buffer(q, (total,), torch.uint8, offset))
        candidates.append(lambda q: handle.get_buffer(q, (total,), torch.uint8, 0))
        seen = []
        for view in candidates:
            try:
                own = view(self.rank)
            except (RuntimeError, TypeError, ValueError) as error:
                seen.append(str(error).splitlines()[0])
                continue
            if own.data_ptr() == mine:
                return [view(q) for q in range(self.world)]
            seen.append(f"{own.data_ptr():#x}")
        raise RuntimeError(f"symmetric memory for group '{self.group_name}': no peer view aliases this rank's "
                           f"buffer {mine:#x} (tried: {seen})")

    def _check_mapping(self, peers) -> None:
        """Each rank writes its rank into a spare flag word; every rank must read each peer's own value through
        its mapping. Leaves every flag zero, and all ranks past a barrier, before any stream signals."""
        mine = self.buffer[:FLAG_BYTES].view(torch.int32)
        mine[PROBE_OFF] = self.rank + 1
        self.handle.barrier(0)
        seen = [int(p[:FLAG_BYTES].view(torch.int32)[PROBE_OFF].item()) for p in peers]
        self.handle.barrier(0)
        mine[PROBE_OFF] = 0
        self.handle.barrier(0)
        if seen != [q + 1 for q in range(self.world)]:
            raise RuntimeError(f"symmetric memory for group '{self.group_name}' maps the wrong peer buffers: rank "
                               f"{self.rank} read {seen}, expected {[q + 1 for q in range(self.world)]}")

    def next_epoch(self) -> int:
        self.check()
        self.join()
        self.epoch += 1
        return self.epoch

    def flag_addr(self, rank: int, index: int) -> int:
        return self.flag_ptrs[rank] + 4 * index

    def data_view(self, rank: int, epoch: int, shape, dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        return self.data[epoch % 2][rank][:nbytes].view(dtype).view(shape)

    def region(self, rank: int, epoch: int) -> torch.Tensor:
        """Rank `rank`'s data bytes of epoch `epoch`'s parity (a peer's through its mapping), uint8."""
        return self.data[epoch % 2][rank]

    def data_ptr(self, rank: int, epoch: int) -> int:
        return self.data_ptrs[epoch % 2][rank]

    def events(self, name: str, count: int) -> list:
        """A reusable pool of driver events (`cuda_driver.Event`: ~1 us per record or wait, where creating a
        torch event per chunk cost ~10 us). Re-recording one is safe once its waits are enqueued: a stream waits
        for the record that preceded its wait call."""
        pool = self._events.setdefault(name, [])
        while len(pool) < count:
            pool.append(cuda_driver.Event())
        return pool

    def defer_join(self, event: torch.cuda.Event, keep: list) -> None:
        """The op's side-stream work ends at `event`; the compute stream waits before the next op (or `join`)."""
        self.pending, self.keep = event, keep

    def join(self) -> None:
        if self.pending is not None:
            torch.cuda.current_stream(self.device).wait_event(self.pending)
            self.pending, self.keep = None, []

    def fail(self, waited_s: float, epoch: int, chunks: int) -> None:
        """Called by the watchdog for op `epoch` (of `chunks` chunks): record the error, saying which peers'
        signals this rank still lacks, then release every stream wait on this rank."""
        torch.cuda.set_device(self.device)  # this thread needs the context current (driver calls below)
        snapshot: dict = {}
        # Read on a helper thread with a deadline: the release below must happen even if the read blocked.
        reader = threading.Thread(target=lambda: snapshot.update(words=self._read_flags()), daemon=True)
        reader.start()
        reader.join(2.0)
        words = snapshot.get("words")
        missing = ["(flags unreadable)"] if words is None else self._missing_signals(words, epoch, chunks)
        self.error = (f"fused TP collective on group '{self.group_name}' (rank {self.rank} of {self.world}) did "
                      f"not complete within {waited_s:g} s: a peer rank failed or did not run the same layer "
                      f"(AUTOTP_FUSED_TIMEOUT_S sets the limit). Op {epoch}; signals not yet here (an all-gather "
                      f"needs only XREADY, a reduce-scatter no RDONE): {', '.join(missing[:12]) or 'none'}")
        cuda_driver.memset32(self.rescue_stream.cuda_stream, self.flag_ptrs[self.rank],
                             self.epoch + POISON_AHEAD, FLAG_WORDS)

    def _missing_signals(self, words: list, epoch: int, chunks: int) -> list:
        """The flag words of op `epoch` that peers have not written yet, named."""
        peers = [q for q in range(self.world) if q != self.rank]
        expected = [(f"READY(rank {q}, chunk {j})", ready_index(q, j)) for q in peers for j in range(chunks)]
        expected += [(f"RDONE(rank {q}, chunk {j})", rdone_index(q, j)) for q in peers for j in range(chunks)]
        expected += [(f"XREADY(rank {q})", shard_index(q)) for q in peers]
        return [label for label, index in expected if 0 <= words[index] < epoch]

    def _read_flags(self) -> list:
        torch.cuda.set_device(self.device)
        with torch.cuda.stream(self.rescue_stream):  # a non-blocking stream: runs while the others wait
            return self.flags[self.rank].cpu().tolist()

    def check(self) -> None:
        if self.error is not None:
            raise FusedCommError(self.error)


def existing(group, device: torch.device) -> Optional[Workspace]:
    """The group's workspace on `device` if a fused op made one."""
    return _workspaces.get((group.group_name, device.index))


def workspace(group, device: torch.device, data_bytes: int) -> Workspace:
    """The group's workspace, grown (collectively: every rank asks for the same sizes in the same order)."""
    ws = existing(group, device)
    if ws is None or ws.data_bytes < data_bytes:
        if ws is not None:
            ws.join()
            _retired.append(ws)
            data_bytes = max(data_bytes, 2 * ws.data_bytes)
        ws = Workspace(group, device, data_bytes)
        _workspaces[(group.group_name, device.index)] = ws
    return ws


def check_errors() -> None:
    """Raise FusedCommError if a fused collective on this rank timed out (host state only: no device sync)."""
    for ws in list(_workspaces.values()) + _retired:
        ws.check()


def available(group) -> bool:
    """Symmetric memory can be used for this group: CUDA, torch with symm_mem, more than one rank."""
    if group is None or not dist.is_initialized() or not torch.cuda.is_available():
        return False
    return _HAS_SYMM_MEM and 2 <= dist.get_world_size(group) <= MAX_RANKS
