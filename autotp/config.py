"""DeepSpeed-style configuration, parsed into dataclasses and validated before any collective runs.

Every rank parses the same dict, so a `ConfigError` is raised identically on every rank and no rank is left
waiting in a collective. Messages name the key path and the offending value.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

logger = logging.getLogger("autotp")


class ConfigError(ValueError):
    """A config key has a wrong value; the message names the key path and the value."""


# Keys autotp reads, per section.
_TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "bfloat16", "fp16", "zero_optimization", "optimizer", "scheduler", "tensor_parallel", "steps_per_print",
    "seed", "communication_data_type",
}
_TP_KEYS = {"autotp_size", "preset_model", "partition_config", "tp_size", "kernels", "vocab_parallel_loss",
            "sequence_parallel"}
_PARTITION_KEYS = {"use_default_specs", "strict_mode", "layer_specs"}
_SPEC_KEYS = {"patterns", "partition_type", "shape", "partition_dim", "model_types", "gather_output",
              "grad_allreduce"}
_ZERO_KEYS = {"stage", "reduce_bucket_size", "allgather_bucket_size", "overlap_comm", "contiguous_gradients",
              "reduce_scatter", "comm_backend"}
_BF16_KEYS = {"enabled"}
_FP16_KEYS = {"enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale"}
_NAMED_KEYS = {"type", "params"}

# DeepSpeed's own keys that autotp accepts and ignores: a DeepSpeed config keeps working, and each one found is
# listed in one warning. A key in neither set is a typo or a foreign key and raises, naming the nearest known key
# (`zero_optimisation` once trained silently without ZeRO; `autotp_sise` at TP=1).
_DEEPSPEED_TOP_KEYS = {
    "wall_clock_breakdown", "memory_breakdown", "prescale_gradients", "gradient_predivide_factor",
    "sparse_gradients", "amp", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "activation_checkpointing", "sparse_attention", "flops_profiler", "tensorboard", "wandb", "csv_monitor", "comet",
    "elasticity", "autotuning", "aio", "checkpoint", "pipeline", "progressive_layer_drop", "curriculum_learning",
    "data_efficiency", "data_types", "eigenvalue", "quantize_training", "compression_training", "nebula",
    "comms_logger", "dataloader_drop_last", "disable_allgather", "dump_state", "seq_parallel_communication_data_type",
    "sequence_parallel_size", "use_data_before_expert_parallelism", "graph_harvesting", "torch_autocast", "compile",
    "timers", "weight_quantization", "hybrid_engine", "zero_optimization_stage", "train_micro_batch_size",
}
_DEEPSPEED_TP_KEYS = {"tp_overlap_comm", "injection_policy_tuple", "keep_module_on_host", "tp_grain_size", "dtype",
                      "tensor_parallel", "tp", "mpu", "tp_group"}
_DEEPSPEED_ZERO_KEYS = {
    "allgather_partitions", "offload_optimizer", "offload_param", "cpu_offload", "cpu_offload_params",
    "cpu_offload_use_pin_memory", "sub_group_size", "stage3_max_live_parameters", "stage3_max_reuse_distance",
    "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_model_persistence_threshold",
    "stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
    "stage3_module_granularity_threshold", "stage3_use_all_reduce_for_fetch_params", "round_robin_gradients",
    "elastic_checkpoint", "ignore_unused_parameters", "legacy_stage1", "load_from_fp32_weights",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "zeropp_loco_param", "mics_shard_size", "mics_hierarchical_params_gather",
    "memory_efficient_linear", "pipeline_loading_checkpoint", "override_module_apply",
    "use_multi_rank_bucket_allreduce", "log_trace_cache_warnings", "prefetch_bucket_size",
    "param_persistence_threshold", "model_persistence_threshold", "max_live_parameters", "max_reuse_distance",
    "gather_16bit_weights_on_model_save", "module_granularity_threshold",
}
_DEEPSPEED_BF16_KEYS = {"immediate_grad_update", "check_grad_overflow", "bf16_master_weights_and_grads",
                        "bf16_optimizer_states", "auto_cast"}
_DEEPSPEED_FP16_KEYS = {"auto_cast", "consecutive_hysteresis", "fp16_master_weights_and_grads", "type"}


def _check_keys(section: dict, path: str, read: set, ignored: set, unused: list) -> None:
    """Raise on a key of `section` that is neither read by autotp nor a DeepSpeed key it ignores (naming the
    nearest known key); append the ignored ones, with their path, to `unused`."""
    known = sorted(read | ignored)
    for key in sorted(section, key=str):
        if key in read:
            continue
        if key in ignored:
            unused.append(path + key)
            continue
        nearest = difflib.get_close_matches(str(key), known, n=1, cutoff=0.0)
        hint = f"; did you mean '{path}{nearest[0]}'?" if nearest else ""
        raise ConfigError(f"config key '{path}{key}' is unknown to autotp and to DeepSpeed{hint} (known keys here: "
                          f"{', '.join(known)})")


COMM_BACKENDS = ("auto", "torch", "nccl_ext")
_COMM_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16"}
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")
PARTITION_TYPES = ("column", "row", "skip")


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key '{key}' = {value!r}: {why}")


def _get_int(d: dict, key: str, path: str, default=None, minimum: int = 1,
             integral_float: bool = False) -> Optional[int]:
    value = d.get(key, default)
    if value is None:
        return None
    if integral_float and isinstance(value, float) and value.is_integer():
        value = int(value)  # DeepSpeed configs write sizes as 5e8, which JSON loads as a float
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(f"{path}{key}", value, "must be an integer")
    if value < minimum:
        _fail(f"{path}{key}", value, f"must be >= {minimum}")
    return value


def _get_bool(d: dict, key: str, path: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        _fail(f"{path}{key}", value, "must be true or false")
    return value


def _get_bool_or_auto(d: dict, key: str, path: str) -> Union[bool, str]:
    value = d.get(key, "auto")
    if not isinstance(value, bool) and value != "auto":
        _fail(f"{path}{key}", value, "must be true, false or \"auto\"")
    return value


def _section(d: dict, key: str) -> dict:
    value = d.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, dict):
        _fail(key, value, "must be an object")
    return value


@dataclass
class LayerSpec:
    """One custom partition rule (DeepSpeed's `layer_specs` entry)."""

    patterns: list[str]
    """Regexes matched (re.match) against parameter names such as `model.layers.0.self_attn.o_proj.weight`."""
    partition_type: str = "column"
    """column: split output features; row: split input features; skip: leave replicated."""
    shape: Optional[tuple] = None
    """Logical shape of the weight: at `partition_dim` an int is a count of equal sub-parameters and a list
    gives unequal sub-parameter sizes (fused QKV under GQA); -1 elsewhere means 'infer'."""
    partition_dim: Optional[int] = None
    """Dimension of `shape` (or of the weight) to split; default 0 for column, 1 for row (nn.Linear layout)."""
    model_types: Optional[list[str]] = None
    """Apply only when `model.config.model_type` is one of these."""
    gather_output: bool = False
    """Column only: all-gather the output so every rank sees the full features."""
    grad_allreduce: bool = False
    """Skip only: the parameter stays replicated but its gradient is summed over the TP group."""

    def effective_partition_dim(self) -> int:
        if self.partition_dim is not None:
            return self.partition_dim
        return 0 if self.partition_type == "column" else 1


def _normalize_shape(shape, path: str):
    if not isinstance(shape, (list, tuple)) or not shape:
        _fail(path, shape, "must be a non-empty list such as [2, -1] or [[q, kv, kv], -1]")
    out = []
    for entry in shape:
        if isinstance(entry, (list, tuple)):
            if not entry or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in entry):
                _fail(path, shape, "nested sub-parameter sizes must be positive integers")
            out.append(tuple(entry))
        elif isinstance(entry, bool) or not isinstance(entry, int) or entry == 0 or entry < -1:
            _fail(path, shape, "dimensions must be positive integers or -1")
        else:
            out.append(entry)
    return tuple(out)


