"""Gradient hooks for parameters that several TP ranks hold but that each rank's own computation touches in part.

Two cases, both summed over the TP group in backward:
  - a parameter replicated over TP whose forward saw only this rank's part (a per-head norm before the heads
    are split: `replicated_with_grad_allreduce`; norms and row-layer biases under sequence parallelism, which
    see one sequence shard each): the true gradient is the sum of the ranks' gradients;
  - a KV head held by several ranks (num_key_value_heads < tp): each copy gets the gradient of its own query
    heads; the true gradient is the sum over the copies of the same head.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from . import comm
from .shard import ShardLayout


class TPGradSums:
    """The gradient sums of one model's TP group; each parameter is summed once, whoever asks first. The hook
    handles go to `hooks` (the model's `TPState.hooks`)."""

    def __init__(self, group, tp_rank: int, hooks: list):
        self.group, self.tp_rank, self.hooks = group, tp_rank, hooks
        self._summed: dict[int, nn.Parameter] = {}  # id -> the parameter, held so that its id stays its own

    def is_summed(self, param: nn.Parameter) -> bool:
        return id(param) in self._summed

    def sum_replicated(self, param: nn.Parameter) -> None:
        """Sum this replicated parameter's gradient over TP (a frozen one has none: a PEFT model's base)."""
        if self.is_summed(param) or comm.group_size(self.group) == 1 or not param.requires_grad:
            return
        group = self.group
        self._summed[id(param)] = param
        self.hooks.append(param.register_hook(lambda grad: comm.all_reduce_raw(grad.clone(), group)))

    def sum_kv_replicas(self, param: nn.Parameter, layout: ShardLayout) -> None:
        """Place this rank's copies in a full-size buffer, all-reduce, take the local part back."""
        if not param.requires_grad:
            return
        group, ranges = self.group, layout.local_ranges(self.tp_rank)

        def hook(grad):
            full_shape = list(grad.shape)
            full_shape[layout.dim] = layout.full_size
            full = grad.new_zeros(full_shape)
            cursor = 0
            for start, length in ranges:
                full.narrow(layout.dim, start, length).add_(grad.narrow(layout.dim, cursor, length))
                cursor += length
            comm.all_reduce_raw(full, group)
            return torch.cat([full.narrow(layout.dim, start, length) for start, length in ranges], dim=layout.dim)

        self.hooks.append(param.register_hook(hook))
