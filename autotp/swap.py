"""Carry out a resolved plan's actions on a model: shard weights, swap Linear/Conv1D for TP layers, mix TP
forwards into embeddings, linear-like modules and experts.

Every sharded parameter is marked with its layout (`shard.mark_sharded`) so `checkpoint.consolidate` can put the
full tensor back under the original name. Parameter names never change: a swapped layer keeps `weight` and
`bias` at the same module path. A tied weight is sharded once and its shard shared.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from .grad_sync import TPGradSums
from .groups import ParallelGroups
from .layers import ColumnParallelLinear, RowParallelLinear
from .linear_mode import LinearMode
from .mixins import (ColumnParallelEmbeddingMixin, ColumnParallelLinearLikeMixin, MixedShard,
                     RowParallelLinearLikeMixin, TPExpertsMixin, VocabParallelEmbeddingMixin, mix_into)
from .plan import Action, PlanError
from .shard import ShardLayout, mark_sharded, shard_tensor


def bias_layout(layout: ShardLayout) -> ShardLayout:
    return ShardLayout(0, layout.blocks, layout.tp_size, None)


def _gather_sizes(layout: ShardLayout) -> tuple[int, ...]:
    return tuple(layout.local_size(r) for r in range(layout.tp_size))


class Sharder:
    def __init__(self, model: nn.Module, groups: ParallelGroups, grad_sums: TPGradSums):
        self.model = model
        self.groups = groups
        self.rank = groups.tp_rank
        self.grad_sums = grad_sums
        self.done: dict[int, nn.Parameter] = {}  # id(original parameter) -> shard, keeps tied weights tied
        self.layouts: dict[int, ShardLayout] = {}

    def shard_param(self, param: nn.Parameter, layout: ShardLayout, name: str) -> nn.Parameter:
        key = id(param)
        if key in self.done:
            if self.layouts[key] != layout:
                raise PlanError(f"parameter '{name}' is shared (tied) with another layer that is split differently; "
                                "give both the same partition (e.g. both vocabulary-parallel) or neither")
            return self.done[key]
        shard = nn.Parameter(shard_tensor(param.data, layout, self.rank), requires_grad=param.requires_grad)
        mark_sharded(shard, layout, param.shape)
        self.done[key] = shard
        self.layouts[key] = layout
        return shard

    def replace_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def apply(self, action: Action, modules: dict[str, nn.Module], mode: Optional[LinearMode]) -> Optional[tuple]:
        """Carry out one action; `mode` is the TP linear layer's (for a Linear or Conv1D target). Returns the
        local weight's shape, or None where nothing is split."""
        target = action.target
        group = self.groups.tp_group
        if action.style == "skip":
            if action.grad_allreduce:
                owner = modules.get(target.name)
                for param in (list(owner.parameters()) if owner is not None else []):
                    self.grad_sums.sum_replicated(param)
            return None
        if action.style == "experts":
            mix_into(modules[target.name], TPExpertsMixin, MixedShard(group))
            return None
        layout = action.layout
        if target.kind == "param":
            owner_name, _, pname = target.name.rpartition(".")
            owner = modules[owner_name]
            shard = self.shard_param(getattr(owner, pname), layout, target.name)
            setattr(owner, pname, shard)
            if action.kv_replicas > 1:
                self.grad_sums.sum_kv_replicas(shard, layout)
            return tuple(shard.shape)
        module = modules[target.name]
        if target.kind == "embedding":
            return self._embedding(module, action)
        if target.kind == "linear_like":
            return self._linear_like(module, action)
        weight = self.shard_param(module.weight, layout, target.name + ".weight")
        bias = None
        if getattr(module, "bias", None) is not None:
            if action.style == "column":
                bias = self.shard_param(module.bias, bias_layout(layout), target.name + ".bias")
            else:
                bias = module.bias  # added once, after the all-reduce
        conv1d = target.kind == "conv1d"
        full_out, full_in = (module.weight.shape[1], module.weight.shape[0]) if conv1d else module.weight.shape[:2]
        cls = ColumnParallelLinear if action.style == "column" else RowParallelLinear
        new = cls(weight, bias, layout, group, self.rank, conv1d, full_in, full_out, mode=mode)
        new.train(module.training)
        self.replace_module(target.name, new)
        if action.kv_replicas > 1:
            self.grad_sums.sum_kv_replicas(weight, layout)
            if bias is not None:
                self.grad_sums.sum_kv_replicas(bias, bias_layout(layout))
        return tuple(weight.shape)

    def _linear_like(self, module: nn.Module, action: Action) -> tuple:
        """A module of its own class with a Linear-layout `weight`: shard it in place and wrap its forward."""
        name, layout = action.target.name, action.layout
        bias = module._parameters.get("bias")
        if action.style == "row" and bias is not None:
            raise PlanError(f"layer '{name}' ({type(module).__name__}) cannot be row-parallel: its own forward adds "
                            "its bias, which would then be added on every TP rank; make it column-parallel or skip it")
        module.weight = self.shard_param(module.weight, layout, name + ".weight")
        if bias is not None and action.style == "column":
            if bias.dim() != 1 or bias.shape[0] != layout.full_size:
                raise PlanError(f"layer '{name}' ({type(module).__name__}): bias of shape {list(bias.shape)} does not "
                                f"follow the {layout.full_size} output features of its weight")
            module.bias = self.shard_param(bias, bias_layout(layout), name + ".bias")
        group = self.groups.tp_group
        if action.style == "column":
            sizes = _gather_sizes(layout) if action.gather_output else None
            mix_into(module, ColumnParallelLinearLikeMixin, MixedShard(group, gather_sizes=sizes))
        else:
            mix_into(module, RowParallelLinearLikeMixin, MixedShard(group))
        if action.kv_replicas > 1:
            self.grad_sums.sum_kv_replicas(module.weight, layout)
        return tuple(module.weight.shape)

    def _embedding(self, module: nn.Embedding, action: Action) -> tuple:
        layout, group = action.layout, self.groups.tp_group
        full_rows = module.weight.shape[0]
        module.weight = self.shard_param(module.weight, layout, action.target.name + ".weight")
        if action.style == "vocab":
            start, rows = layout.local_ranges(self.rank)[0]
            if module.padding_idx is not None:
                local = module.padding_idx - start
                module.padding_idx = local if 0 <= local < rows else None
            module.num_embeddings = rows
            mix_into(module, VocabParallelEmbeddingMixin, MixedShard(group, vocab_start=start, vocab_size=full_rows))
        else:
            module.embedding_dim = module.weight.shape[1]
            mix_into(module, ColumnParallelEmbeddingMixin, MixedShard(group, gather_sizes=_gather_sizes(layout)))
        return tuple(module.weight.shape)
