"""Attention modules after their projections are split over heads: this rank's head counts, a config view that
reports them, and ALiBi biases / 4-D masks sliced to this rank's heads.

HF attention modules read their head counts from attributes (`num_heads`, `num_key_value_groups`, ...:
`presets.ATTENTION_ATTRIBUTES`) or from their config; both must say this rank's counts once q/k/v hold only its
heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .plan import Action, ModelDims, PlanError, local_heads
from .presets import ATTENTION_ATTRIBUTES, FAMILY_OPTIONS


def localise_attention(model: nn.Module, actions: dict[str, Action], dims: ModelDims, tp: int, rank: int,
                       hooks: list) -> None:
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
