"""The engine (ZeRO-0) against single-process training on the global batch, plus its entry points.

Reference: the same model trained by plain torch in one process on the concatenation of every DP rank's
micro-batches, with torch's clip_grad_norm_ and the same optimizer. Tolerances: fp32 sums taken in another
order (TP partial products, DP all-reduce) agree to ~1e-7 relative; AdamW runs with eps=1e-3 so that
coordinates whose gradient is pure rounding noise are not amplified to a full step by the normalisation.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch

from dist_utils import run_distributed
from families import batch, dense_run, tiny_model

MICRO = 2
STEPS = 3


def _micro_batches(step: int, dp: int, gas: int):
    """Micro-batch `m` of DP rank `r` at `step`; the reference concatenates them all."""
    ids = batch(seed=100 + step, batch_size=MICRO * dp * gas, seq=10)
    return ids.view(gas, dp, MICRO, -1)


def _reference(family: str, dp: int, gas: int, clip: float, lr: float):
    model = tiny_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-3, weight_decay=0.01)
    state, _, norms = dense_run(model, optimizer,
                                [_micro_batches(step, dp, gas).reshape(-1, 10) for step in range(STEPS)], clip)
    return state, norms


def _train_tp_dp(rank, world_size, family, tp, gas, clip, lr, use_mesh):
    import autotp

    model = tiny_model(family)
    dp = world_size // tp
    config = {"train_batch_size": MICRO * gas * dp, "train_micro_batch_size_per_gpu": MICRO,
              "gradient_clipping": clip, "zero_optimization": {"stage": 3 if use_mesh == "fsdp" else 0},
              "optimizer": {"type": "AdamW", "params": {"lr": lr, "eps": 1e-3, "weight_decay": 0.01}}}
    kwargs = {}
    if use_mesh:
        from torch.distributed.device_mesh import init_device_mesh

        # "fsdp": the TP chapter's (and torchtitan's) name for the DP dimension, here with ZeRO-3 over it
        kwargs["device_mesh"] = init_device_mesh("cpu", (dp, tp), mesh_dim_names=(use_mesh, "tp"))
    else:
        config["tensor_parallel"] = {"autotp_size": tp}
    engine, _, _, _ = autotp.initialize(model=model, config=config, **kwargs)
    assert (engine.tp_world_size, engine.dp_world_size) == (tp, dp)
    assert engine.gradient_accumulation_steps == gas
    norms = []
    for step in range(STEPS):
        micro = _micro_batches(step, dp, gas)
        for m in range(gas):
            ids = micro[m, engine.dp_rank]
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            engine.step()
        norms.append(engine.get_global_grad_norm())
    assert engine.global_steps == STEPS
    return engine.consolidated_state_dict(), norms, (engine.tp_rank, engine.dp_rank)


@pytest.mark.parametrize("tp,gas,use_mesh", [(2, 2, "dp"), (2, 1, None), (4, 1, None), (2, 1, "fsdp")])
def test_zero0_matches_single_process(tp, gas, use_mesh):
    family, clip, lr, world = "qwen3", 0.5, 1e-2, 4
    results = run_distributed(world, _train_tp_dp, family, tp, gas, clip, lr, use_mesh)
    assert sorted(r[2] for r in results) == sorted((r % tp, r // tp) for r in range(world))
    full, norms, _ = results[0]
    assert all(r[0] is None for r in results[1:]), "only global rank 0 holds the consolidated state dict"
    ref_state, ref_norms = _reference(family, world // tp, gas, clip, lr)
    assert min(ref_norms) > clip, "clipping must be active for this test to check it"
    torch.testing.assert_close(torch.tensor(norms), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    for name, expected in ref_state.items():
        torch.testing.assert_close(full[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def _entry_points(rank, world_size, save_dir):
    """Optimizer built before sharding, scheduler from config, mpu, save_pretrained, tp_model_init conflict."""
    import autotp
    from autotp import ConfigError

    out = {}
    # An optimizer object on the unsharded parameters keeps working (DeepSpeed tutorial style).
    model = tiny_model("llama")
    dense = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.5,
                                                            "warmup_num_steps": 4, "warmup_type": "linear"}},
              "wall_clock_breakdown": False}
    engine, opt, _, sched = autotp.initialize(model=model, optimizer=optimizer, config=config)
    assert opt is optimizer and sched is not None
    sharded_ids = {id(p) for p in engine.module.parameters()}
    assert all(id(p) in sharded_ids for g in optimizer.param_groups for p in g["params"])
    ids = batch(seed=7, batch_size=2)
    lrs = []
    for _ in range(2):
        lrs.append(engine.get_lr()[0])
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    out["lrs"] = lrs
    # Same two steps in plain torch with the same schedule.
    ref_opt = torch.optim.SGD(dense.parameters(), lr=0.5)
    for lr in lrs:
        for group in ref_opt.param_groups:
            group["lr"] = lr
        dense(input_ids=ids, labels=ids).loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    full = engine.consolidated_state_dict()
    if rank == 0:
        out["max_diff"] = max(float((full[k] - v).abs().max()) for k, v in dense.state_dict().items())
    engine.save_pretrained(save_dir)
    with torch.no_grad():
        out["logits"] = engine.module(input_ids=ids).logits  # collective: every TP rank runs it

    # tp_model_init then a config that disagrees: DeepSpeed raises; so do we, on every rank.
    autotp.set_autotp_mode(training=True)
    model = autotp.tp_model_init(tiny_model("llama"), tp_size=2, dtype=torch.float32)
    try:
        autotp.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                               "tensor_parallel": {"autotp_size": 1},
                                               "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
        out["conflict"] = None
    except ConfigError as err:
        out["conflict"] = str(err)
    # ... and with a config that agrees (no tensor_parallel section) it trains.
    engine, _, _, _ = autotp.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1,
                                                             "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    out["tp_after_init"] = engine.tp_world_size
    return out


def test_entry_points_and_save_pretrained(tmp_path):
    save_dir = str(tmp_path / "hf")
    results = run_distributed(2, _entry_points, save_dir)
    first = results[0]
    assert first["lrs"] == [0.0, 0.125], first["lrs"]  # linear warm-up: 0.5 * step / 4
    assert first["max_diff"] < 1e-6, first["max_diff"]  # SGD: fp32 rounding only
    for result in results:
        assert "tensor_parallel.autotp_size" in result["conflict"] and "2" in result["conflict"]
        assert result["tp_after_init"] == 2
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(save_dir, attn_implementation="eager")
    assert os.path.isfile(os.path.join(save_dir, "model.safetensors"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")], "temporary directory left behind"
    ids = batch(seed=7, batch_size=2)
    with torch.no_grad():
        logits = loaded(input_ids=ids).logits
    torch.testing.assert_close(logits, first["logits"], rtol=1e-5, atol=1e-5)


def _mixed_precision(rank, world_size, dtype_key):
    import autotp

    model = tiny_model("llama")
    model.register_buffer("persistent_scale", torch.ones(3))  # a checkpointed float buffer: cast like weights
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2},
              # Loss-scale keys belong to fp16 only (DeepSpeed's bf16 section has none; autotp now rejects them).
              dtype_key: {"enabled": True, **({"initial_scale_power": 40, "hysteresis": 1} if dtype_key == "fp16"
                                              else {})},
              "gradient_clipping": 1.0, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}
    engine, optimizer, _, _ = autotp.initialize(model=model, config=config)
    dtype = next(engine.module.parameters()).dtype
    master_dtypes = {p.dtype for g in optimizer.param_groups for p in g["params"]}
    losses, scales = [], []
    ids = batch(seed=3, batch_size=2)
    for _ in range(6):
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(float(loss.float()))
        scales.append(engine.loss_scale)
    return dict(dtype=str(dtype), masters=sorted(map(str, master_dtypes)), losses=losses, scales=scales,
                skipped=engine.skipped_steps, inv_freq=str(engine.module.model.rotary_emb.inv_freq.dtype),
                persistent=str(engine.module.persistent_scale.dtype))


def test_bf16_master_weights_train():
    results = run_distributed(2, _mixed_precision, "bf16")
    for result in results:
        assert result["dtype"] == "torch.bfloat16" and result["masters"] == ["torch.float32"]
        # RoPE's inv_freq is computed in fp32 at construction, as HF's from_pretrained(dtype=bf16) leaves it
        assert result["inv_freq"] == "torch.float32" and result["persistent"] == "torch.bfloat16"
        assert result["losses"][-1] < result["losses"][0] - 0.5, result["losses"]
        assert result["skipped"] == 0
    assert results[0]["losses"] == results[1]["losses"]  # TP ranks compute the same loss


def test_fp16_overflow_skips_on_every_rank():
    # Scale 2**40 overflows fp16 gradients (max 65504): steps are skipped on both ranks and the scale halves
    # after each overflow (hysteresis 1) until the gradients fit.
    results = run_distributed(2, _mixed_precision, "fp16")
    for result in results:
        assert result["dtype"] == "torch.float16"
        assert result["skipped"] >= 1
        assert result["scales"][0] == 2.0 ** 39
    assert results[0]["scales"] == results[1]["scales"] and results[0]["skipped"] == results[1]["skipped"]
