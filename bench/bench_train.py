"""Training throughput on a random-init Llama-3-8B-shaped model (fewer layers), one provider per run.

    torchrun --standalone --nproc_per_node=2 bench/bench_train.py --provider autotp --tp 2 --zero 0
    python bench/bench_train.py --provider single

Providers: autotp (autotp.initialize, bf16 + fp32 master weights + clipping, ZeRO's recipe), deepspeed
(DeepSpeed AutoTP, same recipe; needs deepspeed installed), dtensor (PyTorch parallelize_module, bf16 AdamW
updating bf16 weights, no clipping), single (one GPU, no TP, bf16 AdamW, clipping). Reports the median step time
after warm-up, tokens/s/GPU, MFU (6*N + attention FLOPs per token over 989 TFLOP/s dense bf16), peak memory and
the first losses, and appends one CSV row with GPU, world size, versions and date to bench/results/train.csv.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import time

import torch
import torch.distributed as dist

H200_BF16_TFLOPS = 989e12


SHAPES = {  # hidden, intermediate, query heads, KV heads (head_dim 128, vocabulary 128256)
    "llama3-8b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
}


def build_model(layers: int, shape: str = "llama3-8b"):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, intermediate, heads, kv_heads = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, num_hidden_layers=layers, vocab_size=128256,
                         max_position_embeddings=8192)
    config._attn_implementation = "sdpa"
    # Built on the meta device and filled with HF's Llama init (normal(0, 0.02) matrices, unit norms) drawn on this
    # rank's GPU: on the H200 machine the CPU's bf16 normal_ took 85-95 s per rank under torchrun (one thread
    # each), a GPU draw plus a 5.6 GB copy takes about a second. Seeded per parameter, so every rank and every
    # provider gets the same weights. RoPE's inv_freq stays fp32, as HF's from_pretrained(dtype=bf16) leaves it.
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)  # its buffers are computed, not loaded
    draw_on = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(draw_on)
    with torch.no_grad():
        for index, param in enumerate(model.parameters()):
            if param.dim() == 1:
                param.fill_(1.0)
                continue
            gen.manual_seed(index)
            values = torch.empty(param.shape, dtype=torch.float32, device=draw_on)
            param.copy_(values.normal_(0.0, config.initializer_range, generator=gen))
    return model, config


def _dtensor_tp(model, mesh) -> None:
    """PyTorch's `parallelize_module` plan for Llama over `mesh` (the DTensor peer's TP)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    plan = {f"self_attn.{p}_proj": ColwiseParallel() for p in "qkv"}
    plan.update({"self_attn.o_proj": RowwiseParallel(), "mlp.gate_proj": ColwiseParallel(),
                 "mlp.up_proj": ColwiseParallel(), "mlp.down_proj": RowwiseParallel()})
    for layer in model.model.layers:
        parallelize_module(layer, mesh, plan)
    parallelize_module(model, mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate())})


