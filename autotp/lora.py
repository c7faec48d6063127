"""PEFT LoRA on a TP-sharded model: the base layers split by the usual plan, the adapters split to match.

`parallelize` takes peft's layers out of the model while it plans (`take_out_adapters`), so presets, tp_plans,
layer_specs and heuristics read the plain model's names and types (no `base_model.model.` prefix, no
`.base_layer`, and lora_A / lora_B are never targets), shards and swaps the base layers, and puts peft's own layer
objects back around them (`put_back_adapters`): `save_pretrained`, `merge_and_unload` and
`get_peft_model_state_dict` keep working on them. Then `enable_adapters` splits each adapter like its base layer
(R = TP ranks, M tokens, K input features, N output features, r the rank):

| base layer | base weight    | lora_A [r, K]        | lora_B [N, r]        | one collective, for base + adapter     |
|------------|----------------|----------------------|----------------------|----------------------------------------|
| column     | w_shard_n      | whole; grad summed   | b_shard_n (rows as   | the input copy: backward all-reduces   |
|            | [N/R, K]       | over TP              | the base, KV too)    | both paths' input gradients at once    |
| row        | w_shard_k      | a_shard_k [r, K/R]   | whole; grad summed   | the all-reduce of base + adapter       |
|            | [N, K/R]       | (columns as the base)| over TP              | partial outputs, then the bias once    |

The collective moves from the base layer to peft's layer: its pre-hook copies the input in (column) and `hand`s it
to the base's `AdapterCall`, so the base skips its own copy, or its all-reduce and bias (row), which the
forward hook then does on the sum. A column adapter's h = lora_A(x) [M, r] feeds only this rank's rows of lora_B,
so h's gradient is a partial sum: it flows on into x's gradient, which the input copy's one all-reduce sums with
the base's, and lora_A's gradient, partial too, is summed over TP by a hook (r*K elements per layer). A copy-to-TP
on h instead would make lora_A's gradient whole at once but x's adapter part whole on every rank, counted R times
by x's all-reduce, and it would move M*r elements, more than r*K whenever the M tokens outnumber K. A row
adapter's h = a_shard_k x_shard_k is partial on every rank, and so is lora_B's gradient, summed by a hook.

Dropout (`lora_dropout`): on a column layer the input is replicated, so its mask is drawn on the replicated stream
(the same on every TP rank, as the dense model's); on a row layer each rank drops its own input slice on the
per-rank stream (`rng.py`), the dense mask's distribution but not its values.

Layers the plan keeps whole keep their adapters whole (peft's forward is then exact on every rank); so do column
layers that gather their output and row layers that split their input. Anything else on a split layer (a LoRA
variant such as DoRA, LoRA on an embedding or on the vocabulary-parallel LM head, other tuners, modules_to_save,
sequence parallelism) raises `PlanError` on every rank. Adapters must be added before `parallelize`.
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass
from typing import Optional

import torch.nn as nn

from . import comm
from .grad_sync import TPGradSums
from .layers import ColumnParallelLinear, RowParallelLinear
from .plan import Action, PlanError
from .rng import TPRandom
from .shard import ShardLayout

ADAPTER_TAGS = ("lora_", "modules_to_save", "trainable_tokens_")
"""Substrings of the state-dict names of peft's adapter tensors (what its `get_peft_model_state_dict` keeps)."""


def _peft_loaded() -> bool:
    # A model holding peft layers has imported peft; without it there is nothing to look for (and no import cost).
    return "peft" in sys.modules


def is_peft_model(model: nn.Module) -> bool:
    if not _peft_loaded():
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


