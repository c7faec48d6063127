"""Sharding plans: rules from presets, custom `layer_specs`, HF tp_plans or heuristics, resolved per layer.

No torch.distributed here: `resolve_plan` takes a description of the model's layers and returns what to do
with each, so plans are testable without processes. Priority follows DeepSpeed: custom `partition_config`
(merged with the preset when `use_default_specs`) > HF tp_plan > preset found from `model_type` > heuristics.

- `types`: Target, Rule, Action, ModelDims, PlanError
- `rules`: the rule sources (presets, layer_specs, HF tp_plans with DeepSpeed's key forms, heuristics)
- `layout`: how a weight is cut (blocks, head units, uneven and replicated KV heads)
- `resolve`: rules -> actions, and the plan's log lines
"""

from ..presets import PRESETS
from .layout import head_split, layout_for, local_heads
from .resolve import format_plan, resolve_plan
from .rules import (HF_STYLES, build_rules, heuristic_rules, hf_tp_plan, preset_name_for, rules_from_layer_specs,
                    rules_from_preset, rules_from_tp_plan)
from .types import Action, ModelDims, PlanError, Rule, Target, model_dims

__all__ = ["PRESETS", "Target", "Rule", "Action", "ModelDims", "PlanError", "resolve_plan", "build_rules",
           "rules_from_tp_plan", "rules_from_preset", "rules_from_layer_specs", "heuristic_rules", "hf_tp_plan",
           "preset_name_for", "model_dims", "format_plan", "layout_for", "local_heads", "head_split", "HF_STYLES"]
