"""05: 2-D tensor parallelism, the TP chapter's third example: a Llama on a 2 x 2 grid of ranks.

    torchrun --standalone --nproc_per_node=4 examples/05_2d_tensor_parallel.py

`tensor_parallel.grid: [2, 2]` with `autotp_size: 4`: every weight is cut along both of its dimensions, rank
(i, j) holding block (j, i) of each projection, a quarter of every matrix. Activations are split too: grid row i
runs its half of the TP group's batch (the engine cuts it), grid column j its half of the hidden features. A
linear layer all-gathers its input's features over the grid row and its weight's blocks over the grid column,
and reduce-scatters the gradients back. Three SGD steps; each loss must equal the dense model's on the whole batch.
"""

import copy

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp

autotp.init_distributed()
ds_config = {
    "train_micro_batch_size_per_gpu": 4,  # the TP group's batch: 2 samples per grid row
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "tensor_parallel": {"autotp_size": 4, "grid": [2, 2]},
}

torch.manual_seed(0)
config = AutoConfig.for_model("llama", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
dense = copy.deepcopy(model)
dense_optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
engine, _, _, _ = autotp.initialize(model=model, config=ds_config)

for step in range(3):
    ids = torch.randint(1, 128, (4, 16), generator=torch.Generator().manual_seed(step))
    loss = engine(input_ids=ids, labels=ids).loss  # the mean over the grid's rows
    engine.backward(loss)
    engine.step()
    dense_loss = dense(input_ids=ids, labels=ids).loss
    dense_loss.backward()
    dense_optimizer.step()
    dense_optimizer.zero_grad()
    # fp32: the grid reorders sums over blocks of 32-128 terms (~1e-7 relative), compounded over 3 steps.
    torch.testing.assert_close(loss.detach(), dense_loss.detach(), rtol=1e-5, atol=1e-5)
    if dist.get_rank() == 0:
        print(f"step {step}: loss {loss.item():.6f} = dense {dense_loss.item():.6f}", flush=True)

grid, q = model.autotp_grid, model.model.layers[0].self_attn.q_proj
print(f"rank {dist.get_rank()} at ({grid.i}, {grid.j}): q_proj block {tuple(q.weight.shape)} of (64, 64)", flush=True)
dist.barrier()  # a rank that tears gloo down while a peer still works can abort (SIGABRT)
dist.destroy_process_group()