def parse_layer_spec(raw: Any, path: str) -> LayerSpec:
    if not isinstance(raw, dict):
        _fail(path, raw, "each layer spec must be an object")
    unknown = set(raw) - _SPEC_KEYS
    if unknown:
        _fail(f"{path}.{sorted(unknown)[0]}", raw[sorted(unknown)[0]], f"unknown layer-spec key; known: {sorted(_SPEC_KEYS)}")
    patterns = raw.get("patterns")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        _fail(f"{path}.patterns", patterns, "must be a non-empty list of regex strings")
    import re

    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(f"{path}.patterns", pattern, f"is not a valid regex ({err})")
    ptype = raw.get("partition_type", "column")
    if not isinstance(ptype, str) or ptype.lower() not in PARTITION_TYPES:
        _fail(f"{path}.partition_type", ptype, f"must be one of {list(PARTITION_TYPES)}")
    ptype = ptype.lower()
    shape = raw.get("shape")
    if shape is not None:
        shape = _normalize_shape(shape, f"{path}.shape")
    pdim = raw.get("partition_dim")
    if pdim is not None and (isinstance(pdim, bool) or not isinstance(pdim, int) or pdim < 0):
        _fail(f"{path}.partition_dim", pdim, "must be a non-negative integer")
    model_types = raw.get("model_types")
    if model_types is not None:
        if isinstance(model_types, str):
            model_types = [model_types]
        if not isinstance(model_types, list) or not all(isinstance(m, str) for m in model_types):
            _fail(f"{path}.model_types", model_types, "must be a list of model_type strings")
    spec = LayerSpec(patterns=list(patterns), partition_type=ptype, shape=shape, partition_dim=pdim,
                     model_types=model_types, gather_output=_get_bool(raw, "gather_output", path + ".", False),
                     grad_allreduce=_get_bool(raw, "grad_allreduce", path + ".", False))
    if shape is not None:
        dim = spec.effective_partition_dim()
        if dim >= len(shape):
            _fail(f"{path}.partition_dim", dim, f"is out of range for shape {raw['shape']} of length {len(shape)}")
        nested = [i for i, entry in enumerate(shape) if isinstance(entry, tuple)]
        if nested and nested != [dim]:
            # The value as the user wrote it (lists), not the normalised tuples.
            _fail(f"{path}.shape", raw["shape"], f"a nested size list is only allowed at partition_dim {dim}")
    if spec.gather_output and ptype != "column":
        _fail(f"{path}.gather_output", True, "only applies to partition_type 'column'")
    if spec.grad_allreduce and ptype != "skip":
        _fail(f"{path}.grad_allreduce", True, "only applies to partition_type 'skip'")
    return spec


