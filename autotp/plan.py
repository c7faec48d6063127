"""Sharding plans: rules from presets, custom `layer_specs`, HF tp_plans or heuristics, resolved per layer.

No torch.distributed here: `resolve_plan` takes a description of the model's layers and returns what to do
with each, so plans are testable without processes. Priority follows DeepSpeed: custom `partition_config`
(merged with the preset when `use_default_specs`) > HF tp_plan > preset found from `model_type` > heuristics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .config import LayerSpec, PartitionConfig
from .presets import PRESET_ALIASES, PRESETS
from .shard import Block, ShardLayout, split_sizes

__all__ = ["PRESETS", "Target", "Rule", "Action", "ModelDims", "PlanError", "resolve_plan", "build_rules",
           "rules_from_tp_plan", "model_dims", "format_plan"]


class PlanError(ValueError):
    """A layer cannot be sharded as asked; the message names the layer, the sizes and the fix."""


@dataclass(frozen=True)
class Target:
    """One thing a rule can apply to: a Linear / Conv1D / Embedding module, a bare parameter, or a module."""

    name: str
    kind: str  # linear | conv1d | embedding | param | linear_like | module
    """linear_like: a module of another class with its own 2-D `weight` used as `x @ weight.T` (DeepSpeed's
    layer_specs can target it by parameter name)."""
    shape: tuple = ()
    """Weight shape in storage order (Conv1D: [in, out]); empty for plain modules."""
    in_block: bool = False
    """Lives inside a repeated transformer block (strict mode only checks these)."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    style: str  # column | row | skip | vocab | embed_dim | experts
    options: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""
    match: str = "search_end"  # search_end (presets) | match (DeepSpeed layer_specs) | full (HF tp_plan)
    model_types: Optional[tuple] = None
    key: str = field(default="", compare=False)
    """The plan key or pattern as the user wrote it, for messages."""

    def names_for(self, target: "Target", param_names: tuple = ()) -> list[str]:
        """The names this rule is matched against. DeepSpeed's layer_specs match parameter names: a splittable
        layer's `<name>.weight` (and, as autotp always allowed, its own name), a bare parameter's own name, and
        (for skip rules only) the direct parameters of any other module, never a container's name; HF tp_plans
        and presets match module names."""
        splittable = target.kind in ("linear", "conv1d", "embedding", "linear_like")
        if self.match == "match":
            if splittable:
                return [target.name + ".weight", target.name]  # the layer's own name too: `.*qkv_proj$`
            if target.kind == "param":
                return [target.name]
            return [f"{target.name}.{p}" for p in param_names] if self.style == "skip" else []
        if target.kind == "param":
            return [target.name]
        return [target.name, target.name + ".weight"] if splittable else [target.name]

    def matches(self, names, model_type: Optional[str]) -> bool:
        if self.model_types and (model_type or "").lower() not in {m.lower() for m in self.model_types}:
            return False
        regex = re.compile(self.pattern)
        for name in names:
            if self.match == "full" and regex.fullmatch(name):
                return True
            if self.match == "match" and regex.match(name):
                return True
            if self.match == "search_end" and regex.search(name):
                return True
        return False


@dataclass
class Action:
    target: Target
    style: str
    source: str
    layout: Optional[ShardLayout] = None
    """How the weight's split dimension is cut (None for skip / experts modules)."""
    weight_dim: int = 0
    """Storage dimension of the weight that is split."""
    gather_output: bool = False
    split_input: bool = False
    grad_allreduce: bool = False
    kv_replicas: int = 1
    """TP ranks holding each KV head (tp // kv_heads when kv_heads < tp)."""


@dataclass(frozen=True)
class ModelDims:
    model_type: str = ""
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    vocab: int = 0
    falcon_layout: str = ""  # grouped | multi_query | interleaved (Falcon's fused qkv variants)


