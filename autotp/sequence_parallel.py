"""Sequence parallelism: between TP regions, activations are split over the sequence across the TP group.

Without it every TP rank runs the norms, residual adds and dropouts of every block on the whole sequence, so
activation memory does not shrink with TP. With it (Megatron's scheme, applied to an HF model in place):
  - the first decoder layer's input is split over the sequence (backward: all-gather);
  - each TP region (a module holding row-parallel layers: attention, MLP) all-gathers the sequence on entry
    (backward: reduce-scatter, which also sums its column layers' partial input gradients in one collective);
    its row layers reduce-scatter their partial sums themselves (backward: all-gather), so the region's tail
    (residual dropout) runs on the shard. With the fused kernels both ends run inside GEMMs: the entry gather
    under the entry column layers' GEMMs (`layers.gather_region_input`), the row layers' reduce-scatter inside
    theirs;
  - the last decoder layer's output is gathered again (the final norm and the LM head run on the whole sequence,
    which HF models need: several reshape to the input's shape after the final norm);
  - parameters replicated over TP that now see one sequence shard each (norms, row-layer biases) get their
    gradients all-reduced over TP.
Activations are [batch, sequence, hidden]; the sequence may be any length (uneven shards are gathered padded).

This module only decides where: `plan_sequence_parallel` finds the stack, the regions and their entry layers
from the plan before any module is swapped (the TP layers get `sequence_parallel` and their `RegionEntry` in
their modes), and `enable_sequence_parallel` hooks the swapped model. The collectives are `comm`'s sequence
pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

import torch.nn as nn

from . import comm
from .comm import SEQ_DIM
from .grad_sync import TPGradSums
from .layers import ColumnParallelLinear, gather_region_input
from .linear_mode import RegionEntry
from .plan import Action
from .rng import TPRandom
from .shard import layout_of


def tp_linear_names(actions: dict[str, Action], style: str) -> list[str]:
    """Names of the layers that become column (`style` "column") or row-parallel linear layers."""
    return [name for name, action in actions.items()
            if action.target.kind in ("linear", "conv1d") and action.style == style]


def decoder_stack(model: nn.Module, row_layers: Iterable[str]) -> Optional[tuple[str, nn.ModuleList]]:
    """The decoder layers: the longest ModuleList holding any of the (row-parallel) `row_layers`; None if none."""
    row_layers = list(row_layers)
    best = None
    for name, module in model.named_modules():
        prefix = name + "." if name else ""
        if isinstance(module, nn.ModuleList) and any(row.startswith(prefix) for row in row_layers):
            if best is None or len(module) > len(best[1]):
                best = (name, module)
    return best


@dataclass
class SequenceParallelPlan:
    """Where sequence parallelism applies, found from the plan's actions before any module is swapped."""

    stack: nn.ModuleList
    regions: dict[str, RegionEntry]
    """Region module name -> its fused entry (a module holding row-parallel layers: attention, MLP)."""
    layers: frozenset[str]
    """TP linear layers inside a region: their modes say `sequence_parallel`."""
    entries: dict[str, RegionEntry]
    """Entry column layer name -> its region's `RegionEntry`: the region's direct column children without
    gather_output (q, k, v; gate, up; GPT-2's c_attn, c_fc), which HF models call on the region's input."""


def plan_sequence_parallel(model: nn.Module, actions: dict[str, Action]) -> SequenceParallelPlan:
    if any(action.style == "experts" for action in actions.values()):
        raise ValueError("sequence parallelism does not support tensor-parallel MoE experts yet")
    rows = tp_linear_names(actions, "row")
    found = decoder_stack(model, rows)
    if found is None:
        raise ValueError("sequence parallelism needs decoder layers holding row-parallel layers; none found")
    stack_name, stack = found
    stack_prefix = stack_name + "." if stack_name else ""
    region_names = {row.rpartition(".")[0] for row in rows if row.startswith(stack_prefix)}
    regions = {name: RegionEntry() for name, _ in stack.named_modules(prefix=stack_name) if name in region_names}
    linear = tp_linear_names(actions, "column") + rows
    inside = frozenset(name for name in linear for region in regions if name.startswith(region + "."))
    entries = {name: regions[name.rpartition(".")[0]] for name in tp_linear_names(actions, "column")
               if name.rpartition(".")[0] in regions and not actions[name].gather_output}
    return SequenceParallelPlan(stack, regions, inside, entries)


def _hidden_states(args, kwargs):
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden_states(args, kwargs, value):
    if args:
        return (value,) + tuple(args[1:]), kwargs
    return args, {**kwargs, "hidden_states": value}


class SequenceParallelState:
    """What `enable_sequence_parallel` attached; the sequence length of the current forward lives here."""

    def __init__(self, group):
        self.group = group
        self.length: Optional[int] = None
        self.hooks: list = []


def enable_sequence_parallel(model: nn.Module, plan: SequenceParallelPlan, group, rng: Optional[TPRandom],
                             grad_sums: TPGradSums) -> SequenceParallelState:
    """Hook a model whose TP layers were built from `plan` (see the module docstring). `rng`: the per-TP-rank
    dropout stream, pinned for the whole stack (every activation there is sharded)."""
    state = SequenceParallelState(group)
    layers = plan.stack

    def scatter(module, args, kwargs):
        x = _hidden_states(args, kwargs)
        state.length = x.shape[SEQ_DIM]
        if rng is not None:
            rng.pin(x.is_cuda)
        return _replace_hidden_states(args, kwargs, comm.scatter_to_sequence(x, group))

    def gather_last(module, args, kwargs, output):
        # Modules after the decoder stack (final norm, reshapes to the input's shape, the LM head) see the whole
        # sequence again; they compute the same full gradient on every rank, so the backward keeps a slice.
        if rng is not None:
            rng.unpin()
        if isinstance(output, tuple):
            return (comm.gather_sequence(output[0], group, state.length, False),) + tuple(output[1:])
        return comm.gather_sequence(output, group, state.length, False)

    state.hooks.append(layers[0].register_forward_pre_hook(scatter, with_kwargs=True))
    for name, entry in plan.regions.items():
        region = model.get_submodule(name)
        entry.layers = [child for child in region.children()
                        if isinstance(child, ColumnParallelLinear) and child.mode.region_entry is entry]

        def gather_region(module, args, kwargs, entry=entry):
            x_full = gather_region_input(entry, _hidden_states(args, kwargs), group, state.length)
            return _replace_hidden_states(args, kwargs, x_full)

        state.hooks.append(region.register_forward_pre_hook(gather_region, with_kwargs=True))
        state.hooks.append(region.register_forward_hook(entry.clear))  # products a layer did not take
    state.hooks.append(layers[-1].register_forward_hook(gather_last, with_kwargs=True))
    _sum_replicated_grads(layers, grad_sums)
    return state


def _sum_replicated_grads(layers: nn.ModuleList, grad_sums: TPGradSums) -> None:
    """TP-replicated parameters of the decoder layers (norms, row-layer biases) see one sequence shard per rank:
    their gradients are summed over TP. Parameters that already get that sum (per-head norms) are skipped."""
    for module in layers.modules():
        for param in module.parameters(recurse=False):
            if param.requires_grad and layout_of(param) is None:
                grad_sums.sum_replicated(param)
