"""04: custom partition rules for fused projections (Phi-3's qkv_proj and gate_up_proj).

    torchrun --standalone --nproc_per_node=2 examples/04_custom_layer_specs.py

A fused weight cannot be cut in the middle: qkv_proj stacks [q | k | v] rows of unequal sizes under GQA, and
gate_up_proj stacks [gate | up]. `shape` names the sub-parameters along the split dimension so each rank gets
its slice of every one: [[q, kv, kv], -1] for unequal sizes, [2, -1] for two equal halves. With
`use_default_specs: false` only these rules apply (no built-in phi3 preset), so every Linear in a block must be
covered here. The sharded loss must equal the dense model's.
"""

import copy

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp

autotp.init_distributed()
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16
Q, KV = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM  # 64 and 32 rows of qkv_proj's 128
layer_specs = [
    {"patterns": [r".*\.self_attn\.qkv_proj\.weight$"], "partition_type": "column", "shape": [[Q, KV, KV], -1]},
    {"patterns": [r".*\.self_attn\.o_proj\.weight$"], "partition_type": "row"},
    {"patterns": [r".*\.mlp\.gate_up_proj\.weight$"], "partition_type": "column", "shape": [2, -1]},
    {"patterns": [r".*\.mlp\.down_proj\.weight$"], "partition_type": "row"},
]
ds_config = {
    "train_micro_batch_size_per_gpu": 2,
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
    "tensor_parallel": {"autotp_size": dist.get_world_size(),
                        "partition_config": {"use_default_specs": False, "layer_specs": layer_specs}},
}

torch.manual_seed(0)
config = AutoConfig.for_model("phi3", vocab_size=128, hidden_size=Q, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                              pad_token_id=0, bos_token_id=1, eos_token_id=2)
model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
dense = copy.deepcopy(model)
engine, _, _, _ = autotp.initialize(model=model, config=ds_config)
dense.to(engine.device)

input_ids = torch.randint(1, 128, (2, 16), generator=torch.Generator().manual_seed(1)).to(engine.device)
tp_loss = engine(input_ids=input_ids, labels=input_ids).loss
dense_loss = dense(input_ids=input_ids, labels=input_ids).loss
# fp32 everywhere: the TP all-reduces only reorder sums over 32-96 terms (~1e-7 relative).
torch.testing.assert_close(tp_loss, dense_loss, rtol=1e-5, atol=1e-5)
engine.backward(tp_loss)
engine.step()

attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
if dist.get_rank() == 0:
    print(attn.qkv_proj)
    print(mlp.gate_up_proj)
print(f"rank {dist.get_rank()}: qkv_proj {tuple(attn.qkv_proj.weight.shape)} of {(Q + 2 * KV, Q)}, gate_up_proj "
      f"{tuple(mlp.gate_up_proj.weight.shape)} of {(2 * 96, Q)}; loss {tp_loss.item():.6f} = dense "
      f"{dense_loss.item():.6f}", flush=True)
dist.barrier()  # a rank that tears gloo down while a peer still works can abort (SIGABRT)
dist.destroy_process_group()