def _first_attr(config, names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(config) -> ModelDims:
    """Head counts and widths from an HF config, across the naming schemes of the supported families."""
    if config is None:
        return ModelDims()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    hidden = _first_attr(text, ["hidden_size", "n_embd", "d_model", "word_embed_proj_dim"], 0) or 0
    q_heads = _first_attr(text, ["num_attention_heads", "n_head", "num_heads", "n_heads"], 0) or 0
    falcon_layout = ""
    if model_type == "falcon":
        if getattr(text, "new_decoder_architecture", False):
            kv_heads, falcon_layout = text.num_kv_heads, "grouped"
        elif getattr(text, "multi_query", False):
            kv_heads, falcon_layout = 1, "multi_query"
        else:
            kv_heads, falcon_layout = q_heads, "interleaved"
    else:
        kv_heads = _first_attr(text, ["num_key_value_heads", "num_kv_heads", "n_head_kv"], q_heads) or q_heads
    head_dim = getattr(text, "head_dim", None) or (hidden // q_heads if q_heads else 0)
    vocab = getattr(text, "vocab_size", 0) or 0
    return ModelDims(model_type, q_heads, kv_heads, head_dim, hidden, vocab, falcon_layout)


# ----------------------------------------------------------------------------------------------------------
# Rule sources


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


def _symbol(value, dims: ModelDims, where: str) -> int:
    if isinstance(value, int):
        return value
    table = {"q": dims.q_heads * dims.head_dim, "kv": dims.kv_heads * dims.head_dim, "head": dims.head_dim}
    if value not in table or not table[value]:
        raise PlanError(f"{where}: cannot resolve size '{value}' from the model config")
    return table[value]


def _unit(option, dims: ModelDims, where: str) -> int:
    if option is None:
        return 1
    if isinstance(option, int):
        return option
    per_group = (dims.q_heads // max(dims.kv_heads, 1)) + 2
    table = {"head": dims.head_dim, "head3": 3 * dims.head_dim, "group": per_group * dims.head_dim}
    if not table.get(option):
        raise PlanError(f"{where}: cannot resolve unit '{option}': head_dim unknown in the model config")
    return table[option]


def _logical_shape(target: Target) -> tuple:
    """Weight shape in Linear orientation ([out, in]); Conv1D stores [in, out]."""
    if target.kind == "conv1d":
        return (target.shape[1], target.shape[0]) + tuple(target.shape[2:])
    return tuple(target.shape)


def _storage_dim(target: Target, logical_dim: int) -> int:
    if target.kind == "conv1d" and len(target.shape) == 2:
        return 1 - logical_dim
    return logical_dim


def _blocks_for(target: Target, rule: Rule, dims: ModelDims, tp: int, where: str):
    """(view, split dim in the view, [(size, unit)]) in Linear orientation."""
    logical = _logical_shape(target)
    options = rule.options
    ndim = len(logical)
    if rule.style == "column":
        default_dim = ndim - 2 if ndim >= 2 else 0
    elif rule.style == "row":
        default_dim = ndim - 1
    else:  # vocab / embed_dim on an Embedding [vocab, dim]
        default_dim = 0 if rule.style == "vocab" else 1
    shape = options.get("shape")
    unit = _unit(options.get("unit", _default_unit(target, rule, dims)), dims, where)
    if options.get("falcon_qkv"):
        return _falcon_blocks(logical, dims, where)
    if options.get("packed"):
        # Packed halves (gate | up) along the default dimension; works for 2-D and 3-D expert weights.
        count, size = options["packed"], logical[default_dim]
        if size % count:
            raise PlanError(f"{where}: packed dimension of size {size} does not split into {count} halves")
        return None, default_dim, [(size // count, unit)] * count
    if shape is None:
        dim = options.get("partition_dim", default_dim)
        if dim >= ndim:
            raise PlanError(f"{where}: partition_dim {dim} is out of range for weight shape {list(logical)}")
        return None, dim, [(logical[dim], unit)]
    dim = options.get("partition_dim", default_dim if len(shape) == ndim else 0)
    if dim >= len(shape):
        raise PlanError(f"{where}: partition_dim {dim} is out of range for shape {list(shape)}")
    numel = 1
    for size in logical:
        numel *= size
    entry = shape[dim]
    sizes, total = None, None
    if isinstance(entry, tuple):
        sizes = [_symbol(v, dims, where) for v in entry]
        total = sum(sizes)
    view = []
    unknown = []
    for index, value in enumerate(shape):
        if index == dim:
            view.append(total)
            if total is None:
                unknown.append(index)
        elif value == -1:
            view.append(logical[index] if len(shape) == ndim else None)
            if view[-1] is None:
                unknown.append(index)
        else:
            view.append(_symbol(value, dims, where))
    known = 1
    for value in view:
        if value is not None:
            known *= value
    if len(unknown) > 1:
        raise PlanError(f"{where}: shape {list(shape)} leaves {len(unknown)} dimensions to infer; give all but one")
    if unknown:
        if numel % known:
            raise PlanError(f"{where}: shape {list(shape)} does not divide the weight's {numel} elements "
                            f"(weight shape {list(logical)})")
        view[unknown[0]] = numel // known
    product = 1
    for value in view:
        product *= value
    if product != numel:
        raise PlanError(f"{where}: shape {list(shape)} resolves to {view} ({product} elements) but the weight "
                        f"{list(logical)} has {numel}")
    if sizes is None:
        count = entry if isinstance(entry, int) and entry > 0 else 1
        if view[dim] % count:
            raise PlanError(f"{where}: dimension {dim} of size {view[dim]} does not split into {count} equal "
                            "sub-parameters")
        sizes = [view[dim] // count] * count
    if len(shape) == ndim and all(v == l for v, l in zip(view, logical)):
        view = None
    return (tuple(view) if view else None), dim, [(size, unit) for size in sizes]


ATTENTION_PARENTS = {"self_attn", "attention", "attn", "self_attention", "attn_layer", "mixer"}


def _default_unit(target: Target, rule: Rule, dims: ModelDims):
    """Projections of an attention module split on head boundaries even when the rule does not say so
    (HF tp_plans and most layer_specs don't); gathered outputs may split anywhere."""
    if not dims.head_dim or rule.options.get("gather_output") or rule.options.get("split_input"):
        return None
    parts = target.name.split(".")
    if len(parts) < 2 or parts[-2] not in ATTENTION_PARENTS or rule.style not in ("column", "row"):
        return None
    if rule.style == "column" and parts[-1] in FUSED_QKV_NAMES and not rule.options.get("shape"):
        return "head3" if dims.model_type in ("gpt_neox", "bloom") else None
    return "head"


def _falcon_blocks(logical, dims: ModelDims, where: str):
    hd = dims.head_dim
    if dims.falcon_layout == "multi_query":
        return None, 0, [(dims.q_heads * hd, hd), (hd, hd), (hd, hd)]
    if dims.falcon_layout == "grouped":
        return None, 0, [(logical[0], (dims.q_heads // dims.kv_heads + 2) * hd)]
    return None, 0, [(logical[0], 3 * hd)]


def head_split(dims: ModelDims, tp: int) -> str:
    """How attention heads are cut over `tp` ranks (see `local_heads`).

    even: tp divides the query and the KV heads. replicate: tp divides the query heads and is a multiple of
    kv_heads < tp, so each KV head lives on tp / kv_heads ranks. groups: anything else, cut as DeepSpeed AutoTP
    cuts it (`tp_shard.get_shard_size`): whole KV groups (a KV head and its query heads) per rank, the first
    kv_heads % tp ranks one group more, so a rank may hold no head at all. Falcon's fused grouped q/k/v cannot
    replicate a KV head, so it always takes groups.
    """
    q, kv = dims.q_heads, dims.kv_heads or dims.q_heads
    if not q or (q % tp == 0 and kv % tp == 0):
        return "even"
    if q % tp == 0 and kv < tp and tp % kv == 0 and dims.falcon_layout != "grouped":
        return "replicate"
    return "groups"


def local_heads(dims: ModelDims, tp: int, rank: int) -> tuple[int, int]:
    """(query heads, KV heads) TP rank `rank` computes attention over; a replicated KV head counts once.
    16 q / 4 KV heads over 3 ranks: (8, 2), (4, 1), (4, 1); 16 q / 2 KV: (8, 1), (8, 1), (0, 0)."""
    kv = dims.kv_heads or dims.q_heads
    split = head_split(dims, tp)
    if split == "even":
        return dims.q_heads // tp, kv // tp
    if split == "replicate":
        return dims.q_heads // tp, 1
    groups = split_sizes(kv, tp)[rank]
    return groups * (dims.q_heads // kv), groups


def layout_for(target: Target, rule: Rule, dims: ModelDims, tp: int) -> tuple[ShardLayout, int, int]:
    where = f"layer '{target.name}' ({rule.source}, {rule.style})"
    view, dim, blocks_spec = _blocks_for(target, rule, dims, tp, where)
    blocks, replicas = [], 1
    hd, kv = dims.head_dim, dims.kv_heads or dims.q_heads
    split = head_split(dims, tp) if hd else "even"
    for size, unit in blocks_spec:
        if size % unit:
            raise PlanError(f"{where}: sub-parameter of size {size} is not a whole number of units of {unit}")
        units = size // unit
        pieces = tp
        head_block = bool(hd) and unit % hd == 0
        if head_block and split == "groups" and (units == kv or (unit == hd and units == dims.q_heads)):
            if dims.q_heads % kv:
                raise PlanError(f"{where}: {dims.q_heads} query heads do not form whole groups over {kv} KV heads")
            if unit == hd and units == dims.q_heads:
                unit = dims.q_heads // kv * hd  # query heads move with their KV head: whole groups per rank
        elif units % tp == 0:
            pass
        elif head_block and split == "replicate" and unit == hd and units == kv:
            # Fewer KV heads than ranks: each rank keeps the one KV head its query heads use.
            pieces, replicas = units, tp // units
        elif head_block:
            raise PlanError(
                f"{where}: {units} heads (or head groups) of width {unit} (size {size}) cannot be split over "
                f"tp_size {tp}; heads are never split, and this sub-parameter is neither the query heads "
                f"({dims.q_heads}) nor the KV heads ({kv}) that autotp cuts in whole KV groups")
        elif target.kind == "param":
            # 3-D expert weights feed HF's grouped expert GEMM (torch._grouped_mm), which needs 16-byte aligned
            # strides: 100 features over 3 ranks leave 33 fp32 (132 bytes) on two of them.
            raise PlanError(f"{where}: {units} expert features (size {size}) cannot be split evenly over tp_size "
                            f"{tp}; expert weights are split evenly only (grouped expert GEMMs need aligned strides)")
        # Otherwise plain features (unit 1, or a granularity that is no head): uneven pieces, the first
        # (units % tp) pieces one unit larger (shard.split_sizes), 129 over 2 -> 65, 64.
        blocks.append(Block(size, pieces, unit))
    if view is None and target.kind == "conv1d":
        storage_dim = _storage_dim(target, dim)
    else:
        storage_dim = dim
    if view is not None and target.kind == "conv1d":
        raise PlanError(f"{where}: a reshaped 'shape' is not supported on Conv1D weights; use a 2-D shape")
    return ShardLayout(storage_dim, tuple(blocks), tp, view), storage_dim, replicas


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

