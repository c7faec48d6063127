"""Errors under real processes: every rank raises the same error and none is left waiting in a collective.

One gloo spawn of 2 ranks runs every case in turn (a spawn costs seconds; the cases cost milliseconds) and
returns (error type, message) per case; the parent compares ranks. A hang fails through run_distributed's
timeout instead of blocking the suite.
"""

from __future__ import annotations

import warnings

import torch

from dist_utils import run_distributed
from families import batch, tiny_model

_OPTIMIZER = {"type": "AdamW", "params": {"lr": 1e-3}}
_GOOD = {"train_micro_batch_size_per_gpu": 2, "optimizer": _OPTIMIZER, "tensor_parallel": {"autotp_size": 2}}

# name -> (model overrides, config); each must fail inside autotp.initialize.
_FAILING = {
    "tp_larger_than_world": ({}, {**_GOOD, "tensor_parallel": {"autotp_size": 4}}),
    "batch_inconsistent": ({}, {**_GOOD, "train_batch_size": 16, "gradient_accumulation_steps": 2}),
    "bad_scheduler": ({}, {**_GOOD, "scheduler": {"type": "OneCycle", "params": {}}}),
    "bad_layer_spec": ({}, {**_GOOD, "tensor_parallel": {"autotp_size": 2, "partition_config": {
        "layer_specs": [{"patterns": [".*o_proj"], "partition_type": "diagonal"}]}}}),
    "not_whole_heads": ({}, {**_GOOD, "tensor_parallel": {"autotp_size": 2, "partition_config": {"layer_specs": [
        {"patterns": [r".*self_attn\.q_proj\.weight$"], "partition_type": "column", "shape": [[40, 24], -1]}]}}}),
}


def _outcome(call):
    try:
        call()
    except Exception as err:  # the type and message are what the parent checks
        return type(err).__name__, str(err)
    return None


def _test_errors(rank, world_size):
    import autotp

    outcomes = {}
    for name, (overrides, config) in _FAILING.items():
        outcomes[name] = _outcome(lambda: autotp.initialize(model=tiny_model("llama", **overrides), config=config))

    # A good config with keys autotp does not use: one warning, on rank 0 only.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, *_ = autotp.initialize(model=tiny_model("llama"), config={**_GOOD, "wall_clock_breakdown": True})
    outcomes["unused_warnings"] = [str(w.message) for w in caught if "autotp" in str(w.message)]

    # Control: the same batch on both TP ranks trains.
    ids = batch(seed=1)
    outcomes["same_batch"] = _outcome(lambda: engine.backward(engine(input_ids=ids, labels=ids).loss))

    # Different batches on the two ranks of one TP group: the first step must fail on both.
    engine, *_ = autotp.initialize(model=tiny_model("llama"), config=_GOOD)
    ids = batch(seed=1 + rank)
    outcomes["different_batches"] = _outcome(lambda: engine(input_ids=ids, labels=ids))
    # The helper behind these: one rank's error is raised on both ranks, same type and message; the first rank's
    # error wins when several fail.
    from autotp.collective_errors import raise_on_every_rank

    outcomes["one_rank_fails"] = _outcome(
        lambda: raise_on_every_rank(autotp.ConfigError("rank 1 only") if rank == 1 else None))
    outcomes["both_fail"] = _outcome(lambda: raise_on_every_rank(ValueError(f"from rank {rank}")))
    outcomes["none_fails"] = _outcome(lambda: raise_on_every_rank(None))
    # The group is still usable afterwards: nobody is stuck in a half-finished collective.
    total = torch.ones(1)
    torch.distributed.all_reduce(total)
    outcomes["after"] = float(total.item())
    return outcomes


def test_errors_are_raised_on_every_rank(world_size=2):
    rank0, rank1 = run_distributed(world_size, _test_errors, timeout_s=120)
    for name in _FAILING:
        assert rank0[name] is not None, f"{name}: initialize did not fail"
        assert rank0[name] == rank1[name], name  # same type and message on both ranks

    assert rank0["tp_larger_than_world"] == (
        "ConfigError", "config key 'tensor_parallel.autotp_size' = 4: must divide the world size 2")
    kind, message = rank0["batch_inconsistent"]
    assert kind == "ConfigError"
    assert all(f"'{key}' = {value}" in message for key, value in [
        ("train_batch_size", 16), ("train_micro_batch_size_per_gpu", 2), ("gradient_accumulation_steps", 2)])
    assert rank0["bad_scheduler"][0] == "ConfigError" and "'scheduler.type' = 'OneCycle'" in rank0["bad_scheduler"][1]
    kind, message = rank0["bad_layer_spec"]
    assert kind == "ConfigError" and "layer_specs[0].partition_type' = 'diagonal'" in message
    kind, message = rank0["not_whole_heads"]
    assert kind == "PlanError"
    assert "model.layers.0.self_attn.q_proj" in message and "size 40" in message and "units of 16" in message

    assert len(rank0["unused_warnings"]) == 1 and "wall_clock_breakdown" in rank0["unused_warnings"][0]
    assert rank1["unused_warnings"] == []

    assert rank0["same_batch"] is None and rank1["same_batch"] is None
    for outcome in (rank0["different_batches"], rank1["different_batches"]):
        assert outcome[0] == "RuntimeError" and "different batches" in outcome[1]
    assert rank0["one_rank_fails"] == rank1["one_rank_fails"] == ("ConfigError", "rank 1 only")
    assert rank0["both_fail"] == rank1["both_fail"] == ("ValueError", "from rank 0")
    assert rank0["none_fails"] is None and rank1["none_fails"] is None
    assert rank0["after"] == rank1["after"] == 2.0
