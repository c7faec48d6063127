"""y = x @ W^T (+ b) with forward, input gradient and weight gradient all on the Triton GEMM.

x: [..., in], W: [out, in] (nn.Linear layout). dgrad: dx = dy @ W; wgrad: dW = dy^T @ x, both strided views.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .gemm import matmul


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., F] as [rows, F]; explicit sizes because reshape(-1, 0) is ambiguous (an empty TP shard has F = 0)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1])


class TritonLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
        x_2d = _rows(x)
        y = matmul(x_2d, weight.t())
        if bias is not None:
            y += bias
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, weight = ctx.saved_tensors
        dy_2d = _rows(dy)
        if dy_2d.stride(-1) != 1:
            dy_2d = dy_2d.contiguous()
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = matmul(dy_2d, weight).reshape(x.shape)
        if ctx.needs_input_grad[1]:
            dw = matmul(dy_2d.t(), _rows(x))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy_2d.sum(0)
        return dx, dw, db


def triton_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return TritonLinear.apply(x, weight, bias)
