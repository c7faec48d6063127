"""`parallelize`: resolve a sharding plan for a model and apply it in place.

The steps, each in its own module: the plan (`plan`), tied weights kept tied (`ties`), where sequence
parallelism applies (`sequence_parallel.plan_sequence_parallel`), every TP linear layer's mode built once from
all the settings (`linear_mode`), weights sharded and modules swapped (`swap`), then the model-level hooks
(shared input copies, dropout streams, the vocab-parallel loss, sequence parallelism) and the attention
modules' head counts (`attention_heads`). PEFT's layers are out of the model while it is planned and sharded, and
their adapters follow the TP layers after (`lora`).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
import torch.nn as nn

from .attention_heads import localise_attention
from .collective_errors import raise_on_every_rank
from .config import KERNELS, PartitionConfig, parse_partition_config
from .grad_sync import TPGradSums
from .groups import ParallelGroups, resolve_groups
from .layers import ColumnParallelLinear, RowParallelLinear
from .linear_mode import AdapterCall, ColumnMode, InputCopies, LinearMode, LogitsGather, RowMode
from .lora import check_adapters, enable_adapters, plan_root, put_back_adapters, take_out_adapters, wrapped_layers
from .plan import (Action, ModelDims, PlanError, Rule, Target, build_rules, format_plan, model_dims, resolve_plan,
                   rules_from_tp_plan)
from .presets import PRESETS
from .rng import enable_tp_dropout_streams
from .sequence_parallel import (SequenceParallelPlan, SequenceParallelState, decoder_stack,
                                enable_sequence_parallel, plan_sequence_parallel, tp_linear_names)
from .swap import Sharder
from .ties import keep_ties
from .vocab_parallel import enable_vocab_parallel_loss, vocab_parallel_wanted

logger = logging.getLogger("autotp")


@dataclass
class TPState:
    """What `parallelize` did, kept on the model as `model.autotp_state`."""

    groups: ParallelGroups
    actions: dict[str, Action]
    plan_source: str
    dims: ModelDims
    hooks: list = field(default_factory=list)
    sequence_parallel: Optional[SequenceParallelState] = None


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
    groups = resolve_groups(tp_size, device_mesh=device_mesh, tp_group=tp_group)
    if tp_group is not None and device_mesh is None and tp_size is not None and tp_size != groups.tp_size:
        raise PlanError(f"tp_size {tp_size} does not match the size {groups.tp_size} of the given tp_group")
    return groups


def _check_family(model: nn.Module, dims: ModelDims, tp: int) -> None:
    for name, module in model.named_modules():
        if getattr(module, "slow_but_exact", False) and getattr(module, "pretraining_tp", 1) > 1 and tp > 1:
            raise PlanError(f"module '{name}': slow_but_exact with pretraining_tp > 1 bypasses the dense layer's "
                            "forward; set config.slow_but_exact = False to train it with autotp")


def _vocab_parallel_rules(model: nn.Module) -> tuple[list, str]:
    """Rules, ahead of the plan's own, that split the LM head (no output gather) and the input embedding over
    the vocabulary (a tied pair gets the same shard), and the LM head's name."""
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or id(head) not in names:
        raise PlanError(f"vocab_parallel: {type(model).__name__} has no output embeddings (LM head) to split")
    rules = [Rule(re.escape(names[id(head)]), "column", {}, "vocab_parallel", match="full")]
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, nn.Embedding) and id(embedding) in names:
        rules.append(Rule(re.escape(names[id(embedding)]), "vocab", {}, "vocab_parallel", match="full"))
    return rules, names[id(head)]


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