@dataclass
class PartitionConfig:
    use_default_specs: bool = True
    """Merge the preset's specs after the custom ones (custom specs win on conflicts)."""
    strict_mode: bool = False
    """Fail when an nn.Linear-like layer inside a transformer block matches no spec."""
    layer_specs: list[LayerSpec] = field(default_factory=list)


def parse_partition_config(raw: Any, path: str = "tensor_parallel.partition_config") -> Optional[PartitionConfig]:
    if raw is None:
        return None
    if isinstance(raw, PartitionConfig):
        return raw
    if not isinstance(raw, dict):
        _fail(path, raw, "must be an object")
    unknown = set(raw) - _PARTITION_KEYS
    if unknown:
        key = sorted(unknown)[0]
        _fail(f"{path}.{key}", raw[key], f"unknown key; known: {sorted(_PARTITION_KEYS)}")
    specs_raw = raw.get("layer_specs", [])
    if not isinstance(specs_raw, list):
        _fail(f"{path}.layer_specs", specs_raw, "must be a list")
    specs = [parse_layer_spec(s, f"{path}.layer_specs[{i}]") for i, s in enumerate(specs_raw)]
    return PartitionConfig(use_default_specs=_get_bool(raw, "use_default_specs", path + ".", True),
                           strict_mode=_get_bool(raw, "strict_mode", path + ".", False), layer_specs=specs)


