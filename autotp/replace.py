"""Apply a resolved plan to a model: shard weights, swap Linear/Conv1D for TP layers, localise head counts.

Every sharded parameter carries `autotp_layout` (its `ShardLayout`) so `checkpoint.consolidate` can put the
full tensor back under the original name. Parameter names never change: a swapped layer keeps `weight` and
`bias` at the same module path.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from . import comm
from .config import PartitionConfig, parse_partition_config
from .groups import ParallelGroups, build_groups, groups_from_mesh, groups_from_tp_group
from .layers import (KERNELS, ColumnParallelEmbeddingMixin, ColumnParallelLinear, ColumnParallelLinearLikeMixin,
                     InputCopies, RowParallelLinear, RowParallelLinearLikeMixin, TPExpertsMixin,
                     VocabParallelEmbeddingMixin, mix_into)
from .plan import (Action, ModelDims, PlanError, Rule, Target, build_rules, format_plan, local_heads,
                   layout_for, model_dims, resolve_plan, rules_from_tp_plan)
from .presets import ATTENTION_ATTRIBUTES, FAMILY_OPTIONS, PRESETS
from .shard import ShardLayout, shard_tensor

logger = logging.getLogger("autotp")


@dataclass
class TPState:
    """What `parallelize` did, kept on the model as `model.autotp_state`."""

    groups: ParallelGroups
    actions: dict[str, Action]
    plan_source: str
    dims: ModelDims
    hooks: list = field(default_factory=list)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and getattr(module, "weight", None) is not None


def collect_targets(model: nn.Module) -> list[Target]:
    """Linear, Conv1D and Embedding modules, 3-D parameters (fused experts), and every other module."""
    block_prefixes = [name for name, module in model.named_modules() if isinstance(module, nn.ModuleList)]

    def in_block(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in block_prefixes)

    targets = []
    for name, module in model.named_modules():
        if not name:
            continue
        if isinstance(module, nn.Linear):
            targets.append(Target(name, "linear", tuple(module.weight.shape), in_block(name)))
        elif _is_conv1d(module):
            targets.append(Target(name, "conv1d", tuple(module.weight.shape), in_block(name)))
        elif isinstance(module, nn.Embedding):
            targets.append(Target(name, "embedding", tuple(module.weight.shape), in_block(name)))
        else:
            for pname, param in module.named_parameters(recurse=False):
                if param.dim() == 3:
                    targets.append(Target(f"{name}.{pname}", "param", tuple(param.shape), in_block(name)))
            weight = module._parameters.get("weight")
            if weight is not None and weight.dim() == 2:
                targets.append(Target(name, "linear_like", tuple(weight.shape), in_block(name)))
            else:
                targets.append(Target(name, "module", (), in_block(name)))
    return targets


def direct_param_names(model: nn.Module) -> dict[str, tuple]:
    """Module name -> its own parameters' names (what a DeepSpeed skip spec can name)."""
    return {name: tuple(n for n, _ in module.named_parameters(recurse=False)) for name, module in model.named_modules()}


def _resolve_groups(tp_size, tp_group, device_mesh) -> ParallelGroups:
    if device_mesh is not None:
        return groups_from_mesh(device_mesh)
    if tp_group is not None:
        groups = groups_from_tp_group(tp_group)
        if tp_size is not None and tp_size != groups.tp_size:
            raise PlanError(f"tp_size {tp_size} does not match the size {groups.tp_size} of the given tp_group")
        return groups
    return build_groups(tp_size or 1)


def _bias_layout(layout: ShardLayout) -> ShardLayout:
    return ShardLayout(0, layout.blocks, layout.tp_size, None)


