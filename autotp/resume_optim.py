"""Optimizer state in training checkpoints: this rank's fp32 master values and per-element state by parameter name
and range, and its load at any TP x DP layout and ZeRO stage.

Each rank's optimizer file (`optim_tp{t}_dp{d}.pt`) holds, for every (parameter name, start, length) range the
ZeRO store says this rank owns (`ZeroStore.optimizer_slices`), the master values and each per-element state
tensor (Adam's moments); per param group, the scalar state (the step count) and the group's settings. On load a
rank gathers the ranges it now owns from whichever files hold them, resharding over TP where the layout changed.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from .reshard import layout_from_data, reshard, stored_as_here
from .resume_files import CheckpointError, Reader
from .shard import full_shape_of, local_shape


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of an optimizer tensor (or its state) this rank holds: a ZeRO-3 DTensor's local shard (a view, so
    writes land in the DTensor); any other tensor itself. Ranges in `optimizer_slices` index this flat view."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def split_state(state: dict, numel: int) -> tuple[dict, dict]:
    """(per-element tensors, everything else) of one optimizer tensor's state."""
    elements, scalars = {}, {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.numel() == numel and value.ndim > 0:
            elements[key] = value
        else:
            scalars[key] = value
    return elements, scalars


def optimizer_payload(engine) -> dict:
    optimizer, store = engine.optimizer, engine.store
    slices = []
    for name, start, length, tensor, offset in store.optimizer_slices():
        elements, _ = split_state(optimizer.state.get(tensor, {}), tensor.numel())
        values = {"master": _local(tensor).detach().reshape(-1)[offset:offset + length].cpu().clone()}
        for key, value in elements.items():
            values[key] = _local(value).detach().reshape(-1)[offset:offset + length].cpu().clone()
        slices.append((name, start, length, values))
    scalars, element_keys, settings = [], [], []
    for group in optimizer.param_groups:
        first = next((p for p in group["params"] if p in optimizer.state), None)
        elements, scalar = split_state(optimizer.state[first], first.numel()) if first is not None else ({}, {})
        scalars.append(scalar)
        element_keys.append(sorted(elements))
        settings.append({k: v for k, v in group.items() if k != "params"})
    return dict(slices=slices, scalars=scalars, element_keys=element_keys, param_groups=settings)


def load_optimizer(engine, reader: Reader, meta: dict) -> None:
    old_tp, old_dp, tp_rank = meta["tp_size"], meta["dp_size"], engine.groups.tp_rank
    old_dp_files = old_dp if meta["zero_stage"] > 0 else 1

    def files_of(old_tp_rank: int):
        return [reader(f"optim_tp{old_tp_rank:02d}_dp{d:02d}.pt") for d in range(old_dp_files)]

    index: dict = {}  # (old tp rank, name) -> [(start, length, values)]
    indexed: set = set()

    def pieces(old_tp_rank: int, name: str):
        if old_tp_rank not in indexed:
            for payload in files_of(old_tp_rank):
                for pname, start, length, values in payload["slices"]:
                    index.setdefault((old_tp_rank, pname), []).append((start, length, values))
            indexed.add(old_tp_rank)
        found = index.get((old_tp_rank, name))
        if not found:
            raise CheckpointError(f"checkpoint '{reader.path}' holds no optimizer state for parameter '{name}'")
        return found

    def old_flat(old_tp_rank: int, name: str, numel: int) -> dict:
        out = {}
        if numel == 0:  # an empty shard (a TP rank holding no head) has no slice in any optimizer file
            return out
        for start, length, values in pieces(old_tp_rank, name):
            for key, value in values.items():
                out.setdefault(key, torch.empty(numel, dtype=value.dtype))[start:start + length] = value
        return out

    cache: dict = {}
    optimizer, store = engine.optimizer, engine.store
    param_of = dict(zip(store.names, store.params))

    def fetch(name: str, numel: int) -> dict:
        if name not in cache:
            cache.clear()  # one parameter at a time: slices of a parameter are consecutive
            target = param_of[name]
            if stored_as_here(name, meta, target, engine.groups.tp_size):
                cache[name] = old_flat(tp_rank, name, numel)
            else:
                info = meta["layouts"].get(name)
                if info is None:  # saved replicated: old TP rank 0 holds it whole (`reshard` reads only that)
                    full_shape = full_shape_of(target)
                    per_rank = [old_flat(0, name, int(torch.Size(full_shape).numel()))]
                else:
                    old_layout, full_shape = layout_from_data(info["layout"]), info["full_shape"]
                    per_rank = [old_flat(r, name, int(torch.Size(local_shape(old_layout, full_shape, r)).numel()))
                                for r in range(old_tp)]
                dtypes = {key: value.dtype for flat in per_rank for key, value in flat.items()}
                cache[name] = {key: reshard(name, meta, target, tp_rank,
                                             lambda r, k=key, d=dtype: per_rank[r].get(k, torch.empty(0, dtype=d))
                                             ).reshape(-1) for key, dtype in dtypes.items()}
        values = cache[name]
        if values["master"].numel() != numel:
            raise CheckpointError(f"checkpoint '{reader.path}': parameter '{name}' has {values['master'].numel()} "
                                  f"elements in this rank's shard, the model has {numel}")
        return values

    numel_of = {n: p.numel() for n, p in param_of.items()}
    saved_groups = reader(f"optim_tp{0:02d}_dp{0:02d}.pt")
    if len(saved_groups["param_groups"]) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint '{reader.path}' has {len(saved_groups['param_groups'])} optimizer "
                              f"param groups, this optimizer has {len(optimizer.param_groups)}")
    with torch.no_grad():
        for name, start, length, tensor, offset in store.optimizer_slices():
            if length == 0:  # an empty shard: its element state is created empty below
                continue
            values = fetch(name, numel_of[name])
            state = optimizer.state[tensor]
            _local(tensor).view(-1)[offset:offset + length].copy_(values["master"][start:start + length])
            for key, flat in values.items():
                if key == "master":
                    continue
                if key not in state:
                    state[key] = torch.zeros_like(tensor, dtype=flat.dtype, memory_format=torch.contiguous_format)
                _local(state[key]).view(-1)[offset:offset + length].copy_(flat[start:start + length])
        for group, settings, scalars, element_keys in zip(optimizer.param_groups, saved_groups["param_groups"],
                                                          saved_groups["scalars"], saved_groups["element_keys"]):
            group.update({k: v for k, v in settings.items() if k in group})
            for tensor in group["params"]:
                for key in element_keys:  # a partition of pure padding received no slice above
                    if key not in optimizer.state[tensor]:
                        optimizer.state[tensor][key] = torch.zeros_like(tensor)
                for key, value in scalars.items():
                    if torch.is_tensor(value):
                        value = value.clone()
                        if key == "step" and (group.get("fused") or group.get("capturable")):
                            # torch's fused and capturable Adam keep the step count on the parameter's device.
                            value = value.to(device=tensor.device, dtype=torch.float32)
                    optimizer.state[tensor][key] = value
    store.after_load()

