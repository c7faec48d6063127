"""DeepSpeed-style configuration, parsed into dataclasses and validated before any collective runs.

Every rank parses the same dict, so a `ConfigError` is raised identically on every rank and no rank is left
waiting in a collective. Messages name the key path and the offending value. The keys each section may hold are
in `config_keys`, the typed getters in `config_values`, the `partition_config` parser in `layer_specs`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from .config_keys import (_BF16_KEYS, _DEEPSPEED_BF16_KEYS, _DEEPSPEED_FP16_KEYS, _DEEPSPEED_TOP_KEYS,
                          _DEEPSPEED_TP_KEYS, _DEEPSPEED_ZERO_KEYS, _FP16_KEYS, _NAMED_KEYS, _TOP_KEYS, _TP_KEYS,
                          _ZERO_KEYS, _check_keys)
from .config_values import ConfigError, _fail, _get_bool, _get_bool_or_auto, _get_int, _section
from .layer_specs import PARTITION_TYPES, LayerSpec, PartitionConfig, parse_layer_spec, parse_partition_config
from .presets import PRESETS

__all__ = ["ConfigError", "AutoTPConfig", "TensorParallelConfig", "ZeroConfig", "OptimizerConfig", "SchedulerConfig",
           "LayerSpec", "PartitionConfig", "parse_config", "parse_partition_config", "parse_layer_spec",
           "load_config_dict", "check_tp_divides_world", "KERNELS", "COMM_BACKENDS", "SCHEDULER_TYPES", "PARTITION_TYPES"]

logger = logging.getLogger("autotp")

KERNELS = ("auto", "torch", "triton")
"""`tensor_parallel.kernels` (and `parallelize(kernels=)`): who runs the TP layers' GEMMs and collectives.
`torch`: cuBLAS, then the NCCL collective. `triton`: autotp_kernels' Triton GEMM, and on CUDA the collective fused
into it. `auto` (the default): per shape, the fused path with cuBLAS GEMMs where `autotp_kernels/fused_table.csv`
measured it faster than cuBLAS then NCCL at this TP size (`autotp_kernels.auto_table`), else as `torch`. `torch`
also keeps ZeRO 0-3's optimizer step on `optimizer.step()`; the others run it in `autotp_kernels.adam` where it
applies (`zero/master_adam.py`). This is the one description; the README and the layers point here."""
COMM_BACKENDS = ("auto", "torch", "nccl_ext")
_COMM_DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
                "fp16": "float16", "float16": "float16"}
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR")


@dataclass
class TensorParallelConfig:
    autotp_size: int = 1
    """GPUs per TP group. Keep it within a node: TP all-reduces every layer (0.34 ms per 64 MB at 4xH200)."""
    preset_model: Optional[str] = None
    """Built-in plan name (llama, qwen3, gpt2, ...); default: the model's HF tp_plan, then heuristics."""
    partition_config: Optional[PartitionConfig] = None
    kernels: str = "auto"
    """One of `KERNELS` (see there)."""
    vocab_parallel_loss: Union[bool, str] = "auto"
    """Keep the LM head's logits split over the vocabulary and compute the loss vocab-parallel (no full logits).
    `auto` (default) turns it on where it is exact by construction (`vocab_parallel.supports_vocab_parallel_loss`):
    at TP=4 on Llama-3-8B's shape it is worth +27% tokens/s and -38% peak memory (bench/results/train_features.csv)."""
    sequence_parallel: bool = False
    """Split activations over the sequence between TP regions (norms, residuals, dropout on 1/tp of it)."""
    grid: Optional[tuple] = None
    """(rows, cols) with rows x cols = autotp_size: 2-D tensor parallelism (`autotp.parallel2d`) for the families
    it supports (`parallel2d.FAMILIES`), 1-D for the others (one log line). None: 1-D."""


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
    split too (reduce-scattered during backward). 3: parameters split too, by PyTorch's FSDP2 (`zero/fsdp.py`)."""
    reduce_bucket_size: int = 50_000_000
    """Elements per gradient bucket. 50M (100 MB bf16) sits in NCCL's bandwidth-bound regime (reduce-scatter
    reaches 247 GB/s at 64 MB on 4xH200 but 83 GB/s at 8 MB) while leaving an 8-layer backward several buckets to
    overlap with. DeepSpeed's default (5e8) is accepted when written in the config. Stage 3: consecutive decoder
    layers share one FSDP2 unit (one all-gather, one reduce-scatter) while they hold at most this many elements."""
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
    """torch dtype name of gradients on the wire; default: the gradient's own dtype (stage 3: fp32)."""
    prefetch_bucket_size: Optional[int] = None
    """Stage 3 (`stage3_prefetch_bucket_size`): parameter elements FSDP2 all-gathers ahead of the unit computing,
    as whole units (at least one). None, the default: FSDP2's own prefetch of the next unit, which already hides
    one unit's all-gather behind the current one's compute; more holds more gathered parameters at once."""
    param_persistence_threshold: int = 0
    """Stage 3 (`stage3_param_persistence_threshold`): parameters with fewer elements stay whole on every DP rank
    (all-reduced gradients, as stage 0) instead of being sharded. Default 0 shards everything, as FSDP2 does;
    DeepSpeed's own default (1e5) would keep a Llama's norms whole, saving two tiny collectives per unit."""
    gather_16bit_weights_on_model_save: bool = True
    """Stage 3 (`stage3_gather_16bit_weights_on_model_save`): `save_pretrained` and the consolidated state dicts
    gather the weights in the bf16/fp16 training dtype, as stages 0-2 hold them; false: the fp32 masters (what
    DeepSpeed's zero_to_fp32.py would recover). Without bf16/fp16 both are fp32."""


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
        if not isinstance(preset, str) or preset.lower() not in PRESETS:
            _fail("tensor_parallel.preset_model", preset, f"unknown preset; known: {sorted(PRESETS)}")
        preset = preset.lower()
    kernels = raw.get("kernels", "auto")
    if kernels not in KERNELS:
        _fail("tensor_parallel.kernels", kernels, f"must be one of {list(KERNELS)}")
    grid = raw.get("grid")
    if grid is not None:
        if (not isinstance(grid, (list, tuple)) or len(grid) != 2
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in grid)):
            _fail("tensor_parallel.grid", grid, "must be [rows, cols], two positive integers")
        if grid[0] * grid[1] != size:
            _fail("tensor_parallel.grid", grid, f"is {grid[0] * grid[1]} ranks, but tensor_parallel.autotp_size is "
                                                f"{size}")
        grid = tuple(grid)
    sequence_parallel = _get_bool(raw, "sequence_parallel", "tensor_parallel.", False)
    if grid is not None and sequence_parallel:
        _fail("tensor_parallel.grid", list(grid), "does not combine with tensor_parallel.sequence_parallel (a 2-D "
                                                  "grid already splits activations over both of its axes)")
    return TensorParallelConfig(autotp_size=size, preset_model=preset,
                                partition_config=parse_partition_config(raw.get("partition_config")),
                                kernels=kernels,
                                vocab_parallel_loss=_get_bool_or_auto(raw, "vocab_parallel_loss", "tensor_parallel."),
                                sequence_parallel=sequence_parallel, grid=grid)


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
    persistence = _first_of(zero, ("stage3_param_persistence_threshold", "param_persistence_threshold"))
    prefetch = _first_of(zero, ("stage3_prefetch_bucket_size", "prefetch_bucket_size"))
    gather_16bit = _first_of(zero, _GATHER_16BIT_KEYS)
    return ZeroConfig(
        stage=stage,
        prefetch_bucket_size=_get_int(zero, prefetch, path, None, minimum=0, integral_float=True) if prefetch else None,
        param_persistence_threshold=_get_int(zero, persistence, path, 0, minimum=0, integral_float=True)
        if persistence else 0,
        gather_16bit_weights_on_model_save=_get_bool(zero, gather_16bit, path, True) if gather_16bit else True,
        reduce_bucket_size=_get_int(zero, "reduce_bucket_size", path, defaults.reduce_bucket_size,
                                    integral_float=True),
        allgather_bucket_size=_get_int(zero, "allgather_bucket_size", path, defaults.allgather_bucket_size,
                                       integral_float=True),
        overlap_comm=_get_bool(zero, "overlap_comm", path, True), contiguous_gradients=True,
        comm_backend=backend, communication_data_type=wire)


