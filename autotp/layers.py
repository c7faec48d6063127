"""Tensor-parallel modules: column- and row-parallel linear, vocabulary-parallel embedding, TP expert blocks.

Shapes (R = TP ranks, M tokens, K input features, N output features):

| layer            | weight held (Linear layout) | input            | output                          |
|------------------|-----------------------------|------------------|---------------------------------|
| column           | w_shard_n [N/R, K]          | x [M, K]         | y_shard_n [M, N/R] (or gathered) |
| row              | w_shard_k [N, K/R]          | x_shard_k [M, K/R] (or split here) | y [M, N] after all-reduce |

Conv1D (GPT-2) keeps its [K, N] layout so parameter names and orientation match the original model; the
shard metadata records which dimension was cut. Communication lives in `comm` (autograd pairs); these
modules only choose which pair runs where.
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import comm
from .shard import ShardLayout


KERNELS = ("auto", "torch", "triton")


def _linear(x, weight, bias, conv1d: bool, kernels: str = "torch"):
    if kernels == "triton":
        from autotp_kernels import triton_linear  # imported on use: triton is only needed for this path

        # Conv1D stores [in, out]; its transpose is an [out, in] view, no copy.
        return triton_linear(x, weight.t() if conv1d else weight, bias)
    if conv1d:
        out = torch.matmul(x, weight)
        return out + bias if bias is not None else out
    return F.linear(x, weight, bias)


def _fused_emulated() -> bool:
    """Whether `autotp_kernels.fused.TUNING.emulate` is on, read without importing the kernels: its environment
    variable, or the flag on the module when a caller has already imported it."""
    if os.environ.get("AUTOTP_FUSED_EMULATE") == "1":
        return True
    fused = sys.modules.get("autotp_kernels.fused")
    return fused is not None and fused.TUNING.emulate


class _ParallelLinear(nn.Module):
    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter], layout: ShardLayout, tp_group,
                 tp_rank: int, conv1d: bool, full_in: int, full_out: int):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.layout = layout
        self.tp_group = tp_group
        self.tp_rank = tp_rank
        self.conv1d = conv1d
        self.kernels = "torch"
        """GEMMs and collectives: `torch`, `triton` or `auto` (see `_fused_gemm`); set by `parallelize`."""
        self.sequence_parallel = False
        """Inside a sequence-parallel region: the region gathers the input; a row layer reduce-scatters its output."""
        self.full_in_features = full_in
        self.full_out_features = full_out
        # Linear-compatible attributes: HF code sometimes reads these (e.g. `module.in_features`).
        self.in_features = weight.shape[0] if conv1d else weight.shape[1]
        self.out_features = weight.shape[1] if conv1d else weight.shape[0]

    def _fused_gemm(self, x: torch.Tensor, comm_bytes: int) -> Optional[str]:
        """The GEMM to run under a fused collective (`cublas` or `triton`), or None for GEMM then NCCL.

        Fused needs CUDA and a TP group of 2-8 ranks; `triton` always fuses, `auto` from TUNING.min_bytes of
        traffic up (no crossover is measured yet, so by default `auto` keeps cuBLAS then NCCL)."""
        if self.kernels == "torch" or self.layout.tp_size == 1:
            return None
        if not x.is_cuda and not _fused_emulated():
            return None  # fused ops need CUDA peer memory: on the CPU nothing imports the kernel package (triton)
        from autotp_kernels import fused, symm  # imported on use: triton is only needed for this path

        if self.kernels == "auto" and comm_bytes < fused.TUNING.min_bytes:
            return None
        if not (x.is_cuda and symm.available(self.tp_group)) and not fused.TUNING.emulate:
            return None
        return "triton" if self.kernels == "triton" else "cublas"

    def extra_repr(self) -> str:
        return (f"{type(self).__name__.replace('ParallelLinear', '').lower()}: tp_rank={self.tp_rank}/"
                f"{self.layout.tp_size}, local={tuple(self.weight.shape)}, unsharded_in={self.full_in_features}, "
                f"unsharded_out={self.full_out_features}, bias={self.bias is not None}"
                + (", conv1d" if self.conv1d else "") + (", kernels=triton" if self.kernels == "triton" else ""))


class InputCopies:
    """One `copy_to_tp` per input tensor per forward, shared by the column layers that read it (q, k and v; gate
    and up): autograd sums their input gradients into the one copy, whose backward then all-reduces once. On
    Llama that is 2 all-reduces per decoder layer in backward instead of 5 (on H200 at TP=4, 58 all-reduces took
    37 ms of a 108 ms step; bench/results/profile_tp4.md). Summing before the all-reduce is exact algebra: the
    all-reduce is linear. `parallelize` gives every column layer of a model the same instance and clears it
    before and after each forward of the model, so nothing outlives the step's graph."""

    def __init__(self):
        self._entries: dict = {}

    def copy(self, x: torch.Tensor, group) -> torch.Tensor:
        key = id(group)
        hit = self._entries.get(key)
        # The very tensor object, unmodified, in the same grad mode: the strong reference held here keeps its
        # id from being reused until `clear`.
        if hit is not None and hit[0] is x and hit[1] == x._version and hit[2] == torch.is_grad_enabled():
            return hit[3]
        copied = comm.copy_to_tp(x, group)
        self._entries[key] = (x, x._version, torch.is_grad_enabled(), copied)
        return copied

    def clear(self, *unused) -> None:
        self._entries.clear()


