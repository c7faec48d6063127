"""GPU check of ZeRO 0/1/2 over NCCL with the comm stream (not collected by CI: it needs CUDA).

    torchrun --standalone --nproc_per_node=4 tests/gpu/zero_nccl_check.py

TP2 x DP2 (world 4) or TP2 x DP1 (world 2), fp32, stages 0/1/2 x gradient accumulation 1/2: the consolidated
parameters after 3 AdamW steps with clipping equal single-process AdamW on the global batch on the CPU, with the
tolerance of tests/test_zero.py (TF32 off, so the GPU runs true fp32 GEMMs). Then a checkpoint saved at step 3
resumes bit-exactly on the GPU. Prints one line per case and 'ALL OK'.
"""

import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import autotp  # noqa: E402
from test_zero import _reference, _train  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def main():
    autotp.init_distributed()
    world, rank = dist.get_world_size(), dist.get_rank()
    tp, family = (4 if world >= 8 else 2), "qwen3"  # 8 GPUs: TP=4 x DP=2, the two-node layout of issue 8
    dp = world // tp
    ok = True
    for stage in (0, 1, 2):
        for gas in (1, 2):
            engine, _, norms = _train(family, tp, dp, stage, gas)
            full = engine.consolidated_state_dict()
            if rank == 0:
                ref_state, ref_norms = _reference(family, dp, gas)
                worst = max(float(((full[k] - v).abs() / (1e-6 + 1e-5 * v.abs())).max()) for k, v in ref_state.items())
                norm_err = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
                case_ok = worst <= 1.0 and norm_err <= 1e-5
                ok &= case_ok
                print(f"zero stage={stage} gas={gas} tp={tp} dp={dp}: worst excess={worst:.3f} "
                      f"norm rel err={norm_err:.1e} {'OK' if case_ok else 'FAIL'}", flush=True)
            del engine
    # Exact resume on the GPU: 2 steps, save, 2 steps; versus load + 2 steps.
    folder = [tempfile.mkdtemp() if rank == 0 else None]
    dist.broadcast_object_list(folder)
    engine, _, _ = _train(family, tp, dp, 2, 2)
    engine.save_checkpoint(folder[0])
    state_a = _continue(engine)
    engine, optimizer, _ = _train(family, tp, dp, 2, 2)
    with torch.no_grad():  # wipe weights and optimizer state: the load must restore all of it
        for tensor in list(engine.module.parameters()) + [v for s in optimizer.state.values() for v in s.values()
                                                          if torch.is_tensor(v)]:
            tensor.zero_()
    engine.load_checkpoint(folder[0])
    state_b = _continue(engine)
    if rank == 0:
        same = all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        ok &= same
        print(f"resume stage=2 on GPU: bit-exact={same} {'OK' if same else 'FAIL'}", flush=True)
        print("ALL OK" if ok else "SOME FAILED", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _continue(engine):
    from test_zero import MICRO, SEQ
    from families import batch

    for step in range(2):
        ids = batch(seed=900 + step, batch_size=MICRO * engine.dp_world_size, seq=SEQ)
        mine = ids.view(engine.dp_world_size, MICRO, SEQ)[engine.dp_rank].to(engine.device)
        for _ in range(engine.gradient_accumulation_steps):
            engine.backward(engine(input_ids=mine, labels=mine).loss)
            engine.step()
    return engine.consolidated_state_dict()


if __name__ == "__main__":
    main()