class _Sharder:
    def __init__(self, model: nn.Module, groups: ParallelGroups, dims: ModelDims):
        self.model = model
        self.groups = groups
        self.dims = dims
        self.rank = groups.tp_rank
        self.done: dict[int, nn.Parameter] = {}  # id(original parameter) -> shard, keeps tied weights tied
        self.layouts: dict[int, ShardLayout] = {}
        self.hooks: list = []

    def shard_param(self, param: nn.Parameter, layout: ShardLayout, name: str) -> nn.Parameter:
        key = id(param)
        if key in self.done:
            if self.layouts[key] != layout:
                raise PlanError(f"parameter '{name}' is shared (tied) with another layer that is split differently; "
                                "give both the same partition (e.g. both vocabulary-parallel) or neither")
            return self.done[key]
        shard = nn.Parameter(shard_tensor(param.data, layout, self.rank), requires_grad=param.requires_grad)
        shard.autotp_layout = layout
        shard.autotp_full_shape = tuple(param.shape)
        self.done[key] = shard
        self.layouts[key] = layout
        return shard

    def replace_module(self, name: str, new: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        setattr(parent, child, new)

    def grad_allreduce(self, param: nn.Parameter) -> None:
        """Sum this replicated parameter's gradient over TP (it saw only this rank's heads)."""
        if getattr(param, "autotp_grad_allreduce", False) or self.groups.tp_size == 1:
            return
        group = self.groups.tp_group
        param.autotp_grad_allreduce = True
        self.hooks.append(param.register_hook(lambda grad: comm.all_reduce_raw(grad.clone(), group)))

    def kv_replica_grad_sum(self, param: nn.Parameter, layout: ShardLayout) -> None:
        """A KV head held by several ranks: each rank's copy gets the gradient of its own query heads; the
        true gradient is their sum. Place each copy in a full-size buffer, all-reduce, take the local part."""
        group, rank = self.groups.tp_group, self.rank
        ranges = layout.local_ranges(rank)

        def hook(grad):
            full_shape = list(grad.shape)
            full_shape[layout.dim] = layout.full_size
            full = grad.new_zeros(full_shape)
            cursor = 0
            for start, length in ranges:
                full.narrow(layout.dim, start, length).add_(grad.narrow(layout.dim, cursor, length))
                cursor += length
            comm.all_reduce_raw(full, group)
            return torch.cat([full.narrow(layout.dim, start, length) for start, length in ranges], dim=layout.dim)

        self.hooks.append(param.register_hook(hook))

    def apply(self, action: Action, modules: dict[str, nn.Module]) -> Optional[tuple]:
        target = action.target
        group = self.groups.tp_group
        if action.style == "skip":
            if action.grad_allreduce:
                owner = modules.get(target.name)
                params = list(owner.parameters()) if owner is not None else []
                for param in params:
                    self.grad_allreduce(param)
            return None
        if action.style == "experts":
            module = modules[target.name]
            mix_into(module, TPExpertsMixin)
            module.autotp_group = group
            return None
        layout = action.layout
        if target.kind == "param":
            owner_name, _, pname = target.name.rpartition(".")
            owner = modules[owner_name]
            shard = self.shard_param(getattr(owner, pname), layout, target.name)
            setattr(owner, pname, shard)
            if action.kv_replicas > 1:
                self.kv_replica_grad_sum(shard, layout)
            return tuple(shard.shape)
        module = modules[target.name]
        if target.kind == "embedding":
            return self._embedding(module, action)
        if target.kind == "linear_like":
            return self._linear_like(module, action)
        weight = self.shard_param(module.weight, layout, target.name + ".weight")
        bias = None
        if getattr(module, "bias", None) is not None:
            if action.style == "column":
                bias = self.shard_param(module.bias, _bias_layout(layout), target.name + ".bias")
            else:
                bias = module.bias  # added once, after the all-reduce
        conv1d = target.kind == "conv1d"
        full_out, full_in = (module.weight.shape[1], module.weight.shape[0]) if conv1d else module.weight.shape[:2]
        cls = ColumnParallelLinear if action.style == "column" else RowParallelLinear
        extra = {"gather_output": action.gather_output} if action.style == "column" else {"split_input": action.split_input}
        new = cls(weight, bias, layout, group, self.rank, conv1d, full_in, full_out, **extra)
        new.train(module.training)
        self.replace_module(target.name, new)
        if action.kv_replicas > 1:
            self.kv_replica_grad_sum(weight, layout)
            if bias is not None:
                self.kv_replica_grad_sum(bias, _bias_layout(layout))
        return tuple(weight.shape)

    def _linear_like(self, module: nn.Module, action: Action) -> tuple:
        """A module of its own class with a Linear-layout `weight`: shard it in place and wrap its forward."""
        name, layout = action.target.name, action.layout
        bias = module._parameters.get("bias")
        if action.style == "row" and bias is not None:
            raise PlanError(f"layer '{name}' ({type(module).__name__}) cannot be row-parallel: its own forward adds "
                            "its bias, which would then be added on every TP rank; make it column-parallel or skip it")
        module.weight = self.shard_param(module.weight, layout, name + ".weight")
        if bias is not None and action.style == "column":
            if bias.dim() != 1 or bias.shape[0] != layout.full_size:
                raise PlanError(f"layer '{name}' ({type(module).__name__}): bias of shape {list(bias.shape)} does not "
                                f"follow the {layout.full_size} output features of its weight")
            module.bias = self.shard_param(bias, _bias_layout(layout), name + ".bias")
        module.autotp_group = self.groups.tp_group
        if action.style == "column":
            mix_into(module, ColumnParallelLinearLikeMixin)
            if action.gather_output:
                module.autotp_gather_sizes = [layout.local_size(r) for r in range(layout.tp_size)]
        else:
            mix_into(module, RowParallelLinearLikeMixin)
        if action.kv_replicas > 1:
            self.kv_replica_grad_sum(module.weight, layout)
        return tuple(module.weight.shape)

    def _embedding(self, module: nn.Embedding, action: Action) -> tuple:
        layout = action.layout
        full_rows, full_dim = module.weight.shape
        module.weight = self.shard_param(module.weight, layout, action.target.name + ".weight")
        module.autotp_group = self.groups.tp_group
        if action.style == "vocab":
            start, rows = layout.local_ranges(self.rank)[0]
            module.autotp_vocab_start = start
            module.autotp_full_rows = full_rows
            if module.padding_idx is not None:
                local = module.padding_idx - start
                module.padding_idx = local if 0 <= local < rows else None
            module.num_embeddings = rows
            mix_into(module, VocabParallelEmbeddingMixin)
        else:
            module.autotp_sizes = [layout.local_size(r) for r in range(layout.tp_size)]
            module.embedding_dim = module.weight.shape[1]
            mix_into(module, ColumnParallelEmbeddingMixin)
        return tuple(module.weight.shape)


def _localise_attention(model: nn.Module, actions: dict[str, Action], dims: ModelDims, tp: int, hooks: list):
    """Set head counts on attention modules whose query heads are now split (see presets.ATTENTION_ATTRIBUTES):
    this rank's own counts (`plan.local_heads`), which differ between ranks when the heads do not split evenly;
    a rank holding no head runs its attention over zero heads (zero-width q/k/v, o_proj still all-reduces)."""
    if tp == 1 or not dims.q_heads:
        return
    split_parents = []
    for name, action in actions.items():
        if action.layout is None or action.target.kind not in ("linear", "conv1d"):
            continue
        if action.gather_output or action.split_input:
            continue
        parent = name.rpartition(".")[0]
        if any(b.unit % dims.head_dim == 0 for b in action.layout.blocks):
            if action.style == "column" and parent not in split_parents:
                split_parents.append(parent)
            continue
        module = model.get_submodule(parent) if parent else model
        sizes = [action.layout.local_size(r) for r in range(tp)]
        holds_heads = any(isinstance(getattr(module, attr, None), int) for attr in ATTENTION_ATTRIBUTES)
        if holds_heads and any(size % dims.head_dim for size in sizes):
            raise PlanError(f"layer '{name}' ({action.source}) splits {action.layout.full_size} features of attention "
                            f"module '{parent}' into {sizes} over tp_size {tp}, across heads of width "
                            f"{dims.head_dim}; give its rule \"unit\": \"head\" or gather its output")
    family = FAMILY_OPTIONS.get(dims.model_type, {})
    rank = model.autotp_state.groups.tp_rank
    heads = [local_heads(dims, tp, r) for r in range(tp)]
    q_local, kv_local = heads[rank]
    q_start = sum(q for q, _ in heads[:rank])
    kv = dims.kv_heads or dims.q_heads
    empty = [r for r, (q, _) in enumerate(heads) if q == 0]
    if empty and split_parents and family.get("no_zero_heads"):
        raise PlanError(f"'{split_parents[0]}': {dims.q_heads} query heads in {kv} KV groups over tp_size {tp} leave "
                        f"TP ranks {empty} without heads (whole KV groups per rank), and {dims.model_type}'s "
                        f"attention cannot run over zero heads; choose a tp_size of at most {kv}")
    values = {"q": q_local, "kv": kv_local, "groups": q_local // kv_local if kv_local else dims.q_heads // kv,
              "q_width": q_local * dims.head_dim}
    for parent in split_parents:
        module = model.get_submodule(parent) if parent else model
        for attr, kind in ATTENTION_ATTRIBUTES.items():
            if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                setattr(module, attr, values[kind])
        if family.get("config_view") and getattr(module, "config", None) is not None:
            module.config = LocalConfigView(module.config, num_attention_heads=q_local, num_key_value_heads=kv_local)
        if family.get("alibi_kwarg"):
            hooks.append(module.register_forward_pre_hook(_alibi_slicer(dims.q_heads, q_start, q_local),
                                                          with_kwargs=True))


class LocalConfigView:
    """Reads through to the shared model config except for a few local overrides (local head counts)."""

    def __init__(self, base, **overrides):
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_overrides", overrides)

    def __getattr__(self, name):
        overrides = object.__getattribute__(self, "_overrides")
        if name in overrides:
            return overrides[name]
        return getattr(object.__getattribute__(self, "_base"), name)

    def __setattr__(self, name, value):
        setattr(object.__getattribute__(self, "_base"), name, value)


def _alibi_slicer(global_heads: int, start: int, local: int):
    """ALiBi biases and 4-D masks are built for all heads at model level; keep this rank's heads
    [start, start + local) (uneven splits give ranks different counts)."""

    def slice_heads(tensor):
        if not torch.is_tensor(tensor):
            return tensor
        if tensor.dim() == 3 and tensor.size(0) % global_heads == 0:  # [batch * heads, 1, kv]
            batch = tensor.size(0) // global_heads
            view = tensor.view(batch, global_heads, *tensor.shape[1:])
            return view[:, start:start + local].reshape(batch * local, *tensor.shape[1:])
        if tensor.dim() == 4 and tensor.size(1) == global_heads:  # [batch, heads, q, kv]
            return tensor[:, start:start + local]
        return tensor

    def hook(module, args, kwargs):
        for key in ("alibi", "attention_mask"):
            if key in kwargs:
                kwargs[key] = slice_heads(kwargs[key])
        return args, kwargs

    return hook


def _check_family(model: nn.Module, dims: ModelDims, tp: int) -> None:
    for name, module in model.named_modules():
        if getattr(module, "slow_but_exact", False) and getattr(module, "pretraining_tp", 1) > 1 and tp > 1:
            raise PlanError(f"module '{name}': slow_but_exact with pretraining_tp > 1 bypasses the dense layer's "
                            "forward; set config.slow_but_exact = False to train it with autotp")


def _vocab_parallel_rules(model: nn.Module) -> list:
    """Rules, ahead of the plan's own, that split the LM head (no output gather) and the input embedding over
    the vocabulary; a tied pair gets the same shard."""
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or id(head) not in names:
        raise PlanError(f"vocab_parallel: {type(model).__name__} has no output embeddings (LM head) to split")
    rules = [Rule(re.escape(names[id(head)]), "column", {}, "vocab_parallel", match="full")]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding) and id(embedding) in names:
        rules.append(Rule(re.escape(names[id(embedding)]), "vocab", {}, "vocab_parallel", match="full"))
    return rules


