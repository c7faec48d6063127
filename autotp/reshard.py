"""A saved tensor onto this model's shard: the same TP layout is copied as it is, any other is unsharded from the
old TP ranks' pieces and cut again. Layouts travel in a checkpoint as plain data (`layout_to_data`), so a
checkpoint never depends on autotp's classes.
"""

from __future__ import annotations

import torch

from .shard import (Block, ShardLayout, full_shape_of, layout_of, local_shape, shard_tensor,
                    unshard_tensor)


def layout_to_data(layout: ShardLayout) -> dict:
    return dict(dim=layout.dim, tp_size=layout.tp_size, view=list(layout.view) if layout.view else None,
                blocks=[[b.size, b.pieces, b.unit] for b in layout.blocks])


def layout_from_data(data: dict) -> ShardLayout:
    return ShardLayout(dim=data["dim"], tp_size=data["tp_size"], view=tuple(data["view"]) if data["view"] else None,
                       blocks=tuple(Block(*b) for b in data["blocks"]))


def stored_as_here(name: str, meta: dict, target: torch.Tensor, tp_size: int) -> bool:
    """Whether a TP rank's saved copy of `name` is this model's shard as it stands: the same TP size and the same
    layout (or replicated in both). A checkpoint saved with another sharding of a tensor (e.g. the embedding
    without `vocab_parallel_loss`) is resharded instead, so it does not depend on that flag."""
    if meta["tp_size"] != tp_size:
        return False
    info = meta["layouts"].get(name)
    layout, _ = layout_of(target) or (None, None)
    if info is None or layout is None:
        return info is None and layout is None
    return layout_to_data(layout) == info["layout"]


def reshard(name: str, meta: dict, target: torch.Tensor, tp_rank: int, old_shard) -> torch.Tensor:
    """`tp_rank`'s shard of `name` in the layout of `target` (this model's tensor), from `old_shard(r)` of every
    old TP rank (a tensor saved replicated: from `old_shard(0)`)."""
    info = meta["layouts"].get(name)
    if info is None:
        full = old_shard(0).reshape(full_shape_of(target))
    else:
        old_layout, full_shape = layout_from_data(info["layout"]), info["full_shape"]
        shards = [old_shard(r).reshape(local_shape(old_layout, full_shape, r)) for r in range(meta["tp_size"])]
        full = unshard_tensor(shards, old_layout, full_shape)
    layout, _ = layout_of(target) or (None, None)
    return shard_tensor(full, layout, tp_rank) if layout is not None else full

