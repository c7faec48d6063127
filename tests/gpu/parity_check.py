"""GPU check of this release's DeepSpeed-parity paths on CUDA/NCCL (not collected by CI: needs 2 GPUs).

    torchrun --standalone --nproc_per_node=2 tests/gpu/parity_check.py

1. Uneven heads with a rank that holds none (3 query / 1 KV heads over 2 ranks: DeepSpeed's group rule gives
   3 and 0) and an MLP of 129 features (65, 64), ZeRO-1, the user's AdamW object (now torch's fused kernel, over
   a zero-size shard on rank 1): three steps' losses and the consolidated weights against the dense model trained
   by fused AdamW on one GPU. fp32 with TF32 off: TP only reorders sums (~1e-6 relative); Adam with eps 1e-3 keeps
   noise-level gradients from being amplified, so rtol 1e-4 over three steps.
2. Logits read after a labelled training forward (vocabulary-parallel loss on) equal the dense logits.
Prints one line per check and 'ALL OK'.
"""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import autotp  # noqa: E402
from families import batch, tiny_model  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
SIZES = dict(num_attention_heads=3, num_key_value_heads=1, hidden_size=48, intermediate_size=129)
RTOL = 1e-4  # module docstring
failures = []


def check(name, ok, detail=""):
    if dist.get_rank() == 0:
        print(f"{'OK  ' if ok else 'FAIL'} {name} {detail}", flush=True)
    if not ok:
        failures.append(name)


def uneven_training():
    device = torch.device("cuda", torch.cuda.current_device())
    dense = tiny_model("llama", **SIZES).to(device)
    optimizer = torch.optim.AdamW(dense.parameters(), lr=1e-2, eps=1e-3, fused=True)
    ref_losses = []
    for step in range(3):
        ids = batch(seed=10 + step, batch_size=2).to(device)
        loss = dense(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ref_losses.append(float(loss))
    model = tiny_model("llama", **SIZES)
    user_optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, eps=1e-3)
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
              "tensor_parallel": {"autotp_size": 2}}
    engine, opt, _, _ = autotp.initialize(model=model, optimizer=user_optimizer, config=config)
    check("user AdamW runs fused", bool(opt.param_groups[0].get("fused")))
    heads = [m.weight.shape[0] for n, m in engine.module.named_modules() if n.endswith("layers.0.self_attn.q_proj")]
    gathered = [None] * 2
    dist.all_gather_object(gathered, heads[0])
    check("query rows per rank", gathered == [48, 0], str(gathered))
    losses = []
    for step in range(3):
        ids = batch(seed=10 + step, batch_size=2).to(device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
    check("losses", all(abs(a - b) <= RTOL * abs(b) for a, b in zip(losses, ref_losses)), f"{losses} vs {ref_losses}")
    state = engine.consolidated_state_dict()
    if dist.get_rank() == 0:
        worst = max(((state[k].float().cpu() - v.float().cpu()).norm() / v.float().cpu().norm().clamp_min(1e-12)).item()
                    for k, v in dense.state_dict().items())
        check("weights after 3 steps", worst <= RTOL, f"max relative error {worst:.2e}")


def logits_read():
    device = torch.device("cuda", torch.cuda.current_device())
    dense = tiny_model("llama").to(device)
    model = tiny_model("llama")
    engine, _, _, _ = autotp.initialize(model=model, config={"train_micro_batch_size_per_gpu": 2,
                                                             "tensor_parallel": {"autotp_size": 2},
                                                             "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    ids = batch(seed=3, batch_size=2).to(device)
    out = engine(input_ids=ids, labels=ids)
    ref = dense(input_ids=ids, labels=ids)
    error = ((out.logits - ref.logits).norm() / ref.logits.norm()).item()
    check("logits read after a labelled forward", out.logits.shape == ref.logits.shape and error < 1e-5,
          f"shape {tuple(out.logits.shape)}, relative error {error:.1e}")


autotp.init_distributed()
uneven_training()
logits_read()
if dist.get_rank() == 0:
    print("ALL OK" if not failures else f"FAILED: {failures}", flush=True)
dist.barrier()
dist.destroy_process_group()