def _linear_modes(actions: dict[str, Action], kernels: str, sequence: Optional[SequenceParallelPlan],
                  head: Optional[str], logits_gather: Optional[LogitsGather],
                  wrapped: frozenset = frozenset()) -> dict[str, LinearMode]:
    """Each TP linear layer's mode, from every setting at once; the column layers outside sequence-parallel
    regions share one `InputCopies`; those in `wrapped` (under a LoRA layer) get an `AdapterCall`."""
    copies = InputCopies()
    inside = sequence.layers if sequence is not None else frozenset()
    modes: dict[str, LinearMode] = {name: RowMode(kernels, name in inside, split_input=actions[name].split_input,
                                                  adapter_call=AdapterCall() if name in wrapped else None)
                                    for name in tp_linear_names(actions, "row")}
    for name in tp_linear_names(actions, "column"):
        modes[name] = ColumnMode(kernels, name in inside, gather_output=actions[name].gather_output,
                                 logits_gather=logits_gather if name == head else None,
                                 input_copies=None if name in inside else copies,
                                 region_entry=sequence.entries.get(name) if sequence is not None else None,
                                 adapter_call=AdapterCall() if name in wrapped else None)
    return modes


def set_kernels(model: nn.Module, kernels: str) -> None:
    """Set every TP linear layer's `kernels` (one of `config.KERNELS`, described there) by swapping its whole
    mode."""
    for module in model.modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            module.set_mode(dataclasses.replace(module.mode, kernels=kernels))


def _resolve_actions(model: nn.Module, tp: int, dims: ModelDims, preset_model: Optional[str], partition_config: Any,
                     vocab_parallel: bool) -> tuple[dict[str, Action], str, Optional[str]]:
    """The plan's rules resolved into one action per layer, checked; with where the rules came from and the name of
    the vocabulary-parallel LM head (None without it)."""
    targets = collect_targets(model)
    strict = False
    if tp == 1:
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
    head = None
    if vocab_parallel:
        vocab_rules, head = _vocab_parallel_rules(model)
        rules = vocab_rules + rules
    actions = resolve_plan(targets, rules, dims, tp, strict=strict, param_names=direct_param_names(model))
    if "forward" in vars(model):
        _keep_head_whole(model, actions)
    if tp > 1:
        _check_plan_shards(actions, rules, source, tp)
        keep_ties(model, actions, targets, dims, tp)
    _check_family(model, dims, tp)
    return actions, source, head