# DeepSpeed's stage-3 keys with an FSDP2 meaning (`ZeroConfig`), each under both of DeepSpeed's spellings; the
# stage-1/2 keys that FSDP2 has no use for. Either kind is listed in the one unused-keys warning when it does not
# apply to the stage in use.
_GATHER_16BIT_KEYS = ("stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save",
                      "gather_16bit_weights_on_model_save")
_STAGE3_KEYS = {"stage3_prefetch_bucket_size", "prefetch_bucket_size", "stage3_param_persistence_threshold",
                "param_persistence_threshold", *_GATHER_16BIT_KEYS}
_STAGE12_KEYS = {"allgather_bucket_size", "overlap_comm", "comm_backend"}


def _first_of(section: dict, spellings: tuple) -> Optional[str]:
    """The first of `spellings` present in `section` (DeepSpeed accepts several names for one setting)."""
    return next((key for key in spellings if key in section), None)


def _zero_unused(zero: dict, stage: int, unused: list) -> list:
    """`unused` (keys `_check_keys` found DeepSpeed-only) adjusted for the stage: at stage 3 the stage-3 keys
    autotp honours are read and the stage-1/2 keys are not; below stage 3 the reverse."""
    path = "zero_optimization."
    if stage == 3:
        honoured = {path + key for key in _STAGE3_KEYS}
        return [k for k in unused if k not in honoured] + [path + k for k in sorted(_STAGE12_KEYS) if k in zero]
    return unused


def check_tp_divides_world(tp_size: int, world_size: int, key: str = "tensor_parallel.autotp_size") -> None:
    """The one check that a TP size divides the world (the config key, `tp_model_init`, the groups)."""
    if world_size % tp_size:
        _fail(key, tp_size, f"must divide the world size {world_size}")


def parse_config(config: Any, world_size: int) -> AutoTPConfig:
    """Parse and validate; `world_size` is the global world size (dp = world / autotp_size)."""
    d = load_config_dict(config)
    unused: list[str] = []
    _check_keys(d, "", _TOP_KEYS, _DEEPSPEED_TOP_KEYS, unused)
    if "bf16" in d and "bfloat16" in d:
        raise ConfigError("config keys 'bf16' and 'bfloat16' are both given: they are the same setting, keep one")
    tp = _parse_tensor_parallel(d, unused)
    check_tp_divides_world(tp.autotp_size, world_size)
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
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        _fail("zero_optimization.stage", stage, "autotp supports ZeRO stages 0, 1, 2 and 3")
    zero_cfg = _parse_zero(zero, stage, d)
    unused[:] = _zero_unused(zero, stage, unused)
    if tp.grid is not None and stage == 3:
        _fail("zero_optimization.stage", stage, "with tensor_parallel.grid (2-D tensor parallelism) stages 0-2 are "
                                                "supported, not 3 yet")

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
