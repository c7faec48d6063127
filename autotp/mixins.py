"""Tensor parallelism mixed into a model's own module classes: embeddings, linear-like modules, MoE experts.

Where a module must keep its own class (Gemma's scaled embedding, a custom projection, HF's fused experts), autotp
shards its weights in place and gives it a class that runs a mixin's forward around its own (`mix_into`). What
that forward needs is given once, with the class: a frozen `MixedShard`, kept as `module.tp_shard`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from . import comm


@dataclass(frozen=True)
class MixedShard:
    group: Any
    """The TP process group."""
    gather_sizes: Optional[tuple[int, ...]] = None
    """Every rank's share of the split features where the forward all-gathers its output (a column-parallel
    embedding; a column linear-like module with gather_output); None: the output stays sharded."""
    vocab_start: int = 0
    """A vocabulary-parallel embedding: the first vocabulary row this rank holds."""
    vocab_size: int = 0
    """A vocabulary-parallel embedding: the whole vocabulary's rows."""


class VocabParallelEmbeddingMixin:
    """Mixed into the model's own embedding class (keeps subclass behaviour such as Gemma's scaling).

    The weight holds rows [vocab_start, vocab_start + rows) of the vocabulary. forward: ids outside the shard
    read row 0 and are zeroed, then the partial embeddings are all-reduced; backward: identity.
    """

    tp_shard: MixedShard

    def forward(self, input_ids):
        start, rows = self.tp_shard.vocab_start, self.weight.shape[0]
        outside = (input_ids < start) | (input_ids >= start + rows)
        local_ids = (input_ids - start).masked_fill(outside, 0)
        partial = super().forward(local_ids)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_tp(partial, self.tp_shard.group)

    def extra_repr(self):
        start = self.tp_shard.vocab_start
        return (super().extra_repr() + f", vocab_parallel: rows [{start}, {start + self.weight.shape[0]}) of "
                f"{self.tp_shard.vocab_size}")


class ColumnParallelEmbeddingMixin:
    """Embedding dimension split over TP; forward gathers the full embedding (HF's `embedding_colwise`)."""

    tp_shard: MixedShard

    def forward(self, input_ids):
        return comm.gather_from_tp(super().forward(input_ids), self.tp_shard.group, self.tp_shard.gather_sizes)

    def extra_repr(self):
        return super().extra_repr() + f", embedding_dim_parallel: unsharded={sum(self.tp_shard.gather_sizes)}"


class ColumnParallelLinearLikeMixin:
    """A module of its own class whose 2-D `weight` [N, K] (and bias [N]) now holds this rank's output features:
    its forward runs unchanged on a copied-in input (backward: all-reduce of the input gradient) and returns
    y_shard_n [..., N/R], gathered to [..., N] when `tp_shard.gather_sizes` is set (gather_output)."""

    tp_shard: MixedShard

    def forward(self, x, *args, **kwargs):
        group, sizes = self.tp_shard.group, self.tp_shard.gather_sizes
        y_shard_n = super().forward(comm.copy_to_tp(x, group), *args, **kwargs)
        return y_shard_n if sizes is None else comm.gather_from_tp(y_shard_n, group, sizes)

    def extra_repr(self):
        return super().extra_repr() + f"column_parallel: local={tuple(self.weight.shape)}"


class RowParallelLinearLikeMixin:
    """A module of its own class whose 2-D `weight` [N, K] now holds this rank's input features: it reads
    x_shard_k [..., K/R] and its partial outputs are all-reduced (backward: identity). Refused with a bias
    (`swap.py`): the module's own forward would add it on every rank."""

    tp_shard: MixedShard

    def forward(self, x_shard_k, *args, **kwargs):
        return comm.reduce_from_tp(super().forward(x_shard_k, *args, **kwargs), self.tp_shard.group)

    def extra_repr(self):
        return super().extra_repr() + f"row_parallel: local={tuple(self.weight.shape)}"


class TPExpertsMixin:
    """Experts whose intermediate dimension is split over TP (HF's `moe_tp_experts`).

    Each rank computes every routed expert on its slice of the intermediate features, so the output is a
    partial sum. forward: copy hidden states in, all-reduce the output; backward: all-reduce the input grad.
    Router indices pass through untouched; router weights are floating inputs and are copied in like the
    hidden states.
    """

    tp_shard: MixedShard

    def forward(self, hidden_states, *args, **kwargs):
        group = self.tp_shard.group

        # Every floating input (hidden states and the router's top-k weights) feeds a partial sum on each
        # rank, so its gradient is partial too: copy in (all-reduce in backward).
        def copy_in(value):
            if torch.is_tensor(value) and value.is_floating_point():
                return comm.copy_to_tp(value, group)
            return value

        hidden_states = copy_in(hidden_states)
        args = tuple(copy_in(a) for a in args)
        kwargs = {k: copy_in(v) for k, v in kwargs.items()}
        out_partial = super().forward(hidden_states, *args, **kwargs)
        return comm.reduce_from_tp(out_partial, group)

    def extra_repr(self):
        return super().extra_repr() + f"tp_experts: intermediate split over {comm.group_size(self.tp_shard.group)}"


_MIXED_CLASSES: dict = {}


def mix_into(module: nn.Module, mixin: type, shard: MixedShard) -> None:
    """Give `module` a class that runs `mixin`'s forward around its own (one cached class per pair), reading
    `shard`."""
    key = (mixin, type(module))
    if key not in _MIXED_CLASSES:
        base = type(module)
        _MIXED_CLASSES[key] = type(mixin.__name__.replace("Mixin", "") + "_" + base.__name__, (mixin, base), {})
    module.tp_shard = shard
    module.__class__ = _MIXED_CLASSES[key]
