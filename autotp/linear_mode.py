"""What decides a TP linear layer's forward and backward, given to it whole at construction.

`parallelize` knows every setting (kernels, sequence parallelism, the vocab-parallel loss) before it swaps a
module, so it builds each layer's mode once: a frozen `ColumnMode` or `RowMode`. A setting that changes later
(`initialize` applying the config's kernels to a model `parallelize` already sharded; the vocab-parallel loss
switched on for an LM head sharded without it) swaps the whole mode through `set_mode`, never a loose attribute.

A mode may point at state shared by several layers and changed per forward, each with one home:
  - `InputCopies`: one input copy per tensor per forward, shared by the column layers that read it;
  - `LogitsGather`: whether the vocab-parallel LM head gathers its logits in this call of its model;
  - `RegionEntry`: a sequence-parallel region's fused entry products, one per entry column layer;
  - `AdapterCall`: the input a PEFT LoRA layer wrapping this layer handed it, in this call (`lora.py`).
The mode fixes which of these a layer uses; what they hold lives for one forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch

from . import comm



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


class LogitsGather:
    """Whether the vocab-parallel LM head gathers its logits, decided per call of its model. A call with labels
    computes its loss from this rank's vocabulary slice and keeps the slice (`keep_slice`, set by the model's
    forward pre-hook for the call in flight and cleared by its forward hook); any other call gathers, and so does
    every call inside `full_logits` (`forced`: open blocks). One per model, in its head's `ColumnMode`."""

    def __init__(self):
        self.keep_slice = False
        self.forced = 0
        self.model_hooks: list = []
        """Handles of the model hooks that decide it (`enable_vocab_parallel_loss`); empty: not decided yet."""

    @property
    def gather(self) -> bool:
        return self.forced > 0 or not self.keep_slice


class RegionEntry:
    """The fused entry of one sequence-parallel region (attention, MLP): the region's pre-hook all-gathers the
    sequence under the GEMMs of its entry column layers (q, k, v; gate, up) and leaves each layer's product here
    (`hold`); a layer called on that gathered input takes its own, once (`take`). The region's forward hook drops
    what no layer took (`clear`), so nothing outlives the forward."""

    def __init__(self):
        self.layers: list = []
        """The entry column layers in the region's child order; filled when the region's hooks are installed."""
        self._x_full: Optional[torch.Tensor] = None
        self._products: dict[int, torch.Tensor] = {}

    def hold(self, x_full: torch.Tensor, products) -> None:
        self._x_full = x_full
        self._products = {id(layer): y for layer, y in zip(self.layers, products)}

    def take(self, layer, x: torch.Tensor) -> Optional[torch.Tensor]:
        if self._x_full is None or x is not self._x_full:
            return None
        return self._products.pop(id(layer), None)

    def clear(self, *unused) -> None:
        self._x_full, self._products = None, {}


class AdapterCall:
    """A TP linear layer wrapped by a PEFT LoRA layer (`lora.py`): the wrapper does the layer's collective for
    the base path and the adapter path together, once, so the gradients of the shared input (column) or the
    partial outputs (row) are summed before the one all-reduce. The wrapper's pre-hook `hand`s the layer the tensor
    it calls it on; a layer called on exactly that tensor `take`s it and skips its own input copy (column) or its
    all-reduce and bias (row); the wrapper's forward hook does them and `clear`s. Called on anything else (after
    peft's `merge_and_unload` dropped the wrapper), the layer does both itself."""

    def __init__(self):
        self._x: Optional[torch.Tensor] = None  # a strong reference: its identity cannot be reused meanwhile
        self._taken = False

    def hand(self, x: torch.Tensor) -> None:
        self._x, self._taken = x, False

    def take(self, x: torch.Tensor) -> bool:
        """Whether `x` is the tensor handed in this call (then the wrapper does the collective)."""
        handed = self._x is not None and x is self._x
        self._taken = self._taken or handed
        return handed

    def clear(self) -> bool:
        """End the wrapper's call; returns whether the layer took the handed tensor."""
        taken = self._taken
        self._x, self._taken = None, False
        return taken


@dataclass(frozen=True)
class LinearMode:
    """Settings common to column and row layers."""

    kernels: str = "auto"
    """One of `config.KERNELS` (described there), checked where it enters: the config key or `parallelize`."""
    sequence_parallel: bool = False
    """Inside a sequence-parallel region: the region gathers the sequence of the input (and reduces the input
    gradient); a row layer reduce-scatters its output over the sequence."""

    def describe(self) -> str:
        """The settings that differ from the defaults, for `extra_repr` (`kernels=triton, sequence_parallel`)."""
        return ", ".join(_setting(field.name, getattr(self, field.name)) for field in fields(self)
                         if getattr(self, field.name) != field.default)


def _setting(name: str, value) -> str:
    if value is True or isinstance(value, (RegionEntry, AdapterCall)):
        return name
    if isinstance(value, InputCopies):
        return f"{name}=shared"
    if isinstance(value, LogitsGather):
        return f"{name}=per_call"
    return f"{name}={value}"


@dataclass(frozen=True)
class ColumnMode(LinearMode):
    gather_output: bool = False
    """All-gather the output features (HF's `colwise_rep` / `colwise_gather_output`)."""
    logits_gather: Optional[LogitsGather] = None
    """The vocab-parallel LM head: gather the output or keep the vocabulary slice, decided per call."""
    input_copies: Optional[InputCopies] = None
    """Share the input's copy (and its gradient's all-reduce) with the model's other column layers; None: every
    call copies its own input. Not inside a sequence-parallel region, whose gather already reduces it."""
    region_entry: Optional[RegionEntry] = None
    """An entry layer of a sequence-parallel region: take the product the region computed while gathering."""
    adapter_call: Optional[AdapterCall] = None
    """Wrapped by a PEFT LoRA layer that copies the input in for the layer and its adapter together."""

    def __post_init__(self):
        if self.gather_output and self.logits_gather is not None:
            raise ValueError("a column layer either always gathers its output or decides per call, not both")
        if self.sequence_parallel and self.input_copies is not None:
            raise ValueError("a sequence-parallel column layer takes no input copy: the region's gather reduces "
                             "its input gradient")
        if self.region_entry is not None and (not self.sequence_parallel or self.gather_output):
            raise ValueError("only a sequence-parallel column layer without gather_output enters a region fused")
        if self.adapter_call is not None and (self.sequence_parallel or self.may_gather()):
            raise ValueError("a LoRA-wrapped column layer keeps its output sharded, outside sequence parallelism")

    def may_gather(self) -> bool:
        return self.gather_output or self.logits_gather is not None

    def gathers(self) -> bool:
        """Whether this call all-gathers the output."""
        return self.gather_output if self.logits_gather is None else self.logits_gather.gather


@dataclass(frozen=True)
class RowMode(LinearMode):
    split_input: bool = False
    """The input arrives whole: keep this rank's features first (HF's `rowwise_rep` / `rowwise_split_input`)."""
    adapter_call: Optional[AdapterCall] = None
    """Wrapped by a PEFT LoRA layer that adds its adapter's partial output, then all-reduces and adds the bias."""

    def __post_init__(self):
        if self.adapter_call is not None and (self.sequence_parallel or self.split_input):
            raise ValueError("a LoRA-wrapped row layer reads a sharded input and all-reduces, outside sequence "
                             "parallelism")
