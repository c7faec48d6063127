"""Rule sources, in DeepSpeed's priority: custom `layer_specs` (merged with the preset when `use_default_specs`) >
the model's HF tp_plan > the preset found from `model_type` > heuristics."""

from __future__ import annotations

import re
from typing import Any, Optional

from ..layer_specs import LayerSpec, PartitionConfig
from ..presets import PRESET_ALIASES, PRESETS
from .types import ModelDims, PlanError, Rule, Target


def preset_name_for(model_type: str) -> Optional[str]:
    name = PRESET_ALIASES.get(model_type, model_type)
    return name if name in PRESETS else None


def rules_from_preset(name: str) -> list[Rule]:
    return [Rule(pattern, style, dict(options), f"preset:{name}") for pattern, style, options in PRESETS[name]]


def rules_from_layer_specs(specs: list[LayerSpec]) -> list[Rule]:
    rules = []
    for index, spec in enumerate(specs):
        options: dict[str, Any] = {}
        if spec.shape is not None:
            options["shape"] = spec.shape
            # DeepSpeed reads `shape` at the spec's effective dim (0 column, 1 row), the dim config.py validated
            # the nesting at; the plan's own default would pick 0 for a reshaped row weight.
            options["partition_dim"] = spec.effective_partition_dim()
        elif spec.partition_dim is not None:
            options["partition_dim"] = spec.partition_dim
        if spec.gather_output:
            options["gather_output"] = True
        if spec.grad_allreduce:
            options["grad_allreduce"] = True
        for pattern in spec.patterns:
            rules.append(Rule(pattern, spec.partition_type, options, f"layer_specs[{index}]", "match",
                              tuple(spec.model_types) if spec.model_types else None, key=pattern))
    return rules


# HF tp_plan style -> (autotp style, options). DeepSpeed 0.19 accepts only colwise and rowwise.
HF_STYLES = {
    "colwise": ("column", {}),
    "rowwise": ("row", {}),
    "colwise_gather_output": ("column", {"gather_output": True}),
    "colwise_rep": ("column", {"gather_output": True}),
    "rowwise_split_input": ("row", {"split_input": True}),
    "rowwise_rep": ("row", {"split_input": True}),
    "packed_colwise": ("column", {"packed": 2}),
    "packed_rowwise": ("row", {"packed": 2}),
    "moe_tp_experts": ("experts", {}),
    "replicated_with_grad_allreduce": ("skip", {"grad_allreduce": True}),
    "embedding_rowwise": ("vocab", {}),
    "embedding_colwise": ("embed_dim", {}),
    "replicate": ("skip", {}),
}


def _tp_plan_key_to_regex(key: str) -> str:
    """HF's reading: `*` stands for a layer index, the key names the whole module path."""
    return re.escape(key).replace(r"\*", r"\d+")


def _deepspeed_key_regexes(key: str) -> list[str]:
    """Readings of a key written for DeepSpeed, tried in order after HF's: a glob at any depth (`*.q_proj`,
    `q_proj`, `layers.*.self_attn.o_proj`: `*` is any run of characters, `.` a dot), then the key as a regex
    with a `.*` prefix (`.*\\.q_proj`), as DeepSpeed matches its patterns."""
    readings = [r"(?:.*\.)?" + re.escape(key).replace(r"\*", ".*")]
    try:
        re.compile(key)
        readings.append(".*" + key)
    except re.error:
        pass
    return readings


def rules_from_tp_plan(plan: dict, prefix: str = "", names: Optional[list[str]] = None) -> list[Rule]:
    """HF `base_model_tp_plan` keys are relative to the base model (`prefix`), `model._tp_plan` keys are full.

    With the model's module `names`, a key that names no module as HF reads it is read as DeepSpeed does
    (`_deepspeed_key_regexes`): plans written for DeepSpeed (`*.q_proj`) once matched nothing here and the run
    trained fully replicated."""
    rules = []
    for key, style in plan.items():
        if style not in HF_STYLES:
            raise PlanError(f"tp_plan style '{style}' for layer '{key}' is not supported by autotp; supported: "
                            f"{sorted(HF_STYLES)}. Override it with tensor_parallel.partition_config.layer_specs")
        autotp_style, options = HF_STYLES[style]
        full_key = f"{prefix}.{key}" if prefix and not key.startswith(prefix + ".") else key
        regex = _tp_plan_key_to_regex(full_key)
        if names is not None and not any(re.fullmatch(regex, name) for name in names):
            regex = next((r for r in _deepspeed_key_regexes(key) if any(re.fullmatch(r, n) for n in names)), regex)
        rules.append(Rule(regex, autotp_style, dict(options), f"tp_plan:{style}", "full", key=key))
    return rules


