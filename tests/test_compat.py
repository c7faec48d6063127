"""DeepSpeed's older entry points (gloo, world 4, TP 2): `tp_model_init` records its arguments and turns training
mode on; `initialize` applies them merged with the config and raises, naming both sources, on each conflict.

Reference: DeepSpeed's behaviour (deepspeed/__init__.py `tp_model_init`, runtime/engine.py
`_configure_tensor_parallel`). Nothing here is numerical: plans, sizes, dtypes and messages are checked exactly.
"""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from families import batch, tiny_model

SGD = {"type": "SGD", "params": {"lr": 0.1}}
ATTENTION_ONLY = {"use_default_specs": False, "layer_specs": [
    {"patterns": [r".*\.(q|k|v)_proj\.weight$"], "partition_type": "column"},
    {"patterns": [r".*\.o_proj\.weight$"], "partition_type": "row"}]}


def _plan(engine) -> tuple:
    layer = engine.module.model.layers[0]
    return type(layer.self_attn.q_proj).__name__, type(layer.mlp.up_proj).__name__


def _conflict(build) -> str:
    from autotp import ConfigError

    try:
        build()
    except ConfigError as err:
        return str(err)
    return "no error"


def _tp_model_init(rank, world_size):
    import autotp
    from autotp.groups import build_groups
    from autotp.layers import ColumnParallelLinear, RowParallelLinear
    from torch.distributed.device_mesh import init_device_mesh

    out = {"mode_before": autotp.is_autotp_training_mode()}
    out["inference_refused"] = _conflict(lambda: autotp.set_autotp_mode(training=False))

    # Without set_autotp_mode: tp_model_init turns training mode on itself, and shards nothing yet.
    model = tiny_model("llama")
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    returned = autotp.tp_model_init(model, 2, torch.bfloat16)
    out["mode_after"] = autotp.is_autotp_training_mode()
    out["recorded_only"] = (returned is model and shapes == {n: tuple(p.shape) for n, p in model.named_parameters()}
                            and next(model.parameters()).dtype == torch.float32 and not any(
                                isinstance(m, (ColumnParallelLinear, RowParallelLinear)) for m in model.modules()))
    # initialize: TP size and dtype from tp_model_init, the plan from the config's partition_config.
    config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True}, "optimizer": SGD,
              "tensor_parallel": {"partition_config": ATTENTION_ONLY}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    ids = batch(seed=4, batch_size=1)
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()
    out["config_plan"] = _plan(engine)
    out["sizes"] = (engine.tp_world_size, engine.dp_world_size, str(next(engine.module.parameters()).dtype))

    # tp_model_init's own tp_group and partition_config (an HF tp_plan) apply when the config has none.
    tp_group = build_groups(2).tp_group
    plan = {"layers.*.self_attn.q_proj": "colwise", "layers.*.self_attn.k_proj": "colwise",
            "layers.*.self_attn.v_proj": "colwise", "layers.*.self_attn.o_proj": "rowwise"}
    model = autotp.tp_model_init(tiny_model("llama"), 2, torch.float32, tp_group=tp_group, partition_config=plan)
    engine, _, _, _ = autotp.initialize(model=model, config={"train_micro_batch_size_per_gpu": 1, "optimizer": SGD})
    out["init_plan"] = _plan(engine)
    out["group_used"] = engine.groups.tp_group is tp_group and engine.tp_world_size == 2

    # Conflicts: each names tp_model_init and the other source.
    def initialize_after(init_kwargs, config, **kwargs):
        model = autotp.tp_model_init(tiny_model("llama"), **init_kwargs)
        base = {"train_micro_batch_size_per_gpu": 1, "optimizer": SGD}
        return lambda: autotp.initialize(model=model, config={**base, **config}, **kwargs)

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    # The mesh gives the TP size and the config none: the batch-size rule runs at DP 2 (world 4 / TP 2). A batch of
    # 2 is not divisible by micro 1 x DP 4, which a parse at TP 1 once rejected.
    engine, _, _, _ = autotp.initialize(model=tiny_model("llama"), device_mesh=mesh, config={
        "train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "optimizer": SGD})
    out["mesh_batch"] = (engine.tp_world_size, engine.dp_world_size, engine.gradient_accumulation_steps)
    out["conflicts"] = {
        "tp_size": _conflict(initialize_after({"tp_size": 2}, {"tensor_parallel": {"autotp_size": 4}})),
        "dtype": _conflict(initialize_after({"tp_size": 2, "dtype": torch.float16}, {"bf16": {"enabled": True}})),
        "dtype_fp32": _conflict(initialize_after({"tp_size": 2, "dtype": torch.bfloat16}, {})),
        "partition_config": _conflict(initialize_after(
            {"tp_size": 2, "partition_config": ATTENTION_ONLY},
            {"tensor_parallel": {"partition_config": ATTENTION_ONLY}})),
        "tp_group_mpu": _conflict(initialize_after({"tp_size": 2, "tp_group": tp_group}, {}, mpu=mesh)),
        "mpu_size": _conflict(initialize_after({"tp_size": 4}, {}, mpu=mesh)),
    }
    return out


def test_tp_model_init_records_and_initialize_merges():
    results = run_distributed(4, _tp_model_init)
    for out in results:
        assert out["mode_before"] is False and out["mode_after"] is True
        assert "set_autotp_mode(training=True)" in out["inference_refused"]
        assert out["recorded_only"]
        assert out["config_plan"] == ("ColumnParallelLinear", "Linear")  # the config's attention-only plan
        assert out["sizes"] == (2, 2, "torch.bfloat16")
        assert out["init_plan"] == ("ColumnParallelLinear", "Linear") and out["group_used"]
        assert out["mesh_batch"] == (2, 2, 1)
        conflicts = out["conflicts"]
        assert "'tensor_parallel.autotp_size' = 4" in conflicts["tp_size"] and \
            "tp_model_init(tp_size=2)" in conflicts["tp_size"], conflicts["tp_size"]
        assert "tp_model_init(dtype=torch.float16)" in conflicts["dtype"] and "'bf16.enabled'" in conflicts["dtype"]
        assert "tp_model_init(dtype=torch.bfloat16)" in conflicts["dtype_fp32"] and "fp32" in conflicts["dtype_fp32"]
        assert "tp_model_init(partition_config=...)" in conflicts["partition_config"] and \
            "'tensor_parallel.partition_config'" in conflicts["partition_config"]
        assert "tp_model_init(tp_group=...)" in conflicts["tp_group_mpu"] and "mpu=" in conflicts["tp_group_mpu"]
        assert "tp_model_init(tp_size=...) = 4" in conflicts["mpu_size"] and "mpu" in conflicts["mpu_size"]