def parallelize(model: nn.Module, tp_size: Optional[int] = None, tp_group=None, preset_model: Optional[str] = None,
                partition_config: Any = None, device_mesh=None, verbose: bool = True,
                kernels: str = "auto", vocab_parallel: Union[bool, str] = False,
                sequence_parallel: bool = False) -> nn.Module:
    """Shard `model` in place over the TP group and return it.

    `vocab_parallel`: True, False, or "auto" (on where `supports_vocab_parallel_loss(model)`, see
    `vocab_parallel`).

    `partition_config` is DeepSpeed's `partition_config` (dict or `PartitionConfig`) or an HF-style tp_plan
    (`{"layers.*.mlp.up_proj": "colwise", ...}`), like `parallelize_module`'s plan.

    A PEFT model (`peft.get_peft_model`) is planned by its transformers model's names and types, and its LoRA
    layers' adapters are split to follow their base layers (`lora.py`).
    """
    if getattr(model, "autotp_state", None) is not None:
        raise PlanError("model is already parallelized by autotp")
    if kernels not in KERNELS:  # the config's key is checked in config.py; this is the argument's check
        raise PlanError(f"kernels '{kernels}' is unknown; choose one of {list(KERNELS)}")
    if preset_model is not None and preset_model.lower() not in PRESETS:
        raise PlanError(f"preset_model '{preset_model}' is unknown; known: {sorted(PRESETS)}")
    if vocab_parallel not in (True, False, "auto"):
        raise PlanError(f"vocab_parallel must be true, false or 'auto', got {vocab_parallel!r}")
    groups = _resolve_groups(tp_size, tp_group, device_mesh)
    tp = groups.tp_size
    root = plan_root(model)  # a PeftModel is planned by its transformers model's names
    # Decided before peft's layers come out: an LM head under LoRA is no Linear, so "auto" keeps it whole.
    vocab_parallel = vocab_parallel_wanted(vocab_parallel, root, tp) and tp > 1
    sequence_parallel = sequence_parallel and tp > 1
    config = getattr(root, "config", None)
    dims = model_dims(config)
    slots = take_out_adapters(model, root)  # the plan sees the plain model; peft's layers come back below
    try:
        actions, source, head = _resolve_actions(root, tp, dims, preset_model, partition_config, vocab_parallel)
        if slots and tp > 1:  # the same plan on every rank; agreed anyway, so no rank is left waiting
            raise_on_every_rank(check_adapters(slots, actions, head, sequence_parallel), groups.tp_group)
        sequence = None
        if sequence_parallel:
            try:
                sequence = plan_sequence_parallel(root, actions)
            except ValueError as err:
                raise PlanError(f"sequence_parallel: {err}") from None
        logits_gather = LogitsGather() if vocab_parallel else None
        modes = _linear_modes(actions, kernels, sequence, head, logits_gather, wrapped_layers(slots, actions))

        state = TPState(groups, actions, source, dims)
        grad_sums = TPGradSums(groups.tp_group, groups.tp_rank, state.hooks)
        sharder = Sharder(root, groups, grad_sums)
        modules = dict(root.named_modules())
        local_shapes = {}
        if tp > 1:
            for name, action in actions.items():
                shape = sharder.apply(action, modules, modes.get(name))
                if shape is not None:
                    local_shapes[name] = shape
    finally:
        put_back_adapters(root, slots)
    model.autotp_state = root.autotp_state = state  # the merged model of `merge_and_unload` is `root`
    if tp > 1:
        _clear_input_copies(modes, root, state.hooks)
        stack = decoder_stack(root, tp_linear_names(actions, "row"))
        rng = enable_tp_dropout_streams(root, groups.tp_rank, state.hooks, stack[1] if stack else None)
        model.autotp_rng = rng  # checkpoints read it from the model the engine holds (a PeftModel: not `root`)
        enable_adapters(model, slots, actions, sharder, grad_sums, rng, state.hooks)
        if vocab_parallel:
            enable_vocab_parallel_loss(root)
        if sequence is not None:
            state.sequence_parallel = enable_sequence_parallel(root, sequence, groups.tp_group, rng, grad_sums)
        localise_attention(root, actions, dims, tp, groups.tp_rank, state.hooks)
    if verbose and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        logger.info("autotp plan (%s, tp=%d, rank 0 shapes):\n%s", source, tp, format_plan(actions, local_shapes))
    return model


def _keep_head_whole(model: nn.Module, actions: dict[str, Action]) -> None:
    """A forward replaced on the instance (TRL's fused LM head, Liger's fused cross-entropy) multiplies by
    `lm_head.weight` itself: a vocabulary shard of it would give a loss over 1/tp of the vocabulary, silently. The
    LM head (and an input embedding tied to it) stays whole on every TP rank, as DeepSpeed AutoTP keeps it."""
    names = {id(module): name for name, module in model.named_modules()}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    kept = [names[id(head)]] if head is not None and id(head) in names else []
    if kept and embedding is not None and getattr(embedding, "weight", None) is getattr(head, "weight", 0):
        kept.append(names[id(embedding)])
    kept = [name for name in kept if actions.pop(name, None) is not None]
    if kept and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        logger.warning("autotp: %s.forward is replaced on the instance and reads the LM head's weight itself; "
                       "kept whole on every TP rank: %s", type(model).__name__, ", ".join(kept))


def _clear_input_copies(modes: dict[str, LinearMode], model: nn.Module, hooks: list) -> None:
    """The column layers' shared input copies are emptied around every forward of the model."""
    for copies in {id(m.input_copies): m.input_copies for m in modes.values()
                   if isinstance(m, ColumnMode) and m.input_copies is not None}.values():
        hooks.append(model.register_forward_pre_hook(copies.clear))
        hooks.append(model.register_forward_hook(copies.clear))
