"""A training run's TP x DP topology: its TP size and where that comes from, the config parsed at it, the groups.

Sources of the groups, first wins: `device_mesh=`, `mpu=`, the groups of a model already sharded by
`autotp.parallelize`, `tp_model_init(tp_group=...)`, else contiguous TP blocks (`groups.resolve_groups`) of the
config's `tensor_parallel.autotp_size`, or of `tp_model_init(tp_size=...)` when the config gives none. The TP size
is settled before the config is parsed, because the config's batch-size rule needs the DP size (world / TP): the
config is parsed once, at the size the run uses. A size the config or `tp_model_init` asks for that differs from
a given source's raises, naming both.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch.distributed as dist
import torch.nn as nn

from .compat import check_tp_model_init
from .config import AutoTPConfig, ConfigError, parse_config
from .groups import ParallelGroups, build_groups, resolve_groups


def _tp_size_in_config(raw: dict) -> bool:
    section = raw.get("tensor_parallel") or {}
    return "autotp_size" in section or "tp_size" in section


def _at_tp_size(raw: dict, tp_size: Optional[int]) -> dict:
    """`raw` with `tensor_parallel.autotp_size` set to `tp_size` (None: as it is). Only for a config that names
    no TP size; a `tensor_parallel` that is not an object is left for `parse_config` to reject."""
    section = raw.get("tensor_parallel")
    if tp_size is None or not isinstance(section, (dict, type(None))):
        return raw
    return {**raw, "tensor_parallel": {**(section or {}), "autotp_size": tp_size}}


def resolve_topology(model: nn.Module, raw: dict, mpu=None, device_mesh=None) -> tuple[AutoTPConfig, ParallelGroups]:
    """The parsed config and the TP/DP groups of a run of `model` (`raw`: the config dict). Every check that
    depends on the config alone runs before any group is created, so a bad config raises on every rank alike."""
    world = dist.get_world_size()
    recorded = getattr(model, "autotp_tp_model_init", None)  # DeepSpeed's tp_model_init: applied here
    sharded = getattr(model, "autotp_state", None)
    given: Optional[ParallelGroups] = None  # groups the caller fixed; reading them is no collective
    if device_mesh is not None or mpu is not None:
        given = resolve_groups(device_mesh=device_mesh, mpu=mpu)
    elif sharded is not None:
        given = sharded.groups

    in_config = _tp_size_in_config(raw)
    parse_at = None if in_config else given.tp_size if given is not None else getattr(recorded, "tp_size", None)
    cfg = parse_config(_at_tp_size(raw, parse_at), world)
    if recorded is not None:
        check_tp_model_init(recorded, raw, cfg, mpu, device_mesh)
    if cfg.unused_keys and dist.get_rank() == 0:
        warnings.warn("autotp ignores these DeepSpeed config keys: " + ", ".join(cfg.unused_keys),
                      stacklevel=3)  # points at the caller of autotp.initialize

    if cfg.tensor_parallel.grid is not None and (given is not None or recorded is not None):
        raise ConfigError("config key 'tensor_parallel.grid' builds its grid over the config's contiguous TP groups; "
                          "it does not combine with device_mesh=, mpu=, tp_model_init or a model autotp.parallelize "
                          "sharded")
    if given is None:
        groups = resolve_groups(cfg.tensor_parallel.autotp_size,
                                tp_group=recorded.tp_group if recorded is not None else None)
    else:
        if in_config:
            asked, source = cfg.tensor_parallel.autotp_size, "config key 'tensor_parallel.autotp_size'"
        else:
            asked, source = getattr(recorded, "tp_size", None), "tp_model_init(tp_size=...)"
        if asked is not None and asked != given.tp_size:
            given_by = "autotp.parallelize" if sharded is not None else "mpu/device_mesh"
            raise ConfigError(f"{source} = {asked} conflicts with TP size {given.tp_size} from {given_by}")
        groups = given
    if groups.dp_group is None and groups.tp_size < world and sharded is None:
        groups = build_groups(groups.tp_size)  # a mesh with a "tp" dimension only: DP groups built here
    if groups.tp_size * groups.dp_size != world:
        raise ConfigError(f"TP size {groups.tp_size} x DP size {groups.dp_size} != world size {world}")
    return cfg, groups