def _check_plan_shards(actions: dict[str, Action], rules: list[Rule], source: str, tp: int) -> None:
    """At TP > 1 a plan that splits nothing is a mistake (its keys name no layer), never a silently replicated
    run: raise naming the keys."""
    own = [rule for rule in rules if rule.source != "vocab_parallel"]
    if not own or any(a.source != "vocab_parallel" and a.style != "skip" for a in actions.values()):
        return
    keys = list(dict.fromkeys(rule.key or rule.pattern for rule in own))
    raise PlanError(f"the sharding plan ({source}) splits no layer at tp_size {tp}: none of its keys "
                    f"{keys[:12]}{' ...' if len(keys) > 12 else ''} matches a layer autotp can split (Linear, "
                    "Conv1D, Embedding, a module with its own 2-D weight, or a 3-D parameter). Check the names with "
                    "print(model); HF tp_plan keys are module paths ('model.layers.*.self_attn.q_proj'), "
                    "layer_specs patterns are parameter names ('.*\\.q_proj\\.weight$')")


def _weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id(weight parameter) -> names of every module holding it as its `weight` (tied weights: several)."""
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        weight = module._parameters.get("weight")
        if weight is not None and name not in owners.get(id(weight), []):
            owners.setdefault(id(weight), []).append(name)
    return owners


def _keep_ties(model: nn.Module, actions: dict[str, Action], targets: list[Target], dims: ModelDims, tp: int):
    """A weight shared by several modules (tied input embedding and LM head) must be split the same way in all of
    them. When the plan splits one side only, the vocabulary split is extended to the other (a head split over
    the vocabulary with its output gathered, an embedding split over the vocabulary: both exact); any other
    mismatch raises. Before, the head became a (vocab/tp, hidden) shard beside a whole embedding and the pair
    silently came apart after the first step."""
    by_name = {target.name: target for target in targets}

    def split(name):
        action = actions.get(name)
        return action is not None and action.layout is not None

    for names in _weight_owners(model).values():
        if len(names) < 2 or all(split(n) for n in names) or not any(split(n) for n in names):
            continue
        done = [n for n in names if split(n)]
        for name in (n for n in names if not split(n)):
            target, other = by_name.get(name), actions[done[0]]
            wanted = {"embedding": "vocab", "linear": "column"}.get(target.kind if target else "")
            extended = None
            if wanted and other.style in ("vocab", "column") and other.weight_dim == 0:
                rule = Rule(re.escape(name), wanted, {}, f"tied to {done[0]}", "full")
                layout, weight_dim, replicas = layout_for(target, rule, dims, tp)
                if layout == other.layout:
                    extended = Action(target, wanted, rule.source, layout, weight_dim, gather_output=wanted == "column",
                                      kv_replicas=replicas)
            if extended is None:
                raise PlanError(f"layers {names} share one weight (tied), but the plan splits '{done[0]}' "
                                f"({other.style}, {other.source}) and leaves '{name}' whole; split both the same way "
                                "(e.g. both over the vocabulary: vocab_parallel_loss) or neither, or untie them "
                                "(config.tie_word_embeddings = False)")
            actions[name] = extended
            logger.info("autotp: '%s' shares its weight with '%s' and is split the same way (%s)", name, done[0],
                        extended.style)


def _share_input_copies(model: nn.Module, hooks: list) -> None:
    """Column layers reading the same tensor share one input copy (one all-reduce of their summed input
    gradients); the cache is emptied around every forward of the model."""
    copies = InputCopies()
    for module in model.modules():
        if isinstance(module, ColumnParallelLinear):
            module.autotp_input_copies = copies
    hooks.append(model.register_forward_pre_hook(copies.clear))
    hooks.append(model.register_forward_hook(copies.clear))


def set_kernels(model: nn.Module, kernels: str) -> None:
    """GEMM implementation of every TP linear layer: `torch` (cuBLAS, then NCCL), `triton` (autotp_kernels' GEMM,
    collectives fused into it on CUDA), `auto` (cuBLAS with the fused collectives where the layer's traffic is
    large enough for fusing to pay, see `_ParallelLinear._fused_gemm`)."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.kernels = kernels


