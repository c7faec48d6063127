"""2-D tensor parallelism's layers (`autotp.layers2d` on an `autotp.grid.Grid`) against the dense block, over
gloo with real processes: a 2 x 2 grid (world 4), a 2 x 3 grid (world 6) and two 1 x 2 grids side by side.

The block is a pre-norm MLP with a residual, y = x + down(silu(up(rmsnorm(x)))), with biases; the loss is
sum(y * target) summed over ranks (each rank's part of it). Checked: the output, the input gradient and every
parameter's gradient, each rank's block against the same block of the dense model's. Tolerance: fp32, the same
products summed in another order (gathered K blocks, reduce-scattered partial sums): rtol 1e-5 / atol 1e-6 on
values of order 1 is a few ulps of each sum's terms. Also checked: the bytes each rank's collectives carry for
one linear layer equal `layers2d.bytes_sent`, the formula the README's 1-D against 2-D comparison uses.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dist_utils import run_distributed

B_PER_ROW, S, H, F = 2, 5, 12, 24


def _bench_2d():
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "bench_2d.py")
    spec = importlib.util.spec_from_file_location("bench_2d", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dense(seed):
    gen = torch.Generator().manual_seed(seed)
    up, down = nn.Linear(H, F), nn.Linear(F, H)
    with torch.no_grad():
        for p in (*up.parameters(), *down.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    norm_weight = 1 + 0.1 * torch.randn(H, generator=gen)
    return up, down, norm_weight


def _block_dense(x, up, down, norm_weight, eps):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * norm_weight
    return x + down(torch.nn.functional.silu(up(h)))


def _check(rank, world, rows, cols):
    from autotp import layers2d
    from autotp.grid import make_grid

    torch.manual_seed(0)
    grid = make_grid(rows, cols)
    eps = 1e-6
    up, down, norm_weight = _dense(7)
    B = B_PER_ROW * rows
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(B, S, H, generator=gen)
    target = torch.randn(B, S, H, generator=gen)

    norm_weight_p = nn.Parameter(norm_weight.clone())
    x_dense = x.clone().requires_grad_()
    y = _block_dense(x_dense, up, down, norm_weight_p, eps)
    (y * target).sum().backward()

    norm2d = layers2d.RMSNorm2D(norm_weight, eps, grid)
    up2d, down2d = layers2d.ParallelLinear2D(up, grid), layers2d.ParallelLinear2D(down, grid)
    x_ij = layers2d.split_activation(x, grid).requires_grad_()
    y_ij = x_ij + down2d(torch.nn.functional.silu(up2d(norm2d(x_ij))))
    (y_ij * layers2d.split_activation(target, grid)).sum().backward()

    kw = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_ij, layers2d.split_activation(y.detach(), grid), **kw)
    torch.testing.assert_close(x_ij.grad, layers2d.split_activation(x_dense.grad, grid), **kw)
    torch.testing.assert_close(layers2d.gather_activation(y_ij.detach(), grid), y.detach(), **kw)
    for mine, dense in ((up2d, up), (down2d, down)):
        N, K = dense.weight.shape
        n, k = slice(grid.j * N // cols, (grid.j + 1) * N // cols), slice(grid.i * K // rows, (grid.i + 1) * K // rows)
        torch.testing.assert_close(mine.weight.grad, dense.weight.grad[n, k], **kw)
        torch.testing.assert_close(mine.bias.grad, dense.bias.grad[n], **kw)
    h = slice(grid.j * H // cols, (grid.j + 1) * H // cols)
    torch.testing.assert_close(norm2d.weight.grad, norm_weight_p.grad[h], **kw)

    # Bytes: count what one linear layer's forward + backward asks the collectives to move (ring costs), with the
    # benchmark's own counter, so the bytes bench/bench_2d.py reports are the ones checked here.
    with _bench_2d().ByteCounter() as counter:
        bare = layers2d.ParallelLinear2D(nn.Linear(H, F, bias=False), grid)
        x_ij = layers2d.split_activation(x, grid).requires_grad_()
        bare(x_ij).sum().backward()
    assert counter.sent == layers2d.bytes_sent("2d", B * S, H, F, grid, elem=4, grad_elem=4), counter.sent
    return counter.sent


@pytest.mark.parametrize("world,rows,cols", [(4, 2, 2), (6, 2, 3), (4, 1, 2)])
def test_2d_block_equals_the_dense_block(world, rows, cols):
    sent = run_distributed(world, _check, rows, cols)
    assert len(set(sent)) == 1  # every rank of a grid carries the same bytes


def _refuse_grid(rank, world):
    from autotp.grid import make_grid

    with pytest.raises(ValueError, match=r"\[3, 1\] is 3 ranks, which does not divide the world of 2"):
        make_grid(3, 1)
    return True


def test_grid_refuses_a_size_that_does_not_divide_the_world():
    assert run_distributed(2, _refuse_grid) == [True, True]  # raised on every rank alike: nobody waits


def test_layers_refuse_a_dimension_the_grid_does_not_divide():
    from autotp import layers2d
    from autotp.grid import Grid

    grid = Grid(rows=2, cols=3, i=0, j=0, row_group=None, col_group=None)
    with pytest.raises(ValueError, match="the output features \\(grid columns\\) of 8 is not divisible by 3"):
        layers2d.ParallelLinear2D(nn.Linear(6, 8), grid)
    with pytest.raises(ValueError, match="the hidden size of 8 is not divisible by 3"):
        layers2d.RMSNorm2D(torch.ones(8), 1e-6, grid)


def test_2d_traffic_falls_with_the_grid_where_1d_does_not():
    """Llama-3-8B's MLP (gate/up then down; 1-D as Megatron's column + row pair), bf16, per rank, from the formula
    the test above checks against counted bytes. At 8192 tokens 1-D's traffic per rank tends to a constant as the
    group grows (each all-reduce moves 2(p-1)/p of the activations) while 2-D's falls with the grid's side (its
    weight traffic is split over both axes): 2-D is dearer at 2 x 2 (it moves weights, 1-D does not) and cheaper
    from 4 x 4; with 32768 tokens it is cheaper already at 2 x 2."""
    from autotp import layers2d
    from autotp.grid import Grid

    h, f = 4096, 14336

    def per_rank(tokens, side):
        one_d = (layers2d.bytes_sent("1d-column", tokens, h, f, tp=side * side)
                 + layers2d.bytes_sent("1d-row", tokens, f, h, tp=side * side))
        grid = Grid(side, side, 0, 0, None, None)
        return one_d, layers2d.bytes_sent("2d", tokens, h, f, grid) + layers2d.bytes_sent("2d", tokens, f, h, grid)

    rows = [per_rank(8192, side) for side in (2, 4, 8)]
    assert rows[0][1] > rows[0][0] and rows[1][1] < rows[1][0] and rows[2][1] < rows[2][0]
    assert rows[0][0] < rows[1][0] < rows[2][0] and rows[0][1] > rows[1][1] > rows[2][1]
    one_d, two_d = per_rank(32768, 2)
    assert two_d < one_d


def _llama_2d(rank, world, rows, cols):
    import torch.distributed as dist
    from families import batch, tiny_model

    from autotp.grid import make_grid
    from autotp.parallel2d import parallelize_llama_2d

    grid = make_grid(rows, cols)
    dense = tiny_model("llama", vocab_size=104).float()
    sharded = tiny_model("llama", vocab_size=104).float()
    ids = batch(seed=3, batch_size=2 * rows, seq=12)
    loss = dense(input_ids=ids, labels=ids).loss
    loss.backward()
    parallelize_llama_2d(sharded, grid)
    mine = ids[grid.i * 2:(grid.i + 1) * 2]
    row_loss = sharded(input_ids=mine, labels=mine).loss
    (row_loss / rows).backward()  # the grid's weight gradients are summed over its rows
    total = row_loss.detach().clone() / rows
    if grid.col_group is not None:
        dist.all_reduce(total, group=grid.col_group)
    # fp32, the same sums in another order (gathered blocks, reduce-scattered partials): a few ulps per sum.
    torch.testing.assert_close(total, loss.detach(), rtol=1e-5, atol=1e-6)
    dense_params = dict(dense.named_parameters())
    checked = 0
    for name, param in sharded.named_parameters():
        want = dense_params[name].grad
        if param.grad.shape != want.shape:  # a (j, i) block [N/c, K/r], or a column block of a vector / embedding
            if param.dim() == 2 and name != "model.embed_tokens.weight":
                N, K = want.shape
                want = want[grid.j * N // cols:(grid.j + 1) * N // cols, grid.i * K // rows:(grid.i + 1) * K // rows]
            else:
                H = want.shape[-1]
                want = want[..., grid.j * H // cols:(grid.j + 1) * H // cols]
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-6, msg=name)
        checked += 1
    return checked


@pytest.mark.parametrize("world,rows,cols", [(4, 2, 2), (4, 4, 1), (2, 1, 2)])
def test_llama_on_a_2d_grid_equals_the_dense_model(world, rows, cols):
    """A tiny Llama (2 layers, 4 heads, 2 KV heads) on the grid: the global loss and every parameter's gradient
    (each rank's block) equal the dense model's on the whole batch."""
    counts = run_distributed(world, _llama_2d, rows, cols)
    assert counts[0] == 2 * 9 + 3 and len(set(counts)) == 1  # 9 per decoder layer, embedding, final norm, head


def test_parallelize_llama_2d_refuses_what_it_cannot_split():
    from families import tiny_model

    from autotp.grid import Grid
    from autotp.parallel2d import parallelize_llama_2d

    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by the grid's 3 columns"):
        parallelize_llama_2d(tiny_model("llama", vocab_size=104, hidden_size=48), Grid(1, 3, 0, 0, None, None))
    with pytest.raises(ValueError, match="tied input and output embeddings"):
        parallelize_llama_2d(tiny_model("llama", tie_word_embeddings=True), Grid(1, 2, 0, 0, None, None))
    with pytest.raises(ValueError, match="Llama-style causal LMs .* got GPT2LMHeadModel"):
        parallelize_llama_2d(tiny_model("gpt2"), Grid(1, 2, 0, 0, None, None))


def _round_trip(rank, world):
    import copy

    from families import batch, tiny_model

    from autotp.grid import make_grid
    from autotp.parallel2d import consolidated_state_dict_2d, parallelize_llama_2d

    grid = make_grid(2, 2)
    dense = tiny_model("llama", vocab_size=104).float()
    sharded = parallelize_llama_2d(copy.deepcopy(dense), grid)
    optimizer = torch.optim.SGD(sharded.parameters(), lr=0.5)
    dense_optimizer = torch.optim.SGD(dense.parameters(), lr=0.5)
    for step in range(2):
        ids = batch(seed=10 + step, batch_size=4, seq=12)
        mine = ids[grid.i * 2:(grid.i + 1) * 2]
        (sharded(input_ids=mine, labels=mine).loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        dense(input_ids=ids, labels=ids).loss.backward()
        dense_optimizer.step()
        dense_optimizer.zero_grad()
    state = consolidated_state_dict_2d(sharded)
    want = dense.state_dict()
    assert set(state) == set(want)
    for name, tensor in want.items():
        # fp32 after two SGD steps of lr 0.5 from gradients equal to a few ulps (the test above)
        torch.testing.assert_close(state[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    fresh = tiny_model("llama", vocab_size=104, seed=99).float()  # other weights: the load must replace them all
    fresh.load_state_dict(state)
    ids = batch(seed=20, batch_size=2, seq=12)
    torch.testing.assert_close(fresh(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    return True


def test_a_2d_model_consolidates_to_the_dense_model_after_training():
    """Two SGD steps on a 2 x 2 grid, then the grid's blocks gathered back: the dense model's state dict (every
    name and shape), equal to the dense model trained on the whole batch, and loadable into a plain HF model."""
    assert run_distributed(4, _round_trip) == [True] * 4
