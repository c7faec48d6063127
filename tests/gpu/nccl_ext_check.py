"""GPU check of the C++/NCCL extension (not collected by CI: it needs CUDA and NCCL).

    torchrun --standalone --nproc_per_node=4 tests/gpu/nccl_ext_check.py     # and with 2

1. reduce_scatter equals torch.distributed.reduce_scatter_tensor bit for bit (fp32 and bf16, several sizes, a
   coalesced batch, accumulation into fp32); all_gather equals all_gather_into_tensor.
2. ZeRO-2 training (tiny Qwen3, bf16, TP2 x DP(n/2) or TP1 x DP2) with comm_backend nccl_ext equals the torch
   backend: same losses and parameters.
3. 1000 ZeRO-2 steps with nccl_ext: allocated memory is the same at step 100 and step 1000 (no buffer leak) and
   the extension's stream and events are reused (one communicator, launch count grows by buckets per step).
Prints one line per check and 'ALL OK'.
"""

import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import autotp  # noqa: E402
from autotp import _ext  # noqa: E402
from autotp.comm import all_gather_flat as _all_gather_flat  # noqa: E402
from autotp.zero.backend import NcclExtBackend  # noqa: E402
from families import batch, tiny_model  # noqa: E402


def report(ok: bool, text: str) -> bool:
    if dist.get_rank() == 0:
        print(f"{text} {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def check_collectives(device) -> bool:
    world, rank = dist.get_world_size(), dist.get_rank()
    start = time.perf_counter()
    module = _ext.load("nccl")
    report(True, f"extension loaded in {time.perf_counter() - start:.1f} s, NCCL {module.nccl_version()}")
    backend = NcclExtBackend(dist.group.WORLD, device, module)
    ok = True
    for dtype in (torch.float32, torch.bfloat16):
        for numel in (1, 1000, 1 << 20, 25_000_000):
            gen = torch.Generator(device=device).manual_seed(1000 + rank)
            x = torch.randn(numel * world, generator=gen, device=device).to(dtype)
            ours, ref = torch.empty(numel, dtype=dtype, device=device), torch.empty(numel, dtype=dtype, device=device)
            backend.reduce_scatter([ours], [x], [False])
            backend.join()
            dist.reduce_scatter_tensor(ref, x)
            same = torch.equal(ours, ref)
            ok &= report(same, f"reduce_scatter {str(dtype):<15} n={numel:>9} x {world}: bit-exact={same}")
        # Coalesced batch with accumulation into fp32 (what ZeRO-2 does with gradient accumulation).
        xs = [torch.randn(n * world, device=device).to(dtype) for n in (7, 4096, 100_003)]
        outs = [torch.full((n,), 0.5, device=device) for n in (7, 4096, 100_003)]
        backend.reduce_scatter(outs, xs, [True, True, True])
        backend.join()
        refs = []
        for x in xs:
            r = torch.empty(x.numel() // world, dtype=dtype, device=device)
            dist.reduce_scatter_tensor(r, x)
            refs.append(0.5 + r.float())
        same = all(torch.equal(o, r) for o, r in zip(outs, refs))
        ok &= report(same, f"coalesced batch of 3, accumulate into fp32, {dtype}: bit-exact={same}")
        part = torch.randn(12345, device=device).to(dtype)
        gathered, ref = torch.empty(12345 * world, dtype=dtype, device=device), torch.empty(
            12345 * world, dtype=dtype, device=device)
        backend.all_gather(gathered, part)
        _all_gather_flat(ref, part)
        same = torch.equal(gathered, ref)
        ok &= report(same, f"all_gather {dtype}: equal={same}")
    return ok


def train(backend: str, steps: int, device, track_memory: bool = False):
    world = dist.get_world_size()
    tp = 2 if world >= 4 else 1
    model = tiny_model("qwen3")
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": tp}, "bf16": {"enabled": True},
              "gradient_clipping": 1.0, "steps_per_print": 10 ** 9,
              "zero_optimization": {"stage": 2, "reduce_bucket_size": 20_000, "comm_backend": backend},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    assert engine.store.backend.name == backend, engine.store.backend.name
    losses, memory = [], {}
    for step in range(steps):
        ids = batch(seed=step * 100 + engine.dp_rank, batch_size=2).to(device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        if step < 5:
            losses.append(float(loss.detach().float()))
        if track_memory and step + 1 in (100, steps):
            torch.cuda.synchronize()
            memory[step + 1] = torch.cuda.memory_allocated()
    return engine, losses, memory


def main():
    autotp.init_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    ok = check_collectives(device)
    engine_t, losses_t, _ = train("torch", 5, device)
    engine_n, losses_n, _ = train("nccl_ext", 5, device)
    full_t, full_n = engine_t.consolidated_state_dict(), engine_n.consolidated_state_dict()
    if dist.get_rank() == 0:
        worst = max(float((full_t[k].float() - full_n[k].float()).abs().max()) for k in full_t)
        same = losses_t == losses_n and worst == 0.0
        ok &= report(same, f"ZeRO-2 bf16 nccl_ext vs torch: losses {losses_n} vs {losses_t}, max param diff {worst}")
    del engine_t, engine_n
    start = time.perf_counter()
    engine, _, memory = train("nccl_ext", 1000, device, track_memory=True)
    launches = engine.store.backend.comm.launches
    buckets = len(engine.store.buckets)
    steady = memory[100] == memory[1000]
    ok &= report(steady and launches == 1000 * buckets,
                 f"1000 ZeRO-2 steps in {time.perf_counter() - start:.1f} s: allocated {memory[100]} B at step 100, "
                 f"{memory[1000]} B at step 1000; {launches} reduce-scatters = 1000 x {buckets} buckets")
    flags = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    report(bool(flags.item()), "ALL" if flags.item() else "SOME CHECKS FAILED:")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
