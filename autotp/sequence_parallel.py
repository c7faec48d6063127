"""Sequence parallelism: between TP regions, activations are split over the sequence across the TP group.

Without it every TP rank runs the norms, residual adds and dropouts of every block on the whole sequence, so
activation memory does not shrink with TP. With it (Megatron's scheme, applied to an HF model in place):
  - the first decoder layer's input is split over the sequence (backward: all-gather);
  - each TP region (a module holding row-parallel layers: attention, MLP) all-gathers the sequence on entry
    (backward: reduce-scatter, which also sums its column layers' partial input gradients in one collective);
    its row layers reduce-scatter their partial sums themselves (backward: all-gather), so the region's tail
    (residual dropout) runs on the shard. With the fused kernels both ends run inside GEMMs: the entry gather
    under the entry column layers' GEMMs (`_GatherMatmuls`), the row layers' reduce-scatter inside theirs;
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
        # the flat reduce-scatter splits dim 0: put the sequence first, contiguous.
        seq_first = x_partial.transpose(0, SEQ_DIM).contiguous()
        out = seq_first.new_empty((sizes[0],) + tuple(seq_first.shape[1:]))
        comm.reduce_scatter_flat(out, seq_first, group=group)
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


class _GatherMatmuls(torch.autograd.Function):
    """A region's entry, fused: all-gather the sequence and multiply it by every entry column layer's weight while
    the shards arrive. forward: (x_full, y_1, ..., y_n); backward: the input gradient sum_i dy_i W_i (+ the
    gradient of x_full from other consumers) reduce-scattered over the sequence, fused with its GEMMs, and the
    weight gradients dy_i^T x_full."""

    @staticmethod
    def forward(ctx, x_shard, group, gemm, layers, *weights):
        from autotp_kernels import fused
        from autotp_kernels.tp_linear import _w_kn

        x_full, ys = fused.all_gather_matmul(x_shard.contiguous(), [_w_kn(w, m.conv1d) for w, m in
                                                                    zip(weights, layers)], group, gemm=gemm)
        ctx.save_for_backward(x_full, *weights)
        ctx.group, ctx.gemm, ctx.layers = group, gemm, layers
        return (x_full, *ys)

    @staticmethod
    def backward(ctx, grad_x_full, *grad_ys):
        from autotp_kernels import fused
        from autotp_kernels.tp_linear import _w_nk, weight_grad

        x_full, *weights = ctx.saved_tensors
        pairs = [(g.contiguous(), _w_nk(w, m.conv1d)) for g, w, m in zip(grad_ys, weights, ctx.layers)
                 if g is not None]
        sizes = _sizes(x_full.shape[SEQ_DIM], ctx.group)
        dx = fused.matmul_reduce(pairs, ctx.group, scatter=True, gemm=ctx.gemm, defer_join=True) if pairs else None
        x_2d = x_full.reshape(-1, x_full.shape[-1])
        grad_ws = [None if g is None else weight_grad(g.flatten(0, -2), x_2d, m.conv1d, ctx.gemm)
                   for g, m in zip(grad_ys, ctx.layers)]
        if pairs:
            fused.join(ctx.group, x_full.device)
        if grad_x_full is not None:
            extra = _reduce_scatter_seq(grad_x_full, ctx.group, sizes)
            dx = extra if dx is None else dx + extra
        return (dx, None, None, None, *grad_ws)


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
        entry = entries[module]
        gemm = entry[0]._fused_gemm(x, x.numel() * x.element_size()) if entry else None
        if gemm is not None and x.dim() == 3 and state.length % comm.group_size(group) == 0:
            x_full, *ys = _GatherMatmuls.apply(x, group, gemm, entry, *[m.weight for m in entry])
            for layer, y in zip(entry, ys):
                layer.autotp_entry_output = (x_full, y)  # taken (once) by the layer when called with x_full
            return _replace_hidden_states(args, kwargs, x_full)
        return _replace_hidden_states(args, kwargs, _GatherSequence.apply(x, group, state.length, True))

    def clear_region(module, args, output):
        for layer in entries[module]:  # outputs a layer was not called for must not outlive the forward
            layer.autotp_entry_output = None

    state.hooks.append(layers[0].register_forward_pre_hook(scatter, with_kwargs=True))
    regions = {}
    for name, module in layers.named_modules():
        for child in module.children():
            if isinstance(child, RowParallelLinear):
                regions[name] = module
    # The region's entry layers: column layers that are its direct children (q, k, v; gate, up; GPT-2's c_attn,
    # c_fc), which HF models call on the region's input. A layer called on anything else computes as usual.
    entries = {region: [child for child in region.children()
                        if isinstance(child, ColumnParallelLinear) and not child.gather_output]
               for region in regions.values()}
    for region in regions.values():
        for layer in region.modules():
            if isinstance(layer, (ColumnParallelLinear, RowParallelLinear)):
                layer.sequence_parallel = True
        state.hooks.append(region.register_forward_pre_hook(gather_region, with_kwargs=True))
        state.hooks.append(region.register_forward_hook(clear_region))
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
