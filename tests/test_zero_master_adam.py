"""ZeRO 1/2's one-kernel optimizer step (`autotp.zero.master_adam`) against torch's fused AdamW step in the same
engine, TP=2 x DP=2 over gloo, bf16 model with fp32 masters (the kernel runs under Triton's interpreter).

Both runs see the same bf16 gradients at the first step, so after it the masters agree as in
`test_kernels_adam.py` (an ulp of |p| plus a few ulp of the update), the global norm to fp32 rounding (the
kernel path norms the DP sums and scales by 1/dp^2, exact for dp = 2; 1e-6 covers the bf16 -> fp32 sum order),
and the model's bf16 weights are exactly the masters rounded, on every DP rank (after the all-gather). The
clipping is active (norm > CLIP), so a kernel that dropped the folded scale or the DP mean fails here.
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from families import batch, tiny_model

from autotp.zero.master_adam import local_of

MICRO, SEQ, CLIP, LR = 2, 10, 0.05, 1e-2


def _engine(stage: int, gas: int, kernels: str, dp: int):
    import autotp

    model = tiny_model("llama")
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=LR, eps=1e-6, fused=True)
    config = {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_clipping": CLIP, "bf16": {"enabled": True},
              "tensor_parallel": {"autotp_size": 2, "kernels": kernels},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000}}
    if stage == 3:  # the norm weights (64 elements) stay whole, with their own masters and bf16 weights
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 100
    engine, _, _, _ = autotp.initialize(model=model, optimizer=optimizer, config=config)
    return engine, optimizer


def _step(engine, gas: int, dp: int, seed: int) -> None:
    ids = batch(seed=seed, batch_size=MICRO * gas * dp, seq=SEQ).view(gas, dp, MICRO, SEQ)
    for m in range(gas):
        engine.backward(engine(input_ids=ids[m, engine.dp_rank], labels=ids[m, engine.dp_rank]).loss)
        engine.step()


def _train(stage: int, gas: int, kernels: str, dp: int):
    engine, optimizer = _engine(stage, gas, kernels, dp)
    store = engine.store
    # Count the gradients the kernel reads without a copy: a parameter's own gradient as a bucket's partition
    # (stages 1/2), a bf16 gradient left on its parameter (stage 0).
    uncopied, name = [], {0: "_kernel_grad", 1: "_own_grad", 2: "_own_grad"}.get(stage)
    if name is not None:
        original = getattr(store, name)
        setattr(store, name, lambda arg: uncopied.append(original(arg)) or uncopied[-1])
    probe = batch(seed=9, batch_size=MICRO, seq=SEQ)
    with torch.no_grad():
        loss_before = float(engine(input_ids=probe, labels=probe).loss)
    _step(engine, gas, dp, seed=5)
    with torch.no_grad():  # the updated weights as the next forward sees them (stage 3: gathered by FSDP2)
        loss_after = float(engine(input_ids=probe, labels=probe).loss)
    if stage == 3:  # FSDP2's fp32 shards are the masters; a persistent (small) parameter has its own
        trained = [store._trained(i) for i in range(len(store.params))]
        pairs = [(store.params[i].detach().reshape(-1), m) for i, m in store.masters.items()]
        flats = []  # sharded over DP: no replicas to compare
    elif stage == 0:
        trained = store.masters
        pairs = [(p.detach().reshape(-1), m) for p, m in zip(store.params, store.masters)]
        flats = [p.detach().clone() for p in store.params]
    else:
        trained = store.masters
        pairs = [(flat[slice(*bucket.partition_range(store.dp_rank))], m)
                 for bucket, flat, m in zip(store.buckets, store.flat_params, store.masters)]
        flats = [f.clone() for f in store.flat_params]
    weights_match_masters = all(torch.equal(w, local_of(m.detach()).reshape(-1).bfloat16()) for w, m in pairs)
    states = [optimizer.state[m] for m in trained]
    return dict(kernel=store.master_adam is not None, norm=float(engine.get_global_grad_norm()),
                uncopied=sum(g is not None and (stage or g.dtype == torch.bfloat16) for g in uncopied),
                masters=[local_of(m.detach()).clone() for m in trained],
                exp_avg=[local_of(s["exp_avg"]).clone() for s in states], steps=[float(s["step"]) for s in states],
                layout=[{k: (v.dtype, v.device.type, tuple(v.shape)) for k, v in s.items()} for s in states],
                weights_match_masters=weights_match_masters, tp_rank=engine.tp_rank, flats=flats,
                persistent=len(pairs), losses=(loss_before, loss_after))


def _both(rank, world_size, stage, gas):
    dp = world_size // 2
    return {kernels: _train(stage, gas, kernels, dp) for kernels in ("auto", "torch")}


@pytest.mark.parametrize("stage,gas,world", [(1, 1, 4), (2, 2, 4), (1, 1, 2), (0, 1, 2), (0, 2, 4), (3, 2, 4)])
def test_kernel_step_matches_torch_fused_adamw(stage, gas, world):
    """(2, 2) accumulates in an fp32 partition gradient: the kernel reads fp32 there, bf16 at (1, 1). At DP=1
    (world 2) a bucket of one parameter passes that parameter's gradient itself, shorter than the padded master;
    stage 0 there reads the parameters' bf16 gradients, and fp32 master gradients with accumulation or DP; stage 3
    updates FSDP2's fp32 shards through their local tensors (and a persistent parameter's bf16 weight)."""
    dp = world // 2
    results = run_distributed(world, _both, stage, gas)
    for rank, run in enumerate(results):
        ours, torchs = run["auto"], run["torch"]
        assert ours["kernel"] and not torchs["kernel"], "kernels: auto must take the kernel step, torch must not"
        assert (ours["uncopied"] > 0) == (stage < 3 and dp == 1 and gas == 1), ours["uncopied"]
        assert ours["norm"] > CLIP, "the clipping must be active for this test to check the folded scale"
        assert ours["norm"] == pytest.approx(torchs["norm"], rel=1e-6)
        assert ours["weights_match_masters"] and ours["persistent"] > 0, rank
        # The next forward sees the step: the loss moved, and to where torch's step moved it (the bf16 weights
        # are the same up to rare rounding flips from ulp-level master differences: 1/10 of the move).
        moved = abs(ours["losses"][1] - ours["losses"][0])
        assert moved > 1e-3 and abs(ours["losses"][1] - torchs["losses"][1]) < moved / 10, (ours, torchs)
        assert ours["layout"] == torchs["layout"], "the optimizer state must keep torch's layout (checkpoints)"
        assert ours["steps"] == torchs["steps"] == [1.0] * len(ours["steps"])
        for mine, ref in zip(ours["masters"], torchs["masters"]):
            bound = torch.finfo(torch.float32).eps * ref.abs() + 1e-5 * LR
            assert bool(((mine - ref).abs() <= bound).all()), float(((mine - ref).abs() / bound).max())
        for mine, ref in zip(ours["exp_avg"], torchs["exp_avg"]):
            # One step: exp_avg = 0.1 * grad, a product of two roundings in either path.
            torch.testing.assert_close(mine, ref, rtol=2 * torch.finfo(torch.float32).eps, atol=0)
    for tp_rank in (0, 1):  # the all-gathered bf16 buckets are the same on every DP rank of a TP shard
        replicas = [r["auto"]["flats"] for r in results if r["auto"]["tp_rank"] == tp_rank]
        assert len(replicas) == dp
        assert all(torch.equal(a, b) for a, b in zip(replicas[0], replicas[-1]))


def _resume_across(rank, world_size, ckpt_dir):
    """A checkpoint of the kernel step's state, loaded by an engine on torch's step: the same state, and the
    next step agrees as the first did."""
    dp = world_size // 2
    ours, ours_opt = _engine(1, 1, "auto", dp)
    _step(ours, 1, dp, seed=5)
    ours.save_checkpoint(ckpt_dir)
    torchs, torchs_opt = _engine(1, 1, "torch", dp)
    torchs.load_checkpoint(ckpt_dir)
    same = all(torch.equal(ours_opt.state[a][key].cpu(), torchs_opt.state[b][key].cpu())
               for a, b in zip(ours.store.masters, torchs.store.masters) for key in ("step", "exp_avg", "exp_avg_sq"))
    same = same and all(torch.equal(a, b) for a, b in zip(ours.store.masters, torchs.store.masters))
    _step(ours, 1, dp, seed=6)
    _step(torchs, 1, dp, seed=6)
    errors = [float(((a - b).abs() / (2 * torch.finfo(torch.float32).eps * b.abs() + 2e-5 * LR)).max())
              for a, b in zip(ours.store.masters, torchs.store.masters)]
    return dict(same=same, kernel=(ours.store.master_adam is not None, torchs.store.master_adam is not None),
                error=max(errors))


def test_checkpoint_moves_between_kernel_and_torch_steps(tmp_path):
    """Two steps, the second on both sides of the checkpoint: the bound is the first step's, twice (the loaded
    masters are equal, so only the second update's rounding and the bf16 weights it was computed from differ:
    the weights are the same masters rounded, hence equal)."""
    for result in run_distributed(4, _resume_across, str(tmp_path / "ckpt")):
        assert result["kernel"] == (True, False)
        assert result["same"], "the loaded state must be the saved state"
        assert result["error"] <= 1.0, result["error"]


def _hooked(rank, world_size):
    """An optimizer step hook set after the engine was built: the kernel cannot run it, so the step falls back to
    `optimizer.step()` (hooks called), on partitions `_own_grad` had already taken (padded back here)."""
    dp = world_size // 2
    hooked, hooked_opt = _engine(1, 1, "auto", dp)
    calls = []
    hooked_opt.register_step_pre_hook(lambda *args: calls.append(1))
    own_grads, fill = [], hooked.store._own_grad
    hooked.store._own_grad = lambda bucket: own_grads.append(fill(bucket)) or own_grads[-1]
    plain, _ = _engine(1, 1, "torch", dp)
    for engine in (hooked, plain):
        _step(engine, 1, dp, seed=5)
    same = all(torch.equal(a, b) for a, b in zip(hooked.store.masters, plain.store.masters))
    return dict(calls=len(calls), own=sum(g is not None for g in own_grads), same=same)


def test_step_hook_falls_back_to_torch_step():
    for result in run_distributed(2, _hooked):
        assert result["calls"] == 1 and result["own"] > 0
        assert result["same"], "the fallback is torch's own step: the same bits as kernels: torch"


def test_reads_param_groups_and_counts_after_load_state_dict():
    """`load_state_dict` replaces the param-group dicts (an LR scheduler then writes the new ones) and the step
    tensors: the kernel step must read both anew (lr 0 after the load: the master stays where it is)."""
    from autotp.zero.master_adam import MasterAdam

    master = torch.nn.Parameter(torch.ones(8))
    optimizer = torch.optim.AdamW([master], lr=1e-2, fused=True)
    step = MasterAdam.for_masters(optimizer, [master], torch.bfloat16, "auto")
    weight = torch.empty(8, dtype=torch.bfloat16)
    step.step([(torch.ones(8, dtype=torch.bfloat16), master, weight)], 1.0, None)
    moved = master.detach().clone()
    assert not torch.equal(moved, torch.ones(8))
    saved = optimizer.state_dict()
    saved["state"][0]["step"] = torch.tensor(5.0)  # a count the host has not seen: read from the loaded state
    optimizer.load_state_dict(saved)
    optimizer.param_groups[0]["lr"] = 0.0
    step.step([(torch.ones(8, dtype=torch.bfloat16), master, weight)], 1.0, None)
    assert torch.equal(master.detach(), moved)
    assert float(optimizer.state[master]["step"]) == 6.0 and step._counts[id(master)][2] == 6
    assert MasterAdam.for_masters(optimizer, [master], torch.float16, "auto") is None  # fp16: unscaled first
    assert MasterAdam.for_masters(optimizer, [master], torch.bfloat16, "torch") is None
    assert MasterAdam.for_masters(torch.optim.AdamW([master], fused=True, amsgrad=True), [master],
                                  torch.bfloat16, "auto") is None
    assert MasterAdam.for_masters(torch.optim.AdamW([master], foreach=True), [master], torch.bfloat16, "auto") is None


def _irregular(rank, world_size):
    """Stage 0 at DP=1 (bf16 gradients left on the parameters for the kernel): two backwards before one step sum
    in fp32 on the masters as torch's path does, and a step with no backward at all changes nothing."""
    out = {}
    for kernels in ("auto", "torch"):
        engine, optimizer = _engine(0, 1, kernels, 1)
        ids = batch(seed=5, batch_size=2 * MICRO, seq=SEQ)
        for half in (ids[:MICRO], ids[MICRO:]):
            engine.backward(engine(input_ids=half, labels=half).loss)
        engine.step()
        before = [m.detach().clone() for m in engine.store.masters]
        engine.step()  # no backward since the last step
        unchanged = all(torch.equal(a, b) for a, b in zip(before, engine.store.masters))
        out[kernels] = dict(masters=before, unchanged=unchanged,
                            steps=sorted({float(s["step"]) for s in optimizer.state.values()}))
    return out


