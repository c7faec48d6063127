"""DeepSpeed's older AutoTP entry points: `set_autotp_mode(training=True)` and `tp_model_init(...)`.

As in DeepSpeed, `tp_model_init` shards nothing: it turns training mode on and records its arguments on the
model (`model.autotp_tp_model_init`, a `TPModelInitArgs`); `initialize` shards the model with them merged into
the config, so the config's `tensor_parallel.partition_config` and `preset_model` still apply. Settings given in
both places must agree: a conflict raises a `ConfigError` naming both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import AutoTPConfig, ConfigError, check_tp_divides_world, parse_partition_config

_MODE = {"training": False}


def set_autotp_mode(training: bool = False) -> None:
    """Kept for DeepSpeed compatibility: autotp always shards for training; inference mode is refused."""
    if not training:
        raise ConfigError("autotp only implements AutoTP for training; call set_autotp_mode(training=True)")
    _MODE["training"] = True


def is_autotp_training_mode() -> bool:
    """Whether `set_autotp_mode(training=True)` or `tp_model_init` ran in this process (DeepSpeed's
    `_is_autotp_training_mode`)."""
    return _MODE["training"]


@dataclass(frozen=True)
class TPModelInitArgs:
    """What `tp_model_init` recorded, applied by `initialize`."""

    tp_size: int
    dtype: Optional[torch.dtype]
    tp_group: Any
    partition_config: Any
    """A parsed `PartitionConfig` or an HF tp_plan dict; None: the config's (or the model's own plan)."""


def tp_model_init(model: torch.nn.Module, tp_size: int, dtype: Optional[torch.dtype] = None, tp_group=None,
                  partition_config=None) -> torch.nn.Module:
    """Record TP arguments for `initialize` (which shards the model) and turn AutoTP training mode on.

    `partition_config`: DeepSpeed's partition_config dict or an HF tp_plan dict; the config may not give one too.
    At `initialize`, a config whose `tensor_parallel.autotp_size` differs from `tp_size`, whose bf16/fp16 setting
    differs from `dtype`, or an `mpu`/`device_mesh` together with `tp_group` raise a `ConfigError`.
    """
    if not isinstance(tp_size, int) or isinstance(tp_size, bool) or tp_size < 1:
        raise ConfigError(f"tp_model_init: tp_size = {tp_size!r} must be a positive integer")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise ConfigError(f"tp_model_init: dtype = {dtype!r} must be a torch.dtype")
    if getattr(model, "autotp_state", None) is not None:
        raise ConfigError("tp_model_init: the model is already sharded (autotp.parallelize); pass it to "
                          "autotp.initialize directly")
    if tp_group is not None and dist.get_world_size(tp_group) != tp_size:
        raise ConfigError(f"tp_model_init: tp_size = {tp_size} but tp_group has {dist.get_world_size(tp_group)} "
                          "ranks")
    if dist.is_initialized():
        check_tp_divides_world(tp_size, dist.get_world_size(), key="tp_model_init(tp_size)")
    if isinstance(partition_config, dict) and partition_config and all(
            isinstance(v, str) for v in partition_config.values()):
        partition_config = dict(partition_config)  # an HF tp_plan, as `parallelize` takes it
    else:
        partition_config = parse_partition_config(partition_config, "tp_model_init(partition_config=...)")
    set_autotp_mode(training=True)
    model.autotp_tp_model_init = TPModelInitArgs(tp_size, dtype, tp_group, partition_config)
    return model


def _config_dtype(cfg: AutoTPConfig) -> tuple[torch.dtype, str]:
    if cfg.bf16:
        return torch.bfloat16, "'bf16.enabled' = true"
    if cfg.fp16:
        return torch.float16, "'fp16.enabled' = true"
    return torch.float32, "neither 'bf16.enabled' nor 'fp16.enabled' (fp32)"


def check_tp_model_init(recorded: TPModelInitArgs, raw: dict, cfg: AutoTPConfig, mpu, device_mesh) -> None:
    """Raise a `ConfigError` naming both sources on each conflict between `tp_model_init`'s arguments and the
    config dict `raw` (`cfg`, parsed at the TP size the run uses), as DeepSpeed's `initialize` raises. The TP size
    itself is merged by `topology.resolve_topology`: the config's when it gives one, else `recorded.tp_size`."""
    tp_section = raw.get("tensor_parallel") or {}
    if recorded.tp_group is not None and (mpu is not None or device_mesh is not None):
        given = "mpu=" if mpu is not None else "device_mesh="
        raise ConfigError(f"tp_model_init(tp_group=...) and autotp.initialize({given}...) both give the TP group; "
                          "pass one of them")
    key = "autotp_size" if "autotp_size" in tp_section else "tp_size" if "tp_size" in tp_section else None
    if key is not None and cfg.tensor_parallel.autotp_size != recorded.tp_size:
        raise ConfigError(f"config key 'tensor_parallel.{key}' = {cfg.tensor_parallel.autotp_size} conflicts with "
                          f"tp_model_init(tp_size={recorded.tp_size})")
    config_dtype, setting = _config_dtype(cfg)
    if recorded.dtype is not None and recorded.dtype != config_dtype:
        raise ConfigError(f"tp_model_init(dtype={recorded.dtype}) conflicts with the config's {setting}; make "
                          "them agree (the config decides the training precision)")
    if recorded.partition_config is not None and tp_section.get("partition_config") is not None:
        raise ConfigError("partition_config is given both to tp_model_init(partition_config=...) and as config key "
                          "'tensor_parallel.partition_config'; give it in one place")
