"""The DP mesh of ZeRO stage 3 and the tensors FSDP2 shards over it: which rows of its TP shard a DP rank holds
(`Shard(0)`: rank r holds rows [r*ceil(n/dp), ...)), a checkpoint value cut to them, a shard gathered back whole
(checkpoints and consolidated state dicts use these; a plain tensor passes through unchanged).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor


GATHER_DTYPE_ATTR = "_autotp_gather_dtype"  # on a sharded parameter: the dtype its consolidated copy is gathered in


def dp_mesh(groups, device: torch.device) -> DeviceMesh:
    """The 1-D mesh FSDP2 shards over: the DP dimension of a given DeviceMesh, else this TP rank's DP group."""
    mesh = groups.device_mesh
    for name in ("dp", "fsdp"):  # groups.groups_from_mesh accepts either name for the DP dimension
        if mesh is not None and name in (mesh.mesh_dim_names or ()):
            return mesh[name]
    group = groups.dp_group
    if group is None:  # DP size 1 from a mesh or group without one: a group of this rank alone (collective)
        group, _ = dist.new_subgroups(group_size=1)
    return DeviceMesh.from_group(group, device.type)


def dp_rows(param: DTensor) -> tuple[int, int]:
    """(first row, rows) of a TP shard that this DP rank's local shard of `param` holds: FSDP2 cuts dim 0 as
    `torch.chunk` does, ceil(n/dp) rows a rank."""
    rows, dp = param.shape[0], param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    per_rank = math.ceil(rows / dp)
    start = min(rank * per_rank, rows)
    length = param.to_local().shape[0]
    if length != max(0, min(per_rank, rows - start)):
        raise RuntimeError(f"autotp ZeRO-3: FSDP2 holds {length} rows of a {tuple(param.shape)} tensor on DP rank "
                           f"{rank}/{dp}, expected rows from {start} in chunks of {per_rank}")
    return start, length


def dp_local_part(param: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(where to write, what to write) for `value`, a whole TP shard, into `param`: for an FSDP2-sharded parameter
    this DP rank's rows of both; otherwise the tensors themselves."""
    if not isinstance(param, DTensor):
        return param, value
    start, length = dp_rows(param)
    return param.to_local(), value.narrow(0, start, length)


def gather_dp(param: torch.Tensor) -> torch.Tensor:
    """A sharded parameter's whole TP shard, gathered over DP (collective over the DP group) in its save dtype
    (`gather_16bit_weights_on_model_save`); any other tensor as it is."""
    if not isinstance(param, DTensor):
        return param.detach()
    local = param.to_local().detach()
    dtype = getattr(param, GATHER_DTYPE_ATTR, None)
    if dtype is not None:
        local = local.to(dtype)  # cast before gathering: half the traffic of a gather in fp32
    gathered = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())
    return gathered.full_tensor()
