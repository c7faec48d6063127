"""Resolution: rules -> one action per targeted layer, with its validated layout; and the plan's log lines."""

from __future__ import annotations

import re
from typing import Optional

from .layout import layout_for
from .types import Action, ModelDims, PlanError, Rule, Target


def resolve_plan(targets: list[Target], rules: list[Rule], dims: ModelDims, tp: int,
                 strict: bool = False, param_names: Optional[dict] = None) -> dict[str, Action]:
    """First matching rule wins per target. Returns actions for every target a rule touches.

    `param_names`: module name -> names of its direct parameters (what a DeepSpeed skip spec can name)."""
    actions: dict[str, Action] = {}
    unmatched = []
    param_names = param_names or {}
    for target in targets:
        rule = next((r for r in rules
                     if r.matches(r.names_for(target, param_names.get(target.name, ())), dims.model_type)), None)
        if rule is None:
            if target.kind in ("linear", "conv1d") and target.in_block:
                unmatched.append(target.name)
            continue
        action = Action(target, rule.style, rule.source, grad_allreduce=bool(rule.options.get("grad_allreduce")))
        if rule.style in ("column", "row", "vocab", "embed_dim"):
            if target.kind == "module":
                raise PlanError(f"layer '{target.name}' ({rule.source}, '{rule.key or rule.pattern}') is a "
                                f"{rule.style} rule but the module has no weight that autotp can split (expected "
                                "Linear, Conv1D, Embedding, a module with its own 2-D weight, or a parameter)")
            if rule.style in ("vocab", "embed_dim") and target.kind != "embedding":
                raise PlanError(f"layer '{target.name}' ({rule.source}): style {rule.style} applies to embeddings")
            action.layout, action.weight_dim, action.kv_replicas = layout_for(target, rule, dims, tp)
            action.gather_output = bool(rule.options.get("gather_output"))
            action.split_input = bool(rule.options.get("split_input"))
        elif rule.style == "experts" and target.kind not in ("module", "linear_like"):
            continue
        actions[target.name] = action
    if strict and unmatched:
        raise PlanError("strict_mode: no layer spec matches " + ", ".join(unmatched[:8])
                        + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
                        + "; add a layer spec (partition_type column, row or skip) for each")
    return actions


def format_plan(actions: dict[str, Action], local_shapes: dict[str, tuple]) -> str:
    """One line per sharded layer: name, style, source, local weight shape. Repeated layers are folded."""
    lines, seen = [], set()
    for name, action in actions.items():
        folded = re.sub(r"\.\d+\.", ".*.", name)
        key = (folded, action.style, action.source)
        if key in seen:
            continue
        seen.add(key)
        extra = []
        if action.gather_output:
            extra.append("gather_output")
        if action.split_input:
            extra.append("split_input")
        if action.grad_allreduce:
            extra.append("grad_allreduce")
        if action.kv_replicas > 1:
            extra.append(f"kv_replicated x{action.kv_replicas}")
        shape = local_shapes.get(name)
        lines.append(f"  {folded:<48} {action.style:<8} {str(list(shape)) if shape else '':<16} "
                     f"{action.source}{' ' + ' '.join(extra) if extra else ''}")
    return "\n".join(lines)