def setup(args, model):
    """(forward, backward, step, world, rank, dp) for the chosen provider."""
    if args.provider == "single":
        model = model.cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # the fastest one-GPU baseline

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return (lambda ids: model(input_ids=ids, labels=ids).loss), (lambda loss: loss.backward()), step, 1, 0, 1
    zero = {"stage": args.zero}
    if args.reduce_bucket:
        zero.update(reduce_bucket_size=args.reduce_bucket, allgather_bucket_size=args.reduce_bucket)
    config = {"train_micro_batch_size_per_gpu": args.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": zero, "bf16": {"enabled": True},
              "tensor_parallel": {"autotp_size": args.tp}, "gradient_clipping": 1.0, "steps_per_print": 10 ** 9}
    if args.provider == "autotp":  # DeepSpeed would reject keys it does not know
        config["tensor_parallel"].update(kernels=args.kernels, vocab_parallel_loss=args.vocab_parallel,
                                         sequence_parallel=args.sequence_parallel)
    if args.provider == "autotp":
        import autotp

        autotp.init_distributed()
        if args.optimizer == "config":
            config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-5}}
            opt = None
        else:  # the README quick start's object; `object-foreach` pins torch's foreach path (the user chose it)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5,
                                    **({"foreach": True} if args.optimizer == "object-foreach" else {}))
        engine, _, _, _ = autotp.initialize(model=model, optimizer=opt, config=config)
        dp = engine.dp_world_size
    elif args.provider == "deepspeed":
        import deepspeed

        deepspeed.init_distributed()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
        dp = dist.get_world_size() // args.tp
    elif args.provider == "fsdp2":  # PyTorch's own TP x ZeRO-3 (torchtitan's recipe): DTensor TP, FSDP2 over DP
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        dp = dist.get_world_size() // args.tp
        mesh = init_device_mesh("cuda", (dp, args.tp), mesh_dim_names=("dp", "tp"))
        model = model.float().cuda()  # fp32 sharded masters, bf16 compute: autotp's and DeepSpeed's recipe
        if args.tp > 1:
            _dtensor_tp(model, mesh["tp"])
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh["dp"], mp_policy=policy)
        fully_shard(model, mesh=mesh["dp"], mp_policy=policy)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return ((lambda ids: model(input_ids=ids, labels=ids).loss), (lambda loss: loss.backward()), step,
                dist.get_world_size(), dist.get_rank(), dp)
    else:  # dtensor: pure TP over all ranks
        from torch.distributed.device_mesh import init_device_mesh

        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        mesh = init_device_mesh("cuda", (dist.get_world_size(),), mesh_dim_names=("tp",))
        model = model.cuda()
        _dtensor_tp(model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=False)

        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)

        return ((lambda ids: model(input_ids=ids, labels=ids).loss), (lambda loss: loss.backward()), step,
                dist.get_world_size(), dist.get_rank(), 1)
    return ((lambda ids: engine(input_ids=ids, labels=ids).loss), engine.backward, engine.step,
            dist.get_world_size(), dist.get_rank(), dp)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--provider", choices=["autotp", "deepspeed", "dtensor", "fsdp2", "single", "all"], default="autotp")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--zero", type=int, default=0)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b", help="layer sizes of this model")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reduce-bucket", type=float, default=None,
                        help="zero_optimization reduce/allgather_bucket_size (default: each provider's own)")
    parser.add_argument("--losses-csv", default=None, help="also append every step's loss to this CSV")
    parser.add_argument("--optimizer", choices=["object", "object-foreach", "config"], default="object",
                        help="autotp: AdamW built by the user (object; object-foreach pins foreach=True) or from the "
                             "config's optimizer section")
    parser.add_argument("--kernels", choices=["auto", "torch", "triton"], default="auto", help="autotp only")
    parser.add_argument("--fuse-all", action="store_true",
                        help="autotp, kernels auto: fuse every shape (cuBLAS under the fused collectives) instead of "
                             "where autotp_kernels/fused_table.csv measured it faster")
    parser.add_argument("--vocab-parallel", action="store_true", help="autotp: tensor_parallel.vocab_parallel_loss")
    parser.add_argument("--sequence-parallel", action="store_true", help="autotp: tensor_parallel.sequence_parallel")
    parser.add_argument("--profile", default=None, help="profile one step after warm-up; write the table here (.md)")
    parser.add_argument("--gpus", type=int, default=None, help="--provider all: GPUs for the TP providers")
    parser.add_argument("--providers", default="single,deepspeed,dtensor,autotp",
                        help="--provider all: which ones, in this order (the single-GPU row runs first, once per machine)")
    parser.add_argument("--csv", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "train.csv"))
    args = parser.parse_args()
    if args.fuse_all:
        from autotp_kernels import fused

        fused.TUNING.always = True
    if args.provider == "all":
        return run_all(args)

    began = time.perf_counter()
    model, config = build_model(args.layers, args.shape)
    built = time.perf_counter()
    n_params = sum(p.numel() for p in model.parameters())
    forward, backward, step, world, rank, dp = setup(args, model)
    ready = time.perf_counter()
    del model  # the providers hold what they keep; the unsharded CPU copy must not count
    torch.cuda.synchronize()
    static_gb = torch.cuda.memory_allocated() / 2 ** 30  # weights (+ masters, optimizer buffers made so far)
    gen = torch.Generator().manual_seed(1234)  # same batch on every rank of a TP group
    times, host_times, losses = [], [], []
    profiler = None
    for index in range(args.steps):
        if args.profile and index == args.warmup:
            profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
            profiler.__enter__()
        ids = torch.randint(0, config.vocab_size, (args.micro_batch * dp, args.seq), generator=gen)
        dp_rank = rank // args.tp if args.provider in ("autotp", "deepspeed", "fsdp2") else 0
        ids = ids[dp_rank * args.micro_batch:(dp_rank + 1) * args.micro_batch].cuda()
        torch.cuda.synchronize()
        start = time.perf_counter()
        loss = forward(ids)
        forward_gb = torch.cuda.memory_allocated() / 2 ** 30  # static + saved activations (+ logits)
        backward(loss)
        step()
        host_times.append(time.perf_counter() - start)  # launches issued; the GPU may still be busy
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach().float()))
        if profiler is not None:
            profiler.__exit__(None, None, None)
            _write_profile(args, profiler, times[-1], rank)
            profiler = None
    median = _median(times[args.warmup:])
    tokens_per_gpu = args.micro_batch * args.seq * dp / median / world
    flops_per_token = 6 * n_params + 12 * args.layers * config.hidden_size * args.seq
    row = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), world=world,
               provider=args.provider, tp=args.tp if args.provider != "single" else 1, dp=dp, zero=args.zero,
               shape=args.shape, layers=args.layers, seq=args.seq, micro_batch=args.micro_batch, params=n_params,
               kernels=(args.kernels + ("+fuse-all" if args.fuse_all else "")) if args.provider == "autotp" else "",
               optimizer=args.optimizer if args.provider == "autotp" else "",
               # which package version ran (bench/run_levers_gpu.sh runs several commits side by side)
               version=os.environ.get("AUTOTP_BENCH_VERSION", ""),
               vocab_parallel=int(args.vocab_parallel and args.provider == "autotp"),
               sequence_parallel=int(args.sequence_parallel and args.provider == "autotp"),
               step_s=round(median, 4),
               # Host time to issue a step (median, same steps): near step_s, the step is bound by Python and
               # kernel launches rather than by the GPU (the loss's .item() in some providers syncs early).
               host_s=round(_median(host_times[args.warmup:]), 4),
               tokens_per_s_per_gpu=round(tokens_per_gpu),
               mfu=round(tokens_per_gpu * flops_per_token / H200_BF16_TFLOPS, 4),
               peak_mem_gb=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2),
               static_mem_gb=round(static_gb, 2), after_forward_gb=round(forward_gb, 2), after_mem_gb=round(torch.cuda.memory_allocated() / 2 ** 30, 2),
               first_losses=" ".join(f"{x:.4f}" for x in losses[:3]), torch=torch.__version__,
               transformers=__import__("transformers").__version__, triton=_version("triton"),
               deepspeed=_version("deepspeed"))
    if rank == 0 and args.losses_csv:
        new = not os.path.exists(args.losses_csv)
        with open(args.losses_csv, "a", newline="") as handle:
            writer = csv.writer(handle)
            if new:
                writer.writerow(["date", "provider", "tp", "dp", "zero", "step", "loss"])
            for index, loss in enumerate(losses):
                writer.writerow([row["date"], args.provider, row["tp"], dp, args.zero, index, f"{loss:.5f}"])
    if rank == 0:
        print(f"PHASES build {built - began:.1f} s, setup {ready - built:.1f} s, steps {time.perf_counter() - ready:.1f} s",
              flush=True)
        print("RESULT " + json.dumps(row), flush=True)
        _append_row(args.csv, row)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _write_profile(args, profiler, step_s: float, rank: int) -> None:
    """The profiled step's GPU time by category (rank 0's), as a Markdown table at args.profile."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from profile_summary import format_table, format_top, kernels_of, summarise, top_kernels

    if rank != 0:
        return
    kernels = kernels_of(profiler)
    rows = summarise(kernels, step_s * 1e6)
    tp = 1 if args.provider == "single" else args.tp
    with open(args.profile, "w") as handle:
        handle.write(f"One {args.provider} step (tp={tp}, zero={args.zero}, seq={args.seq}, "
                     f"kernels={args.kernels}, vocab_parallel={args.vocab_parallel}, sequence_parallel="
                     f"{args.sequence_parallel}), {step_s * 1e3:.1f} ms, rank 0, {torch.cuda.get_device_name()}, "
                     f"torch {torch.__version__}, {datetime.date.today().isoformat()}:\n\n{format_table(rows)}\n\n"
                     f"Kernels with the most GPU time:\n\n{format_top(top_kernels(kernels))}\n")
    # Every kernel, not only the top ones: two providers' steps are compared kernel by kernel from these.
    with open(os.path.splitext(args.profile)[0] + "_kernels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kernel", "calls", "ms", "category"])
        for kernel in top_kernels(kernels, count=None, width=None):
            writer.writerow([kernel["kernel"], kernel["calls"], kernel["ms"], kernel["category"]])
    print("PROFILE\n" + format_table(rows), flush=True)


def run_all(args) -> None:
    """Every provider one after another in this job (same machine state, same data): single on one GPU, the
    TP providers on --gpus GPUs. Each appends its row to --csv."""
    import subprocess
    import sys

    gpus = args.gpus or args.tp
    common = ["--tp", str(args.tp), "--zero", str(args.zero), "--layers", str(args.layers), "--shape", args.shape,
              "--seq", str(args.seq),
              "--micro-batch", str(args.micro_batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
              "--csv", args.csv]
    if args.losses_csv:
        common += ["--losses-csv", args.losses_csv]
    script = os.path.abspath(__file__)
    wanted = args.providers.split(",")
    runs = [[sys.executable, script, "--provider", "single"] + common] if "single" in wanted else []
    unknown = set(wanted) - {"single", "deepspeed", "dtensor", "autotp"}
    if unknown:
        raise SystemExit(f"--providers: unknown {sorted(unknown)}; choose from single, deepspeed, dtensor, autotp")
    for provider in [p for p in wanted if p != "single"]:  # in the order given
        extra = []
        if provider == "autotp":
            extra = ["--kernels", args.kernels, "--optimizer", args.optimizer] + (["--vocab-parallel"] if args.vocab_parallel else []) + \
                (["--sequence-parallel"] if args.sequence_parallel else []) + \
                (["--profile", args.profile] if args.profile else [])
        if provider == "dtensor" and gpus != args.tp:
            continue  # plain TP only: no data-parallel configuration
        runs.append(["torchrun", "--standalone", f"--nproc_per_node={gpus}", script, "--provider", provider]
                    + common + extra)
    for command in runs:
        print("RUN " + " ".join(command[-20:]), flush=True)
        subprocess.run(command, check=False)


def _median(values: list) -> float:
    """The upper median (the middle of an odd count, the larger middle of an even one)."""
    return sorted(values)[len(values) // 2]


def _append_row(path: str, row: dict) -> None:
    """Append `row` to the CSV at `path`; a file written before a column was added is rewritten with the union
    of the columns (appending under the old header would shift every later value into the wrong column)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    rows, fields = [], list(row)
    if os.path.exists(path):
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            fields = list(reader.fieldnames or []) + [k for k in row if k not in (reader.fieldnames or [])]
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows + [row])
    os.replace(path + ".tmp", path)


def _version(name: str) -> str:
    try:
        return __import__(name).__version__
    except ImportError:
        return ""


if __name__ == "__main__":
    main()
