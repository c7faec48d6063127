"""How ZeRO stage 3 cuts a model into FSDP2 units (`plan_units`), and the TP gradient hooks moved onto FSDP2's
unsharded parameters (`move_tp_grad_hooks`). See `fsdp.py` for the whole design."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor


def _outermost_module_lists(model: nn.Module) -> list[nn.ModuleList]:
    lists, prefixes = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p + ".") for p in prefixes):
            lists.append(module)
            prefixes.append(name)
    return lists


def plan_units(model: nn.Module, bucket: int, persistent: set) -> list[list[nn.Module]]:
    """The FSDP2 units below the root, in forward order: the input embedding, then decoder layers grouped while
    a group holds at most `bucket` elements. A module sharing a parameter with anything outside it stays in the
    root (FSDP2 shards a parameter in one unit only)."""
    uses: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1

    def numel_if_unit(module: nn.Module) -> int:
        inside: dict[int, int] = {}
        for _, param in module.named_parameters(remove_duplicate=False):
            inside[id(param)] = inside.get(id(param), 0) + 1
        if any(uses[key] != count for key, count in inside.items()):
            return 0
        return sum(p.numel() for p in module.parameters() if p not in persistent)

    units: list[list[nn.Module]] = []
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(embedding, nn.Module) and numel_if_unit(embedding):
        units.append([embedding])
    for blocks in _outermost_module_lists(model):
        group, size = [], 0
        for block in blocks:
            numel = numel_if_unit(block)
            if numel == 0:
                continue
            if group and size + numel > bucket:
                units.append(group)
                group, size = [], 0
            group.append(block)
            size += numel
        if group:
            units.append(group)
    return units


def move_tp_grad_hooks(model: nn.Module, fsdp_modules: list[FSDPModule], hooks_by_name: dict) -> None:
    """Give each sharded parameter's unsharded tensor (what forward and backward use) the tensor hooks its
    pre-FSDP parameter had. FSDP2 creates that tensor at its first all-gather and keeps it (only its storage is
    freed between uses), so one unshard per unit here sets it up; the hooks' dict is shared, so the TP state's
    handles still remove them."""
    moved = set()
    for module in fsdp_modules:
        module.unshard()
        for name, param in model.named_parameters():
            if name in hooks_by_name and name not in moved and not isinstance(param, DTensor):
                param._backward_hooks = hooks_by_name[name]  # the setter registers the dict with autograd
                moved.add(name)
        module.reshard()
    missing = sorted(set(hooks_by_name) - moved)
    if missing:
        raise RuntimeError(f"autotp ZeRO-3: the TP gradient hook of '{missing[0]}' found no unsharded parameter")
