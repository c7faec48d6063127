"""Dropout RNG streams under tensor parallelism.

Activations between a column layer's output and the next row layer's input are sharded over TP (attention
heads, MLP features): dropout there must draw different masks on each rank, or every shard repeats the same
pattern. Activations after a row layer are replicated: dropout there must draw the same mask on every TP rank,
or the replicas diverge. Without help, both use the default generator. Worse, a TP-local dropout whose tensor
differs in size between ranks (uneven heads) advances that generator by different amounts, and every later
replicated dropout then disagrees across ranks.

So TP-local regions run on a second, per-rank stream (Megatron's "model-parallel" RNG): the default generator's
state is swapped out when a column layer returns a sharded output and swapped back when a row layer starts (or
the decoder layer ends). The replicated stream is the default generator, untouched. Under sequence parallelism
every activation between the first decoder layer's scatter and the last one's gather is sharded (over features
or over the sequence), so the per-rank stream is pinned for the whole stack. Checkpoints save and restore the
per-rank stream (`state_dict`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .layers import ColumnParallelLinear, RowParallelLinear

TP_SEED_OFFSET = 2718


def _get(cuda: bool) -> torch.Tensor:
    return torch.cuda.get_rng_state() if cuda else torch.get_rng_state()


def _set(cuda: bool, state: torch.Tensor) -> None:
    if cuda:
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


class TPRandom:
    """The per-TP-rank dropout stream, swapped in for the default generator of the device that runs."""

    def __init__(self, seed: int, tp_rank: int):
        self.seed = seed + TP_SEED_OFFSET + tp_rank
        self.states: dict = {}  # "cpu" / "cuda" -> generator state while swapped out
        self.active: Optional[bool] = None  # None: default stream; else whether the swapped generator is CUDA's
        self.saved: Optional[torch.Tensor] = None
        self.pinned = False

    def _fresh(self, cuda: bool) -> torch.Tensor:
        if not cuda:
            return torch.Generator().manual_seed(self.seed).get_state()
        current = torch.cuda.get_rng_state()
        torch.cuda.manual_seed(self.seed)
        fresh = torch.cuda.get_rng_state()
        torch.cuda.set_rng_state(current)
        return fresh

    def enter(self, cuda: bool) -> None:
        if self.active is not None:
            return
        key = "cuda" if cuda else "cpu"
        if key not in self.states:
            self.states[key] = self._fresh(cuda)
        self.saved = _get(cuda)
        _set(cuda, self.states[key])
        self.active = cuda

    def exit(self) -> None:
        if self.active is None:
            return
        cuda = self.active
        self.states["cuda" if cuda else "cpu"] = _get(cuda)
        _set(cuda, self.saved)
        self.active, self.saved = None, None

    def pin(self, cuda: bool) -> None:
        """Stay on the per-rank stream until `unpin` (the layers' switches are ignored meanwhile)."""
        self.exit()
        self.enter(cuda)
        self.pinned = True

    def unpin(self) -> None:
        self.pinned = False
        self.exit()

    def state_dict(self) -> dict:
        self.exit()
        return {"seed": self.seed, "states": {k: v.clone() for k, v in self.states.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.exit()
        self.seed = state["seed"]
        self.states = {k: v.clone() for k, v in state["states"].items()}


def _first_tensor(value) -> Optional[torch.Tensor]:
    if torch.is_tensor(value):
        return value
    if isinstance(value, (tuple, list)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def enable_tp_dropout_streams(model: nn.Module, tp_rank: int, hooks: list,
                              stack: Optional[nn.ModuleList] = None, seed: Optional[int] = None) -> TPRandom:
    """Install the stream switches on a TP-sharded model (see the module docstring); returns the stream, also
    kept as `model.autotp_rng` for checkpoints. `stack`: the decoder layers, whose ends switch back to the
    replicated stream (None: the row layers' own switch suffices)."""
    rng = TPRandom(torch.initial_seed() if seed is None else seed, tp_rank)

    def to_local(module, args, output):
        tensor = _first_tensor(output)
        if tensor is not None and not rng.pinned:
            rng.enter(tensor.is_cuda)

    def to_replicated(*_):
        if not rng.pinned:
            rng.exit()

    def reset(*_):
        rng.unpin()

    for module in model.modules():
        if isinstance(module, ColumnParallelLinear) and not module.mode.gather_output:
            hooks.append(module.register_forward_hook(to_local))
        elif isinstance(module, RowParallelLinear):
            hooks.append(module.register_forward_pre_hook(to_replicated))
    for layer in stack if stack is not None else ():
        hooks.append(layer.register_forward_hook(to_replicated))

    # An exception mid-forward must not leave the next forward on the per-rank stream.
    hooks.append(model.register_forward_pre_hook(reset))
    hooks.append(model.register_forward_hook(reset))
    model.autotp_rng = rng
    return rng
