"""Tensor-parallel linear layers: column- and row-parallel, and the fused entry of a sequence-parallel region.

Shapes (R = TP ranks, M tokens, K input features, N output features):

| layer            | weight held (Linear layout) | input            | output                          |
|------------------|-----------------------------|------------------|---------------------------------|
| column           | w_shard_n [N/R, K]          | x [M, K]         | y_shard_n [M, N/R] (or gathered) |
| row              | w_shard_k [N, K/R]          | x_shard_k [M, K/R] (or split here) | y [M, N] after all-reduce |

Conv1D (GPT-2) keeps its [K, N] layout so parameter names and orientation match the original model; the
shard metadata records which dimension was cut. Each layer receives its `ColumnMode` / `RowMode`
(`linear_mode`) at construction, and its forward picks one path from it: plain GEMM and a `comm` pair, or a
fused GEMM + collective Function of `autotp_kernels`. That package (and triton with it) is imported only where a
fused path runs: never on the CPU unless `fused.TUNING.emulate` is on.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .comm import SEQ_DIM
from .linear_mode import ColumnMode, LinearMode, RegionEntry, RowMode
from .shard import ShardLayout


def _linear(x, weight, bias, conv1d: bool, kernels: str):
    if kernels == "triton":
        from autotp_kernels import triton_linear  # imported on use: triton is only needed for this path

        # Conv1D stores [in, out]; its transpose is an [out, in] view, no copy.
        return triton_linear(x, weight.t() if conv1d else weight, bias)
    if conv1d:
        out = torch.matmul(x, weight)
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


def _fused_emulated() -> bool:
    """Whether `autotp_kernels.fused.TUNING.emulate` is on, read without importing the kernels: its environment
    variable, or the flag on the module when a caller has already imported it."""
    if os.environ.get("AUTOTP_FUSED_EMULATE") == "1":
        return True
    fused = sys.modules.get("autotp_kernels.fused")
    return fused is not None and fused.TUNING.emulate


class _ParallelLinear(nn.Module):
    mode_type: type = LinearMode

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], layout: ShardLayout, tp_group,
                 tp_rank: int, conv1d: bool, full_in: int, full_out: int):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.layout = layout
        self.tp_group = tp_group
        self.tp_rank = tp_rank
        self.conv1d = conv1d
        self.full_in_features = full_in
        self.full_out_features = full_out
        # Linear-compatible attributes: HF code sometimes reads these (e.g. `module.in_features`).
        self.in_features = weight.shape[0] if conv1d else weight.shape[1]
        self.out_features = weight.shape[1] if conv1d else weight.shape[0]
        self.mode = None

    def set_mode(self, mode: LinearMode) -> None:
        """Swap the whole mode (e.g. other kernels for a model `parallelize` already sharded)."""
        if type(mode) is not self.mode_type:
            raise TypeError(f"{type(self).__name__} takes a {self.mode_type.__name__}, got {type(mode).__name__}")
        self.mode = mode

    def _index_buffer(self, name: str, needed: bool, build) -> None:
        """A non-persistent index buffer the mode needs (kept on the weight's device), or None."""
        if not needed:
            self.register_buffer(name, None, persistent=False)
        elif getattr(self, name) is None:
            self.register_buffer(name, build().to(self.weight.device), persistent=False)

    def fused_gemm(self, x: torch.Tensor, op: str, K: int, N: int, rows: Optional[int] = None,
                   backward: Optional[tuple] = None) -> Optional[str]:
        """The GEMM to run under a fused collective (`cublas` or `triton`), or None for GEMM then NCCL.

        `op` (AR, RS or AG) and the local GEMM's `rows` (default: x's) x K x N name the fused op; `backward`
        (op, K, N) the fused op its backward then runs (a fused reduce-scatter's backward is a fused all-gather
        and the reverse): `auto` fuses only where both measured faster. Fused needs CUDA and a TP
        group of 2-8 ranks; `triton` always fuses, `auto` where the committed table measured this shape's fused
        op faster than cuBLAS then NCCL (`autotp_kernels.auto_table`)."""
        kernels = self.mode.kernels
        if kernels == "torch" or self.layout.tp_size == 1:
            return None
        if not x.is_cuda and not _fused_emulated():
            return None  # fused ops need CUDA peer memory: on the CPU nothing imports the kernel package (triton)
        from autotp_kernels import auto_table, fused, symm  # imported on use: triton is only needed here

        if not (x.is_cuda and symm.available(self.tp_group)) and not fused.TUNING.emulate:
            return None
        M = x[..., :1].numel() if rows is None else rows
        wanted = [(op, K, N)] + ([backward] if backward is not None else [])
        if kernels == "auto" and not (fused.TUNING.always or all(
                auto_table.fuses(name, self.layout.tp_size, M, k, n) for name, k, n in wanted)):
            return None
        return "triton" if kernels == "triton" else "cublas"

    def extra_repr(self) -> str:
        mode = self.mode.describe()
        return (f"{type(self).__name__.replace('ParallelLinear', '').lower()}: tp_rank={self.tp_rank}/"
                f"{self.layout.tp_size}, local={tuple(self.weight.shape)}, unsharded_in={self.full_in_features}, "
                f"unsharded_out={self.full_out_features}, bias={self.bias is not None}"
                + (", conv1d" if self.conv1d else "") + (", " + mode if mode else ""))


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over TP. forward: copy input, local GEMM, optionally all-gather the output;
    backward: all-reduce the input gradient (inside a sequence-parallel region the region's gather does both)."""

    mode_type = ColumnMode

    def __init__(self, *args, mode: ColumnMode = ColumnMode(), **kwargs):
        super().__init__(*args, **kwargs)
        self.gather_sizes = [self.layout.local_size(r) for r in range(self.layout.tp_size)]
        self.register_buffer("gather_order", None, persistent=False)
        self.set_mode(mode)

    def set_mode(self, mode: ColumnMode) -> None:
        super().set_mode(mode)
        self._index_buffer("gather_order", mode.may_gather() and not self.layout.is_plain, self._gather_order)

    def _gather_order(self) -> torch.Tensor:
        """Shards of a fused projection interleave by rank after the gather ([q0 k0 v0 | q1 k1 v1]); this index
        puts the gathered features back in the original order, replicated KV pieces taken once."""
        order, offset = torch.empty(self.layout.full_size, dtype=torch.long), 0
        for rank in range(self.layout.tp_size):
            index = self.layout.local_index(rank)
            order[index] = torch.arange(offset, offset + len(index))
            offset += len(index)
        return order

    def forward(self, x):
        mode = self.mode
        if mode.region_entry is not None:
            y_shard_n = mode.region_entry.take(self, x)
            if y_shard_n is not None:  # the region computed it while gathering its input (fused)
                return y_shard_n + self.bias if self.bias is not None else y_shard_n
        gather = mode.gathers()
        # A LoRA wrapper's copy of the input: its backward all-reduces the base's and the adapter's gradients at once.
        wrapped = mode.adapter_call is not None and mode.adapter_call.take(x)
        # Fused here is the backward's dgrad [M, N/R] @ [N/R, K] + all-reduce.
        gemm = None if mode.sequence_parallel or gather or wrapped else self.fused_gemm(
            x, "AR", self.out_features, self.in_features)
        if gemm is not None:
            from autotp_kernels.tp_linear import ColumnLinearGradAllReduce

            # The input gradient's all-reduce runs inside its GEMM, the weight gradient under its tail.
            return ColumnLinearGradAllReduce.apply(x, self.weight, self.bias, self.conv1d, self.tp_group, gemm)
        if not mode.sequence_parallel and not wrapped:  # with SP, the region's gather reduces the input gradient
            copies = mode.input_copies
            x = copies.copy(x, self.tp_group) if copies is not None else comm.copy_to_tp(x, self.tp_group)
        y_shard_n = _linear(x, self.weight, self.bias, self.conv1d, mode.kernels)
        return self.gather(y_shard_n) if gather else y_shard_n

    def gather(self, y_shard_n: torch.Tensor) -> torch.Tensor:
        """[..., N/R] -> [..., N] in the original feature order (backward: keep this rank's slice)."""
        y = comm.gather_from_tp(y_shard_n, self.tp_group, self.gather_sizes)
        return y.index_select(-1, self.gather_order) if self.gather_order is not None else y


class RowParallelLinear(_ParallelLinear):
    """Input features split over TP. forward: (optionally split the full input), local GEMM, all-reduce (inside a
    sequence-parallel region: reduce-scatter over the sequence), add the bias once; backward: identity for the
    output gradient (all-gather over the sequence)."""

    mode_type = RowMode

    def __init__(self, *args, mode: RowMode = RowMode(), **kwargs):
        super().__init__(*args, **kwargs)
        self.split_sizes = [self.layout.local_size(r) for r in range(self.layout.tp_size)]
        self.register_buffer("input_index", None, persistent=False)
        self.set_mode(mode)

    def set_mode(self, mode: RowMode) -> None:
        super().set_mode(mode)
        self._index_buffer("input_index", mode.split_input and not self.layout.is_plain,
                           lambda: self.layout.local_index(self.tp_rank))

    def forward(self, x):
        mode = self.mode
        if mode.adapter_call is not None and mode.adapter_call.take(x):
            # The LoRA wrapper adds its adapter's partial output to this one, then all-reduces and adds the bias.
            return _linear(x, self.weight, None, self.conv1d, mode.kernels)
        if mode.split_input:
            if self.input_index is None:
                x = comm.split_to_tp(x, self.tp_group, self.split_sizes)
            else:
                x = comm.copy_to_tp(x, self.tp_group).index_select(-1, self.input_index)
        # Sequence parallel: a fused reduce-scatter here, a fused all-gather of dy [M/R, N] @ [N, K/R] in backward.
        gemm = (self.fused_gemm(x, "RS", self.in_features, self.out_features,
                                backward=("AG", self.out_features, self.in_features)) if mode.sequence_parallel
                else self.fused_gemm(x, "AR", self.in_features, self.out_features))
        if mode.sequence_parallel:
            # Every rank adds the bias to its own rows; the bias gradient is summed over TP with the norms'.
            y = self._reduce_scatter_sequence(x, gemm)
        elif gemm is not None:
            from autotp_kernels.tp_linear import RowLinearAllReduce

            y = RowLinearAllReduce.apply(x, self.weight, self.conv1d, self.tp_group, gemm)
        else:
            y = comm.reduce_from_tp(_linear(x, self.weight, None, self.conv1d, mode.kernels), self.tp_group)
        return y + self.bias if self.bias is not None else y

    def _reduce_scatter_sequence(self, x, gemm: Optional[str]):
        """x [B, S, K/R] (the region gathered the sequence) -> y [B, S/R, N]: the partial sums are reduce-scattered
        over the sequence here, so the rest of the region (residual dropout, adds) already runs on the shard."""
        if gemm is not None and x.dim() == 3 and x.shape[SEQ_DIM] % self.layout.tp_size == 0:
            from autotp_kernels.tp_linear import RowLinearReduceScatter

            return RowLinearReduceScatter.apply(x, self.weight, self.conv1d, self.tp_group, gemm)
        y_partial = _linear(x, self.weight, None, self.conv1d, self.mode.kernels)
        return comm.reduce_scatter_sequence(y_partial, self.tp_group)


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
        sizes = comm.sequence_sizes(x_full.shape[SEQ_DIM], ctx.group)
        dx = fused.matmul_reduce(pairs, ctx.group, scatter=True, gemm=ctx.gemm, defer_join=True) if pairs else None
        x_2d = x_full.reshape(-1, x_full.shape[-1])
        grad_ws = [None if g is None else weight_grad(g.flatten(0, -2), x_2d, m.conv1d, ctx.gemm)
                   for g, m in zip(grad_ys, ctx.layers)]
        if pairs:
            fused.join(ctx.group, x_full.device)
        if grad_x_full is not None:
            extra = comm.reduce_scatter_sequence_raw(grad_x_full, ctx.group, sizes)
            dx = extra if dx is None else dx + extra
        return (dx, None, None, None, *grad_ws)


def gather_region_input(entry: RegionEntry, x_shard_s: torch.Tensor, group, length: int) -> torch.Tensor:
    """A sequence-parallel region's input [B, S/R, H] gathered to [B, S, H] (backward: reduce-scatter, which also
    sums the region's column layers' partial input gradients). Where the entry layers run fused, the gather runs
    under their GEMMs and each product waits in `entry` for its layer."""
    layers = entry.layers
    # Decided on the gathered GEMM [M, K] @ [K, sum of the entry layers' N/R].
    # Backward: the entry layers' input gradients [M, sum N/R] @ [sum N/R, H], fused with their reduce-scatter.
    width = sum(m.out_features for m in layers)
    gemm = layers[0].fused_gemm(x_shard_s, "AG", x_shard_s.shape[-1], width,
                                rows=x_shard_s[..., :1].numel() * comm.group_size(group),
                                backward=("RS", width, x_shard_s.shape[-1])) if layers else None
    if gemm is not None and x_shard_s.dim() == 3 and length % comm.group_size(group) == 0:
        x_full, *products = _GatherMatmuls.apply(x_shard_s, group, gemm, layers, *[m.weight for m in layers])
        entry.hold(x_full, products)
        return x_full
    return comm.gather_sequence(x_shard_s, group, length, partial_grad=True)
