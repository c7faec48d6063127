"""Where the model of a training run lives: sharded over its TP group, on the run's device, in the training dtype,
and identical across its DP replicas. Two steps of `initialize`: `shard_model`, then `place_model`.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import AutoTPConfig, ConfigError
from .groups import ParallelGroups
from .replace import parallelize, set_kernels
from .vocab_parallel import enable_vocab_parallel_loss, vocab_parallel_wanted

logger = logging.getLogger("autotp")


def shard_model(model: nn.Module, cfg: AutoTPConfig, groups: ParallelGroups, raw: dict) -> None:
    """Shard `model` over `groups` with the config's plan (`parallelize`). A model `parallelize` already sharded
    keeps its plan: the config only picks its GEMMs (`tensor_parallel.kernels`, when given) and turns the
    vocabulary-parallel loss on where its LM head is split over the vocabulary."""
    tp = cfg.tensor_parallel
    if tp.grid is not None and getattr(model, "autotp_state", None) is None and _shard_2d(model, tp.grid):
        return
    if getattr(model, "autotp_state", None) is None:
        recorded = getattr(model, "autotp_tp_model_init", None)
        partition = recorded.partition_config if recorded is not None and recorded.partition_config is not None \
            else tp.partition_config
        parallelize(model, tp_group=groups.tp_group if groups.tp_size > 1 else None, tp_size=groups.tp_size,
                    preset_model=tp.preset_model, partition_config=partition,
                    device_mesh=groups.device_mesh, kernels=tp.kernels, vocab_parallel=tp.vocab_parallel_loss,
                    sequence_parallel=tp.sequence_parallel)
        model.autotp_state.groups = groups
        return
    if "kernels" in (raw.get("tensor_parallel") or {}):
        set_kernels(model, tp.kernels)  # parallelize sharded it; the config picks GEMMs
    if vocab_parallel_wanted(tp.vocab_parallel_loss, model, groups.tp_size) and groups.tp_size > 1:
        try:  # sharded by parallelize without it: works if its LM head is vocab-split
            enable_vocab_parallel_loss(model)
        except ValueError as err:  # the same model on every rank: every rank raises this
            if tp.vocab_parallel_loss is True:  # `auto` keeps the LM head as it was sharded
                raise ConfigError(f"config key 'tensor_parallel.vocab_parallel_loss' = True: {err}; call "
                                  "autotp.parallelize(..., vocab_parallel=True)") from None


def _shard_2d(model: nn.Module, grid_shape: tuple) -> bool:
    """Put the model on the config's r x c grid (`parallel2d`) where 2-D TP supports it; False (one log line on
    rank 0 naming why) where it does not, and the run is 1-D over the same ranks."""
    from .grid import make_grid
    from .parallel2d import parallelize_llama_2d, unsupported_2d

    why = unsupported_2d(model, grid_shape)
    if why is not None:
        if dist.get_rank() == 0:
            logger.warning("autotp: tensor_parallel.grid %s: %s; this run uses 1-D tensor parallelism over the same "
                           "%d ranks", list(grid_shape), why, grid_shape[0] * grid_shape[1])
        return False
    parallelize_llama_2d(model, make_grid(*grid_shape))  # sets model.autotp_grid
    return True


def device_for_run() -> torch.device:
    """The current CUDA device under NCCL, else the CPU."""
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def training_dtype(cfg: AutoTPConfig) -> Optional[torch.dtype]:
    """bf16 or fp16 as the config enables; None: the model's own dtype."""
    return torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None


def place_model(model: nn.Module, cfg: AutoTPConfig, groups: ParallelGroups) -> torch.device:
    """Move the (sharded) model to the run's device, cast it to the training dtype, and broadcast it from DP rank 0.
    Returns the device."""
    device = device_for_run()
    dtype = training_dtype(cfg)
    model.to(device)
    if dtype is not None:
        cast_floating_state(model, dtype)
    broadcast_over_dp(model, groups)
    return device


def cast_floating_state(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters and persistent buffers to `dtype`, as HF's from_pretrained(dtype=...) leaves a model; buffers a
    module computes at construction (RoPE's inv_freq, built in fp32 on purpose) keep their dtype. Casting
    inv_freq to bf16 too moved the first loss of the Llama-3-8B bench by 0.03 away from the dense model's."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                    setattr(module, name, buf.to(dtype))


def broadcast_over_dp(model: nn.Module, groups: ParallelGroups) -> None:
    """Make DP replicas identical (from DP rank 0), as DeepSpeed does at start."""
    if groups.dp_group is None or groups.dp_size == 1:
        return
    src = dist.get_global_rank(groups.dp_group, 0) if hasattr(dist, "get_global_rank") else 0
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=src, group=groups.dp_group)
