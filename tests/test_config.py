"""Config parsing and validation (autotp/config.py) and the optimizers / schedules it builds (autotp/optim.py).

Pure Python except `test_initialize_warns_once_about_unused_keys`, which needs a one-process gloo group.
References: DeepSpeed's batch-size rule and schedule formulas, written out by hand at each checked step.
"""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from autotp.config import ConfigError, OptimizerConfig, SchedulerConfig, parse_config
from autotp.optim import build_optimizer, build_scheduler
from dist_utils import run_distributed
from families import tiny_model


def _named(key: str, value) -> str:
    """How every ConfigError names the offending key and value."""
    return f"'{key}' = {value!r}"


def _raises(config: dict, world_size: int = 1) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(config, world_size)
    return str(info.value)


# ---- batch sizes: train_batch_size = micro_batch * grad_accum * dp_world_size ------------------------------


@pytest.mark.parametrize("given, world, tp, expected", [
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 2, 1,
     (16, 2, 4)),
    ({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2}, 2, 1, (16, 2, 4)),
    ({"train_batch_size": 16, "gradient_accumulation_steps": 4}, 2, 1, (16, 2, 4)),
    ({"train_batch_size": 16}, 2, 1, (16, 8, 1)),
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 4}, 2, 1, (16, 2, 4)),
    ({"train_micro_batch_size_per_gpu": 3}, 2, 1, (6, 3, 1)),
    # TP ranks share a batch: world 4 with autotp_size 2 is dp 2.
    ({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3}, 4, 2, (12, 2, 3)),
    ({"train_batch_size": 12, "train_micro_batch_size_per_gpu": 2}, 4, 2, (12, 2, 3)),
])
def test_batch_sizes_any_two_imply_the_third(given, world, tp, expected):
    cfg = parse_config({**given, "tensor_parallel": {"autotp_size": tp}}, world)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == expected


def test_batch_sizes_inconsistent_names_all_three_keys_and_values():
    message = _raises({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 2,
                       "gradient_accumulation_steps": 2}, world_size=2)
    for key, value in [("train_batch_size", 16), ("train_micro_batch_size_per_gpu", 2),
                       ("gradient_accumulation_steps", 2)]:
        assert _named(key, value) in message
    assert "2 * 2 * 2" in message  # micro_batch * grad_accum * dp_world_size, so the user sees the product


@pytest.mark.parametrize("given, world, mentions", [
    ({"train_batch_size": 15, "train_micro_batch_size_per_gpu": 2}, 2, "micro_batch 2 * dp_world_size 2"),
    ({"train_batch_size": 15, "gradient_accumulation_steps": 2}, 2, "gradient_accumulation_steps 2"),
    ({"train_batch_size": 5}, 2, "dp_world_size 2"),
])
def test_batch_size_not_divisible(given, world, mentions):
    message = _raises(given, world)
    assert _named("train_batch_size", given["train_batch_size"]) in message
    assert mentions in message


@pytest.mark.parametrize("given", [{}, {"gradient_accumulation_steps": 4}])
def test_batch_size_missing(given):
    assert "'train_batch_size' or 'train_micro_batch_size_per_gpu'" in _raises(given)


@pytest.mark.parametrize("key", ["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"])
@pytest.mark.parametrize("value", ["8", 2.5, True, 0, -4])
def test_batch_size_must_be_a_positive_int(key, value):
    config = {"train_micro_batch_size_per_gpu": 1, key: value}
    assert _named(key, value) in _raises(config)


# ---- every validation error names its key and value ---------------------------------------------------------

_BASE = {"train_micro_batch_size_per_gpu": 1}


def _spec(**fields) -> dict:
    return {**_BASE, "tensor_parallel": {"partition_config": {"layer_specs": [{"patterns": [".*proj"], **fields}]}}}


_SPEC = "tensor_parallel.partition_config.layer_specs[0]"


