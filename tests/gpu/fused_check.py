"""GPU check of the fused GEMM + collective kernels (not collected by CI: it needs CUDA and 2+ GPUs).

    torchrun --standalone --nproc_per_node=4 tests/gpu/fused_check.py [all|kernels|training]
    torchrun --standalone --nproc_per_node=1 tests/gpu/fused_check.py native   # one GPU: the C++ build and
                                                                              # its slot reduction only

Tolerance, argued from torch's own error: every path rounds each rank's partial GEMM to the working precision;
cuBLAS then NCCL also rounds each of the ring's W-1 partial sums, while the fused kernel sums in fp32 and
rounds once. So against an fp64 reference of the same inputs the fused error may not exceed the cuBLAS+NCCL
error by more than 25% (the margin covers chunked GEMMs picking kernels that round differently). Outputs must
also be bit-identical on every rank and across repeated runs. Prints one line per case and 'ALL OK'.
"""

import faulthandler
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from autotp import comm  # noqa: E402
from autotp.comm import SEQ_DIM, _GatherSequence, _ReduceScatterSequence  # noqa: E402
from autotp_kernels import fused, symm  # noqa: E402
from autotp_kernels.tp_linear import (ColumnLinearAllGather, ColumnLinearGradAllReduce,  # noqa: E402
                                      RowLinearAllReduce, RowLinearReduceScatter)

torch.backends.cuda.matmul.allow_tf32 = False
RESULTS = []


def report(name, ok, detail=""):
    ok_all = torch.tensor([1.0 if ok else 0.0], device="cuda")
    dist.all_reduce(ok_all, op=dist.ReduceOp.MIN)
    ok = bool(ok_all.item() == 1.0)
    RESULTS.append(ok)
    if dist.get_rank() == 0:
        print(f"{name}: {detail} {'OK' if ok else 'FAIL'}", flush=True)


def rel(a, ref):
    return float((a.double() - ref).norm() / ref.norm().clamp_min(1e-30))


def same_everywhere(t):
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return all(torch.equal(g, gathered[0]) for g in gathered)


def rand(*shape, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32).to(dtype) * 0.5


def full_of(local, dim):
    """Concatenate every rank's `local` along `dim` (fp64 for references)."""
    pieces = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(pieces, local.contiguous())
    return torch.cat(pieces, dim=dim).double()


