"""GEMM + TP collective: cuBLAS alone, collective alone, cuBLAS then NCCL, PyTorch symm_mem fused ops, autotp fused.

    torchrun --standalone --nproc_per_node=4 bench/bench_tp_overlap.py --out bench/results [--gemm-check] [--sweep]

Cases: Llama-3-8B and -70B projections at this world size (QKV, O, gate/up, down), tokens M in {4096, 8192,
16384}, bf16:
  row layers (O, down):         AR  forward GEMM + all-reduce         RS  sequence-parallel GEMM + reduce-scatter
  column layers (QKV, gate/up): AR  backward dgrad + all-reduce       AG  sequence-parallel all-gather + GEMM
plus the down projection at small M (512-2048) to find where fusing starts to pay. --write-table writes the rows
`kernels: auto` decides from (fused_table_w{W}.csv, for autotp_kernels/fused_table.csv).
Times are medians over trials of back-to-back launches queued behind a sleep kernel (the GPU's time, as when the
host runs ahead), the slowest rank's; `fused_b2b_ms` is the fused op without the sleep (bound by its host path
where that is slower), `fused_host_ms` the host time to issue one fused op on a busy GPU (one call after a
synchronisation), `fused_host_loop_ms` the host time per call over the timed run. Overlap efficiency is
(sequential - fused) / (sequential - max(GEMM, collective)). --gemm-check times the Triton GEMM against cuBLAS
on the 8B shapes (forward, dgrad, wgrad); --sweep times push mode, piece size and reduction programs;
--host-profile writes what host calls cost and a cProfile of the fused ops.
Writes tp_overlap_w{W}.csv (+ tp_overlap_gemm.csv, tp_overlap_sweep.csv) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import triton  # noqa: E402

from autotp_kernels import fused, matmul  # noqa: E402

MODELS = {  # hidden, intermediate, q heads, kv heads (head_dim 128)
    "llama3-8b": (4096, 14336, 32, 8),
    "llama3-70b": (8192, 28672, 64, 8),
}


def projections(model):
    h, inter, heads, kv = MODELS[model]
    return [("qkv", "col", h, (heads + 2 * kv) * 128), ("o", "row", heads * 128, h),
            ("gate_up", "col", h, 2 * inter), ("down", "row", inter, h)]


HOST_MS = {}


def timeit(fn, budget_ms=60.0, trials=5, label="", ahead=True):
    """Median ms per call over `trials` runs of back-to-back calls, the slowest rank's. With `ahead` (the
    default) a sleep kernel long enough to cover the host's issuing of the whole run is queued before the start
    event: the time is the GPU's alone, as in a training step whose host runs ahead. Without it a call whose host
    path is slower than its GPU work is timed at its host speed. HOST_MS["last"] is the host time to issue one
    call in the run."""
    if os.environ.get("BENCH_VERBOSE") and dist.get_rank() == 0:
        print(f"  timing {label}", flush=True)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    fused.symm.check_errors()  # a fused op that timed out is an error, not a slow case
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    host = time.perf_counter()
    fn()
    host = (time.perf_counter() - host) * 1e3
    end.record()
    end.synchronize()
    per_call = max(start.elapsed_time(end), host, 1e-3)
    iters = torch.tensor([max(3, min(50, int(budget_ms / per_call)))], device="cuda")
    # Every rank must issue the same number of calls: each rank's count comes from its own timing, and a rank
    # issuing one fused op more than its peers waits for signals that never come (the stalls of
    # bench/results/fused_notes.md, cases over ~1.2 ms where 60 ms / time rounds differently per rank).
    dist.all_reduce(iters, op=dist.ReduceOp.MIN)
    iters = int(iters)
    sleep_cycles = int((2 * host * iters + 2.0) * 2.0e6)  # H200 SMs clock at most 1.98 GHz: >= this many ms
    times = []
    for _ in range(trials):
        dist.barrier()
        torch.cuda.synchronize()
        if ahead:
            torch.cuda._sleep(sleep_cycles)
        start.record()
        host = time.perf_counter()
        for _ in range(iters):
            fn()
        HOST_MS["last"] = (time.perf_counter() - host) * 1e3 / iters
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    t = torch.tensor([statistics.median(times)], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def issue_ms(fn, reps=7):
    """Host ms to issue one call while the GPU is busy (a ~10 ms sleep kernel queued first), median over reps:
    the launch overhead a training step pays on the CPU. Timing back-to-back calls instead would count the
    waits of a full launch queue, i.e. GPU time."""
    times = []
    for _ in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        torch.cuda._sleep(20_000_000)
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    fused.symm.check_errors()
    return statistics.median(times)


def _symm_group_name(group):
    import torch.distributed._symmetric_memory as symm_mem

    name = group.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            symm_mem.enable_symm_mem_for_group(name)
    return name


def run_case(group, op, M, K, N, dtype, with_triton):
    """One case; K, N are the local GEMM's (already divided by the world where the layer is sharded)."""
    world = dist.get_world_size()
    gen = torch.Generator(device="cuda").manual_seed(dist.get_rank())
    r = {}
    if op in ("AR", "RS"):
        a = torch.randn(M, K, device="cuda", generator=gen).to(dtype)
        b = torch.randn(K, N, device="cuda", generator=gen).to(dtype) * 0.05
        y = torch.empty(M, N, device="cuda", dtype=dtype)
        piece = torch.empty(M // world, N, device="cuda", dtype=dtype)
        a3 = a.unsqueeze(0)
        r["gemm"] = timeit(lambda: torch.mm(a, b, out=y), label="gemm")
        if op == "AR":
            r["coll"] = timeit(lambda: dist.all_reduce(y, group=group), label="coll")
            r["seq"] = timeit(lambda: (torch.mm(a, b, out=y), dist.all_reduce(y, group=group)), label="seq")
            r["fused"] = timeit(lambda: fused.matmul_reduce([(a3, b)], group), label="fused")
            r["fused_host_loop"] = HOST_MS["last"]
            r["fused_b2b"] = timeit(lambda: fused.matmul_reduce([(a3, b)], group), label="fused b2b", ahead=False)
            r["fused_host"] = issue_ms(lambda: fused.matmul_reduce([(a3, b)], group))
            if with_triton:
                r["fused_triton"] = timeit(lambda: fused.matmul_reduce([(a3, b)], group, gemm="triton"), label="fused_triton")
        else:
            r["coll"] = timeit(lambda: dist.reduce_scatter_tensor(piece, y, group=group), label="coll")
            r["seq"] = timeit(lambda: (torch.mm(a, b, out=y), dist.reduce_scatter_tensor(piece, y, group=group)), label="seq")
            name = _symm_group_name(group)
            try:
                r["symm"] = timeit(lambda: torch.ops.symm_mem.fused_matmul_reduce_scatter(a, b, "sum", 0, name), label="symm")
            except Exception as error:  # noqa: BLE001 - recorded, the row still has the other columns
                print(f"symm_mem fused_matmul_reduce_scatter failed: {error}", flush=True)
            r["fused"] = timeit(lambda: fused.matmul_reduce([(a3, b)], group, scatter=True), label="fused")
            r["fused_host_loop"] = HOST_MS["last"]
            r["fused_b2b"] = timeit(lambda: fused.matmul_reduce([(a3, b)], group, scatter=True),
                                    label="fused b2b", ahead=False)
            r["fused_host"] = issue_ms(lambda: fused.matmul_reduce([(a3, b)], group, scatter=True))
    else:  # AG: x_shard [M/W, K] gathered, times w [K, N]
        x = torch.randn(M // world, K, device="cuda", generator=gen).to(dtype)
        w = torch.randn(K, N, device="cuda", generator=gen).to(dtype) * 0.05
        x_full = torch.empty(M, K, device="cuda", dtype=dtype)
        y = torch.empty(M, N, device="cuda", dtype=dtype)
        x3 = x.unsqueeze(0)
        r["gemm"] = timeit(lambda: torch.mm(x_full, w, out=y), label="gemm")
        r["coll"] = timeit(lambda: dist.all_gather_into_tensor(x_full, x, group=group), label="coll")
        r["seq"] = timeit(lambda: (dist.all_gather_into_tensor(x_full, x, group=group), torch.mm(x_full, w, out=y)), label="seq")
        name = _symm_group_name(group)
        try:
            r["symm"] = timeit(lambda: torch.ops.symm_mem.fused_all_gather_matmul(x, [w], 0, name), label="symm")
        except Exception as error:  # noqa: BLE001
            print(f"symm_mem fused_all_gather_matmul failed: {error}", flush=True)
        r["fused"] = timeit(lambda: fused.all_gather_matmul(x3, [w], group), label="fused")
        r["fused_host_loop"] = HOST_MS["last"]
        r["fused_b2b"] = timeit(lambda: fused.all_gather_matmul(x3, [w], group), label="fused b2b", ahead=False)
        r["fused_host"] = issue_ms(lambda: fused.all_gather_matmul(x3, [w], group))
    return r


def gemm_check(out_dir, dtype):
    """Triton GEMM against cuBLAS on the 8B TP=world shapes: forward, dgrad, wgrad (rank 0 writes)."""
    world = dist.get_world_size()
    rows = []
    for proj, kind, k_full, n_full in projections("llama3-8b"):
        k, n = (k_full // world, n_full) if kind == "row" else (k_full, n_full // world)
        for M in (4096, 8192, 16384):
            cases = [("fwd", (M, k), (k, n))]
            if M == 8192:
                cases += [("dgrad", (M, n), (n, k)), ("wgrad", (n, M), (M, k))]
            for what, sa, sb in cases:
                a = torch.randn(*(sa if what != "wgrad" else sa[::-1]), device="cuda").to(dtype)
                a = a.t() if what == "wgrad" else a  # dy^T: a transposed view, as the layers pass it
                b = torch.randn(*sb, device="cuda").to(dtype)
                out = torch.empty(sa[0], sb[1], device="cuda", dtype=dtype)
                matmul(a, b, out=out)  # autotune outside the timing
                t_cublas = triton.testing.do_bench(lambda: torch.mm(a, b, out=out), return_mode="median")
                t_triton = triton.testing.do_bench(lambda: matmul(a, b, out=out), return_mode="median")
                flops = 2 * sa[0] * sa[1] * sb[1]
                rows.append(dict(proj=proj, layer=kind, gemm=what, M=sa[0], K=sa[1], N=sb[1],
                                 cublas_ms=round(t_cublas, 4), triton_ms=round(t_triton, 4),
                                 cublas_tflops=round(flops / t_cublas / 1e9, 1),
                                 triton_tflops=round(flops / t_triton / 1e9, 1),
                                 triton_over_cublas=round(t_triton / t_cublas, 3)))
    if dist.get_rank() == 0:
        _write(os.path.join(out_dir, "tp_overlap_gemm.csv"), rows)
        worst = max(rows, key=lambda r: r["triton_over_cublas"])
        print(f"GEMM triton/cublas: median {statistics.median(r['triton_over_cublas'] for r in rows):.3f}, worst "
              f"{worst['triton_over_cublas']} ({worst['proj']} {worst['gemm']} M={worst['M']})", flush=True)


def sweep(group, out_dir, dtype):
    """Push mode x piece rows x reduction programs on the two headline all-reduces (8B o and down, M=8192): the
    epilogue push stores over NVLink from cuBLAS, the copy push stages locally and spends the copy engine;
    fewer pieces cost less host time and GEMM efficiency, more shorten the exposed tail."""
    world = dist.get_world_size()
    rows = []
    knobs = ("push", "chunk_rows", "reduce_programs")
    saved = {knob: getattr(fused.TUNING, knob) for knob in knobs}
    for proj, k in (("o", 4096 // world), ("down", 14336 // world)):
        a = torch.randn(1, 8192, k, device="cuda").to(dtype)
        b = torch.randn(k, 4096, device="cuda").to(dtype) * 0.05
        for push in ("epilogue", "copy"):
            for chunk_rows in (2048, 4096, 8192, 16384):
                for programs in (32, 132):
                    for knob, value in zip(knobs, (push, chunk_rows, programs)):
                        setattr(fused.TUNING, knob, value)
                    t = timeit(lambda: fused.matmul_reduce([(a, b)], group),  # noqa: B023 - timed at once
                               label=f"sweep {proj} {push} {chunk_rows} {programs}")
                    rows.append({"world": world, "proj": proj, "M": 8192, "K": k, "N": 4096, "push": push,
                                 "chunk_rows": chunk_rows, "reduce_programs": programs, "fused_ms": round(t, 4)})
    for knob, value in saved.items():
        setattr(fused.TUNING, knob, value)
    if dist.get_rank() == 0:
        _write(os.path.join(out_dir, f"tp_overlap_sweep_w{world}.csv"), rows)
        for proj in ("o", "down"):
            mine = [r for r in rows if r["proj"] == proj]
            best = min(mine, key=lambda r: r["fused_ms"])
            print(f"SWEEP {proj} " + " ".join(f"{r['push'][0]}{r['chunk_rows']}p{r['reduce_programs']}="
                                              f"{r['fused_ms']}" for r in mine) + f" best {best}", flush=True)


def host_profile(group, out_dir, dtype):
    """Where a fused op's host time goes (the fused all-reduce was host-bound at ~150 us per chunk): cProfile
    over 20 calls of the headline all-reduce and of an all-gather + GEMM, top functions by own time (rank 0)."""
    import cProfile
    import io
    import pstats

    world = dist.get_world_size()
    a = torch.randn(1, 8192, 14336 // world, device="cuda").to(dtype)
    b = torch.randn(14336 // world, 4096, device="cuda").to(dtype) * 0.05
    x = torch.randn(1, 8192 // world, 4096, device="cuda").to(dtype)
    w = torch.randn(4096, 6144 // world, device="cuda").to(dtype)
    report = io.StringIO()
    # What one host call of each kind costs here (the fused op's host time is a sum of these): 200 calls each on
    # a GPU kept busy by a sleep kernel, so no call waits for the device.
    flag = fused.symm.workspace(group, a.device, 1 << 20).flag_addr(dist.get_rank(), fused.symm.PROBE_OFF)
    stream = torch.cuda.current_stream().cuda_stream
    event = fused.cuda_driver.Event()
    small_a, small_b = a[0, :64, :64].contiguous(), b[:64, :64].contiguous()
    small_out = torch.empty(64, 64, device="cuda", dtype=dtype)
    costs = {"cuStreamWriteValue32 (own flag)": lambda: fused.cuda_driver.write_value(stream, flag, 0),
             "cuStreamWaitValue32 (met)": lambda: fused.cuda_driver.wait_value(stream, flag, 0),
             "cuEventRecord": lambda: event.record(stream),
             "torch.mm 64x64 out=": lambda: torch.mm(small_a, small_b, out=small_out),
             "torch.empty 8192x4096": lambda: torch.empty(8192, 4096, device="cuda", dtype=dtype),
             "torch.cuda.Event()+record": lambda: torch.cuda.Event().record()}
    for label, fn in costs.items():
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)
        start = time.perf_counter()
        for _ in range(200):
            fn()
        report.write(f"host us per call, {label}: {(time.perf_counter() - start) / 200 * 1e6:.1f}\n")
        torch.cuda.synchronize()
    for label, fn in (("matmul_reduce 8192x3584x4096", lambda: fused.matmul_reduce([(a, b)], group)),
                      ("all_gather_matmul 8192x4096x1536", lambda: fused.all_gather_matmul(x, [w], group))):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(20):
            fn()
        profiler.disable()
        torch.cuda.synchronize()
        report.write(f"== {label}: 20 calls, world {world}, chunk_rows {fused.TUNING.chunk_rows}\n")
        pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(18)
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, f"tp_overlap_host_w{world}.txt"), "w") as f:
            f.write(report.getvalue())
        print("\n".join(line for line in report.getvalue().splitlines() if line.strip())[:6000], flush=True)


def _write(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--gemm-check", action="store_true")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--host-profile", action="store_true")
    parser.add_argument("--no-cases", action="store_true", help="only the --sweep / --host-profile / --gemm-check")
    parser.add_argument("--models", default="llama3-8b,llama3-70b")
    parser.add_argument("--tokens", default="4096,8192,16384")
    parser.add_argument("--write-table", action="store_true",
                        help="also write fused_table_w{W}.csv: the rows autotp_kernels/fused_table.csv takes")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    os.makedirs(args.out, exist_ok=True)
    world, group, dtype = dist.get_world_size(), dist.group.WORLD, torch.bfloat16
    meta = dict(date=datetime.date.today().isoformat(), gpu=torch.cuda.get_device_name(), world=world,
                torch=torch.__version__, triton=triton.__version__,
                nccl=".".join(map(str, torch.cuda.nccl.version())))
    if args.host_profile:
        host_profile(group, args.out, dtype)
    if args.sweep:
        sweep(group, args.out, dtype)
    cases = []
    for model in args.models.split(","):
        for proj, kind, k_full, n_full in projections(model):
            for M in map(int, args.tokens.split(",")):
                if kind == "row":
                    cases += [(model, proj, "AR", M, k_full // world, n_full),
                              (model, proj, "RS", M, k_full // world, n_full)]
                else:
                    cases += [(model, proj, "AR", M, n_full // world, k_full),  # dgrad: dy [M, N/W] @ W [N/W, K]
                              (model, proj, "AG", M, k_full, n_full // world)]
    cases += [("llama3-8b", "down", "AR", M, 14336 // world, 4096) for M in (512, 1024, 2048)]
    if args.no_cases:
        cases = []
    rows = []
    for model, proj, op, M, K, N in cases:
        headline = model == "llama3-8b" and proj == "down" and M == 8192
        r = run_case(group, op, M, K, N, dtype, with_triton=headline)
        host_ms = r.pop("fused_host")
        host_loop_ms = r.pop("fused_host_loop")
        best = max(r["gemm"], r["coll"])
        row = dict(meta, model=model, proj=proj, op=op, M=M, K=K, N=N,
                   **{f"{key}_ms": round(value, 4) for key, value in r.items()})
        row["fused_host_ms"] = round(host_ms, 4)
        row["fused_host_loop_ms"] = round(host_loop_ms, 4)
        row["fused_tflops"] = round(2 * M * K * N / r["fused"] / 1e9, 1)
        row["overlap_eff"] = round((r["seq"] - r["fused"]) / max(r["seq"] - best, 1e-6), 3)
        row["fused_over_max"] = round(r["fused"] / best, 3)
        row["seq_over_fused"] = round(r["seq"] / r["fused"], 3)
        if "symm" in r:
            row["symm_over_fused"] = round(r["symm"] / r["fused"], 3)
        rows.append(row)
        if dist.get_rank() == 0:
            print(f"{model:10s} {proj:7s} {op} M={M:5d} K={K:5d} N={N:5d} | gemm {r['gemm']:.3f} coll "
                  f"{r['coll']:.3f} seq {r['seq']:.3f} symm {r.get('symm', float('nan')):.3f} fused "
                  f"{r['fused']:.3f} triton {r.get('fused_triton', float('nan')):.3f} host {host_ms:.3f} | eff "
                  f"{row['overlap_eff']:.2f} fused/max {row['fused_over_max']:.2f}", flush=True)
            # Rewritten after every case: a run cut short by the device's time limit keeps what it measured.
            fields = []
            for done in rows:
                fields += [k for k in done if k not in fields]
            with open(os.path.join(args.out, f"tp_overlap_w{world}.csv"), "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
    if args.write_table and rows and dist.get_rank() == 0:
        _write(os.path.join(args.out, f"fused_table_w{world}.csv"),
               [{"op": r["op"], "world": world, "M": r["M"], "K": r["K"], "N": r["N"], "seq_ms": r["seq_ms"],
                 "fused_ms": r["fused_ms"], "date": r["date"], "gpu": r["gpu"], "torch": r["torch"]} for r in rows])
    if args.gemm_check:
        gemm_check(args.out, dtype)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
