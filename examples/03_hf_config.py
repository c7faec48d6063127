"""03: train a tiny HF model through a DeepSpeed-style config alone, as in DeepSpeed's AutoTP tutorial.

    torchrun --standalone --nproc_per_node=2 examples/03_hf_config.py

Everything autotp needs is in `ds_config`: the TP size, the optimizer, the LR schedule, batch sizes and
clipping. The loop is DeepSpeed's: engine(...) -> engine.backward(loss) -> engine.step(). The result is saved
as an ordinary HF directory, which rank 0 reloads without autotp and checks against the TP model's logits.
"""

import os
import tempfile

import torch
import torch.distributed as dist
from transformers import AutoConfig, AutoModelForCausalLM

import autotp

autotp.init_distributed()
world = dist.get_world_size()
on_gpu = dist.get_backend() == "nccl"
ds_config = {
    "train_batch_size": 8,  # = micro batch 4 x grad accumulation 2 x DP size 1 (TP uses every rank)
    "train_micro_batch_size_per_gpu": 4,
    "gradient_accumulation_steps": 2,
    "gradient_clipping": 1.0,
    "bf16": {"enabled": on_gpu},
    "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.0}},
    "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 3e-3,
                                                  "warmup_num_steps": 5, "warmup_type": "linear"}},
    "tensor_parallel": {"autotp_size": world},
}

torch.manual_seed(0)  # identical random init on every rank
config = AutoConfig.for_model("qwen3", vocab_size=128, hidden_size=64, intermediate_size=128, head_dim=16,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=64)
model = AutoModelForCausalLM.from_config(config)
# Toy data set: counting sequences; initialize() shards it over DP ranks only (here DP = 1).
samples = [{"input_ids": (torch.arange(24) + start) % 128} for start in range(256)]
engine, optimizer, loader, scheduler = autotp.initialize(model=model, config=ds_config, training_data=samples)

engine.train()
for micro_step, batch in enumerate(loader):
    input_ids = batch["input_ids"].to(engine.device)
    outputs = engine(input_ids=input_ids, labels=input_ids)
    engine.backward(outputs.loss)
    engine.step()
    if dist.get_rank() == 0 and (micro_step + 1) % 8 == 0:  # every 4th optimizer step (accumulation 2)
        print(f"step {engine.global_steps:2d}  loss {outputs.loss.item():.4f}  lr {engine.get_lr()[0]:.2e}  "
              f"grad_norm {engine.get_global_grad_norm():.3f}")

save_dir = os.path.join(tempfile.gettempdir(), "autotp_example_03")
engine.save_pretrained(save_dir)  # collective: every rank sends its shards, rank 0 writes

probe = torch.arange(16).unsqueeze(0)
engine.eval()
with torch.no_grad():
    tp_logits = engine(input_ids=probe.to(engine.device)).logits.float().cpu()
if dist.get_rank() == 0:
    reloaded = AutoModelForCausalLM.from_pretrained(save_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        dense_logits = reloaded(input_ids=probe).logits
    # fp32: only the order of TP sums differs (~1e-6); bf16 weights on GPU: the reloaded fp32 model keeps the
    # same bf16-rounded values but computes in fp32, so allow bf16-sized differences.
    tolerance = 5e-2 if on_gpu else 1e-4
    torch.testing.assert_close(tp_logits, dense_logits, rtol=tolerance, atol=tolerance)
    print(f"saved to {save_dir}; reloaded without autotp, logits match the TP model "
          f"(max |diff| {(tp_logits - dense_logits).abs().max().item():.1e})")
dist.barrier()  # a rank that tears gloo down while a peer still works can abort (SIGABRT)
dist.destroy_process_group()