class ColumnParallelLinear(_ParallelLinear):
    """Output features split over TP. forward: copy input, local GEMM, optionally all-gather the output;
    backward: all-reduce the input gradient."""

    autotp_input_copies: Optional[InputCopies] = None
    """Shared with the model's other column layers (see `InputCopies`); None: every call copies its own input."""

    def __init__(self, *args, gather_output: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gather_output = gather_output
        sizes = [self.layout.local_size(r) for r in range(self.layout.tp_size)]
        self.gather_sizes = sizes
        # Shards of a fused projection interleave by rank after the gather ([q0 k0 v0 | q1 k1 v1]); this
        # index puts the gathered features back in the original order, replicated KV pieces taken once.
        if gather_output and not self.layout.is_plain:
            order, offset = torch.empty(self.layout.full_size, dtype=torch.long), 0
            for rank in range(self.layout.tp_size):
                index = self.layout.local_index(rank)
                order[index] = torch.arange(offset, offset + len(index))
                offset += len(index)
            self.register_buffer("gather_order", order, persistent=False)
        else:
            self.gather_order = None

    def forward(self, x):
        entry = getattr(self, "autotp_entry_output", None)
        if entry is not None and entry[0] is x:
            # The sequence-parallel region computed this product while gathering its input (fused).
            self.autotp_entry_output = None
            return entry[1] + self.bias if self.bias is not None else entry[1]
        gemm = None if self.sequence_parallel else self._fused_gemm(x, x.numel() * x.element_size())
        if gemm is not None and not self.gather_output:
            from autotp_kernels.tp_linear import ColumnLinearGradAllReduce

            # The input gradient's all-reduce runs inside its GEMM, the weight gradient under its tail.
            return ColumnLinearGradAllReduce.apply(x, self.weight, self.bias, self.conv1d, self.tp_group, gemm)
        if not self.sequence_parallel:  # with it, the region's sequence gather reduces the input gradient
            copies = self.autotp_input_copies
            x = copies.copy(x, self.tp_group) if copies is not None else comm.copy_to_tp(x, self.tp_group)
        y_shard_n = _linear(x, self.weight, self.bias, self.conv1d, self.kernels)
        if not self.gather_output:
            return y_shard_n
        y = comm.gather_from_tp(y_shard_n, self.tp_group, self.gather_sizes)
        if self.gather_order is not None:
            y = y.index_select(-1, self.gather_order)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + (", gather_output" if self.gather_output else "")


class RowParallelLinear(_ParallelLinear):
    """Input features split over TP. forward: (optionally split the full input), local GEMM, all-reduce,
    add the bias once; backward: identity for the output gradient."""

    def __init__(self, *args, split_input: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.split_input = split_input
        self.split_sizes = [self.layout.local_size(r) for r in range(self.layout.tp_size)]
        if split_input and not self.layout.is_plain:
            self.register_buffer("input_index", self.layout.local_index(self.tp_rank), persistent=False)
        else:
            self.input_index = None

    def forward(self, x):
        if self.split_input:
            if self.input_index is None:
                x = comm.split_to_tp(x, self.tp_group, self.split_sizes)
            else:
                x = comm.copy_to_tp(x, self.tp_group).index_select(-1, self.input_index)
        if self.sequence_parallel:
            return self._forward_sequence_parallel(x)
        gemm = self._fused_gemm(x, self._output_bytes(x))
        if gemm is not None:
            from autotp_kernels.tp_linear import RowLinearAllReduce

            y = RowLinearAllReduce.apply(x, self.weight, self.conv1d, self.tp_group, gemm)
            return y + self.bias if self.bias is not None else y
        y_partial = _linear(x, self.weight, None, self.conv1d, self.kernels)
        y = comm.reduce_from_tp(y_partial, self.tp_group)
        return y + self.bias if self.bias is not None else y

    def _output_bytes(self, x) -> int:
        """Bytes of the unreduced output [..., N]: what the all-reduce or reduce-scatter moves."""
        return x[..., :1].numel() * self.out_features * x.element_size()

    def _forward_sequence_parallel(self, x):
        """x [B, S, K/R] (the region gathered the sequence) -> y [B, S/R, N]: the partial sums are reduce-scattered
        over the sequence here, so the rest of the region (residual dropout, adds) already runs on the shard."""
        from .sequence_parallel import SEQ_DIM, _ReduceScatterSequence  # sequence_parallel imports this module

        world = self.layout.tp_size
        gemm = self._fused_gemm(x, self._output_bytes(x))
        if gemm is not None and x.dim() == 3 and x.shape[SEQ_DIM] % world == 0:
            from autotp_kernels.tp_linear import RowLinearReduceScatter

            y_shard_s = RowLinearReduceScatter.apply(x, self.weight, self.conv1d, self.tp_group, gemm)
        else:
            y_partial = _linear(x, self.weight, None, self.conv1d, self.kernels)
            y_shard_s = _ReduceScatterSequence.apply(y_partial, self.tp_group)
        # Every rank adds the bias to its own rows; the bias gradient is summed over TP with the norms'.
        return y_shard_s + self.bias if self.bias is not None else y_shard_s

    def extra_repr(self) -> str:
        return super().extra_repr() + (", split_input" if self.split_input else "")


class VocabParallelEmbeddingMixin:
    """Mixed into the model's own embedding class (keeps subclass behaviour such as Gemma's scaling).

    The weight holds rows [vocab_start, vocab_start + rows) of the vocabulary. forward: ids outside the shard
    read row 0 and are zeroed, then the partial embeddings are all-reduced; backward: identity.
    """

    autotp_vocab_start: int
    autotp_group = None

    def forward(self, input_ids):
        rows = self.weight.shape[0]
        outside = (input_ids < self.autotp_vocab_start) | (input_ids >= self.autotp_vocab_start + rows)
        local_ids = (input_ids - self.autotp_vocab_start).masked_fill(outside, 0)
        partial = super().forward(local_ids)
        partial = partial.masked_fill(outside.unsqueeze(-1), 0.0)
        return comm.reduce_from_tp(partial, self.autotp_group)

    def extra_repr(self):
        return (super().extra_repr() + f", vocab_parallel: rows [{self.autotp_vocab_start}, "
                f"{self.autotp_vocab_start + self.weight.shape[0]}) of {self.autotp_full_rows}")


class ColumnParallelEmbeddingMixin:
    """Embedding dimension split over TP; forward gathers the full embedding (HF's `embedding_colwise`)."""

    autotp_group = None

    def forward(self, input_ids):
        return comm.gather_from_tp(super().forward(input_ids), self.autotp_group, self.autotp_sizes)

    def extra_repr(self):
        return super().extra_repr() + f", embedding_dim_parallel: unsharded={sum(self.autotp_sizes)}"


class ColumnParallelLinearLikeMixin:
    """A module of its own class whose 2-D `weight` [N, K] (and bias [N]) now holds this rank's output features:
    its forward runs unchanged on a copied-in input (backward: all-reduce of the input gradient) and returns
    y_shard_n [..., N/R], gathered to [..., N] when `autotp_gather_sizes` is set (gather_output)."""

    autotp_group = None
    autotp_gather_sizes = None

    def forward(self, x, *args, **kwargs):
        y_shard_n = super().forward(comm.copy_to_tp(x, self.autotp_group), *args, **kwargs)
        if self.autotp_gather_sizes is None:
            return y_shard_n
        return comm.gather_from_tp(y_shard_n, self.autotp_group, self.autotp_gather_sizes)

    def extra_repr(self):
        return super().extra_repr() + f"column_parallel: local={tuple(self.weight.shape)}"


class RowParallelLinearLikeMixin:
    """A module of its own class whose 2-D `weight` [N, K] now holds this rank's input features: it reads
    x_shard_k [..., K/R] and its partial outputs are all-reduced (backward: identity). Refused with a bias
    (`replace.py`): the module's own forward would add it on every rank."""

    autotp_group = None

    def forward(self, x_shard_k, *args, **kwargs):
        return comm.reduce_from_tp(super().forward(x_shard_k, *args, **kwargs), self.autotp_group)

    def extra_repr(self):
        return super().extra_repr() + f"row_parallel: local={tuple(self.weight.shape)}"


class TPExpertsMixin:
    """Experts whose intermediate dimension is split over TP (HF's `moe_tp_experts`).

    Each rank computes every routed expert on its slice of the intermediate features, so the output is a
    partial sum. forward: copy hidden states in, all-reduce the output; backward: all-reduce the input grad.
    Router indices pass through untouched; router weights are floating inputs and are copied in like the
    hidden states.
    """

    autotp_group = None

    def forward(self, hidden_states, *args, **kwargs):
        # Every floating input (hidden states and the router's top-k weights) feeds a partial sum on each
        # rank, so its gradient is partial too: copy in (all-reduce in backward).
        def copy_in(value):
            if torch.is_tensor(value) and value.is_floating_point():
                return comm.copy_to_tp(value, self.autotp_group)
            return value

        hidden_states = copy_in(hidden_states)
        args = tuple(copy_in(a) for a in args)
        kwargs = {k: copy_in(v) for k, v in kwargs.items()}
        out_partial = super().forward(hidden_states, *args, **kwargs)
        return comm.reduce_from_tp(out_partial, self.autotp_group)

    def extra_repr(self):
        return super().extra_repr() + f"tp_experts: intermediate split over {comm.group_size(self.autotp_group)}"


_MIXED_CLASSES: dict = {}


def mix_into(module: nn.Module, mixin: type) -> None:
    """Give `module` a class that runs `mixin`'s forward around its own (one cached class per pair)."""
    key = (mixin, type(module))
    if key not in _MIXED_CLASSES:
        base = type(module)
        _MIXED_CLASSES[key] = type(mixin.__name__.replace("Mixin", "") + "_" + base.__name__, (mixin, base), {})
    module.__class__ = _MIXED_CLASSES[key]