def test_two_backwards_per_step_and_an_empty_step_at_stage_0():
    for run in run_distributed(2, _irregular):
        ours, torchs = run["auto"], run["torch"]
        assert ours["unchanged"] and torchs["unchanged"]
        assert ours["steps"] == torchs["steps"] == [1.0]
        for mine, ref in zip(ours["masters"], torchs["masters"]):
            bound = torch.finfo(torch.float32).eps * ref.abs() + 1e-5 * LR  # one step: see the module docstring
            assert bool(((mine - ref).abs() <= bound).all()), float(((mine - ref).abs() / bound).max())


def test_count_reread_after_a_step_torch_took():
    """A step that fell back to torch's (a hook set for it) counts on the same step tensor in place: the next
    kernel step must see 3, not its own 2 (its bias corrections come from the count)."""
    from autotp.zero.master_adam import MasterAdam

    grads = [torch.full((8,), value, dtype=torch.bfloat16) for value in (1.0, -0.5, 0.25)]
    ours, ref = torch.nn.Parameter(torch.ones(8)), torch.nn.Parameter(torch.ones(8))
    optimizer = torch.optim.AdamW([ours], lr=1e-2, fused=True)
    reference = torch.optim.AdamW([ref], lr=1e-2, fused=True)
    step = MasterAdam.for_masters(optimizer, [ours], torch.bfloat16, "auto")
    weight = torch.empty(8, dtype=torch.bfloat16)
    for index, grad in enumerate(grads):
        ref.grad = grad.float()
        reference.step()
        if index == 1:  # torch's own step, as a store's fallback takes it
            ours.grad = grad.float()
            optimizer.step()
        else:
            step.step([(grad, ours, weight)], 1.0, None)
    assert step._counts[id(ours)][2] == 3 and float(optimizer.state[ours]["step"]) == 3.0
    bound = 3 * torch.finfo(torch.float32).eps * ref.detach().abs() + 1e-6
    assert bool(((ours.detach() - ref.detach()).abs() <= bound).all())