def plan_root(model: nn.Module) -> nn.Module:
    """The module whose names the plan reads: a PeftModel's transformers model, else the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


@dataclass
class AdapterSlot:
    """One peft layer (a tuner layer such as LoRA's, or a modules_to_save wrapper), out of the model while planning."""

    name: str
    """Its module path in the plan root: the plain model's name of the layer it wraps."""
    layer: nn.Module
    base: nn.Module
    """The module it wraps, in its place while the plan is made."""
    full_name: str
    """Its path in the model the user holds (`base_model.model....`), for messages."""


def _set_child(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _holder(layer: nn.Module) -> nn.Module:
    """The tuner layer whose `base_layer` is the plain module (itself unless tuner layers are nested)."""
    while hasattr(layer.base_layer, "base_layer"):
        layer = layer.base_layer
    return layer


def take_out_adapters(model: nn.Module, root: nn.Module) -> list[AdapterSlot]:
    """Replace every outermost peft layer under `root` by the module it wraps; `model` is what the user holds."""
    if not _peft_loaded():
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    prefix = next((name + "." for name, module in model.named_modules() if module is root and name), "")
    slots: list[AdapterSlot] = []
    for name, module in root.named_modules():
        if slots and name.startswith(slots[-1].name + "."):  # inside the last one (named_modules is prefix order)
            continue
        if isinstance(module, BaseTunerLayer):
            slots.append(AdapterSlot(name, module, module.get_base_layer(), prefix + name))
        elif isinstance(module, AuxiliaryTrainingWrapper):
            slots.append(AdapterSlot(name, module, module.original_module, prefix + name))
    for slot in slots:
        _set_child(root, slot.name, slot.base)
    return slots


def put_back_adapters(root: nn.Module, slots: list[AdapterSlot]) -> None:
    """Each peft layer back in its place, around the TP layer its base became (if it was swapped)."""
    for slot in slots:
        now = root.get_submodule(slot.name)
        if now is not slot.base:
            _holder(slot.layer).base_layer = now
        _set_child(root, slot.name, slot.layer)


def _unsupported(slot: AdapterSlot, action: Action, vocab_head: Optional[str], sequence_parallel: bool):
    """Why this peft layer cannot train on its split layer; None where it can."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    layer = slot.layer
    if not isinstance(layer, LoraLinear):
        what = "an embedding" if action.target.kind == "embedding" else f"a layer split {action.style}-wise"
        return f"only LoRA on Linear / Conv1D layers is split over TP, not {type(layer).__name__} on {what}"
    if layer.lora_variant:
        variants = sorted({type(v).__name__ for v in layer.lora_variant.values()})
        return f"LoRA variants ({', '.join(variants)}; e.g. DoRA, use_dora=True) have no TP forward"
    if _holder(layer) is not layer:
        return "nested tuner layers"
    if action.target.kind not in ("linear", "conv1d") or action.style not in ("column", "row"):
        summed = " with its gradient summed over TP" if action.grad_allreduce else ""
        return f"its base is '{action.style}'{summed} ({action.target.kind}), not a column- or row-parallel linear"
    if sequence_parallel:
        return "sequence parallelism (tensor_parallel.sequence_parallel) does not take LoRA layers yet"
    if action.target.name == vocab_head:
        return "the LM head is split over the vocabulary (set tensor_parallel.vocab_parallel_loss to false)"
    if action.layout.view is not None:
        return "a layer_specs 'shape' that reshapes the weight"
    if action.style == "row" and not action.split_input and any(layer.lora_bias.values()):
        return "lora_bias on a row-parallel layer (its bias would be added on every TP rank)"
    return None


def check_adapters(slots: list[AdapterSlot], actions: dict[str, Action], vocab_head: Optional[str],
                   sequence_parallel: bool) -> Optional[PlanError]:
    """The first peft layer the plan splits under it and that cannot follow, as an error naming it; else None.
    The plan is the same on every rank, and so is the answer."""
    for slot in slots:
        touched = [a for name, a in actions.items() if name == slot.name or name.startswith(slot.name + ".")]
        split = [a for a in touched if a.style != "skip" or a.grad_allreduce]
        if not split:
            continue  # kept whole: peft's forward is exact on every rank
        why = _unsupported(slot, split[0], vocab_head, sequence_parallel)
        if why is not None:
            return PlanError(f"autotp: {type(slot.layer).__name__} '{slot.full_name}' wraps a layer the plan splits "
                             f"({split[0].style}, {split[0].source}), which tensor parallelism does not support: "
                             f"{why}. Leave the layer out of the adapter's target_modules, or keep it whole on "
                             "every rank (a partition_config layer spec with partition_type 'skip')")
    return None


def wrapped_layers(slots: list[AdapterSlot], actions: dict[str, Action]) -> frozenset:
    """Names of the TP linear layers whose LoRA layer does their collective (their modes get an `AdapterCall`)."""
    names = set()
    for slot in slots:
        action = actions.get(slot.name)
        if action is None or action.target.kind not in ("linear", "conv1d"):
            continue
        if (action.style == "column" and not action.gather_output) or (action.style == "row" and
                                                                       not action.split_input):
            names.add(slot.name)
    return frozenset(names)


def _input_of(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["x"]


def _with_input(x, args: tuple, kwargs: dict):
    return ((x, *args[1:]), kwargs) if args else (args, dict(kwargs, x=x))


def _check_taken(call, slot: AdapterSlot) -> None:
    if not call.clear():
        raise RuntimeError(f"autotp: LoRA layer '{slot.full_name}' did not call its base layer on its own input, so "
                           "the base layer's TP collective did not run (a peft version autotp does not know?)")


def enable_adapters(model: nn.Module, slots: list[AdapterSlot], actions: dict[str, Action], sharder,
                    grad_sums: TPGradSums, rng: Optional[TPRandom], hooks: list) -> None:
    """Split each LoRA layer's adapters like its TP base layer and move the base's collective onto the LoRA layer
    (the module docstring's table); `model` (what the user holds) then refuses to save its adapter shards as if
    they were whole (`guard_adapter_save`). Call after `put_back_adapters`."""
    split = False
    for slot in slots:
        base = getattr(slot.layer, "base_layer", None)
        if not isinstance(base, (ColumnParallelLinear, RowParallelLinear)) or base.mode.adapter_call is None:
            continue
        action = actions[slot.name]
        if isinstance(base, ColumnParallelLinear):
            _column_adapters(slot, base, action, sharder, grad_sums, rng, hooks)
        else:
            _row_adapters(slot, base, action, sharder, grad_sums, rng, hooks)
        split = True
    if split:
        guard_adapter_save(model)


def _column_adapters(slot, base: ColumnParallelLinear, action: Action, sharder, grad_sums, rng, hooks) -> None:
    layer, call, group, copies = slot.layer, base.mode.adapter_call, base.tp_group, base.mode.input_copies
    # lora_B [N, r] (and its bias [N]) keep the base's output rows: blocks of a fused projection, replicated KV heads.
    rows = ShardLayout(0, action.layout.blocks, action.layout.tp_size)
    for key, lora_B in layer.lora_B.items():
        lora_B.weight = sharder.shard_param(lora_B.weight, rows, f"{slot.full_name}.lora_B.{key}.weight")
        lora_B.out_features = lora_B.weight.shape[0]
        if lora_B.bias is not None:
            lora_B.bias = sharder.shard_param(lora_B.bias, rows, f"{slot.full_name}.lora_B.{key}.bias")
        if action.kv_replicas > 1:
            for param in lora_B.parameters(recurse=False):
                grad_sums.sum_kv_replicas(param, rows)
        grad_sums.sum_replicated(layer.lora_A[key].weight)  # each rank's part comes from its own rows of lora_B

    def copy_in(module, args, kwargs):
        x = _input_of(args, kwargs)
        # Shared with the model's other column layers reading x (q, k, v): one all-reduce for all their gradients.
        x_copied = copies.copy(x, group) if copies is not None else comm.copy_to_tp(x, group)
        call.hand(x_copied)
        return _with_input(x_copied, args, kwargs)

    hooks.append(layer.register_forward_pre_hook(copy_in, with_kwargs=True))
    hooks.append(layer.register_forward_hook(lambda module, args, output: _check_taken(call, slot)))
    for dropout in layer.lora_dropout.values():
        if rng is not None and not isinstance(dropout, nn.Identity):
            # The base's output switched to the per-rank stream; x is replicated, so its mask is drawn on the
            # replicated one, the same on every TP rank.
            hooks.append(dropout.register_forward_pre_hook(lambda module, args: rng.exit()))
            hooks.append(dropout.register_forward_hook(lambda module, args, output: rng.enter(output.is_cuda)))


def _row_adapters(slot, base: RowParallelLinear, action: Action, sharder, grad_sums, rng, hooks) -> None:
    layer, call, group = slot.layer, base.mode.adapter_call, base.tp_group
    columns = ShardLayout(1, action.layout.blocks, action.layout.tp_size)  # lora_A [r, K]: the base's input columns
    for key, lora_A in layer.lora_A.items():
        lora_A.weight = sharder.shard_param(lora_A.weight, columns, f"{slot.full_name}.lora_A.{key}.weight")
        lora_A.in_features = lora_A.weight.shape[1]
        grad_sums.sum_replicated(layer.lora_B[key].weight)  # h = lora_A(x_shard_k) is a partial sum on each rank

    def hand(module, args, kwargs):
        call.hand(_input_of(args, kwargs))

    def reduce(module, args, y_partial):
        _check_taken(call, slot)
        y = comm.reduce_from_tp(y_partial, group)
        return y + base.bias if base.bias is not None else y

    hooks.append(layer.register_forward_pre_hook(hand, with_kwargs=True))
    hooks.append(layer.register_forward_hook(reduce))
    for dropout in layer.lora_dropout.values():
        if rng is not None and not isinstance(dropout, nn.Identity):
            # x_shard_k is this rank's slice: its own mask, on the per-rank stream (the base's pre-hook left it).
            hooks.append(dropout.register_forward_pre_hook(lambda module, args: rng.enter(args[0].is_cuda)))
            hooks.append(dropout.register_forward_hook(lambda module, args, output: rng.exit()))


def _save_pretrained_whole(model: nn.Module, save_directory, *args, **kwargs):
    """peft's `save_pretrained`, given the whole adapter (`state_dict`); without it, it would write this rank's
    shards."""
    if kwargs.get("state_dict") is None:
        raise RuntimeError("autotp: this PEFT model's adapters are split over tensor parallelism; save them with "
                           "autotp.save_pretrained(model, dir) or engine.save_pretrained(dir) (every rank calls it, "
                           "rank 0 writes), or pass state_dict=autotp.consolidated_adapter_state_dict(model) (a "
                           "collective) to model.save_pretrained on rank 0")
    return type(model).save_pretrained(model, save_directory, *args, **kwargs)


def guard_adapter_save(model: nn.Module) -> None:
    """A PeftModel whose adapters are split saves only a whole adapter (`_save_pretrained_whole`)."""
    if is_peft_model(model):
        model.save_pretrained = types.MethodType(_save_pretrained_whole, model)


def adapter_state_names(model: nn.Module) -> set[str]:
    """State-dict names of what peft's `save_pretrained` may write for `model`: adapter tensors, trainable
    parameters, biases when an adapter trains them (`bias` != "none"), and the embedding layers an adapter targets
    (peft's `save_embedding_layers="auto"`). The rest (the frozen base) need not be gathered to save the adapter."""
    from peft.utils.constants import EMBEDDING_LAYER_NAMES

    configs = list((getattr(model, "peft_config", None) or {}).values())
    biases = any(getattr(config, "bias", "none") != "none" for config in configs)
    embeddings = [name for name in EMBEDDING_LAYER_NAMES
                  if any(name in (getattr(config, "target_modules", None) or ()) for config in configs)]
    trainable = {name for name, param in model.named_parameters(remove_duplicate=False) if param.requires_grad}
    return {name for name in model.state_dict(keep_vars=True)
            if name in trainable or any(tag in name for tag in ADAPTER_TAGS)
            or (biases and name.endswith("bias")) or any(embedding in name for embedding in embeddings)}
