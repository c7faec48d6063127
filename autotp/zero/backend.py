"""The two collectives ZeRO needs, behind one small interface with interchangeable backends.

`torch` runs them through torch.distributed (NCCL on GPU, gloo on CPU). `nccl_ext` is autotp's C++/NCCL
extension (`csrc/`), which owns its own communicator and stream. `auto` takes the extension when it is built and
falls back to torch with one log line. Both are called on the current stream: the caller decides which stream
that is and how it waits.
"""

from __future__ import annotations

import importlib
import logging
from typing import Optional

import torch
import torch.distributed as dist

from ..config import ConfigError

logger = logging.getLogger("autotp")

# torch 2.13 deprecates all_gather_into_tensor for all_gather_single; torch 2.11 (the GPU stack) may lack it.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class TorchBackend:
    """Collectives from torch.distributed over one process group."""

    name = "torch"

    def __init__(self, group):
        self.group = group

    def reduce_scatter(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """`output` (numel / group size) = this rank's slice of the sum of every rank's `input`."""
        dist.reduce_scatter_tensor(output, input, op=dist.ReduceOp.SUM, group=self.group)

    def all_gather(self, output: torch.Tensor, input: torch.Tensor) -> None:
        """`output` = every rank's `input` concatenated in rank order; `input` may alias this rank's slice."""
        _all_gather_flat(output, input, group=self.group)


_EXTENSION_ERROR: Optional[str] = None


def _load_extension_backend(group):
    """The `nccl_ext` backend, or None with the reason recorded in `_EXTENSION_ERROR`."""
    global _EXTENSION_ERROR
    try:
        module = importlib.import_module("autotp.zero.nccl_backend")
        return module.NcclExtBackend(group)
    except (ImportError, OSError, RuntimeError) as err:
        _EXTENSION_ERROR = f"{type(err).__name__}: {err}"
        return None


def make_backend(name: str, group):
    """The backend named by `zero_optimization.comm_backend` for the DP `group`."""
    if name == "torch":
        return TorchBackend(group)
    backend = _load_extension_backend(group)
    if backend is not None:
        return backend
    if name == "nccl_ext":
        raise ConfigError(f"config key 'zero_optimization.comm_backend' = 'nccl_ext': the autotp C++/NCCL "
                          f"extension is not available ({_EXTENSION_ERROR})")
    logger.info("autotp: ZeRO uses the torch backend (nccl_ext unavailable: %s)", _EXTENSION_ERROR)
    return TorchBackend(group)
