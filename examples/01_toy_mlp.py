"""01: shard a toy MLP over the TP ranks and check it computes exactly what the unsharded MLP computes.

    torchrun --standalone --nproc_per_node=2 examples/01_toy_mlp.py

`up` is column-parallel (each rank holds hidden/tp output rows), `down` row-parallel (each rank holds hidden/tp
input columns; the partial outputs are summed by one all-reduce): Megatron's MLP, written as an HF tp_plan.
Runs on CPU (gloo) or on one GPU per process (NCCL); `autotp.init_distributed()` picks the backend.
"""

import copy

import torch
import torch.distributed as dist
import torch.nn as nn

import autotp


class MLP(nn.Module):
    def __init__(self, width: int = 64, hidden: int = 256):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.act = nn.GELU()
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


autotp.init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

torch.manual_seed(0)  # same dense weights on every rank; each rank then keeps its own slice
dense = MLP()
sharded = autotp.parallelize(copy.deepcopy(dense), tp_size=world,
                             partition_config={"up": "colwise", "down": "rowwise"})
dense.to(device)
sharded.to(device)
if rank == 0:
    print(sharded)  # extra_repr shows tp_rank and the unsharded sizes

x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1)).to(device)
y_dense, y_sharded = dense(x), sharded(x)
# fp32, hidden 256: the all-reduce only reorders the sum over hidden, ~1e-7 relative; 1e-5 leaves margin.
torch.testing.assert_close(y_sharded, y_dense, rtol=1e-5, atol=1e-5)
y_sharded.square().sum().backward()
print(f"rank {rank}/{world}: up.weight {tuple(sharded.up.weight.shape)} of {tuple(dense.up.weight.shape)}, "
      f"down.weight {tuple(sharded.down.weight.shape)}; output matches the dense MLP "
      f"(max |diff| {(y_sharded - y_dense).abs().max().item():.1e})")
dist.barrier()  # a rank that tears gloo down while a peer still works can abort (SIGABRT)
dist.destroy_process_group()