def hf_tp_plan(model) -> tuple[dict, str]:
    """The model's own plan with full module paths: the config's `base_model_tp_plan` (base-relative, so the
    base model's prefix is put in front), then the class's `_tp_plan`, then the instance's `_tp_plan`; a later
    source wins per key and comes first in the returned order, so its rules are tried first (DeepSpeed merges
    them the same way; an instance plan once replaced the other two entirely)."""
    config = getattr(model, "config", None)
    base_plan = getattr(config, "base_model_tp_plan", None) if config is not None else None
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix or not hasattr(model, prefix):
        prefix = ""
    sources = [{(f"{prefix}.{k}" if prefix and not k.startswith(prefix + ".") else k): v
                for k, v in (base_plan or {}).items()},
               dict(getattr(type(model), "_tp_plan", None) or {}),
               dict(vars(model).get("_tp_plan") or {})]
    merged: dict = {}
    for source in reversed(sources):  # instance first
        for key, style in source.items():
            merged.setdefault(key, style)
    return merged, ""


# Heuristics: the projection that returns to the residual stream is row-parallel, the rest column.
ROW_NAMES = {"o_proj", "down_proj", "out_proj", "dense", "dense_4h_to_h", "fc2", "c_proj", "w2", "wo", "proj",
             "o", "out", "output_proj", "down"}
ROUTER_NAMES = {"gate", "router", "gate_network", "switch", "classifier"}
PACKED_NAMES = {"gate_up_proj", "w13", "gate_up"}
FUSED_QKV_NAMES = {"qkv_proj", "c_attn", "query_key_value", "Wqkv", "qkv", "in_proj"}


def heuristic_rules(targets: list[Target], dims: ModelDims) -> list[Rule]:
    rules = []
    for target in targets:
        if not target.in_block or target.kind not in ("linear", "conv1d"):
            continue
        leaf = target.name.rsplit(".", 1)[-1]
        exact = "^" + re.escape(target.name) + "$"
        if leaf in ROUTER_NAMES:
            rules.append(Rule(exact, "skip", {}, "heuristic", "full"))
        elif leaf in ROW_NAMES:
            rules.append(Rule(exact, "row", {}, "heuristic", "full"))
        elif leaf in PACKED_NAMES:
            rules.append(Rule(exact, "column", {"packed": 2}, "heuristic", "full"))
        elif leaf in FUSED_QKV_NAMES:
            out = target.shape[1] if target.kind == "conv1d" else target.shape[0]
            q, kv = dims.q_heads * dims.head_dim, dims.kv_heads * dims.head_dim
            if dims.kv_heads != dims.q_heads and q and out == q + 2 * kv:
                rules.append(Rule(exact, "column", {"shape": (("q", "kv", "kv"), -1), "unit": "head"},
                                  "heuristic", "full"))
            else:
                raise PlanError(
                    f"layer '{target.name}' is a fused q/k/v projection of {out} features whose layout (blocks "
                    "[q|k|v] or per-head interleaved) cannot be inferred; describe it with "
                    "tensor_parallel.partition_config.layer_specs, e.g. {\"patterns\": [\".*" + leaf
                    + "\\\\.weight$\"], \"partition_type\": \"column\", \"shape\": [3, -1]}")
        else:
            rules.append(Rule(exact, "column", {}, "heuristic", "full"))
    return rules


def build_rules(model, targets: list[Target], dims: ModelDims, preset_model: Optional[str],
                partition: Optional[PartitionConfig]) -> tuple[list[Rule], str]:
    """The ordered rule list and a one-word description of where it came from."""
    if partition is not None and partition.layer_specs or preset_model:
        rules = rules_from_layer_specs(partition.layer_specs) if partition is not None else []
        use_defaults = partition.use_default_specs if partition is not None else True
        preset = preset_model or preset_name_for(dims.model_type)
        if use_defaults and preset:
            rules += rules_from_preset(preset)
        return rules, "partition_config" if partition is not None and partition.layer_specs else f"preset:{preset}"
    plan, prefix = hf_tp_plan(model)
    if plan:
        return rules_from_tp_plan(plan, prefix, [t.name for t in targets]), "tp_plan"
    preset = preset_name_for(dims.model_type)
    if preset:
        return rules_from_preset(preset), f"preset:{preset}"
    rules = heuristic_rules(targets, dims)
    if not any(rule.style == "row" for rule in rules):
        raise PlanError(
            f"autotp found no row-parallel projection in model type '{dims.model_type or type(model).__name__}' "
            "(none of " + ", ".join(sorted(ROW_NAMES)) + "); the heuristics cannot place its layers. Write "
            "tensor_parallel.partition_config.layer_specs, e.g. [{\"patterns\": [\".*\\\\.out\\\\.weight$\"], "
            "\"partition_type\": \"row\"}, {\"patterns\": [\".*\\\\.in\\\\.weight$\"], \"partition_type\": "
            "\"column\"}]")
    return rules, "heuristics"


# ----------------------------------------------------------------------------------------------------------
# Resolution: rules -> per-target actions with validated layouts

