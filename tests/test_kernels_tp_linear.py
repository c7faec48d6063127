"""The fused TP autograd Functions' wiring (which operand, transpose and collective each gradient takes), on CPU.

The fused collectives need CUDA peer memory, so here `fused.matmul_reduce` and `fused.all_gather_matmul` are
replaced by their cuBLAS-then-NCCL twins (`sequential_*`, over gloo), which compute the same function; the GPU
check (tests/gpu/fused_check.py) covers the kernels themselves. Each Function's output and input / weight
gradients on 2 ranks must equal a dense single-process model in fp64 (tolerance 1e-12: the only difference is
summation order in fp64).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed

pytest.importorskip("triton")

B, S, K, N = 2, 6, 8, 10


def _dense(x, w, conv1d):
    return x @ w if conv1d else x @ w.t()


def _case(rank, world, name, conv1d):
    import torch.distributed as dist

    from autotp_kernels import fused, tp_linear

    fused.matmul_reduce = lambda pairs, group, scatter=False, gemm="cublas", defer_join=False: (
        fused.sequential_matmul_reduce(pairs, group, scatter=scatter))
    fused.all_gather_matmul = lambda x, weights, group, gemm="cublas": fused.sequential_all_gather_matmul(
        x, weights, group)
    group = dist.group.WORLD
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, K, generator=gen, dtype=torch.float64)
    w = torch.randn(K, N, generator=gen, dtype=torch.float64) if conv1d else torch.randn(N, K, generator=gen,
                                                                                         dtype=torch.float64)
    bias = torch.randn(N, generator=gen, dtype=torch.float64)
    dy = torch.randn(B, S, N, generator=gen, dtype=torch.float64)
    k_dim, n_dim = (0, 1) if conv1d else (1, 0)
    k_slice, n_slice, s_slice = (slice(rank * d // world, (rank + 1) * d // world) for d in (K, N, S))
    xs, ws, bs = x.clone().requires_grad_(), w.clone().requires_grad_(), bias.clone().requires_grad_()
    row = name.startswith("row")
    y_ref = _dense(xs, ws, conv1d) + (bs if not row else 0)
    y_ref.backward(dy)
    # This rank's pieces of the input, the weight and the output gradient, as the TP layer holds them.
    w_local = w.narrow(k_dim if row else n_dim, (k_slice if row else n_slice).start, (K if row else N) // world)
    w_local = w_local.clone().requires_grad_()
    if name == "row+AR":
        x_local, dy_local = x[..., k_slice], dy
        y = tp_linear.RowLinearAllReduce.apply(x_local.clone().requires_grad_(), w_local, conv1d, group, "cublas")
        want_y, want_dx = y_ref, xs.grad[..., k_slice]
    elif name == "row+RS":
        x_local, dy_local = x[..., k_slice], dy[:, s_slice]
        y = tp_linear.RowLinearReduceScatter.apply(x_local.clone().requires_grad_(), w_local, conv1d, group,
                                                   "cublas")
        want_y, want_dx = y_ref[:, s_slice], xs.grad[..., k_slice]
    elif name == "col/AR-grad":
        x_local, dy_local = x, dy[..., n_slice]
        y = tp_linear.ColumnLinearGradAllReduce.apply(x_local.clone().requires_grad_(), w_local, None, conv1d, group,
                                                      "cublas")
        want_y, want_dx = y_ref[..., n_slice] - bias[n_slice], xs.grad
    else:  # AG+col
        x_local, dy_local = x[:, s_slice], dy[..., n_slice]
        b_local = bias[n_slice].clone().requires_grad_()
        y = tp_linear.ColumnLinearAllGather.apply(x_local.clone().requires_grad_(), w_local, b_local, conv1d, group,
                                                  "cublas")
        want_y, want_dx = y_ref[..., n_slice], xs.grad[:, s_slice]
    inputs = [t for t in y.grad_fn.next_functions if t[0] is not None]
    y.backward(dy_local)
    x_leaf = inputs[0][0].variable
    want_dw = ws.grad.narrow(k_dim if row else n_dim, (k_slice if row else n_slice).start, (K if row else N) // world)
    for got, want, what in ((y, want_y, "output"), (x_leaf.grad, want_dx, "input grad"),
                            (w_local.grad, want_dw, "weight grad")):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name} conv1d={conv1d}: {what}")
    return True


@pytest.mark.parametrize("conv1d", [False, True])
@pytest.mark.parametrize("name", ["row+AR", "row+RS", "col/AR-grad", "AG+col"])
def test_fused_functions_match_the_dense_layer(name, conv1d):
    assert run_distributed(2, _case, name, conv1d) == [True, True]
