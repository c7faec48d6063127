"""Tensor-parallel collectives as conjugate autograd pairs (Megatron's mappings, written for autotp).

Each pair is named for its forward direction; the docstring gives both halves. Every function returns its
input untouched when the group has one rank, so TP=1 costs nothing. Uneven shards (a vocabulary that tp does
not divide) are gathered by padding to the largest shard and trimming, so every rank issues one collective
of one size.

Two families: over features (the last dimension: column and row layers, the vocabulary) and over the sequence
(`SEQ_DIM` of [batch, sequence, hidden] activations: sequence parallelism). `*_raw` helpers have no autograd.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .shard import split_sizes

SEQ_DIM = 1
"""The sequence dimension of [batch, sequence, hidden] activations, split under sequence parallelism."""

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


# Over the sequence (sequence parallelism). Any length works: rank r holds `sequence_sizes(length)[r]` positions.


def sequence_sizes(length: int, group) -> list[int]:
    """Each rank's share of a sequence of `length` (the first ranks one more when the group does not divide it)."""
    return split_sizes(length, group_size(group))


def reduce_scatter_raw(x_partial: torch.Tensor, group, dim: int, sizes: Optional[Sequence[int]] = None):
    """Sum over `group` and keep this rank's slice along `dim` (`sizes[r]`: rank r's extent; default equal). No
    autograd. Equal slices go through one flat reduce-scatter (a view with `dim` moved back last); uneven ones are
    all-reduced, then sliced."""
    world = group_size(group)
    if world == 1:
        return x_partial
    sizes = list(sizes) if sizes is not None else [x_partial.shape[dim] // world] * world
    if len(set(sizes)) == 1:
        # the flat reduce-scatter splits dim 0: put `dim` first, contiguous.
        moved = x_partial.movedim(dim, 0).contiguous()
        out = moved.new_empty((sizes[0],) + tuple(moved.shape[1:]))
        reduce_scatter_flat(out, moved, group=group)
        return out.movedim(0, dim)
    summed = all_reduce_raw(x_partial.clone(), group)
    return local_slice(summed, group, sizes, dim=dim)


def reduce_scatter_sequence_raw(x_partial: torch.Tensor, group, sizes: Sequence[int]) -> torch.Tensor:
    """Sum over `group` and keep this rank's sequence slice (no autograd)."""
    return reduce_scatter_raw(x_partial, group, SEQ_DIM, sizes).contiguous()


class _ScatterToSequence(torch.autograd.Function):
    """forward: keep this rank's sequence slice; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.sizes = group, sequence_sizes(x.shape[SEQ_DIM], group)
        return local_slice(x, group, ctx.sizes, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_raw(grad.contiguous(), ctx.group, ctx.sizes, dim=SEQ_DIM), None


class _GatherSequence(torch.autograd.Function):
    """forward: all-gather the sequence; backward: reduce-scatter (consumers are TP layers holding partial input
    gradients) or keep this rank's slice (a replicated consumer computes the whole gradient on every rank)."""

    @staticmethod
    def forward(ctx, x_shard, group, length: int, partial_grad: bool):
        ctx.group, ctx.sizes, ctx.partial = group, sequence_sizes(length, group), partial_grad
        return all_gather_raw(x_shard.contiguous(), group, ctx.sizes, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return reduce_scatter_sequence_raw(grad, ctx.group, ctx.sizes), None, None, None
        return local_slice(grad, ctx.group, ctx.sizes, dim=SEQ_DIM), None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """forward: sum partial outputs over TP, keep this rank's sequence slice; backward: all-gather."""

    @staticmethod
    def forward(ctx, x_partial, group):
        ctx.group, ctx.sizes = group, sequence_sizes(x_partial.shape[SEQ_DIM], group)
        return reduce_scatter_sequence_raw(x_partial, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_raw(grad.contiguous(), ctx.group, ctx.sizes, dim=SEQ_DIM), None


def scatter_to_sequence(x, group):
    return x if group_size(group) == 1 else _ScatterToSequence.apply(x, group)


def gather_sequence(x_shard, group, length: int, partial_grad: bool):
    """`length`: the whole sequence's; `partial_grad`: whether the consumers' input gradients are partial sums."""
    return x_shard if group_size(group) == 1 else _GatherSequence.apply(x_shard, group, length, partial_grad)


def reduce_scatter_sequence(x_partial, group):
    return x_partial if group_size(group) == 1 else _ReduceScatterSequence.apply(x_partial, group)