@pytest.mark.parametrize("config, key, value", [
    ({**_BASE, "zero_optimization": {"stage": 4}}, "zero_optimization.stage", 4),
    ({**_BASE, "zero_optimization": {"stage": "2"}}, "zero_optimization.stage", "2"),
    ({**_BASE, "optimizer": {"type": "Lamb", "params": {}}}, "optimizer.type", "Lamb"),
    ({**_BASE, "optimizer": {"type": "AdamW", "params": [0.1]}}, "optimizer.params", [0.1]),
    ({**_BASE, "scheduler": {"type": "OneCycle", "params": {}}}, "scheduler.type", "OneCycle"),
    ({**_BASE, "bf16": {"enabled": "yes"}}, "bf16.enabled", "yes"),
    ({**_BASE, "gradient_clipping": -1.0}, "gradient_clipping", -1.0),
    ({**_BASE, "steps_per_print": 1.5}, "steps_per_print", 1.5),
    ({**_BASE, "tensor_parallel": {"autotp_size": "2"}}, "tensor_parallel.autotp_size", "2"),
    ({**_BASE, "tensor_parallel": {"autotp_size": 0}}, "tensor_parallel.autotp_size", 0),
    ({**_BASE, "tensor_parallel": {"autotp_size": 3}}, "tensor_parallel.autotp_size", 3),  # world 2
    ({**_BASE, "tensor_parallel": {"preset_model": "notamodel"}}, "tensor_parallel.preset_model", "notamodel"),
    ({**_BASE, "tensor_parallel": {"partition_config": {"strict": True}}},
     "tensor_parallel.partition_config.strict", True),
    (_spec(partition_type="diagonal"), f"{_SPEC}.partition_type", "diagonal"),
    (_spec(patterns=["(unclosed"]), f"{_SPEC}.patterns", "(unclosed"),
    (_spec(patterns=[]), f"{_SPEC}.patterns", []),
    (_spec(shape=[2, [32, 16]]), f"{_SPEC}.shape", [2, [32, 16]]),  # nested list at dim 1, partition_dim 0
    (_spec(shape=[[64, 0, 32], -1]), f"{_SPEC}.shape", [[64, 0, 32], -1]),
    (_spec(shape=[[64, -1], -1]), f"{_SPEC}.shape", [[64, -1], -1]),
    (_spec(shape=[0, -1]), f"{_SPEC}.shape", [0, -1]),
    (_spec(shape=[-2, 64]), f"{_SPEC}.shape", [-2, 64]),
    (_spec(shape=[]), f"{_SPEC}.shape", []),
    (_spec(shape=[2, -1], partition_dim=2), f"{_SPEC}.partition_dim", 2),
    (_spec(partition_dim=-1), f"{_SPEC}.partition_dim", -1),
    (_spec(model_types=[3]), f"{_SPEC}.model_types", [3]),
    (_spec(gather_output=True, partition_type="row"), f"{_SPEC}.gather_output", True),
    (_spec(grad_allreduce=True), f"{_SPEC}.grad_allreduce", True),  # only for skip
    (_spec(split="rows"), f"{_SPEC}.split", "rows"),
])
def test_error_names_key_and_value(config, key, value):
    assert _named(key, value) in _raises(config, world_size=2)


def test_bf16_and_fp16_together_names_both_keys():
    message = _raises({**_BASE, "bf16": {"enabled": True}, "fp16": {"enabled": True}})
    assert "'bf16.enabled'" in message and "'fp16.enabled'" in message


