"""ZeRO over the DP group: where the trainable parameters' gradients, fp32 master weights and optimizer state live.

`ZeroStore` is the interface the engine (`engine.py`, `step.py`) and training checkpoints (`resume.py`,
`resume_optim.py`) use; `build_store` picks the store for `zero_optimization.stage`:
  stage 0  `replicated.ReplicatedState`: every DP rank holds the whole optimizer state of its TP shard;
  1, 2     `partitioned.PartitionedState`: flat buckets, each DP rank owns one slice of every bucket;
  3        `fsdp.FullyShardedState`: the parameters too, each TP shard sharded over DP by PyTorch's FSDP2.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from ..collective_errors import raise_on_every_rank
from ..config import AutoTPConfig, ConfigError
from .fsdp import FullyShardedState
from .partitioned import PartitionedState
from .replicated import ReplicatedState


@runtime_checkable
class ZeroStore(Protocol):
    """What a ZeRO store offers. One optimizer step, as the engine drives it:
      every micro-step   begin_backward(reduce_now), loss.backward(), end_backward()
      at the boundary    reduce(); grads() (fp16 unscale, clipping); sumsq(); step(grad_scale)
      then               zero_grad()
    A store takes over the optimizer's param groups when it is built (fp32 masters or partitions in place of the
    model's parameters); the optimizer then only ever sees `grads()`' owners."""

    stage: int
    """The ZeRO stage (0-3). Saved in a checkpoint's `engine.pt`: it says how many optimizer files each TP rank
    wrote (one at stage 0, one per DP rank at 1, 2 and 3)."""
    params: list[nn.Parameter]
    """The model's trainable parameters (TP shards), in model order; `Engine.params`."""
    names: list[str]
    """Their names in the model, in the order of `params`: the keys of optimizer state in a checkpoint."""
    hooks: list
    """Handles of the hooks the store put on the model's parameters; `Engine.destroy` removes them, so the store can
    be collected while the model lives on."""

    def begin_backward(self, reduce_now: bool) -> None:
        """Before a micro-step's backward. `reduce_now`: this micro-step ends an accumulation window, so its
        gradients are to be reduced over DP (a store may reduce on every micro-step anyway, as stage 2 does)."""

    def end_backward(self) -> None:
        """After a micro-step's backward: accumulate or launch what the hooks have not (no wait for it)."""

    def reduce(self) -> None:
        """At the boundary: finish the DP reduction; afterwards `grads()` hold the DP mean of the window's gradients
        (scaled, under fp16). Over the DP group only."""

    def grads(self) -> list[torch.Tensor]:
        """The gradients the optimizer will read, after `reduce`: the engine unscales and clips them in place."""

    def sumsq(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (a 0-d fp32 tensor on the device): summed over all
        ranks (DP x TP) it counts every distinct gradient value of the model once."""

    def step(self, grad_scale) -> None:
        """The optimizer step on what `grads()` hold, dividing them by `grad_scale` (the folded clipping, a device
        tensor) when given, then `after_step()`: `step.step_with_scale(optimizer, grad_scale)`, or a store's own
        kernel for the same update (bf16 models, `master_adam.py`)."""

    def after_step(self) -> None:
        """After `optimizer.step()`: the updated weights reach the model's parameters on every DP rank (a copy from
        fp32 masters, or an all-gather over DP)."""

    def zero_grad(self) -> None:
        """Drop every gradient the store or the model holds, including a window accumulated but not reduced."""

    def writes_optimizer_file(self) -> bool:
        """Whether this rank writes an optimizer file into a checkpoint (DP replicas of stage 0 hold the same)."""

    def optimizer_slices(self) -> list[tuple]:
        """What this rank's optimizer file holds, as (parameter name, start in the parameter's flat TP shard,
        length, optimizer tensor, start in that tensor's flat view): a checkpoint saves and loads the optimizer
        tensor's master values and per-element state through these ranges."""

    def after_load(self) -> None:
        """After a checkpoint wrote the optimizer tensors: bring the model's parameters in line with them."""

    def load_masters_from_model(self) -> None:
        """After a checkpoint loaded weights without optimizer state: master weights start from the parameters."""


def build_store(cfg: AutoTPConfig, model: nn.Module, optimizer, groups, device: torch.device) -> ZeroStore:
    """The store for `cfg.zero.stage` over the model's trainable parameters; it takes over `optimizer`'s param
    groups. A `ConfigError` or `ValueError` on any rank (a parameter in no param group, a backend that cannot
    start) is raised on every rank."""
    named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    params, names = [param for _, param in named], [name for name, _ in named]
    store, error = None, None
    try:
        if cfg.zero.stage == 3:  # takes the model over: FSDP2 replaces its parameters by DP-sharded DTensors
            store = FullyShardedState(model, optimizer, groups, cfg, device)
        elif cfg.zero.stage == 0:
            store = ReplicatedState(params, names, optimizer, groups, cfg.zero.reduce_bucket_size,
                                    mixed_precision=cfg.bf16 or cfg.fp16, kernels=cfg.tensor_parallel.kernels)
        else:
            store = PartitionedState(params, names, optimizer, groups, cfg.zero, cfg.zero.stage,
                                     cfg.gradient_accumulation_steps, device, cfg.tensor_parallel.kernels)
    except (ConfigError, ValueError) as err:
        error = err
    raise_on_every_rank(error)
    return store
