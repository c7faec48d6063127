"""Which keys each config section has: the ones autotp reads, and DeepSpeed's own that autotp accepts and ignores
(listed in one warning). Anything else is a typo or a foreign key and raises, naming the nearest known key."""

from __future__ import annotations

import difflib

from .config_values import ConfigError

# Keys autotp reads, per section.
_TOP_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "bf16", "bfloat16", "fp16", "zero_optimization", "optimizer", "scheduler", "tensor_parallel", "steps_per_print",
    "seed", "communication_data_type",
}
_TP_KEYS = {"autotp_size", "preset_model", "partition_config", "tp_size", "kernels", "vocab_parallel_loss",
            "sequence_parallel", "grid"}
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
        hint = nearest_hint(key, known, path)
        raise ConfigError(f"config key '{path}{key}' is unknown to autotp and to DeepSpeed{hint} (known keys here: "
                          f"{', '.join(known)})")


def nearest_hint(key, known, path: str) -> str:
    """`; did you mean '<path><nearest known key>'?`, or '' when nothing is known."""
    nearest = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.0)
    return f"; did you mean '{path}{nearest[0]}'?" if nearest else ""

