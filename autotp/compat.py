"""DeepSpeed's older AutoTP entry points: `set_autotp_mode(training=True)` then `tp_model_init(...)`."""

from __future__ import annotations

from typing import Optional

import torch

from .config import ConfigError
from .replace import parallelize

_MODE = {"training": None}


def set_autotp_mode(training: bool = False) -> None:
    """Kept for DeepSpeed compatibility: autotp always shards for training; inference mode is refused."""
    if not training:
        raise ConfigError("autotp only implements AutoTP for training; call set_autotp_mode(training=True)")
    _MODE["training"] = True


def tp_model_init(model: torch.nn.Module, tp_size: int, dtype: Optional[torch.dtype] = None, tp_group=None):
    """Shard `model` over `tp_size` ranks (and cast it to `dtype`) before `initialize`.

    A later config whose `tensor_parallel.autotp_size` differs from `tp_size` fails in `initialize`.
    """
    if _MODE["training"] is None:
        raise ConfigError("call autotp.set_autotp_mode(training=True) before tp_model_init, as in DeepSpeed")
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"tp_model_init: tp_size = {tp_size!r} must be a positive integer")
    parallelize(model, tp_size=tp_size, tp_group=tp_group)
    if dtype is not None:
        model.to(dtype)
    return model
