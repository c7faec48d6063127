"""Sequence parallelism: between TP regions, activations are split over the sequence across the TP group.

Without it every TP rank runs the norms, residual adds and dropouts of every block on the whole sequence, so
activation memory does not shrink with TP. With it (Megatron's scheme, applied to an HF model in place):
  - the first decoder layer's input is split over the sequence (backward: all-gather);
  - each TP region (a module holding row-parallel layers: attention, MLP) all-gathers the sequence on entry
    (backward: reduce-scatter, which also sums its column layers' partial input gradients in one collective);
    its row layers reduce-scatter their partial sums themselves (backward: all-gather; on CUDA with
    `kernels: triton` fused into the GEMM), so the region's tail (residual dropout) runs on the shard;
  - the last decoder layer's output is gathered again (the final norm and the LM head run on the whole sequence,
    which HF models need: several reshape to the input's shape after the final norm);
  - parameters replicated over TP that now see one sequence shard each (norms, row-layer biases) get their
    gradients all-reduced over TP.
Activations are [batch, sequence, hidden]; the sequence may be any length (uneven shards are gathered padded).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm
from .layers import ColumnParallelLinear, RowParallelLinear, TPExpertsMixin
from .shard import split_sizes

SEQ_DIM = 1


def _sizes(length: int, group) -> list[int]:
    return split_sizes(length, comm.group_size(group))


def _reduce_scatter_seq(x_partial: torch.Tensor, group, sizes: list[int]) -> torch.Tensor:
    """Sum over TP and keep this rank's sequence slice."""
    if len(set(sizes)) == 1:
        # reduce_scatter_tensor splits dim 0: put the sequence first, contiguous.
        seq_first = x_partial.transpose(0, SEQ_DIM).contiguous()
        out = seq_first.new_empty((sizes[0],) + tuple(seq_first.shape[1:]))
        dist.reduce_scatter_tensor(out, seq_first, group=group)
        return out.transpose(0, SEQ_DIM).contiguous()
    summed = comm.all_reduce_raw(x_partial.clone(), group)  # uneven shards: all-reduce, then slice
    return comm.local_slice(summed, group, sizes, dim=SEQ_DIM)


class _ScatterToSequence(torch.autograd.Function):
    """forward: keep this rank's sequence slice; backward: all-gather the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.sizes = group, _sizes(x.shape[SEQ_DIM], group)
        return comm.local_slice(x, group, ctx.sizes, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_raw(grad.contiguous(), ctx.group, ctx.sizes, dim=SEQ_DIM), None


class _GatherSequence(torch.autograd.Function):
    """forward: all-gather the sequence; backward: reduce-scatter (consumers are TP layers holding partial input
    gradients) or keep this rank's slice (a replicated consumer computes the whole gradient on every rank)."""

    @staticmethod
    def forward(ctx, x_shard, group, length: int, partial_grad: bool):
        ctx.group, ctx.sizes, ctx.partial = group, _sizes(length, group), partial_grad
        return comm.all_gather_raw(x_shard.contiguous(), group, ctx.sizes, dim=SEQ_DIM)

    @staticmethod
    def backward(ctx, grad):
        if ctx.partial:
            return _reduce_scatter_seq(grad, ctx.group, ctx.sizes), None, None, None
        return comm.local_slice(grad, ctx.group, ctx.sizes, dim=SEQ_DIM), None, None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """forward: sum partial outputs over TP, keep this rank's sequence slice; backward: all-gather."""

    @staticmethod
    def forward(ctx, x_partial, group):
        ctx.group, ctx.sizes = group, _sizes(x_partial.shape[SEQ_DIM], group)
        return _reduce_scatter_seq(x_partial, group, ctx.sizes)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_gather_raw(grad.contiguous(), ctx.group, ctx.sizes, dim=SEQ_DIM), None


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden_states(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class SequenceParallelState:
    """What `enable_sequence_parallel` attached; the sequence length of the current forward lives here."""

    def __init__(self, group):
        self.group = group
        self.length: Optional[int] = None
        self.hooks: list = []


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(isinstance(m, RowParallelLinear) for m in module.modules()):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    if best is None:
        raise ValueError("sequence parallelism needs decoder layers holding row-parallel layers; none found")
    return best


def enable_sequence_parallel(model: nn.Module, group) -> SequenceParallelState:
    """Switch a TP-sharded HF causal LM to sequence parallelism in place (see the module docstring)."""
    if any(isinstance(m, TPExpertsMixin) for m in model.modules()):
        raise ValueError("sequence parallelism does not support tensor-parallel MoE experts yet")
    state = SequenceParallelState(group)
    _, layers = _decoder_layers(model)

    rng = getattr(model, "autotp_rng", None)

    def scatter(module, args, kwargs):
        x = _hidden_states(args, kwargs)
        state.length = x.shape[SEQ_DIM]
        if rng is not None:  # every activation of the stack is sharded now: dropout on the per-rank stream
            rng.pin(x.is_cuda)
        return _replace_hidden_states(args, kwargs, _ScatterToSequence.apply(x, group))

    def gather_region(module, args, kwargs):
        x = _hidden_states(args, kwargs)
        return _replace_hidden_states(args, kwargs, _GatherSequence.apply(x, group, state.length, True))

    state.hooks.append(layers[0].register_forward_pre_hook(scatter, with_kwargs=True))
    regions = {}
    for name, module in layers.named_modules():
        for child in module.children():
            if isinstance(child, RowParallelLinear):
                regions[name] = module
    for region in regions.values():
        for layer in region.modules():
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                layer.sequence_parallel = True
        state.hooks.append(region.register_forward_pre_hook(gather_region, with_kwargs=True))
    def gather_last(module, args, kwargs, output):
        # Modules after the decoder stack (final norm, reshapes to the input's shape, the LM head) see the whole
        # sequence again; they compute the same full gradient on every rank, so the backward keeps a slice.
        if rng is not None:
            rng.unpin()
        if isinstance(output, tuple):
            return (_GatherSequence.apply(output[0], group, state.length, False),) + tuple(output[1:])
        return _GatherSequence.apply(output, group, state.length, False)

    state.hooks.append(layers[-1].register_forward_hook(gather_last, with_kwargs=True))
    _sum_replicated_grads(layers, group, state)
    model.autotp_sequence_parallel = state
    return state


def _sum_replicated_grads(layers: nn.ModuleList, group, state) -> None:
    """TP-replicated parameters of the decoder layers (norms, row-layer biases) see one sequence shard per rank:
    their gradients are summed over TP. Parameters that already get that sum (per-head norms) are skipped."""
    for module in layers.modules():
        for param in module.parameters(recurse=False):
            if (not param.requires_grad or hasattr(param, "autotp_layout")
                    or getattr(param, "autotp_grad_allreduce", False)):
                continue
            param.autotp_grad_allreduce = True
            state.hooks.append(param.register_hook(lambda grad: comm.all_reduce_raw(grad.clone(), group)))