def test_accepted_values_parse():
    cfg = parse_config({
        "train_batch_size": 8, "gradient_clipping": 1.0, "bf16": {"enabled": True},
        "zero_optimization": {"stage": 0}, "optimizer": {"type": "adamw", "params": {"lr": 1e-3}},
        "scheduler": {"type": "warmupcosinelr", "params": {"total_num_steps": 10}},
        "tensor_parallel": {"autotp_size": 2, "preset_model": "LLaMA", "partition_config": {
            "use_default_specs": False, "strict_mode": True, "layer_specs": [
                {"patterns": r".*\.o_proj\.weight$", "partition_type": "ROW"},
                {"patterns": [r".*\.qkv_proj\.weight$"], "shape": [[64, 32, 32], -1], "model_types": "phi3"}]}},
    }, world_size=4)
    assert (cfg.optimizer.type, cfg.scheduler.type) == ("AdamW", "WarmupCosineLR")  # canonical spelling
    assert cfg.tensor_parallel.preset_model == "llama"
    assert (cfg.bf16, cfg.fp16, cfg.gradient_clipping, cfg.zero.stage) == (True, False, 1.0, 0)
    partition = cfg.tensor_parallel.partition_config
    assert (partition.use_default_specs, partition.strict_mode) == (False, True)
    row, qkv = partition.layer_specs
    assert (row.patterns, row.partition_type, row.effective_partition_dim()) == ([r".*\.o_proj\.weight$"], "row", 1)
    assert (qkv.shape, qkv.effective_partition_dim(), qkv.model_types) == (((64, 32, 32), -1), 0, ["phi3"])


@pytest.mark.parametrize("value, expected", [(5e8, 500_000_000), (2 ** 20, 2 ** 20)])
def test_reduce_bucket_size_accepts_deepspeed_float_notation(value, expected):
    config = {**_BASE, "zero_optimization": {"stage": 0, "reduce_bucket_size": value}}
    assert parse_config(config, 1).zero.reduce_bucket_size == expected


def test_reduce_bucket_size_fraction_fails():
    config = {**_BASE, "zero_optimization": {"reduce_bucket_size": 2.5}}
    assert _named("zero_optimization.reduce_bucket_size", 2.5) in _raises(config)


def test_zero_section_parses():
    config = {**_BASE, "communication_data_type": "fp32", "zero_optimization": {
        "stage": 2, "reduce_bucket_size": 2e7, "allgather_bucket_size": 3e7, "overlap_comm": False,
        "contiguous_gradients": True, "reduce_scatter": True, "comm_backend": "torch"}}
    zero = parse_config(config, 2).zero
    assert (zero.stage, zero.reduce_bucket_size, zero.allgather_bucket_size) == (2, 20_000_000, 30_000_000)
    assert (zero.overlap_comm, zero.comm_backend, zero.communication_data_type) == (False, "torch", "float32")


@pytest.mark.parametrize("zero, key, value", [
    ({"stage": 1, "comm_backend": "mpi"}, "zero_optimization.comm_backend", "mpi"),
    ({"stage": 2, "contiguous_gradients": False}, "zero_optimization.contiguous_gradients", False),
    ({"stage": 2, "reduce_scatter": False}, "zero_optimization.reduce_scatter", False),
    ({"stage": 1, "allgather_bucket_size": 0}, "zero_optimization.allgather_bucket_size", 0),
    ({"stage": 2, "overlap_comm": "yes"}, "zero_optimization.overlap_comm", "yes"),
])
def test_zero_section_errors_name_the_key(zero, key, value):
    assert _named(key, value) in _raises({**_BASE, "zero_optimization": zero})


def test_kernels_key():
    assert parse_config({**_BASE, "tensor_parallel": {"kernels": "triton"}}, 1).tensor_parallel.kernels == "triton"
    assert parse_config(_BASE, 1).tensor_parallel.kernels == "auto"
    config = {**_BASE, "tensor_parallel": {"kernels": "cutlass"}}
    assert _named("tensor_parallel.kernels", "cutlass") in _raises(config)


def test_communication_data_type_error():
    config = {**_BASE, "communication_data_type": "int8"}
    assert _named("communication_data_type", "int8") in _raises(config)


def test_tp_size_alias():
    assert parse_config({**_BASE, "tensor_parallel": {"tp_size": 2}}, 2).tensor_parallel.autotp_size == 2


# ---- keys autotp does not use --------------------------------------------------------------------------------

_WITH_UNUSED = {
    "train_micro_batch_size_per_gpu": 1, "wall_clock_breakdown": False, "activation_checkpointing": {},
    "zero_optimization": {"stage": 0, "overlap_comm": True, "offload_optimizer": {"device": "none"}},
    "tensor_parallel": {"autotp_size": 1, "tp_grain_size": 64},
    "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
}
_UNUSED = ["activation_checkpointing", "wall_clock_breakdown", "tensor_parallel.tp_grain_size",
           "zero_optimization.offload_optimizer"]


