"""Tensor-parallel collectives as conjugate autograd pairs (Megatron's mappings, written for autotp).

Each pair is named for its forward direction; the docstring gives both halves. Every function returns its
input untouched when the group has one rank, so TP=1 costs nothing. Uneven shards (a vocabulary that tp does
not divide) are gathered by padding to the largest shard and trimming, so every rank issues one collective
of one size.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist


# torch 2.13 renames the flat collectives (`*_single`) and warns on every call of the old names; torch 2.11 (the
# GPU stack) has only the old ones. Same signatures: (output, input, [op], group, async_op).
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_size(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if group is not None and dist.is_initialized() else 0


def all_reduce_raw(tensor: torch.Tensor, group) -> torch.Tensor:
    """Sum in place over `group` (no autograd)."""
    if group_size(group) > 1:
        dist.all_reduce(tensor, group=group)
    return tensor


def all_gather_raw(x_shard: torch.Tensor, group, sizes: Optional[Sequence[int]] = None, dim: int = -1):
    """Concatenate each rank's shard along `dim`; `sizes[r]` is rank r's extent along `dim` (default: equal)."""
    world = group_size(group)
    if world == 1:
        return x_shard
    dim = dim % x_shard.dim()
    local = x_shard.size(dim)
    sizes = list(sizes) if sizes is not None else [local] * world
    longest = max(sizes)
    if local < longest:
        pad_shape = list(x_shard.shape)
        pad_shape[dim] = longest - local
        x_shard = torch.cat([x_shard, x_shard.new_zeros(pad_shape)], dim=dim)
    x_shard = x_shard.contiguous()
    pieces = [torch.empty_like(x_shard) for _ in range(world)]
    dist.all_gather(pieces, x_shard, group=group)
    return torch.cat([piece.narrow(dim, 0, size) for piece, size in zip(pieces, sizes)], dim=dim)


def local_slice(x_full: torch.Tensor, group, sizes: Optional[Sequence[int]] = None, dim: int = -1):
    """This rank's piece of `x_full` along `dim` (no communication)."""
    world = group_size(group)
    if world == 1:
        return x_full
    rank = group_rank(group)
    sizes = list(sizes) if sizes is not None else [x_full.size(dim) // world] * world
    return x_full.narrow(dim, sum(sizes[:rank]), sizes[rank]).contiguous()


class _CopyToTP(torch.autograd.Function):
    """forward: identity; backward: all-reduce the input gradient over TP (column layer input)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        # Out of place: autograd may hand the same gradient tensor to another consumer.
        return all_reduce_raw(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    """forward: all-reduce partial sums over TP (row layer output); backward: identity."""

    @staticmethod
    def forward(ctx, x_partial, group):
        return all_reduce_raw(x_partial.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromTP(torch.autograd.Function):
    """forward: all-gather shards along the last dim; backward: keep this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x_shard, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return all_gather_raw(x_shard, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return local_slice(grad, ctx.group, ctx.sizes), None, None


class _SplitToTP(torch.autograd.Function):
    """forward: keep this rank's slice along the last dim; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x_full, group, sizes):
        ctx.group, ctx.sizes = group, sizes
        return local_slice(x_full, group, sizes)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_raw(grad, ctx.group, ctx.sizes), None, None


def copy_to_tp(x, group):
    return x if group_size(group) == 1 else _CopyToTP.apply(x, group)


def reduce_from_tp(x_partial, group):
    return x_partial if group_size(group) == 1 else _ReduceFromTP.apply(x_partial, group)


def gather_from_tp(x_shard, group, sizes=None):
    return x_shard if group_size(group) == 1 else _GatherFromTP.apply(x_shard, group, sizes)


def split_to_tp(x_full, group, sizes=None):
    return x_full if group_size(group) == 1 else _SplitToTP.apply(x_full, group, sizes)
