"""TP and DP process groups.

TP groups are blocks of consecutive global ranks ([0..tp-1], [tp..2tp-1], ...). torchrun numbers ranks node by
node, so with tp dividing the GPUs per node a TP group never leaves a node: TP all-reduces every layer and
only NVLink carries that (0.34 ms per 64 MB on 4xH200, ~20x slower over a 25 GB/s NIC). DP groups take one
rank of each TP group (ranks r, r+tp, r+2tp, ...).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import ConfigError, check_tp_divides_world


def init_distributed(backend: Optional[str] = None, timeout_s: float = 1800.0,
                     init_method: Optional[str] = None) -> None:
    """Initialise torch.distributed from torchrun's environment: NCCL with CUDA, gloo without.

    Without torchrun's variables this starts a one-process group over an in-memory store (no port to collide
    on), so scripts run unchanged on one device. `init_method` (e.g. `file:///tmp/rdzv`) replaces the
    environment's MASTER_ADDR/MASTER_PORT rendezvous; RANK and WORLD_SIZE still come from the environment.
    """
    if dist.is_initialized():
        return
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = dict(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
        kwargs.update(store=dist.HashStore(), rank=0, world_size=1)
    elif init_method is not None:
        kwargs.update(init_method=init_method, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        kwargs["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(**kwargs)


@dataclass
class ParallelGroups:
    tp_group: Any
    dp_group: Any
    tp_size: int
    tp_rank: int
    dp_size: int
    dp_rank: int
    device_mesh: Any = None


_GROUP_CACHE: dict = {}


def _check_local_fit(tp_size: int) -> None:
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size()))
    if local_world % tp_size and tp_size % local_world == 0 and local_world < dist.get_world_size():
        raise ConfigError(
            f"config key 'tensor_parallel.autotp_size' = {tp_size}: larger than the {local_world} processes per node; "
            "TP groups would span nodes. Use autotp_size <= GPUs per node.")
    if local_world % tp_size and local_world < dist.get_world_size():
        raise ConfigError(
            f"config key 'tensor_parallel.autotp_size' = {tp_size} does not divide the {local_world} processes per "
            "node; TP groups would span nodes")


def build_groups(tp_size: int) -> ParallelGroups:
    """Contiguous TP groups and orthogonal DP groups over the default group (cached per tp_size)."""
    if not dist.is_initialized():
        if tp_size != 1:
            raise RuntimeError("autotp: tensor parallelism needs torch.distributed; call autotp.init_distributed() "
                               "or launch with torchrun")
        return ParallelGroups(None, None, 1, 0, 1, 0)
    world, rank = dist.get_world_size(), dist.get_rank()
    check_tp_divides_world(tp_size, world)
    _check_local_fit(tp_size)
    if tp_size in _GROUP_CACHE:
        return _GROUP_CACHE[tp_size]
    dp_size = world // tp_size
    tp_group = dp_group = None
    # Every rank creates every group, in the same order: new_group is collective over the default group.
    for start in range(0, world, tp_size):
        ranks = list(range(start, start + tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            tp_group = group
    for offset in range(tp_size):
        ranks = list(range(offset, world, tp_size))
        group = dist.new_group(ranks)
        if rank in ranks:
            dp_group = group
    groups = ParallelGroups(tp_group, dp_group, tp_size, rank % tp_size, dp_size, rank // tp_size)
    _GROUP_CACHE[tp_size] = groups
    return groups


def groups_from_mesh(mesh) -> ParallelGroups:
    """A DeviceMesh with a 'tp' dimension and optionally a 'dp' one (or 'fsdp', the TP chapter's and torchtitan's
    name for the same dimension)."""
    names = tuple(mesh.mesh_dim_names or ())
    if "tp" not in names:
        raise ConfigError(f"device_mesh dimensions {names} must include 'tp' (and optionally 'dp' or 'fsdp')")
    if "dp" in names and "fsdp" in names:
        raise ConfigError(f"device_mesh dimensions {names}: 'dp' and 'fsdp' name the same dimension, keep one")
    dp_name = "dp" if "dp" in names else "fsdp" if "fsdp" in names else None
    tp_group = mesh.get_group("tp")
    dp_group = mesh.get_group(dp_name) if dp_name else None
    return ParallelGroups(tp_group, dp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group),
                          dist.get_world_size(dp_group) if dp_group is not None else 1,
                          dist.get_rank(dp_group) if dp_group is not None else 0, device_mesh=mesh)


def groups_from_mpu(mpu) -> ParallelGroups:
    """A Megatron/DeepSpeed-style model-parallel unit (get_tensor_model_parallel_* / get_model_parallel_*)."""
    if hasattr(mpu, "mesh_dim_names"):
        return groups_from_mesh(mpu)

    def first(*names):
        for name in names:
            if hasattr(mpu, name):
                return getattr(mpu, name)()
        raise ConfigError(f"mpu object {type(mpu).__name__} lacks all of {names}")

    tp_group = first("get_tensor_model_parallel_group", "get_model_parallel_group")
    dp_group = first("get_data_parallel_group")
    return ParallelGroups(tp_group, dp_group, dist.get_world_size(tp_group), dist.get_rank(tp_group),
                          dist.get_world_size(dp_group), dist.get_rank(dp_group))


def groups_from_tp_group(tp_group) -> ParallelGroups:
    """Only a TP group given: DP groups are built as the ranks holding the same TP rank."""
    tp_size = dist.get_world_size(tp_group)
    built = build_groups(tp_size)
    if sorted(dist.get_process_group_ranks(tp_group)) != sorted(dist.get_process_group_ranks(built.tp_group)):
        if tp_size == dist.get_world_size():
            return ParallelGroups(tp_group, None, tp_size, dist.get_rank(tp_group), 1, 0)
        # Its DP partners are unknown from one group alone; an mpu or a DeviceMesh names both.
        raise ConfigError(f"tp_group with ranks {dist.get_process_group_ranks(tp_group)} is not a block of "
                          f"consecutive ranks; pass mpu= or device_mesh= so autotp knows the DP groups too")
    return ParallelGroups(tp_group, built.dp_group, tp_size, dist.get_rank(tp_group), built.dp_size, built.dp_rank)


def resolve_groups(tp_size: Optional[int] = None, *, device_mesh=None, mpu=None, tp_group=None) -> ParallelGroups:
    """The TP and DP groups from the first source given: a DeviceMesh, a Megatron/DeepSpeed mpu, a TP group alone
    (its DP groups: the ranks holding the same TP rank), else contiguous TP blocks of `tp_size` ranks (default 1).

    A mesh or an mpu already holds its groups: reading them is no collective. The other two create groups, which
    is collective over the default group: every rank must call this with the same arguments. Whether `tp_size`
    agrees with a given source is the caller's check (`autotp.initialize` and `autotp.parallelize` word it
    differently)."""
    if device_mesh is not None:
        return groups_from_mesh(device_mesh)
    if mpu is not None:
        return groups_from_mpu(mpu)
    if tp_group is not None:
        return groups_from_tp_group(tp_group)
    return build_groups(tp_size or 1)