def parallelize(model: nn.Module, tp_size: Optional[int] = None, tp_group=None, preset_model: Optional[str] = None,
                partition_config: Any = None, device_mesh=None, verbose: bool = True,
                kernels: str = "auto", vocab_parallel: Union[bool, str] = False,
                sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` in place over the TP group and return it.

    `vocab_parallel`: True, False, or "auto" (on where `supports_vocab_parallel_loss(model)`, see
    `vocab_parallel`).

    `partition_config` is DeepSpeed's `partition_config` (dict or `PartitionConfig`) or an HF-style tp_plan
    (`{"layers.*.mlp.up_proj": "colwise", ...}`), like `parallelize_module`'s plan.
    """
    if getattr(model, "autotp_state", None) is not None:
        raise PlanError("model is already parallelized by autotp")
    if kernels not in KERNELS:
        raise PlanError(f"kernels '{kernels}' is unknown; choose one of {list(KERNELS)}")
    if preset_model is not None and preset_model.lower() not in PRESETS:
        raise PlanError(f"preset_model '{preset_model}' is unknown; known: {sorted(PRESETS)}")
    if vocab_parallel not in (True, False, "auto"):
        raise PlanError(f"vocab_parallel must be true, false or 'auto', got {vocab_parallel!r}")
    groups = _resolve_groups(tp_size, tp_group, device_mesh)
    from .vocab_parallel import vocab_parallel_wanted  # vocab_parallel imports layers, which imports this module

    vocab_parallel = vocab_parallel_wanted(vocab_parallel, model, groups.tp_size)
    config = getattr(model, "config", None)
    dims = model_dims(config)
    targets = collect_targets(model)
    strict = False
    if groups.tp_size == 1:
        # TP=1 is plain data parallelism: no plan is needed, so none is built (a model the heuristics cannot
        # place once raised PlanError here).
        rules, source = [], "tp_size 1: nothing sharded"
    elif isinstance(partition_config, dict) and partition_config and all(
            isinstance(v, str) for v in partition_config.values()):
        rules, source = rules_from_tp_plan(partition_config, names=[t.name for t in targets]), "tp_plan(argument)"
    else:
        partition = parse_partition_config(partition_config) if not isinstance(partition_config, PartitionConfig) \
            else partition_config
        strict = bool(partition and partition.strict_mode)
        rules, source = build_rules(model, targets, dims, preset_model and preset_model.lower(), partition)
    if vocab_parallel and groups.tp_size > 1:
        rules = _vocab_parallel_rules(model) + rules
    actions = resolve_plan(targets, rules, dims, groups.tp_size, strict=strict, param_names=direct_param_names(model))
    if groups.tp_size > 1:
        _check_plan_shards(actions, rules, source, groups.tp_size)
        _keep_ties(model, actions, targets, dims, groups.tp_size)
    _check_family(model, dims, groups.tp_size)

    sharder = _Sharder(model, groups, dims)
    modules = dict(model.named_modules())
    local_shapes = {}
    if groups.tp_size > 1:
        for name, action in actions.items():
            shape = sharder.apply(action, modules)
            if shape is not None:
                local_shapes[name] = shape
    set_kernels(model, kernels)
    state = TPState(groups, actions, source, dims, sharder.hooks)
    model.autotp_state = state
    if groups.tp_size > 1:
        _share_input_copies(model, state.hooks)
        from .rng import enable_tp_dropout_streams

        enable_tp_dropout_streams(model, groups.tp_rank, state.hooks)
    if vocab_parallel and groups.tp_size > 1:
        from .vocab_parallel import enable_vocab_parallel_loss

        enable_vocab_parallel_loss(model)
    if sequence_parallel and groups.tp_size > 1:
        from .sequence_parallel import enable_sequence_parallel

        try:
            enable_sequence_parallel(model, groups.tp_group)
        except ValueError as err:
            raise PlanError(f"sequence_parallel: {err}") from None
    if groups.tp_size > 1:
        _localise_attention(model, actions, dims, groups.tp_size, state.hooks)
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        logger.info("autotp plan (%s, tp=%d, rank 0 shapes):\n%s", source, groups.tp_size,
                    format_plan(actions, local_shapes))
    return model