@pytest.mark.parametrize("section, typo, nearest", [
    (None, "zero_optimisation", "zero_optimization"),
    ("tensor_parallel", "autotp_sise", "tensor_parallel.autotp_size"),
    ("zero_optimization", "overlap_com", "zero_optimization.overlap_comm"),
    ("bf16", "enable", "bf16.enabled"),
    ("fp16", "initial_scale_pow", "fp16.initial_scale_power"),
    ("optimizer", "param", "optimizer.params"),
    ("scheduler", "parmas", "scheduler.params"),
])
def test_typo_in_a_read_section_raises_naming_the_nearest_key(section, typo, nearest):
    """A typo used to warn once and train at another layout (TP=4 became TP=1 x DP=4); now it raises."""
    sections = {"tensor_parallel": {"autotp_size": 1}, "zero_optimization": {"stage": 0}, "bf16": {"enabled": False},
                "fp16": {"enabled": False}, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                "scheduler": {"type": "WarmupLR", "params": {}}}
    config = {**_BASE, **sections}
    if section is None:
        config[typo] = {"stage": 1}
    else:
        config[section] = {**config[section], typo: 1}
    message = _raises(config)
    wrong = typo if section is None else f"{section}.{typo}"
    assert f"'{wrong}' is unknown" in message and f"did you mean '{nearest}'" in message


def test_typo_in_partition_config_and_layer_specs_names_the_nearest_key():
    specs = {"use_default_specs": False, "layer_specs": [{"patterns": [".*"], "partion_type": "row"}]}
    message = _raises({**_BASE, "tensor_parallel": {"partition_config": specs}})
    assert _named("tensor_parallel.partition_config.layer_specs[0].partion_type", "row") in message
    assert "did you mean 'tensor_parallel.partition_config.layer_specs[0].partition_type'" in message
    message = _raises({**_BASE, "tensor_parallel": {"partition_config": {"strict": True}}})
    assert "did you mean 'tensor_parallel.partition_config.strict_mode'" in message


def test_bfloat16_is_deepspeeds_alias_of_bf16():
    assert parse_config({**_BASE, "bfloat16": {"enabled": True}}, 1).bf16
    assert "both given" in _raises({**_BASE, "bfloat16": {"enabled": True}, "bf16": {"enabled": True}})


def test_unused_keys_listed():
    assert parse_config(_WITH_UNUSED, 1).unused_keys == _UNUSED
    assert parse_config(_BASE, 1).unused_keys == []


def _initialize_and_record_warnings(rank, world_size):
    import autotp

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autotp.initialize(model=tiny_model("llama"), config=_WITH_UNUSED)
    return [str(w.message) for w in caught if "autotp" in str(w.message)]


def test_initialize_warns_once_about_unused_keys():
    (messages,) = run_distributed(1, _initialize_and_record_warnings, timeout_s=120)
    assert len(messages) == 1, messages
    assert all(key in messages[0] for key in _UNUSED)


# ---- JSON files ---------------------------------------------------------------------------------------------


def test_json_path_loads(tmp_path):
    path = tmp_path / "ds_config.json"
    path.write_text(json.dumps({"train_batch_size": 8, "gradient_accumulation_steps": 2}))
    for config in (path, str(path)):
        cfg = parse_config(config, 2)
        assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (8, 2, 2)


