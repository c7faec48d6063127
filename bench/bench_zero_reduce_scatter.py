"""How much of ZeRO-2's gradient reduce-scatter hides under backward, per comm backend, against DeepSpeed.

    torchrun --standalone --nproc_per_node=4 bench/bench_zero_reduce_scatter.py --tp 1
    torchrun --standalone --nproc_per_node=4 bench/bench_zero_reduce_scatter.py --tp 2 --provider deepspeed
    torchrun --standalone --nproc_per_node=2 bench/bench_zero_reduce_scatter.py --tiny     # CPU smoke test (gloo)

Llama-3-8B shape (8 layers), seq 4096, bf16, ZeRO-2 over DP, TP inside. Per backend (autotp: torch, nccl_ext):
  backward without gradient sync   the hooks drop the gradients instead of reducing them;
  backward with gradient sync      backward plus the wait for the last reduce-scatter (what the step waits for);
  standalone comm                  every bucket's reduce-scatter back to back, nothing else running;
  exposed = with - without; overlap fraction = 1 - exposed / standalone;
  per bucket: reduce-scatter bus bandwidth through the backend and through plain torch.distributed NCCL.
DeepSpeed ZeRO-2 (same model, its AutoTP, its default buckets unless --reduce-bucket): with and without sync
(its reduce hooks patched out). Rows go to bench/results/zero_rs.csv and zero_rs_buckets.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import time

import torch
import torch.distributed as dist

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def build_model(tiny: bool, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    if tiny:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                             num_hidden_layers=2, vocab_size=256, max_position_embeddings=128)
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                             num_hidden_layers=layers, vocab_size=128256, max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    return (model if tiny else model.to(torch.bfloat16)), config


class Timer:
    def __init__(self, cuda: bool):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, reps: int) -> float:
        """Median milliseconds of `fn()` over `reps` runs (synchronised around each)."""
        times = []
        for _ in range(reps):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)


def bus_bandwidth(numel: int, element_size: int, dp: int, ms: float) -> float:
    """GB/s as nccl-tests define it for reduce-scatter: bytes * (n - 1) / n / time."""
    return numel * element_size * (dp - 1) / dp / (ms * 1e-3) / 1e9 if ms > 0 else 0.0


def measure_autotp(args, engine, batch, timer, dp_group):
    from autotp.zero.backend import make_backend

    store = engine.store
    rows, bucket_rows = [], []
    launch = store._launch

    def drop(buckets):  # "no gradient sync": the hooks fire, the gradients are freed, nothing is reduced
        for bucket in buckets:
            for index in bucket.params:
                store.params[index].grad = None

    def backward(sync: bool):
        loss = engine(input_ids=batch, labels=batch).loss
        timer.sync()
        start = time.perf_counter()
        engine.backward(loss)
        if sync:
            store.backend.join()
        timer.sync()
        elapsed = (time.perf_counter() - start) * 1e3
        if sync:
            engine.step()
        else:
            store.zero_grad()
        return elapsed

    for name in args.backends:
        if ":" in name:  # nccl_ext:N caps NCCL's thread blocks at N
            from autotp import _ext
            from autotp.zero.backend import NcclExtBackend

            store.backend = NcclExtBackend(dp_group, engine.device, _ext.load("nccl"), int(name.split(":")[1]))
        else:
            store.backend = make_backend(name, dp_group, engine.device)
            if store.backend.name != name:
                print(f"backend {name} unavailable, skipped", flush=True)
                continue
        for _ in range(args.warmup):
            backward(True)
        with_sync = statistics.median(backward(True) for _ in range(args.reps))
        store._launch = drop
        without = statistics.median(backward(False) for _ in range(args.reps))
        store._launch = launch
        # Standalone: every bucket's reduce-scatter back to back on an idle GPU.
        dtype = store.params[0].dtype
        inputs = [torch.randn(b.padded, device=engine.device).to(dtype) for b in store.buckets]
        outputs = [torch.empty(b.partition_numel, dtype=dtype, device=engine.device) for b in store.buckets]

        def all_buckets():
            for i, o in zip(inputs, outputs):
                store.backend.reduce_scatter([o], [i], [False])
            store.backend.join()

        all_buckets()
        standalone = timer(all_buckets, args.reps)
        exposed = max(with_sync - without, 0.0)
        rows.append(dict(provider="autotp", backend=name, bwd_nosync_ms=round(without, 2),
                         bwd_sync_ms=round(with_sync, 2), exposed_ms=round(exposed, 2),
                         standalone_comm_ms=round(standalone, 2),
                         overlap_fraction=round(1 - exposed / standalone, 3) if standalone else "",
                         buckets=len(store.buckets), bucket_elements=store.cfg.reduce_bucket_size))
        for bucket, i, o in zip(store.buckets, inputs, outputs):
            def ours():
                store.backend.reduce_scatter([o], [i], [False])
                store.backend.join()

            def plain():
                dist.reduce_scatter_tensor(o, i, group=dp_group)

            ours_ms, plain_ms = timer(ours, args.reps), timer(plain, args.reps)
            size = i.element_size()
            bucket_rows.append(dict(backend=name, bucket=bucket.index, elements=bucket.padded,
                                    ours_ms=round(ours_ms, 3), nccl_ms=round(plain_ms, 3),
                                    ours_busbw=round(bus_bandwidth(bucket.padded, size, store.dp, ours_ms), 1),
                                    nccl_busbw=round(bus_bandwidth(bucket.padded, size, store.dp, plain_ms), 1)))
        del inputs, outputs
    return rows, bucket_rows


def measure_deepspeed(args, engine, batch, timer):
    optimizer = engine.optimizer

    def backward(sync: bool):
        loss = engine(input_ids=batch, labels=batch).loss
        timer.sync()
        start = time.perf_counter()
        engine.backward(loss)
        timer.sync()
        elapsed = (time.perf_counter() - start) * 1e3
        if sync:
            engine.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return elapsed

    for _ in range(args.warmup):
        backward(True)
    with_sync = statistics.median(backward(True) for _ in range(args.reps))
    # Without sync: DeepSpeed's gradient hooks and end-of-backward epilogue patched to do nothing.
    optimizer.reduce_ready_partitions_and_remove_grads = lambda *a, **k: None
    optimizer.overlapping_partition_gradients_reduce_epilogue = lambda *a, **k: None
    without = statistics.median(backward(False) for _ in range(args.reps))
    exposed = max(with_sync - without, 0.0)
    return [dict(provider="deepspeed", backend="deepspeed", bwd_nosync_ms=round(without, 2),
                 bwd_sync_ms=round(with_sync, 2), exposed_ms=round(exposed, 2), standalone_comm_ms="",
                 overlap_fraction="", buckets="", bucket_elements=args.reduce_bucket or 500_000_000)], []


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=["autotp", "deepspeed"], default="autotp")
    parser.add_argument("--backends", default="torch,nccl_ext,nccl_ext:8")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--reduce-bucket", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test of this script (gloo, tiny model)")
    parser.add_argument("--out", default=RESULTS)
    args = parser.parse_args()
    args.backends = args.backends.split(",")
    model, config = build_model(args.tiny, args.layers)
    zero = {"stage": 2}
    if args.reduce_bucket:
        zero.update(reduce_bucket_size=args.reduce_bucket, allgather_bucket_size=args.reduce_bucket)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": zero, "bf16": {"enabled": not args.tiny},
                 "tensor_parallel": {"autotp_size": args.tp}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    if args.provider == "autotp":
        import autotp

        autotp.init_distributed()
        if args.tiny:
            args.backends = ["torch"]
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        engine, _, _, _ = autotp.initialize(model=model, optimizer=opt, config=ds_config)
        dp, dp_group, device = engine.dp_world_size, engine.groups.dp_group, engine.device
    else:
        import deepspeed

        deepspeed.init_distributed()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
        dp, device = dist.get_world_size() // args.tp, engine.device
    del model
    rank = dist.get_rank()
    seq = 32 if args.tiny else args.seq
    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, config.vocab_size, (dp, seq), generator=gen)[rank // args.tp:rank // args.tp + 1]
    batch = ids.to(device)
    timer = Timer(device.type == "cuda")
    if args.provider == "autotp":
        rows, bucket_rows = measure_autotp(args, engine, batch, timer, dp_group)
    else:
        rows, bucket_rows = measure_deepspeed(args, engine, batch, timer)
    if rank != 0:
        return
    common = dict(date=datetime.date.today().isoformat(),
                  gpu=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", world=dist.get_world_size(),
                  tp=args.tp, dp=dp, layers=2 if args.tiny else args.layers, seq=seq, torch=torch.__version__)
    os.makedirs(args.out, exist_ok=True)
    for name, table in (("zero_rs.csv", rows), ("zero_rs_buckets.csv", bucket_rows)):
        if not table:
            continue
        path = os.path.join(args.out, name)
        new = not os.path.exists(path)
        with open(path, "a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(common) + list(table[0]))
            if new:
                writer.writeheader()
            for row in table:
                writer.writerow({**common, **row})
    for row in rows:
        print("RS " + " ".join(f"{k}={v}" for k, v in row.items()), flush=True)


if __name__ == "__main__":
    main()
