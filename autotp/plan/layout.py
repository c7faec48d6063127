"""How one targeted weight is cut: its sub-parameter blocks, the unit no piece may straddle (a head), and how many
pieces each block has (KV replication, uneven splits by whole KV groups, as DeepSpeed sizes them)."""

from __future__ import annotations

from ..presets import FAMILY_OPTIONS
from ..shard import Block, ShardLayout, split_sizes
from .rules import FUSED_QKV_NAMES
from .types import ModelDims, PlanError, Rule, Target


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
        return FAMILY_OPTIONS.get(dims.model_type, {}).get("fused_qkv_unit")
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


