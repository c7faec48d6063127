"""1-D against 2-D tensor parallelism on one MLP (up then down, Llama-3-8B sizes by default): bytes each rank's
collectives carry and forward + backward time, in one job.

    torchrun --standalone --nproc_per_node=4 bench/bench_2d.py --out bench/results [--grids 2x2,4x1,1x4]

1-D is Megatron's pair over all W ranks (column up: input copied, gradient all-reduced; row down: output
all-reduced). 2-D runs `autotp.layers2d.ParallelLinear2D` on each r x c grid with r c = W (the batch over the
grid's rows, features over its columns). Bytes are counted from the collectives each rank issues, at ring costs
(an all-gather sends n-1 shards, a reduce-scatter (n-1)/n of its input, an all-reduce twice that); they must
equal `layers2d.bytes_sent`, which the chapter's O(W) against O(sqrt W) comparison uses. Times are medians of
`--iters` forward + backward passes, the slowest rank's. Writes tp2d_w{W}.csv and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from autotp import comm, layers2d  # noqa: E402
from autotp.grid import make_grid  # noqa: E402


class ByteCounter:
    """Counts what this rank's collectives send (ring costs) while installed."""

    def __init__(self):
        self.sent = 0
        self._saved = None

    def __enter__(self):
        gather, scatter, reduce = dist.all_gather, comm.reduce_scatter_flat, dist.all_reduce

        def counting_gather(pieces, tensor, group=None, **kwargs):
            self.sent += (len(pieces) - 1) * tensor.numel() * tensor.element_size()
            return gather(pieces, tensor, group=group, **kwargs)

        def counting_scatter(out, tensor, group=None, **kwargs):
            self.sent += (tensor.numel() // out.numel() - 1) * out.numel() * out.element_size()
            return scatter(out, tensor, group=group, **kwargs)

        def counting_reduce(tensor, op=dist.ReduceOp.SUM, group=None, **kwargs):
            n = dist.get_world_size(group)
            self.sent += 2 * (n - 1) * tensor.numel() * tensor.element_size() // n
            return reduce(tensor, op=op, group=group, **kwargs)

        self._saved = (gather, scatter, reduce)
        dist.all_gather, comm.reduce_scatter_flat, dist.all_reduce = counting_gather, counting_scatter, counting_reduce
        return self

    def __exit__(self, *exc):
        dist.all_gather, comm.reduce_scatter_flat, dist.all_reduce = self._saved


def one_d(x, up_shard, down_shard, group):
    """Megatron's column + row pair over `group`: x [M, H] replicated -> y [M, H] replicated."""
    h = F.silu(F.linear(comm.copy_to_tp(x, group), up_shard))
    return comm.reduce_from_tp(F.linear(h, down_shard), group)


def timed(fn, iters: int, device) -> float:
    times = []
    for i in range(iters + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:  # two warm-up passes
            times.append(time.perf_counter() - start)
    slowest = torch.tensor([statistics.median(times)], device=device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return float(slowest) * 1e3


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--grids", default=None, help="r x c grids to run, comma-separated (default: every one)")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--inter", type=int, default=14336)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    tokens, H, Fi = args.tokens, args.hidden, args.inter
    up, down = nn.Linear(H, Fi, bias=False), nn.Linear(Fi, H, bias=False)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if cuda else "cpu",
                world=world, torch=torch.__version__, tokens=tokens, hidden=H, inter=Fi, dtype=str(dtype)[6:])
    rows = []

    # 1-D over the whole world.
    group = dist.group.WORLD
    cols = slice(rank * Fi // world, (rank + 1) * Fi // world)
    up_shard = up.weight.detach()[cols].to(device, dtype).requires_grad_()
    down_shard = down.weight.detach()[:, cols].to(device, dtype).requires_grad_()
    x = torch.randn(tokens, H, device=device, dtype=dtype, requires_grad=True)
    with ByteCounter() as counter:
        one_d(x, up_shard, down_shard, group).sum().backward()
    formula = (layers2d.bytes_sent("1d-column", tokens, H, Fi, tp=world, elem=x.element_size())
               + layers2d.bytes_sent("1d-row", tokens, Fi, H, tp=world, elem=x.element_size()))
    ms = timed(lambda: one_d(x, up_shard, down_shard, group).sum().backward(), args.iters, device)
    rows.append(dict(meta, layout=f"1-D TP={world}", bytes_sent=counter.sent, bytes_formula=formula, ms=round(ms, 3)))

    grids = ([tuple(map(int, g.split("x"))) for g in args.grids.split(",")] if args.grids else
             [(r, world // r) for r in range(1, world + 1) if world % r == 0])
    for r, c in grids:
        grid = make_grid(r, c)
        up2d = layers2d.ParallelLinear2D(up, grid).to(device, dtype)
        down2d = layers2d.ParallelLinear2D(down, grid).to(device, dtype)
        x_ij = torch.randn(tokens // r, H // c, device=device, dtype=dtype, requires_grad=True)

        def two_d():
            down2d(F.silu(up2d(x_ij))).sum().backward()

        with ByteCounter() as counter:
            two_d()
        formula = (layers2d.bytes_sent("2d", tokens, H, Fi, grid, elem=x_ij.element_size(),
                                       grad_elem=x_ij.element_size())
                   + layers2d.bytes_sent("2d", tokens, Fi, H, grid, elem=x_ij.element_size(),
                                         grad_elem=x_ij.element_size()))
        rows.append(dict(meta, layout=f"2-D {r}x{c}", bytes_sent=counter.sent, bytes_formula=formula,
                         ms=round(timed(two_d, args.iters, device), 3)))
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"tp2d_w{world}.csv")
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        for row in rows:
            print(f"{row['layout']:12s} bytes/rank {row['bytes_sent'] / 1e6:9.2f} MB (formula "
                  f"{row['bytes_formula'] / 1e6:9.2f}) fwd+bwd {row['ms']:8.3f} ms", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