@pytest.mark.parametrize("content, mentions", [
    (None, "does not exist"),
    ('{"train_batch_size": 8,', "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_bad_json_file_names_the_file(tmp_path, content, mentions):
    path = tmp_path / "ds_config.json"
    if content is not None:
        path.write_text(content)
    message = _raises(str(path))
    assert str(path) in message and mentions in message


# ---- schedules: DeepSpeed formulas, evaluated by hand -------------------------------------------------------


def _lrs_at(scheduler_type: str, params: dict, steps: list[int], base_lr: float = 0.1) -> list[float]:
    """The optimizer's lr after the scheduler has stepped to each of `steps` (the last_batch_iteration)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    scheduler = build_scheduler(SchedulerConfig(scheduler_type, params), optimizer)
    lrs = []
    for step in steps:
        while scheduler.last_epoch < step:
            optimizer.step()  # no gradients: a no-op that keeps torch's step-order check quiet
            scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


# Floating point: the formulas involve log / cos, so compare to hand values to 1e-12 relative.
_CLOSE = dict(rel=1e-12, abs=1e-15)


def test_warmup_lr_log():
    # gamma = log(step + 1) / log(16): 0 at step 0, 1/4 at step 1, 1/2 at step 3, 1 from step 15 on.
    params = {"warmup_min_lr": 0.002, "warmup_max_lr": 0.01, "warmup_num_steps": 16, "warmup_type": "log"}
    expected = [0.002, 0.002 + 0.008 / 4, 0.002 + 0.008 / 2, 0.01, 0.01, 0.01]
    assert _lrs_at("WarmupLR", params, [0, 1, 3, 15, 16, 40]) == pytest.approx(expected, **_CLOSE)


def test_warmup_lr_linear():
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 10, "warmup_type": "linear"}
    assert _lrs_at("WarmupLR", params, [0, 5, 9, 10, 30]) == pytest.approx([0.0, 0.005, 0.009, 0.01, 0.01], **_CLOSE)


def test_warmup_decay_lr():
    # Linear warmup over 10 steps, then gamma = (20 - step) / (20 - 10), floored at 0.
    params = {"total_num_steps": 20, "warmup_min_lr": 0.001, "warmup_max_lr": 0.011, "warmup_num_steps": 10,
              "warmup_type": "linear"}
    expected = [0.001, 0.006, 0.011, 0.001 + 0.01 * 0.5, 0.001 + 0.01 * 0.2, 0.001, 0.001]
    assert _lrs_at("WarmupDecayLR", params, [0, 5, 10, 15, 18, 20, 25]) == pytest.approx(expected, **_CLOSE)


def test_warmup_cosine_lr():
    # Ratio of the optimizer's lr 0.1: linear warmup 0.2 -> 1 over 10 steps, then
    # cos_min + (1 - cos_min) * (1 + cos(pi * (step - 10) / 10)) / 2 with cos_min = 0.1, floored at cos_min.
    params = {"total_num_steps": 20, "warmup_min_ratio": 0.2, "warmup_num_steps": 10, "cos_min_ratio": 0.1,
              "warmup_type": "linear"}
    half = 0.1 + 0.9 * 0.5                                   # step 15: cos(pi / 2) = 0
    step12 = 0.1 + 0.9 * (1 + math.cos(math.pi * 0.2)) / 2   # (12 - 10) / 10 of the way down
    expected = [0.1 * 0.2, 0.1 * (0.2 + 0.8 * 0.5), 0.1, 0.1 * step12, 0.1 * half, 0.1 * 0.1, 0.1 * 0.1]
    assert _lrs_at("WarmupCosineLR", params, [0, 5, 10, 12, 15, 20, 30]) == pytest.approx(expected, **_CLOSE)


def test_warmup_num_steps_at_least_two():
    # DeepSpeed clamps warmup_num_steps to 2 so log(warmup_num_steps) is never 0: step 1 is already at max.
    params = {"warmup_min_lr": 0.0, "warmup_max_lr": 0.01, "warmup_num_steps": 1}
    assert _lrs_at("WarmupLR", params, [0, 1, 2]) == pytest.approx([0.0, 0.01, 0.01], **_CLOSE)


@pytest.mark.parametrize("scheduler_type, params, key, value", [
    ("WarmupLR", {"warmup_type": "cubic"}, "scheduler.params.warmup_type", "cubic"),
    ("WarmupCosineLR", {"total_num_steps": 10, "warmup_type": "cubic"}, "scheduler.params.warmup_type", "cubic"),
    ("WarmupDecayLR", {"total_num_steps": 5, "warmup_num_steps": 10}, "scheduler.params.total_num_steps", 5),
    ("WarmupCosineLR", {"total_num_steps": 5, "warmup_num_steps": 10}, "scheduler.params.total_num_steps", 5),
    ("WarmupLR", {"warmup_maximum": 1.0}, "scheduler.params", {"warmup_maximum": 1.0}),
])
def test_scheduler_param_errors(scheduler_type, params, key, value):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError) as info:
        build_scheduler(SchedulerConfig(scheduler_type, params), optimizer)
    assert _named(key, value) in str(info.value)


# ---- optimizers ---------------------------------------------------------------------------------------------


def _build(kind: str, params: dict):
    return build_optimizer(OptimizerConfig(kind, params), [torch.nn.Parameter(torch.zeros(2))])


def test_adam_defaults_to_adamw_without_weight_decay():
    # DeepSpeed's "Adam" is decoupled-weight-decay Adam unless adam_w_mode is false; its default decay is 0.
    optimizer = _build("Adam", {"lr": 1e-3, "betas": [0.9, 0.95]})
    assert type(optimizer) is torch.optim.AdamW
    group = optimizer.param_groups[0]
    assert (group["lr"], tuple(group["betas"]), group["weight_decay"]) == (1e-3, (0.9, 0.95), 0.0)


def test_adam_is_fused_for_floating_cuda_tensors_only():
    from types import SimpleNamespace

    from autotp.optim import fused_by_default

    def tensor(device, dtype=torch.float32):  # only .device and .dtype are read: no GPU needed
        return SimpleNamespace(device=torch.device(device), dtype=dtype)

    assert fused_by_default([tensor("cuda:0"), tensor("cuda:0", torch.bfloat16)])
    assert not fused_by_default([tensor("cuda:0"), tensor("cuda:0", torch.int64)])
    assert not fused_by_default([tensor("cpu")]) and not fused_by_default([])
    assert _build("AdamW", {"lr": 1e-3}).param_groups[0]["fused"] in (None, False)  # CPU: torch's default


def test_user_adamw_object_takes_the_fused_kernel_unless_the_user_chose():
    from types import SimpleNamespace

    from autotp.optim import prefer_fused

    def built(cls=torch.optim.AdamW, device="cuda:0", **kwargs):
        optimizer = cls([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, **kwargs)
        # only .device and .dtype are read: no GPU needed
        optimizer.param_groups[0]["params"] = [SimpleNamespace(device=torch.device(device), dtype=torch.float32)]
        return optimizer

    optimizer = built()
    assert prefer_fused(optimizer) and optimizer.param_groups[0]["fused"] and not optimizer.param_groups[0]["foreach"]
    assert prefer_fused(built(torch.optim.Adam))
    for kept in (built(foreach=True), built(fused=False), built(device="cpu"), built(torch.optim.SGD)):
        before = dict(kept.param_groups[0])
        assert not prefer_fused(kept) and kept.param_groups[0] == before
    stepped = built()
    stepped.state["x"] = {"step": 1}
    assert not prefer_fused(stepped)


def test_adam_w_mode_false_is_plain_adam():
    optimizer = _build("Adam", {"lr": 1e-3, "adam_w_mode": False, "torch_adam": True, "weight_decay": 0.1})
    assert type(optimizer) is torch.optim.Adam
    assert optimizer.param_groups[0]["weight_decay"] == 0.1


def test_adamw_and_sgd():
    adamw = _build("AdamW", {"lr": 2e-4, "weight_decay": 0.05})
    assert type(adamw) is torch.optim.AdamW and adamw.param_groups[0]["weight_decay"] == 0.05
    sgd = _build("SGD", {"lr": 0.5, "momentum": 0.9})
    assert type(sgd) is torch.optim.SGD
    assert (sgd.param_groups[0]["lr"], sgd.param_groups[0]["momentum"]) == (0.5, 0.9)


def test_optimizer_unknown_param_names_params():
    with pytest.raises(ConfigError) as info:
        _build("SGD", {"lr": 0.1, "betas": [0.9, 0.99]})
    assert _named("optimizer.params", {"lr": 0.1, "betas": [0.9, 0.99]}) in str(info.value)
