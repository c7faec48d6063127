"""Autograd Functions for TP linear layers whose collective runs inside the GEMM (`fused`).

Weights come in the module's own layout: nn.Linear [N, K] or GPT-2's Conv1D [K, N] (`conv1d`). Activations are
[..., K]; the sequence-parallel variants take [B, S, K] with the sequence split over the group.

| Function                   | forward                          | backward                                          |
|----------------------------|----------------------------------|---------------------------------------------------|
| RowLinearAllReduce         | GEMM + all-reduce (fused)        | local dgrad and wgrad                             |
| ColumnLinearGradAllReduce  | local GEMM (+ bias)              | dgrad + all-reduce (fused), wgrad under its tail  |
| RowLinearReduceScatter     | GEMM + reduce-scatter (fused)    | all-gather + dgrad (fused), wgrad                 |
| ColumnLinearAllGather      | all-gather + GEMM (fused)        | dgrad + reduce-scatter (fused), wgrad under tail  |
"""

from __future__ import annotations

import torch

from . import fused
from .gemm import matmul


def _w_kn(weight, conv1d):
    return weight if conv1d else weight.t()


def _w_nk(weight, conv1d):
    return weight.t() if conv1d else weight


def _mm(a, b, gemm):
    return matmul(a, b) if gemm == "triton" else torch.mm(a, b)


def weight_grad(dy_2d, x_2d, conv1d: bool, gemm: str):
    """dW in the weight's own layout: Linear dy^T x [N, K]; Conv1D x^T dy [K, N]."""
    return _mm(x_2d.t(), dy_2d, gemm) if conv1d else _mm(dy_2d.t(), x_2d, gemm)


def _as_2d(t):
    t = t.flatten(0, -2)  # not reshape(-1, F): ambiguous for an empty TP shard (F = 0)
    return t if t.stride(-1) == 1 else t.contiguous()


class RowLinearAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_shard_k, weight, conv1d: bool, group, gemm: str):
        ctx.save_for_backward(x_shard_k, weight)
        ctx.conv1d, ctx.gemm = conv1d, gemm
        x_3d = _as_2d(x_shard_k).unsqueeze(0)
        y = fused.matmul_reduce([(x_3d, _w_kn(weight, conv1d))], group, gemm=gemm)
        return y.view(*x_shard_k.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy_2d = _as_2d(dy)
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = _mm(dy_2d, _w_nk(weight, ctx.conv1d), ctx.gemm).view(x.shape)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy_2d, _as_2d(x), ctx.conv1d, ctx.gemm)
        return dx, dw, None, None, None


class ColumnLinearGradAllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, conv1d: bool, group, gemm: str):
        ctx.save_for_backward(x, weight)
        ctx.conv1d, ctx.group, ctx.gemm, ctx.has_bias = conv1d, group, gemm, bias is not None
        y = _mm(_as_2d(x), _w_kn(weight, conv1d), gemm)
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy_2d = _as_2d(dy)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = fused.matmul_reduce([(dy_2d.unsqueeze(0), _w_nk(weight, ctx.conv1d))], ctx.group, gemm=ctx.gemm,
                                     defer_join=True).view(x.shape)
        # The weight gradient runs on the compute stream while the reduction's tail is still on the wire.
        if ctx.needs_input_grad[1]:
            dw = weight_grad(dy_2d, _as_2d(x), ctx.conv1d, ctx.gemm)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_2d.sum(0)
        if dx is not None:
            fused.join(ctx.group, dy.device)
        return dx, dw, db, None, None, None


class RowLinearReduceScatter(torch.autograd.Function):
    """x [B, S, K/W] (sequence whole, features split) -> y [B, S/W, N] (summed, sequence split)."""

    @staticmethod
    def forward(ctx, x_shard_k, weight, conv1d: bool, group, gemm: str):
        ctx.save_for_backward(x_shard_k, weight)
        ctx.conv1d, ctx.group, ctx.gemm = conv1d, group, gemm
        return fused.matmul_reduce([(x_shard_k, _w_kn(weight, conv1d))], group, scatter=True, gemm=gemm)

    @staticmethod
    def backward(ctx, dy_shard_s):
        x, weight = ctx.saved_tensors
        dy_full, (dx,) = fused.all_gather_matmul(dy_shard_s.contiguous(), [_w_nk(weight, ctx.conv1d)], ctx.group,
                                                 gemm=ctx.gemm)
        dw = weight_grad(_as_2d(dy_full), _as_2d(x), ctx.conv1d, ctx.gemm) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None, None


class ColumnLinearAllGather(torch.autograd.Function):
    """x [B, S/W, K] (sequence split) -> y [B, S, N/W] (sequence whole, features split)."""

    @staticmethod
    def forward(ctx, x_shard_s, weight, bias, conv1d: bool, group, gemm: str):
        x_full, (y,) = fused.all_gather_matmul(x_shard_s.contiguous(), [_w_kn(weight, conv1d)], group, gemm=gemm)
        if bias is not None:
            y += bias
        ctx.save_for_backward(x_full, weight)
        ctx.conv1d, ctx.group, ctx.gemm, ctx.has_bias = conv1d, group, gemm, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x_full, weight = ctx.saved_tensors
        dy = dy.contiguous()
        dx = fused.matmul_reduce([(dy, _w_nk(weight, ctx.conv1d))], ctx.group, scatter=True, gemm=ctx.gemm,
                                 defer_join=True)
        dy_2d = _as_2d(dy)
        dw = weight_grad(dy_2d, _as_2d(x_full), ctx.conv1d, ctx.gemm) if ctx.needs_input_grad[1] else None
        db = dy_2d.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        fused.join(ctx.group, dy.device)
        return dx, dw, db, None, None, None