@dataclass
class TensorParallelConfig:
    autotp_size: int = 1
    """GPUs per TP group. Keep it within a node: TP all-reduces every layer (0.34 ms per 64 MB at 4xH200)."""
    preset_model: Optional[str] = None
    """Built-in plan name (llama, qwen3, gpt2, ...); default: the model's HF tp_plan, then heuristics."""
    partition_config: Optional[PartitionConfig] = None
    kernels: str = "auto"
    """GEMMs of the TP layers: `torch`, `triton` (autotp_kernels), or `auto` (torch until measurements pick)."""
    vocab_parallel_loss: Union[bool, str] = "auto"
    """Keep the LM head's logits split over the vocabulary and compute the loss vocab-parallel (no full logits).
    `auto` (default) turns it on where it is exact by construction (`vocab_parallel.supports_vocab_parallel_loss`):
    at TP=4 on Llama-3-8B's shape it is worth +27% tokens/s and -38% peak memory (bench/results/train_features.csv)."""
    sequence_parallel: bool = False
    """Split activations over the sequence between TP regions (norms, residuals, dropout on 1/tp of it)."""


@dataclass
class OptimizerConfig:
    type: str
    params: dict


@dataclass
class SchedulerConfig:
    type: str
    params: dict


@dataclass
class ZeroConfig:
    stage: int = 0
    """0: replicated optimizer, DP all-reduce. 1: fp32 masters and optimizer state split over DP. 2: gradients
    split too (reduce-scattered during backward)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient bucket. 50M (100 MB bf16) sits in NCCL's bandwidth-bound regime (reduce-scatter
    reaches 247 GB/s at 64 MB on 4xH200 but 83 GB/s at 8 MB) while leaving an 8-layer backward several buckets to
    overlap with. DeepSpeed's default (5e8) is accepted when written in the config."""
    allgather_bucket_size: int = 50_000_000
    """Elements per parameter all-gather after the step (larger buckets are gathered in pieces)."""
    overlap_comm: bool = True
    """Stage 1/2: reduce each bucket as soon as its gradients are complete, under the rest of backward."""
    contiguous_gradients: bool = True
    """Gradients are always copied into flat bucket buffers (a reduce-scatter needs them contiguous); the key is
    read so DeepSpeed configs validate, and `false` is refused because it cannot be honoured."""
    comm_backend: str = "auto"
    """Who runs the ZeRO collectives: `torch` (torch.distributed), `nccl_ext` (autotp's C++/NCCL extension), or
    `auto` (the extension when it is built, else torch)."""
    communication_data_type: Optional[str] = None
    """torch dtype name of gradients on the wire; default: the gradient's own dtype."""


@dataclass
class AutoTPConfig:
    train_batch_size: int
    train_micro_batch_size_per_gpu: int
    gradient_accumulation_steps: int
    gradient_clipping: float = 0.0
    """Clip by the global L2 norm over TP x DP (0 disables)."""
    bf16: bool = False
    fp16: bool = False
    zero: "ZeroConfig" = field(default_factory=lambda: ZeroConfig())
    optimizer: Optional[OptimizerConfig] = None
    scheduler: Optional[SchedulerConfig] = None
    tensor_parallel: TensorParallelConfig = field(default_factory=TensorParallelConfig)
    steps_per_print: int = 10
    seed: Optional[int] = None
    unused_keys: list[str] = field(default_factory=list)


def load_config_dict(config: Any) -> dict:
    """A dict, a path to a JSON file, or None (empty config)."""
    if config is None:
        return {}
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if not os.path.isfile(path):
            raise ConfigError(f"config file '{path}' does not exist")
        with open(path) as handle:
            try:
                loaded = json.load(handle)
            except json.JSONDecodeError as err:
                raise ConfigError(f"config file '{path}' is not valid JSON: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file '{path}' must hold a JSON object, got {type(loaded).__name__}")
        return loaded
    raise ConfigError(f"config must be a dict or a path to a JSON file, got {type(config).__name__}")


