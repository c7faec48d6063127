"""Engine surface DeepSpeed users and the HF/accelerate integrations call (gloo, world 4, TP 2 and 4): an engine
without an optimizer, `_consolidated_16bit_state_dict`, `destroy`, `autotp_size`.

References: the dense model's weights. Sharding then gathering only copies values, and an fp32 -> bf16 cast is
deterministic, so consolidated weights are compared bit-exact; the forward loss goes through TP all-reduces (a
different summation order), rtol 1e-5 as in tests/test_families.py.
"""

from __future__ import annotations

import copy
import gc
import os
import weakref

import torch

from dist_utils import run_distributed
from families import batch, tiny_model


def _raises(call) -> str:
    try:
        call()
    except RuntimeError as err:
        return str(err)
    return "no error"


def _surface(rank, world_size, save_root):
    return {tp: _surface_at(tp, os.path.join(save_root, f"tp{tp}")) for tp in (2, 4)}


def _surface_at(tp, save_dir):
    import autotp

    out = {}
    dense = tiny_model("llama")
    ids = batch(seed=6, batch_size=2)

    # No optimizer anywhere: an evaluation engine. Forward, save; backward and step name the missing optimizer.
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": tp}}
    engine, optimizer, _, scheduler = autotp.initialize(model=copy.deepcopy(dense), config=config)
    out["returned"] = (engine.optimizer, optimizer, scheduler)
    loss = engine(input_ids=ids, labels=ids).loss
    out["loss"] = float(loss)
    out["backward"] = _raises(lambda: engine.backward(loss))
    out["step"] = _raises(engine.step)
    out["autotp_size"] = engine.autotp_size()
    out["eval_state"] = engine.consolidated_state_dict()
    engine.save_pretrained(save_dir)
    engine.destroy()

    # A bf16 training engine with ZeRO-2 and one frozen parameter.
    model = copy.deepcopy(dense)
    model.model.norm.weight.requires_grad_(False)
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "tensor_parallel": {"autotp_size": tp}}
    engine, optimizer, _, _ = autotp.initialize(model=model, config=config)
    out["state16"] = engine._consolidated_16bit_state_dict()
    out["state16_trainable"] = engine._consolidated_16bit_state_dict(exclude_frozen_parameters=True)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    out["optimizer_state_before"] = len(optimizer.state)

    # destroy: hooks off the parameters, state released, the store collectable while the model lives on.
    hooked = [p for p in engine.module.parameters() if getattr(p, "_post_accumulate_grad_hooks", None)]
    out["hooked_before"] = len(hooked)
    store = weakref.ref(engine.store)
    engine.destroy()
    engine.destroy()  # idempotent
    out["hooked_after"] = sum(1 for p in engine.module.parameters() if getattr(p, "_post_accumulate_grad_hooks", None))
    out["optimizer_state_after"] = len(optimizer.state)
    out["after_destroy"] = _raises(engine.step)
    module = engine.module
    del engine, optimizer
    gc.collect()
    out["store_collected"] = store() is None
    with torch.no_grad():
        out["module_still_runs"] = bool(torch.isfinite(module(input_ids=ids).logits).all())
    return out


def test_engine_without_optimizer_16bit_state_dict_destroy(tmp_path):
    results = run_distributed(4, _surface, str(tmp_path))  # TP 2 (x DP 2) and TP 4, in the same processes
    for tp in (2, 4):
        _check(tp, [result[tp] for result in results], str(tmp_path / f"tp{tp}"))


def _check(tp, results, save_dir):
    dense = tiny_model("llama")
    ids = batch(seed=6, batch_size=2)
    with torch.no_grad():
        ref_loss = float(dense(input_ids=ids, labels=ids).loss)
    for rank, out in enumerate(results):
        assert out["returned"] == (None, None, None)
        assert abs(out["loss"] - ref_loss) <= 1e-5 * abs(ref_loss), (out["loss"], ref_loss)
        assert "needs an optimizer" in out["backward"] and "'optimizer'" in out["backward"]
        assert "needs an optimizer" in out["step"]
        assert out["autotp_size"] == tp
        assert out["hooked_before"] > 0 and out["hooked_after"] == 0
        assert out["optimizer_state_before"] > 0 and out["optimizer_state_after"] == 0
        assert "destroy" in out["after_destroy"] and out["store_collected"] and out["module_still_runs"]
        if rank > 0:  # collective on every rank, the dict on global rank 0 only (as DeepSpeed)
            assert out["eval_state"] is None and out["state16"] is None and out["state16_trainable"] is None
    first = results[0]
    for name, expected in dense.state_dict().items():
        assert torch.equal(first["eval_state"][name], expected), name
        assert first["state16"][name].dtype == torch.bfloat16, name
        assert torch.equal(first["state16"][name], expected.to(torch.bfloat16)), name
    assert set(first["state16"]) - set(first["state16_trainable"]) == {"model.norm.weight"}
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(save_dir, attn_implementation="eager")
    assert os.path.isfile(os.path.join(save_dir, "model.safetensors"))
    for name, expected in dense.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], expected), name
