"""Step-by-step diagnosis of the fused kernels' flag traffic (torchrun, 2+ GPUs). Prints one line per step."""
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from autotp_kernels import fused, symm  # noqa: E402
from autotp_kernels.comm_kernels import reduce_chunks_kernel, ready_index, signal_kernel, wait_kernel  # noqa: E402


def say(*args):
    print(f"[{dist.get_rank()}]", *args, flush=True)


def main():
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    group, rank, world = dist.group.WORLD, dist.get_rank(), dist.get_world_size()
    if rank == 0:
        say("CUDA_DEVICE_MAX_CONNECTIONS", os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
    ws = symm.workspace(group, torch.device("cuda", rank), 1 << 20)
    flags = ws.flags[rank]
    signal_kernel[(1,)](ws.flag_table, ready_index(rank, 0), 5, W=world)
    torch.cuda.synchronize()
    dist.barrier()
    time.sleep(0.5)
    say("1 signal: ready[q][0] =", [int(flags[ready_index(q, 0)]) for q in range(world)])
    wait_kernel[(1,)](ws.flag_table, rank, ready_index((rank + 1) % world, 0), 5, 2_000_000_000, 3, TIMER=True)
    torch.cuda.synchronize()
    say("2 wait on a raised flag: error", int(flags[symm.ERROR_OFF]))
    S, N, J = 8 * world, 64, 2
    part = ws.data_view(rank, 6, (1, S, N), torch.float32)
    part.fill_(rank + 1)
    for c in range(world * J):
        signal_kernel[(1,)](ws.flag_table, ready_index(rank, c), 6, W=world)
    torch.cuda.synchronize()
    dist.barrier()
    out = torch.full((1, S, N), -1.0, device="cuda")
    reduce_chunks_kernel[(4,)](ws.data_tables[0], out, ws.flag_table, rank, 6, 2_000_000_000, 1, S, N, J, W=world,
                               ALL_GATHER=True, DO_REDUCE=True, DO_GATHER=True, BLOCK=256, ALIGN=4, TIMER=True)
    torch.cuda.synchronize()
    say("3 reduce kernel, flags preset: error", int(flags[symm.ERROR_OFF]), "out unique",
        torch.unique(out).tolist(), "expected", world * (world + 1) // 2)
    ws.epoch = 6
    a = torch.ones(1, S, 32, device="cuda")
    b = torch.ones(32, N, device="cuda") * (rank + 1)
    fused.TUNING.timeout_s = 5
    y = fused.matmul_reduce([(a, b)], group)
    torch.cuda.synchronize()
    say("4 matmul_reduce: error", int(flags[symm.ERROR_OFF]), "out unique", torch.unique(y).tolist(), "expected",
        32 * world * (world + 1) // 2, "ready flags", [int(flags[ready_index(q, c)]) for q in range(world)
                                                      for c in range(world)])
    fused.TUNING.reduce_first = False
    y = fused.matmul_reduce([(a, b)], group)
    torch.cuda.synchronize()
    say("5 matmul_reduce, reduction launched after the GEMMs: error", int(flags[symm.ERROR_OFF]), "out unique",
        torch.unique(y).tolist())
    dist.barrier()


if __name__ == "__main__":
    main()