def _resolve_batch(d: dict, dp_world_size: int) -> tuple[int, int, int]:
    """DeepSpeed's rule: train_batch_size = micro_batch * grad_accum * dp_world_size; any two imply the third."""
    tbs = _get_int(d, "train_batch_size", "")
    mbs = _get_int(d, "train_micro_batch_size_per_gpu", "")
    gas = _get_int(d, "gradient_accumulation_steps", "")
    if tbs is not None and mbs is not None and gas is not None:
        if tbs != mbs * gas * dp_world_size:
            raise ConfigError(
                f"config keys 'train_batch_size' = {tbs}, 'train_micro_batch_size_per_gpu' = {mbs}, "
                f"'gradient_accumulation_steps' = {gas}: train_batch_size must equal "
                f"micro_batch * gradient_accumulation_steps * dp_world_size = {mbs} * {gas} * {dp_world_size}")
    elif tbs is not None and mbs is not None:
        if tbs % (mbs * dp_world_size):
            _fail("train_batch_size", tbs, f"is not divisible by micro_batch {mbs} * dp_world_size {dp_world_size}")
        gas = tbs // (mbs * dp_world_size)
    elif tbs is not None and gas is not None:
        if tbs % (gas * dp_world_size):
            _fail("train_batch_size", tbs, f"is not divisible by gradient_accumulation_steps {gas} * "
                                           f"dp_world_size {dp_world_size}")
        mbs = tbs // (gas * dp_world_size)
    elif tbs is not None:
        if tbs % dp_world_size:
            _fail("train_batch_size", tbs, f"is not divisible by dp_world_size {dp_world_size}")
        gas, mbs = 1, tbs // dp_world_size
    elif mbs is not None:
        gas = gas or 1
        tbs = mbs * gas * dp_world_size
    else:
        raise ConfigError("config needs 'train_batch_size' or 'train_micro_batch_size_per_gpu'")
    return tbs, mbs, gas


def _parse_tensor_parallel(d: dict, unused: list) -> TensorParallelConfig:
    raw = _section(d, "tensor_parallel")
    _check_keys(raw, "tensor_parallel.", _TP_KEYS, _DEEPSPEED_TP_KEYS, unused)
    size = _get_int(raw, "autotp_size", "tensor_parallel.", None)
    if size is None:
        size = _get_int(raw, "tp_size", "tensor_parallel.", 1)
    preset = raw.get("preset_model")
    if preset is not None:
        from .plan import PRESETS

        if not isinstance(preset, str) or preset.lower() not in PRESETS:
            _fail("tensor_parallel.preset_model", preset, f"unknown preset; known: {sorted(PRESETS)}")
        preset = preset.lower()
    kernels = raw.get("kernels", "auto")
    if kernels not in ("auto", "torch", "triton"):
        _fail("tensor_parallel.kernels", kernels, "must be one of ['auto', 'torch', 'triton']")
    return TensorParallelConfig(autotp_size=size, preset_model=preset,
                                partition_config=parse_partition_config(raw.get("partition_config")),
                                kernels=kernels,
                                vocab_parallel_loss=_get_bool_or_auto(raw, "vocab_parallel_loss", "tensor_parallel."),
                                sequence_parallel=_get_bool(raw, "sequence_parallel", "tensor_parallel.", False))


def _parse_named_section(d: dict, key: str, allowed) -> Optional[Any]:
    raw = d.get(key)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        _fail(key, raw, "must be an object with 'type' and 'params'")
    _check_keys(raw, f"{key}.", _NAMED_KEYS, set(), [])
    kind = raw.get("type")
    names = {name.lower(): name for name in allowed}
    if not isinstance(kind, str) or kind.lower() not in names:
        _fail(f"{key}.type", kind, f"must be one of {list(allowed)}")
    params = raw.get("params", {}) or {}
    if not isinstance(params, dict):
        _fail(f"{key}.params", params, "must be an object")
    return names[kind.lower()], params