def check_reduce(group, dtype, seg, S, K, N, scatter, gemm, label="", n_pairs=1):
    rank, world = dist.get_rank(), dist.get_world_size()
    pairs = [(rand(seg, S, K, dtype=dtype, seed=10 + rank + 100 * i), rand(K, N, dtype=dtype, seed=20 + rank + 100 * i))
             for i in range(n_pairs)]
    ref = sum(full_of(a, 2) @ full_of(b, 0) for a, b in pairs)  # sum over ranks and pairs of a @ b, in fp64
    if scatter:
        ref = ref[:, rank * (S // world):(rank + 1) * (S // world)]
    outs = [fused.matmul_reduce(pairs, group, scatter=scatter, gemm=gemm) for _ in range(3)]
    seq = fused.sequential_matmul_reduce(pairs, group, scatter=scatter)
    torch.cuda.synchronize()
    symm.check_errors()
    err, err_seq = rel(outs[0], ref), rel(seq, ref)
    repeat = all(torch.equal(o, outs[0]) for o in outs)
    everywhere = scatter or same_everywhere(outs[0])
    ok = err <= 1.25 * err_seq + 1e-7 and repeat and everywhere
    report(f"{'RS' if scatter else 'AR'} {str(dtype)[6:]} {gemm}{label} seg={seg} S={S} K={K} N={N} "
           f"pairs={n_pairs} push={fused.TUNING.push if n_pairs == 1 else 'copy'}", ok,
           f"err {err:.2e} vs torch+nccl {err_seq:.2e}, repeatable={repeat}, same on ranks={everywhere}")


def check_native_reduction():
    """The C++ extension's slot reduction gives the Triton kernel's bits (same order, one rounding)."""
    from autotp_kernels.comm_kernels import reduce_slots

    native = fused._native()
    if native is None:
        report("native slot reduction", False, "the fused extension did not build")
        return
    ok, detail = True, []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for world, seg, R, N, lo, hi, keep in ((2, 1, 300, 4096, 0, 300, 1), (4, 2, 129, 1000, 3, 120, None),
                                               (8, 1, 64, 7, 1, 63, 5)):
            slots = rand(world, seg, R, N, dtype=dtype, seed=world + N)
            twin = slots.clone()
            out, out_twin = (torch.full((seg, R + 2, N), 7.0, dtype=dtype, device="cuda") for _ in range(2))
            native.reduce_slots(slots, lo, hi, out, 2, -1 if keep is None else keep, 132,
                                torch.cuda.current_stream().cuda_stream)
            reduce_slots(twin, (lo, hi), out_twin, 2, keep=keep)
            torch.cuda.synchronize()
            same = torch.equal(out, out_twin) and torch.equal(slots, twin)
            ok = ok and same
            detail.append(f"{str(dtype)[6:]}/W{world}:{'=' if same else 'DIFF'}")
    report("native slot reduction vs Triton, bit for bit", ok, " ".join(detail))


def check_all_gather(group, dtype, seg, s_own, K, N, gemm, label=""):
    rank = dist.get_rank()
    x = rand(seg, s_own, K, dtype=dtype, seed=30 + rank)
    w = [rand(K, N, dtype=dtype, seed=40), rand(K, N // 2, dtype=dtype, seed=41)]
    x_ref = full_of(x, 1)
    x_full, ys = fused.all_gather_matmul(x, w, group, gemm=gemm)
    _, ys_seq = fused.sequential_all_gather_matmul(x, w, group)
    torch.cuda.synchronize()
    symm.check_errors()
    exact = torch.equal(x_full.double(), x_ref)
    errs = [(rel(y, x_ref @ b.double()), rel(s, x_ref @ b.double())) for y, s, b in zip(ys, ys_seq, w)]
    ok = exact and all(e <= 1.25 * s + 1e-7 for e, s in errs)
    report(f"AG+GEMM {str(dtype)[6:]} {gemm}{label} seg={seg} S/W={s_own} K={K} N={N}", ok,
           f"gather exact={exact}, errs {[f'{e:.2e}/{s:.2e}' for e, s in errs]}")


def check_autograd(group, dtype):
    """Each fused Function's output and gradients against the same math through cuBLAS + NCCL (autotp's own
    unfused collectives)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    B, S, K, N = 2, 256 * world, 512, 384
    cases = {
        "row+AR": (RowLinearAllReduce, lambda x, w: _ar(x @ w.t(), group), (B, S, K // world), (N, K // world)),
        "col/AR-grad": (ColumnLinearGradAllReduce, lambda x, w: _copy_in(x, group) @ w.t(), (B, S, K),
                        (N // world, K)),
        "row+RS": (RowLinearReduceScatter, lambda x, w: _rs(x @ w.t(), group), (B, S, K // world), (N, K // world)),
        "AG+col": (ColumnLinearAllGather, lambda x, w: _ag(x, group) @ w.t(), (B, S // world, K), (N // world, K)),
    }
    for name, (fn, reference, x_shape, w_shape) in cases.items():
        x = rand(*x_shape, dtype=dtype, seed=50 + rank).requires_grad_()
        w = rand(*w_shape, dtype=dtype, seed=60 + rank).requires_grad_()
        dy_shape = reference(x.detach().double(), w.detach().double()).shape
        dy = rand(*dy_shape, dtype=dtype, seed=70 + rank)
        args = (x, w, None, False, group, "cublas") if fn in (ColumnLinearGradAllReduce, ColumnLinearAllGather) \
            else (x, w, False, group, "cublas")
        y = fn.apply(*args)
        y.backward(dy)
        got = [y.detach(), x.grad, w.grad]
        x64 = x.detach().double().requires_grad_()
        w64 = w.detach().double().requires_grad_()
        y64 = reference(x64, w64)
        y64.backward(dy.double())
        want = [y64.detach(), x64.grad, w64.grad]
        xs, ws = x.detach().requires_grad_(), w.detach().requires_grad_()
        ys = reference(xs, ws)
        ys.backward(dy)
        seq = [ys.detach(), xs.grad, ws.grad]
        errs = [(rel(g, r), rel(s, r)) for g, s, r in zip(got, seq, want)]
        ok = all(e <= 1.25 * s + 1e-6 for e, s in errs)
        report(f"autograd {name} {str(dtype)[6:]}", ok, " ".join(f"{e:.1e}/{s:.1e}" for e, s in errs))


def _ar(x, group):
    return comm.reduce_from_tp(x, group)


def _copy_in(x, group):
    return comm.copy_to_tp(x, group)


def _rs(x, group):
    return _ReduceScatterSequence.apply(x, group)


def _ag(x, group):
    return _GatherSequence.apply(x, group, x.shape[SEQ_DIM] * dist.get_world_size(group), True)


def check_training(world):
    """A small Llama trained 4 steps with kernels torch / auto (fused, cuBLAS) / triton, without and with sequence
    parallelism (its fused region entry): the same losses."""
    import autotp
    from families import batch, tiny_model

    losses = {}
    for kernels, sequence_parallel in (("torch", False), ("auto", False), ("triton", False), ("torch", True),
                                       ("triton", True)):
        name = kernels + (" +sp" if sequence_parallel else "")
        model = tiny_model("llama").cuda()
        config = {"train_micro_batch_size_per_gpu": 2,
                  "tensor_parallel": {"autotp_size": world, "kernels": kernels,
                                      "sequence_parallel": sequence_parallel},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3}}}
        fused.TUNING.always = True  # the tiny model's layers are below the auto threshold: fuse them anyway
        engine, _, _, _ = autotp.initialize(model=model, config=config)
        run = []
        for step in range(4):
            if dist.get_rank() == 0:
                print(f"  training {name} step {step} at {time.strftime('%X')}", flush=True)
            ids = batch(seed=40 + step, batch_size=2, seq=64).cuda()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
            run.append(float(loss.detach()))
        losses[name] = torch.tensor(run)
    symm.check_errors()
    # fp32 with TF32 off: the paths differ in GEMM blocking and in the all-reduce's summation order only.
    ok = all(torch.allclose(losses[k], losses["torch"], rtol=1e-5, atol=0) for k in losses)
    report("training llama fp32 4 steps, losses torch/auto/triton, with and without sequence parallelism", ok,
           " | ".join(f"{k}: {[round(float(v), 6) for v in losses[k]]}" for k in losses))


def check_timeout(group):
    """Rank 1 skips one fused op: the others raise FusedCommError within the timeout instead of hanging."""
    rank = dist.get_rank()
    a = rand(1, 512, 256, dtype=torch.bfloat16, seed=1)
    b = rand(256, 256, dtype=torch.bfloat16, seed=2)
    # Every rank runs the op once first: growing the peer workspace is collective (a rendezvous), and after a
    # small model's training it may still be too small for this op (the check then hung in the rendezvous).
    fused.matmul_reduce([(a, b)], group)
    torch.cuda.synchronize()
    fused.TUNING.timeout_s = 2.0
    raised = rank == 1
    start = time.time()
    if rank != 1:
        fused.matmul_reduce([(a, b)], group)
        torch.cuda.synchronize()
        try:
            symm.check_errors()
        except symm.FusedCommError as error:
            raised = "did not complete" in str(error)
    report("timeout: a missing rank turns into FusedCommError", raised, f"after {time.time() - start:.1f} s")


def main():
    # A hang is killed by torchrun's SIGTERM: dump every thread's Python stack first, so the log shows where.
    faulthandler.register(signal.SIGTERM, all_threads=True, chain=True)
    only = sys.argv[1] if len(sys.argv) > 1 else "all"  # all | kernels | training | native
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    group = dist.group.WORLD
    if only == "native":  # one GPU: no peer to time out on
        check_native_reduction()
    else:
        if only in ("all", "kernels"):
            check_kernels(group, world)
        if only in ("all", "training"):
            check_training(world)
        check_timeout(group)
    if rank == 0:
        print("ALL OK" if all(RESULTS) else "SOME FAILED", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def check_kernels(group, world):
    for dtype in (torch.bfloat16, torch.float16):
        for gemm in ("cublas", "triton"):
            check_reduce(group, dtype, 1, 4096, 1024, 2048, scatter=False, gemm=gemm)
            check_reduce(group, dtype, 2, 1024 * world, 768, 1000, scatter=True, gemm=gemm)
        check_reduce(group, dtype, 1, 1000 * world + 3, 512, 520, scatter=False, gemm="cublas")  # ragged rows
        check_all_gather(group, dtype, 1, 1024, 1024, 2048, "cublas")
        check_all_gather(group, dtype, 2, 500, 768, 640, "triton")
        check_autograd(group, dtype)
    check_reduce(group, torch.float32, 1, 2048, 512, 1024, scatter=False, gemm="cublas")
    check_reduce(group, torch.float32, 2, 512 * world, 256, 384, scatter=True, gemm="cublas")
    check_all_gather(group, torch.float32, 2, 256, 512, 384, "cublas")
    check_autograd(group, torch.float32)
    # Several operand pairs (a region's q/k/v input gradients) go through the stage and the copy engine.
    check_reduce(group, torch.bfloat16, 2, 1024 * world, 512, 768, scatter=True, gemm="cublas", n_pairs=3)
    check_reduce(group, torch.bfloat16, 2, 1000, 512, 768, scatter=False, gemm="cublas", n_pairs=2)
    saved, fused.TUNING.push = fused.TUNING.push, "copy"
    try:
        for scatter in (False, True):
            check_reduce(group, torch.bfloat16, 2, 2048 * world, 1024, 1536, scatter=scatter, gemm="cublas")
        check_reduce(group, torch.float16, 1, 700 * world + 1, 512, 520, scatter=False, gemm="cublas")
    finally:
        fused.TUNING.push = saved
    # The Python host path (what runs without the C++ extension), both reductions and both push modes.
    saved, fused.TUNING.native = fused.TUNING.native, False
    try:
        for push in ("epilogue", "copy"):
            fused.TUNING.push = push
            check_reduce(group, torch.bfloat16, 1, 4096, 1024, 2048, scatter=False, gemm="cublas", label=" python")
            check_reduce(group, torch.bfloat16, 2, 1024 * world, 768, 1000, scatter=True, gemm="cublas",
                         label=" python")
        check_all_gather(group, torch.bfloat16, 2, 500, 768, 640, "cublas", label=" python")
    finally:
        fused.TUNING.native, fused.TUNING.push = saved, "epilogue"
    check_native_reduction()
    # The polling-kernel waits (TUNING.wait = "kernel") instead of stream waits, both reductions.
    saved, fused.TUNING.wait = fused.TUNING.wait, "kernel"
    try:
        check_reduce(group, torch.bfloat16, 1, 8192, 1024, 2048, scatter=False, gemm="cublas", label=" wait=kernel")
        check_reduce(group, torch.bfloat16, 2, 1024 * world, 768, 1000, scatter=True, gemm="cublas",
                     label=" wait=kernel")
    finally:
        fused.TUNING.wait = saved


if __name__ == "__main__":
    main()
