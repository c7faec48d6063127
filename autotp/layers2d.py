"""2-D tensor-parallel layers on a `grid.Grid` (the TP chapter's third example; Optimus, arXiv 2104.05343).

Activations between layers are [B/r, S, H/c] on rank (i, j): the batch split over the grid's rows, the features
over its columns. So attention heads split over the columns need no communication (each rank has whole sequences
of its heads), and a norm only sums its statistics over the row group.

| piece            | forward                                                   | backward                               |
|------------------|-----------------------------------------------------------|----------------------------------------|
| ParallelLinear2D | all-gather x's features (row), A's K blocks (column), GEMM | dx: reduce-scatter over the row;       |
|                  |                                                           | dA: reduce-scatter over the column     |
| RMSNorm2D        | sum of squares all-reduced over the row                    | the same sum, all-reduced              |
Replicated pieces (a bias or norm weight block, held by the r ranks of a column) get their gradients summed over
the column, whose ranks saw different samples.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .grid import Grid


class _Linear2D(torch.autograd.Function):
    """y_ij [.., N/c] = gather_row(x_ij) [.., K] @ gather_col(w_ij)^T [K, N/c] (+ b_j)."""

    @staticmethod
    def forward(ctx, x_ij, w_ij, b_j, grid: Grid):
        x_i = comm.all_gather_raw(x_ij, grid.row_group, dim=-1)
        w_j = comm.all_gather_raw(w_ij, grid.col_group, dim=1)
        ctx.save_for_backward(x_i, w_j)
        ctx.grid, ctx.has_bias = grid, b_j is not None
        return F.linear(x_i, w_j, b_j)

    @staticmethod
    def backward(ctx, dy):
        x_i, w_j = ctx.saved_tensors
        grid = ctx.grid
        dx_ij = dw_ij = db_j = None
        if ctx.needs_input_grad[0]:
            dx_ij = comm.reduce_scatter_raw(dy @ w_j, grid.row_group, dim=-1)  # partial over the row's N blocks
        if ctx.needs_input_grad[1]:
            dw_j = dy.flatten(0, -2).t() @ x_i.flatten(0, -2)  # [N/c, K], partial over the column's samples
            dw_ij = comm.reduce_scatter_raw(dw_j, grid.col_group, dim=1)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db_j = dy.flatten(0, -2).sum(0)  # summed over the column by the bias's copy_to_tp
        return dx_ij, dw_ij, db_j, None


class _SumOverGroup(torch.autograd.Function):
    """forward: all-reduce (sum) a statistic every rank of the group uses; backward: all-reduce its gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return comm.all_reduce_raw(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return comm.all_reduce_raw(grad.clone(), ctx.group), None


COUNT_ONCE_ATTR = "autotp_count_once"
"""The weight of a parameter's squared gradient in the grid's global norm (`zero.norm.count_once_weights`): 1 for
a block only this rank holds, and for a block the r ranks of a grid column share, 1 on grid row 0 and 0 elsewhere."""


def _count_once(param: nn.Parameter, replicated_over_rows: bool, grid: Grid) -> nn.Parameter:
    setattr(param, COUNT_ONCE_ATTR, 0.0 if replicated_over_rows and grid.i != 0 else 1.0)
    return param


def _block(size: int, parts: int, index: int, what: str) -> slice:
    if size % parts:
        raise ValueError(f"2-D tensor parallelism: {what} of {size} is not divisible by {parts}")
    step = size // parts
    return slice(index * step, (index + 1) * step)


class ParallelLinear2D(nn.Module):
    """A dense nn.Linear [N, K] held as its (j, i) block [N/c, K/r]; input [.., K/c], output [.., N/c]."""

    def __init__(self, linear: nn.Linear, grid: Grid):
        super().__init__()
        N, K = linear.weight.shape
        rows_n = _block(N, grid.cols, grid.j, "the output features (grid columns)")
        cols_k = _block(K, grid.rows, grid.i, "the input features (grid rows)")
        _block(K, grid.cols, grid.j, "the input features (grid columns)")  # the activations' split
        self.grid = grid
        self.in_features, self.out_features = K, N
        self.weight = _count_once(nn.Parameter(linear.weight.detach()[rows_n, cols_k].clone()), False, grid)
        self.bias = None if linear.bias is None else _count_once(
            nn.Parameter(linear.bias.detach()[rows_n].clone()), True, grid)

    def forward(self, x_ij: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else comm.copy_to_tp(self.bias, self.grid.col_group)
        return _Linear2D.apply(x_ij, self.weight, bias, self.grid)

    def extra_repr(self) -> str:
        return (f"2-D grid {self.grid.rows}x{self.grid.cols} at ({self.grid.i}, {self.grid.j}): "
                f"local={tuple(self.weight.shape)}, unsharded=({self.out_features}, {self.in_features}), "
                f"bias={self.bias is not None}")


class RMSNorm2D(nn.Module):
    """RMSNorm over H features split over the grid's columns: x_ij [.., H/c], weight block [H/c]."""

    def __init__(self, weight: torch.Tensor, eps: float, grid: Grid):
        super().__init__()
        H = weight.shape[0]
        self.grid, self.hidden, self.eps = grid, H, eps
        self.weight = _count_once(nn.Parameter(weight.detach()[_block(H, grid.cols, grid.j, "the hidden size")].clone()),
                                  True, grid)

    def forward(self, x_ij: torch.Tensor) -> torch.Tensor:
        squares = x_ij.float().pow(2).sum(-1, keepdim=True)
        squares = _SumOverGroup.apply(squares, self.grid.row_group) if self.grid.cols > 1 else squares
        normed = (x_ij.float() * torch.rsqrt(squares / self.hidden + self.eps)).to(x_ij.dtype)
        return normed * comm.copy_to_tp(self.weight, self.grid.col_group)


class Embedding2D(nn.Module):
    """An embedding [V, H] held as its column block [V, H/c] (replicated over the grid's rows): ids [B/r, S] ->
    [B/r, S, H/c]."""

    def __init__(self, embedding: nn.Embedding, grid: Grid):
        super().__init__()
        H = embedding.weight.shape[1]
        self.grid = grid
        self.padding_idx = embedding.padding_idx
        self.weight = _count_once(nn.Parameter(
            embedding.weight.detach()[:, _block(H, grid.cols, grid.j, "the hidden size")].clone()), True, grid)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, comm.copy_to_tp(self.weight, self.grid.col_group), self.padding_idx)


class Head2D(ParallelLinear2D):
    """The LM head as a 2-D linear whose logits [B/r, S, V/c] are gathered over the row to [B/r, S, V]."""

    def forward(self, x_ij: torch.Tensor) -> torch.Tensor:
        return comm.gather_from_tp(super().forward(x_ij), self.grid.row_group)


def split_activation(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """[B, ..., H] -> this rank's [B/r, ..., H/c] (no communication)."""
    batch = _block(x.shape[0], grid.rows, grid.i, "the batch (grid rows)")
    features = _block(x.shape[-1], grid.cols, grid.j, "the features (grid columns)")
    return x[batch][..., features].contiguous()


def gather_activation(x_ij: torch.Tensor, grid: Grid) -> torch.Tensor:
    """This rank's [B/r, ..., H/c] -> the whole [B, ..., H] on every rank (no autograd)."""
    x_i = comm.all_gather_raw(x_ij, grid.row_group, dim=-1)
    return comm.all_gather_raw(x_i, grid.col_group, dim=0)


def bytes_sent(op: str, tokens: int, K: int, N: int, grid: Optional[Grid] = None, tp: int = 1,
               elem: int = 2, grad_elem: int = 4) -> int:
    """Bytes one rank sends for one linear layer's forward + backward, ring collectives (a ring all-gather sends
    (n-1) shards, a ring reduce-scatter or all-reduce (n-1)/n or 2(n-1)/n of its input). `op`: "1d-column" /
    "1d-row" (tp ranks, Megatron pairs: the column layer all-reduces its input gradient, the row layer its
    output) or "2d" (the grid's rows x cols). `tokens` is the whole batch's; weight gradients travel in
    `grad_elem` bytes."""
    if op in ("1d-column", "1d-row"):
        return 0 if tp == 1 else int(2 * (tp - 1) / tp * tokens * (K if op == "1d-column" else N) * elem)
    r, c = grid.rows, grid.cols
    x_shard = tokens // r * K // c * elem
    sent = (c - 1) * x_shard                                   # all-gather x's features over the row
    sent += (r - 1) * (N // c) * (K // r) * elem               # all-gather A's K blocks over the column
    sent += (c - 1) * (tokens // r) * (K // c) * elem          # reduce-scatter dx over the row
    sent += (r - 1) * (N // c) * (K // r) * grad_elem          # reduce-scatter dA over the column
    return sent