def _parse_zero(zero: dict, stage: int, d: dict) -> ZeroConfig:
    path = "zero_optimization."
    defaults = ZeroConfig()
    backend = zero.get("comm_backend", "auto")
    if backend not in COMM_BACKENDS:
        _fail(path + "comm_backend", backend, f"must be one of {list(COMM_BACKENDS)}")
    if not _get_bool(zero, "contiguous_gradients", path, True):
        _fail(path + "contiguous_gradients", False, "autotp always reduces gradients from flat contiguous buckets")
    if not _get_bool(zero, "reduce_scatter", path, True):
        _fail(path + "reduce_scatter", False, "autotp's ZeRO always reduce-scatters (an all-reduce would double "
                                              "the traffic)")
    wire = d.get("communication_data_type")
    if wire is not None:
        if not isinstance(wire, str) or wire.lower() not in _COMM_DTYPES:
            _fail("communication_data_type", wire, f"must be one of {sorted(set(_COMM_DTYPES))}")
        wire = _COMM_DTYPES[wire.lower()]
    return ZeroConfig(
        stage=stage,
        reduce_bucket_size=_get_int(zero, "reduce_bucket_size", path, defaults.reduce_bucket_size,
                                    integral_float=True),
        allgather_bucket_size=_get_int(zero, "allgather_bucket_size", path, defaults.allgather_bucket_size,
                                       integral_float=True),
        overlap_comm=_get_bool(zero, "overlap_comm", path, True), contiguous_gradients=True,
        comm_backend=backend, communication_data_type=wire)


def parse_config(config: Any, world_size: int) -> AutoTPConfig:
    """Parse and validate; `world_size` is the global world size (dp = world / autotp_size)."""
    d = load_config_dict(config)
    unused: list[str] = []
    _check_keys(d, "", _TOP_KEYS, _DEEPSPEED_TOP_KEYS, unused)
    if "bf16" in d and "bfloat16" in d:
        raise ConfigError("config keys 'bf16' and 'bfloat16' are both given: they are the same setting, keep one")
    tp = _parse_tensor_parallel(d, unused)
    if world_size % tp.autotp_size:
        _fail("tensor_parallel.autotp_size", tp.autotp_size, f"must divide the world size {world_size}")
    dp = world_size // tp.autotp_size
    tbs, mbs, gas = _resolve_batch(d, dp)

    clip = d.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        _fail("gradient_clipping", clip, "must be a number >= 0")
    bf16_key = "bfloat16" if "bfloat16" in d else "bf16"  # DeepSpeed's alias
    bf16_section, fp16_section = _section(d, bf16_key), _section(d, "fp16")
    _check_keys(bf16_section, f"{bf16_key}.", _BF16_KEYS, _DEEPSPEED_BF16_KEYS, unused)
    _check_keys(fp16_section, "fp16.", _FP16_KEYS, _DEEPSPEED_FP16_KEYS, unused)
    bf16 = _get_bool(bf16_section, "enabled", f"{bf16_key}.", False)
    fp16 = _get_bool(fp16_section, "enabled", "fp16.", False)
    if bf16 and fp16:
        raise ConfigError("config keys 'bf16.enabled' and 'fp16.enabled' are both true: choose one")

    zero = _section(d, "zero_optimization")
    _check_keys(zero, "zero_optimization.", _ZERO_KEYS, _DEEPSPEED_ZERO_KEYS, unused)
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2):
        _fail("zero_optimization.stage", stage, "autotp supports ZeRO stages 0, 1 and 2 (stage 3 shards "
                                                 "parameters, which conflicts with tensor parallelism)")
    zero_cfg = _parse_zero(zero, stage, d)

    optimizer = _parse_named_section(d, "optimizer", ("Adam", "AdamW", "SGD"))
    scheduler = _parse_named_section(d, "scheduler", SCHEDULER_TYPES)
    steps_per_print = _get_int(d, "steps_per_print", "", 10)
    seed = _get_int(d, "seed", "", None, minimum=0)

    cfg = AutoTPConfig(train_batch_size=tbs, train_micro_batch_size_per_gpu=mbs, gradient_accumulation_steps=gas,
                       gradient_clipping=float(clip), bf16=bf16, fp16=fp16, zero=zero_cfg,
                       optimizer=OptimizerConfig(*optimizer) if optimizer else None,
                       scheduler=SchedulerConfig(*scheduler) if scheduler else None,
                       tensor_parallel=tp, steps_per_print=steps_per_print, seed=seed, unused_keys=unused)
    return cfg
