"""How one tensor is cut into TP shards and put back together. Pure tensor math, no communication.

A `ShardLayout` splits dimension `dim` of a tensor into consecutive blocks (sub-parameters such as the q, k and
v parts of a fused projection). Each block is split into `pieces` contiguous pieces in multiples of `unit`
(a head's width, so heads never straddle ranks). When a block has fewer pieces than TP ranks (KV heads under
GQA with num_key_value_heads < tp), `tp // pieces` consecutive ranks hold the same piece. A rank's shard is
the concatenation of its piece of every block.

A sharded parameter records its layout and unsharded shape once, through `mark_sharded`; `layout_of` reads it
back (checkpoints, resharding, the gradient norm's count-once weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


def split_sizes(total: int, parts: int, unit: int = 1) -> list[int]:
    """Sizes of `parts` contiguous pieces of `total` in multiples of `unit`; the first pieces take the rest."""
    units = total // unit
    base, extra = divmod(units, parts)
    return [(base + (1 if i < extra else 0)) * unit for i in range(parts)]


@dataclass(frozen=True)
class Block:
    size: int
    """Extent of this sub-parameter along the split dimension."""
    pieces: int
    """Distinct pieces it is cut into: tp normally; fewer when KV heads are replicated."""
    unit: int = 1
    """Granularity of the cut (head width for attention projections)."""


@dataclass(frozen=True)
class ShardLayout:
    dim: int
    blocks: tuple[Block, ...]
    tp_size: int
    view: tuple[int, ...] | None = None
    """Shape the tensor is viewed as before cutting (e.g. a 2-D expert weight seen as 3-D); None: as is."""

    @property
    def full_size(self) -> int:
        return sum(b.size for b in self.blocks)

    def piece_index(self, block: Block, rank: int) -> int:
        return rank // (self.tp_size // block.pieces)

    def local_ranges(self, rank: int) -> list[tuple[int, int]]:
        """(start, length) in the full split dimension of each block's piece held by `rank`."""
        ranges, offset = [], 0
        for block in self.blocks:
            sizes = split_sizes(block.size, block.pieces, block.unit)
            index = self.piece_index(block, rank)
            ranges.append((offset + sum(sizes[:index]), sizes[index]))
            offset += block.size
        return ranges

    def local_size(self, rank: int) -> int:
        return sum(length for _, length in self.local_ranges(rank))

    def local_index(self, rank: int) -> torch.Tensor:
        """Indices into the full split dimension of `rank`'s shard, in shard order."""
        return torch.cat([torch.arange(start, start + length) for start, length in self.local_ranges(rank)])

    @property
    def is_plain(self) -> bool:
        """One block split over every rank: the shard is a contiguous slice."""
        return len(self.blocks) == 1 and self.blocks[0].pieces == self.tp_size

    @property
    def is_even(self) -> bool:
        return len({self.local_size(r) for r in range(self.tp_size)}) == 1


def _as_view(tensor: torch.Tensor, layout: ShardLayout) -> torch.Tensor:
    return tensor.reshape(layout.view) if layout.view is not None else tensor


def original_dim(layout: ShardLayout, full_shape) -> int:
    """The dimension of the unviewed tensor that holds the view's split dimension.

    A view refines the original shape ([3q, H] seen as [3, q, H]); the split view dimension lies inside the
    original dimension whose running product first covers it.
    """
    if layout.view is None:
        return layout.dim % len(full_shape)
    view_prefix = 1
    for size in layout.view[: layout.dim + 1]:
        view_prefix *= size
    running = 1
    for index, size in enumerate(full_shape):
        running *= size
        if running >= view_prefix:
            return index
    raise ValueError(f"view {layout.view} does not refine shape {tuple(full_shape)}")


def local_shape(layout: ShardLayout, full_shape, rank: int) -> list[int]:
    shape = list(full_shape)
    dim = original_dim(layout, full_shape)
    shape[dim] = shape[dim] * layout.local_size(rank) // layout.full_size
    return shape


def shard_tensor(full: torch.Tensor, layout: ShardLayout, rank: int) -> torch.Tensor:
    """This rank's shard of `full`: a fresh contiguous tensor with the same number of dimensions."""
    view = _as_view(full, layout)
    parts = [view.narrow(layout.dim, start, length) for start, length in layout.local_ranges(rank)]
    shard = torch.cat(parts, dim=layout.dim) if len(parts) > 1 else parts[0].clone()
    return shard.reshape(local_shape(layout, full.shape, rank)).contiguous()


def unshard_tensor(shards: list[torch.Tensor], layout: ShardLayout, full_shape) -> torch.Tensor:
    """Inverse of `shard_tensor`: `shards[r]` is rank r's shard; replicated pieces are taken once."""
    view_shape = list(layout.view if layout.view is not None else full_shape)
    out = shards[0].new_empty(view_shape)
    for rank, shard in enumerate(shards):
        shard_view = list(view_shape)
        shard_view[layout.dim] = layout.local_size(rank)
        shard = shard.reshape(shard_view)
        cursor = 0
        for start, length in layout.local_ranges(rank):
            out.narrow(layout.dim, start, length).copy_(shard.narrow(layout.dim, cursor, length))
            cursor += length
    return out.reshape(full_shape)


class ParamShard(NamedTuple):
    """How a parameter is cut over TP: its layout and the shape of the unsharded tensor."""

    layout: ShardLayout
    full_shape: tuple[int, ...]


_SHARD_ATTRIBUTE = "_autotp_shard"  # the one attribute a sharded parameter carries; read only here


def mark_sharded(param: torch.Tensor, layout: ShardLayout, full_shape) -> None:
    """Record that `param` holds this rank's shard of a tensor of `full_shape` cut by `layout`."""
    setattr(param, _SHARD_ATTRIBUTE, ParamShard(layout, tuple(full_shape)))


def layout_of(param: torch.Tensor) -> Optional[ParamShard]:
    """(layout, full_shape) of a sharded parameter; None for one replicated over TP."""
    return getattr(param, _SHARD_ATTRIBUTE, None)


def full_shape_of(param: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape: the recorded one for a shard, the tensor's own for a replicated parameter."""
    shard = layout_of(param)
    return shard.full_shape if shard is not None else tuple(param.shape)
