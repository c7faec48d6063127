"""02: tensor parallelism inside data parallelism, from a 2-D DeviceMesh.

    torchrun --standalone --nproc_per_node=4 examples/02_tp_dp_mesh.py     # TP=2 x DP=2

The mesh's "tp" dimension splits each layer; the "dp" dimension holds replicas that see different data and
average their gradients. Both ranks of a TP group must get the same batch, so the batch is drawn from a
generator seeded by (step, dp_rank), never by the global rank.
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from transformers import LlamaConfig, LlamaForCausalLM

import autotp

TP = 2
autotp.init_distributed()
world = dist.get_world_size()
if world % TP:
    raise SystemExit(f"run with a multiple of {TP} processes (got {world})")
device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
mesh = init_device_mesh(device_type, (world // TP, TP), mesh_dim_names=("dp", "tp"))

torch.manual_seed(0)
config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
model = LlamaForCausalLM(config)
ds_config = {
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
    "tensor_parallel": {"autotp_size": TP},
}
engine, _, _, _ = autotp.initialize(model=model, config=ds_config, device_mesh=mesh)

# A learnable toy task: each sequence counts upward from a random start, modulo the vocabulary.
for step in range(20):
    generator = torch.Generator().manual_seed(1000 * step + engine.dp_rank)
    starts = torch.randint(0, config.vocab_size, (4, 1), generator=generator)
    input_ids = ((starts + torch.arange(32)) % config.vocab_size).to(engine.device)
    loss = engine(input_ids=input_ids, labels=input_ids).loss
    engine.backward(loss)
    engine.step()
    if step % 5 == 0 or step == 19:
        print(f"rank {dist.get_rank()} (tp_rank {engine.tp_rank}/{engine.tp_world_size}, dp_rank "
              f"{engine.dp_rank}/{engine.dp_world_size}) step {step:2d}: loss {loss.item():.4f}", flush=True)
dist.barrier()  # a rank that tears gloo down while a peer still works can abort (SIGABRT)
dist.destroy_process_group()
