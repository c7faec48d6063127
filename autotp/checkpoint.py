"""Full (unsharded) state dicts and HF model directories from a TP-sharded model.

Every rank of every TP group takes part in the gathers; only global rank 0 keeps the result. Directories are
written under a temporary name and renamed into place, so a crash never leaves a half-written model.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Optional

import torch
import torch.distributed as dist

from . import comm
from .collective_errors import raise_on_every_rank
from .lora import adapter_state_names, is_peft_model
from .shard import ShardLayout, layout_of, local_shape, unshard_tensor
from .zero.dp_shards import gather_dp


def _global_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def gather_full(tensor: torch.Tensor, layout: ShardLayout, full_shape, group) -> torch.Tensor:
    """All TP shards of `tensor` (uneven allowed) reassembled into the original tensor."""
    world = comm.group_size(group)
    shapes = [local_shape(layout, full_shape, r) for r in range(world)]
    numels = [int(torch.Size(s).numel()) for s in shapes]
    flat = tensor.detach().reshape(-1)
    pieces = comm.all_gather_raw(flat, group, numels, dim=0)
    shards, offset = [], 0
    for shape, numel in zip(shapes, numels):
        shards.append(pieces[offset:offset + numel].reshape(shape))
        offset += numel
    return unshard_tensor(shards, layout, full_shape)


def consolidated_state_dict(model: torch.nn.Module, group=None, to_cpu: bool = True,
                            names: Optional[set] = None) -> Optional[dict]:
    """The model's full state dict under its original names, on global rank 0; None elsewhere. `names`: only
    these entries (the same set on every rank: the others are not gathered)."""
    if getattr(model, "autotp_grid", None) is not None:  # 2-D TP: the grid's blocks, gathered over both axes
        from .parallel2d import consolidated_state_dict_2d

        full = consolidated_state_dict_2d(model)
        if _global_rank() != 0:
            return None
        return {name: (value.cpu().clone() if to_cpu else value) for name, value in full.items()
                if names is None or name in names}
    state = getattr(model, "autotp_state", None)
    if group is None and state is not None:
        group = state.groups.tp_group
    keep = _global_rank() == 0
    full: dict = {}
    done: dict[int, torch.Tensor] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if names is not None and name not in names:
            continue
        key = id(tensor)
        if key not in done:
            layout, full_shape = layout_of(tensor) or (None, None)
            # ZeRO-3 (zero/fsdp.py): a DTensor holds this DP rank's rows of its TP shard; gather them over DP
            # first (every rank, collective), then over TP as at stages 0-2. A plain tensor is returned as it is.
            local = gather_dp(tensor)
            if layout is not None and comm.group_size(group) > 1:
                value = gather_full(local, layout, full_shape, group)
            else:
                value = local
            done[key] = value.cpu().clone() if (keep and to_cpu) else value
        if keep:
            full[name] = done[key]
    return full if keep else None


def consolidated_adapter_state_dict(model: torch.nn.Module, group=None) -> Optional[dict]:
    """A PEFT model's adapter tensors (and whatever else peft's `save_pretrained` may write: `lora.
    adapter_state_names`) whole, under the model's state-dict names, on global rank 0; None elsewhere. The frozen
    base is not gathered. `model.save_pretrained(dir, state_dict=...)` on rank 0 then writes the adapter files a
    dense run writes. Collective over all ranks."""
    return consolidated_state_dict(model, group, names=adapter_state_names(model))


def atomic_directory(final_dir: str):
    """A temporary sibling directory to fill; `commit(tmp)` swaps it in place of `final_dir`."""
    parent = os.path.dirname(os.path.abspath(final_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix="." + os.path.basename(os.path.abspath(final_dir)) + ".tmp-", dir=parent)


def commit_directory(tmp_dir: str, final_dir: str) -> None:
    """Replace `final_dir` by `tmp_dir`: the old directory is moved aside first and removed last."""
    old = None
    if os.path.exists(final_dir):
        old = tmp_dir + ".old"
        os.rename(final_dir, old)
    os.rename(tmp_dir, final_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_pretrained(model: torch.nn.Module, save_dir: str, dtype: Optional[torch.dtype] = None,
                    **hf_kwargs) -> None:
    """An HF model directory (config + safetensors) loadable by `AutoModelForCausalLM.from_pretrained`
    without autotp; for a PEFT model, its adapter (adapter_config.json + adapter_model.safetensors, as peft writes
    it from a dense model). Collective over all ranks; rank 0 writes."""
    full = consolidated_adapter_state_dict(model) if is_peft_model(model) else consolidated_state_dict(model)
    error = None
    if full is not None:
        if dtype is not None:
            full = {k: v.to(dtype) if v.is_floating_point() else v for k, v in full.items()}
        tmp = atomic_directory(save_dir)
        try:
            model.save_pretrained(tmp, state_dict=full, safe_serialization=True, **hf_kwargs)
            commit_directory(tmp, save_dir)
        except Exception as err:  # report on every rank below instead of leaving the others waiting
            shutil.rmtree(tmp, ignore_errors=True)
            error = RuntimeError(f"save_pretrained('{save_dir}') failed on rank 0: {err!r}")
    raise_on_every_rank(error)
