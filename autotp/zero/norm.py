"""Which share of the global gradient norm a rank's gradient elements carry.

The global L2 norm runs over every distinct value of the model once. A TP-sharded tensor is distinct on each TP
rank and counts fully; a tensor replicated over TP counts on TP rank 0 only; a piece replicated on `k` TP ranks
(KV heads when num_key_value_heads < tp) counts 1/k on each holder. Summing `weight * grad**2` over the ranks
of a TP group then gives each value exactly once.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from ..shard import layout_of


def count_once_weights(param: nn.Parameter, tp_rank: int) -> Union[float, torch.Tensor]:
    """A scalar weight for the whole local tensor, or a flat tensor of per-element weights (KV replicas)."""
    layout, full_shape = layout_of(param) or (None, None)
    if layout is None:
        return 1.0 if tp_rank == 0 else 0.0
    if all(block.pieces == layout.tp_size for block in layout.blocks):
        return 1.0
    shape = list(layout.view) if layout.view is not None else list(full_shape)
    shape[layout.dim] = layout.local_size(tp_rank)
    weights = torch.empty(shape, dtype=torch.float32, device=param.device)
    cursor = 0
    for block, (_, length) in zip(layout.blocks, layout.local_ranges(tp_rank)):
        weights.narrow(layout.dim, cursor, length).fill_(block.pieces / layout.tp_size)
        cursor += length
    return weights.reshape(-1)


def weighted_sumsq(grad: torch.Tensor, weight: Union[float, torch.Tensor]) -> torch.Tensor:
    g = grad.detach().reshape(-1).float()
    if isinstance(weight, float):
        return g.pow(2).sum() * weight
    return (g.pow(2) * weight).sum()


def merge_pieces(pieces: list[tuple]) -> tuple[list[tuple[int, int]], list[tuple]]:
    """Split (start, length, weight) pieces of one flat tensor into contiguous runs that count fully (weight 1.0,
    adjacent pieces merged) and the pieces that need their weight (fractions, per-element KV-replica weights);
    weight 0.0 pieces (replicated tensors on TP ranks > 0) are dropped."""
    runs: list[list[int]] = []
    weighted = []
    for start, length, weight in pieces:
        if isinstance(weight, float) and weight == 0.0:
            continue
        if isinstance(weight, float) and weight == 1.0:
            if runs and runs[-1][1] == start:
                runs[-1][1] = start + length
            else:
                runs.append([start, start + length])
            continue
        weighted.append((start, length, weight))
    return [(a, b) for a, b in runs], weighted


def runs_sumsq(flats: list[torch.Tensor], runs: list[list[tuple[int, int]]], weighted: list[list[tuple]],
               device) -> torch.Tensor:
    """sum(weight * g**2) over the pieces of `flats` given by `merge_pieces`: the full-weight runs go through
    one multi-tensor norm (a few kernels for the whole model), the rest piece by piece. One piece at a time
    took four kernels per parameter (pow, sum, weight, add: 300 launches per step for 75 parameters at TP=2 on
    the Llama-3-8B shape, and ~0.9 ms of host time in Python alone). Same sum, other fp32 summation order."""
    views = [flat.detach()[a:b] for flat, flat_runs in zip(flats, runs) for a, b in flat_runs]
    total = torch.zeros((), dtype=torch.float32, device=device)
    if views:
        norms = torch._foreach_norm([v if v.dtype == torch.float32 else v.float() for v in views])
        total = total + torch.stack(norms).square().sum()
    for flat, pieces in zip(flats, weighted):
        for start, length, weight in pieces:
            total = total + weighted_sumsq(flat[start:start + length], weight)
    return total
