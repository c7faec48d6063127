"""The collectives ZeRO needs, behind one small interface with interchangeable backends.

`reduce_scatter(outputs, inputs, accumulate)` reduces a batch of ready buckets: it runs after everything already
queued on the current stream, on the backend's comm stream, and keeps the tensors alive for that stream, so the
caller may drop them at once; `join()` makes the current stream wait for all of it. `all_gather` runs on the
current stream. Backends:
  torch     torch.distributed (NCCL on GPU, gloo on CPU) on a high-priority comm stream owned here;
  nccl_ext  autotp's C++/NCCL extension (`csrc/nccl_comm.cpp`): its own communicator and stream, a batch of
            buckets coalesced in one NCCL group, per-bucket work in C++;
  auto      nccl_ext when it loads, else torch with one log line.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Optional

import torch
import torch.distributed as dist

from ..collective_errors import first_error
from ..comm import all_gather_flat, reduce_scatter_flat
from ..config import ConfigError

logger = logging.getLogger("autotp")


class TorchBackend:
    """Collectives from torch.distributed over the DP group; on GPU they run on a comm stream of ours."""

    name = "torch"

    def __init__(self, group, device: torch.device):
        self.group = group
        self.cuda = device.type == "cuda"
        # High priority: a ready reduce-scatter should not queue behind backward's GEMMs.
        self.stream = torch.cuda.Stream(device=device, priority=-1) if self.cuda else None

    def on_comm(self):
        """Context for work that must run on the comm stream after everything queued so far."""
        return _after_current(self.stream)

    def reduce_scatter(self, outputs, inputs, accumulate) -> None:
        if self.cuda:
            for tensor in list(inputs) + list(outputs):
                tensor.record_stream(self.stream)  # freed by the caller only after this stream is past it
        with self.on_comm():
            for output, input, add in zip(outputs, inputs, accumulate):
                if add:
                    reduced = torch.empty(output.numel(), dtype=input.dtype, device=input.device)
                    reduce_scatter_flat(reduced, input, op=dist.ReduceOp.SUM, group=self.group)
                    output.add_(reduced)
                else:
                    reduce_scatter_flat(output, input, op=dist.ReduceOp.SUM, group=self.group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        all_gather_flat(output, input, group=self.group)

    def join(self) -> None:
        if self.cuda:
            torch.cuda.current_stream().wait_stream(self.stream)


def _after_current(stream):
    if stream is None:
        return contextlib.nullcontext()
    stream.wait_stream(torch.cuda.current_stream())
    return torch.cuda.stream(stream)


class NcclExtBackend:
    """autotp's C++/NCCL communicator for the DP group (ids broadcast through torch.distributed).

    AUTOTP_NCCL_MAX_CTAS caps the thread blocks its kernels take from the backward GEMMs (0: NCCL's default)."""

    name = "nccl_ext"

    def __init__(self, group, device: torch.device, module, max_ctas: Optional[int] = None):
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        holder = [module.unique_id() if rank == 0 else None]
        dist.broadcast_object_list(holder, src=dist.get_global_rank(group, 0), group=group)
        if max_ctas is None:
            max_ctas = int(os.environ.get("AUTOTP_NCCL_MAX_CTAS", "0"))
        self.comm = module.NcclComm(holder[0], rank, size, device.index, max_ctas)
        self.stream = torch.cuda.ExternalStream(self.comm.stream_handle, device=device)

    def on_comm(self):
        """Context for work that must run on the extension's stream after everything queued so far."""
        return _after_current(self.stream)

    def reduce_scatter(self, outputs, inputs, accumulate) -> None:
        self.comm.reduce_scatter(list(outputs), list(inputs), list(accumulate))

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        self.comm.all_gather(output, input)

    def join(self) -> None:
        self.comm.join()


def _load_extension(device: torch.device):
    """(module, None) or (None, why not) on this rank."""
    if device.type != "cuda":
        return None, "the nccl_ext backend needs CUDA tensors (this run is on the CPU)"
    try:
        from .. import _ext

        return _ext.load("nccl"), None
    except ImportError as err:
        return None, str(err)


def make_backend(name: str, group, device: torch.device):
    """The backend named by `zero_optimization.comm_backend` for the DP `group`. Every rank calls this; whether
    the extension is usable is agreed over all ranks first, so no rank waits for a communicator the others
    will not create."""
    if name == "torch":
        return TorchBackend(group, device)
    module, why = _load_extension(device)
    unavailable = first_error(None if why is None else ImportError(why))  # the first rank's reason, on every rank
    if unavailable is None:
        return NcclExtBackend(group, device, module)
    why = str(unavailable)
    if name == "nccl_ext":
        raise ConfigError(f"config key 'zero_optimization.comm_backend' = 'nccl_ext': the autotp C++/NCCL "
                          f"extension is not available: {why}")
    logger.info("autotp: ZeRO uses the torch backend (nccl_ext unavailable: %s)", why.splitlines()[0])
    return TorchBackend(group, device)

