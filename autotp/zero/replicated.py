"""ZeRO stage 0: every DP rank holds the whole optimizer state of its TP shard; gradients are all-reduced.

With bf16/fp16 the optimizer updates fp32 master copies and gradients accumulate in fp32 on the masters, one
`add_` per parameter after each backward (the half-precision gradient is freed right away). On bf16 models the step
can run in one kernel per parameter (`master_adam.py`) that writes the bf16 weight too; with one micro-step per
step and DP = 1 it reads the bf16 gradient as it is, with no fp32 copy of it.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from ..step import step_with_scale
from .master_adam import MasterAdam
from .norm import count_once_weights, sumsq_of


def all_reduce_mean(grads: list[torch.Tensor], group, size: int, bucket_size: int) -> None:
    """Replace each of `grads` (one dtype) by its mean over `group` (`size` ranks), all-reduced in flat pieces of at
    most `bucket_size` elements (a larger tensor alone). Every rank must pass the same shapes in the same order."""
    start = 0
    while start < len(grads):
        end, numel = start, 0
        while end < len(grads) and (end == start or numel + grads[end].numel() <= bucket_size):
            numel += grads[end].numel()
            end += 1
        chunk = grads[start:end]
        flat = torch.cat([g.reshape(-1) for g in chunk])
        dist.all_reduce(flat, group=group)
        flat.div_(size)
        offset = 0
        for g in chunk:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        start = end


class ReplicatedState:
    """The `ZeroStore` of stage 0 (see `zero/__init__.py`)."""

    stage = 0

    def __init__(self, params: list[nn.Parameter], names: list[str], optimizer, groups, bucket_size: int,
                 mixed_precision: bool, kernels: str = "auto"):
        self.params = params
        self.names = names
        self.optimizer = optimizer
        self.groups = groups
        self.bucket_size = bucket_size
        self.masters = None
        if mixed_precision:
            self.masters = [nn.Parameter(p.detach().float().clone()) for p in params]
            master_of = {id(p): m for p, m in zip(params, self.masters)}
            for group in optimizer.param_groups:
                group["params"] = [master_of.get(id(p), p) for p in group["params"]]
        self._weights = [count_once_weights(p, groups.tp_rank) for p in params]
        self.hooks: list = []  # none: gradients are summed after backward (`end_backward`), not by hooks
        self.master_adam = None
        if self.masters is not None and all(p.is_contiguous() for p in params):  # the kernel writes them flat
            self.master_adam = MasterAdam.for_masters(optimizer, self.masters, params[0].dtype, kernels)
        self._reduce_now = False
        self._kernel_step = False  # whether this step reads the gradients `_kernel_grad` names

    @property
    def trained(self) -> list[nn.Parameter]:
        """The tensors the optimizer updates, in the order of `params`."""
        return self.masters if self.masters is not None else self.params

    # ---- backward ------------------------------------------------------------------------------------
    def begin_backward(self, reduce_now: bool) -> None:
        # A second backward before the step (two `engine.backward` calls, or a retained graph) must not sum into
        # a deferred bf16 gradient: that sum belongs in fp32 on the master, as torch's path makes it.
        if self.master_adam is not None:
            self._to_masters(defer=False)
        self._reduce_now = reduce_now

    def end_backward(self) -> None:
        # A window of one micro-step at DP = 1 with the kernel step to come: the bf16 gradient stays where it is
        # and the kernel reads it (an fp32 copy and its read were 6 of the 34 bytes per element of such a step).
        self._to_masters(defer=self.master_adam is not None and self._reduce_now and self.groups.dp_size == 1)

    def _to_masters(self, defer: bool) -> None:
        """Each parameter's half-precision gradient becomes (or joins) its master's fp32 one and is freed; with
        `defer`, one whose master has none yet stays on the parameter for the kernel step to read."""
        if self.masters is None:
            return
        for param, master in zip(self.params, self.masters):
            if param.grad is None or (defer and master.grad is None):
                continue
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad.float())
            param.grad = None

    def reduce(self) -> None:
        """Mean of gradients over DP in flat buckets of `bucket_size` elements per dtype."""
        self._kernel_step = self.master_adam is not None and self.master_adam.applies()
        if self.master_adam is not None and not self._kernel_step:
            self._to_masters(defer=False)  # what `end_backward` left for a kernel step that is not taken
        if self.groups.dp_size == 1:
            return
        buckets: dict = {}
        for param in self.trained:
            if param.grad is None:  # unused on this rank: contribute zeros so every rank sends the same bucket
                param.grad = torch.zeros_like(param)
            buckets.setdefault(param.grad.dtype, []).append(param.grad)
        for grads in buckets.values():
            all_reduce_mean(grads, self.groups.dp_group, self.groups.dp_size, self.bucket_size)

    def _kernel_grad(self, index: int):
        """The gradient the kernel step reads for parameter `index`: the master's fp32 one, or the deferred bf16
        one on the parameter, or None (unused: no update, as torch's step skips it)."""
        master = self.masters[index]
        return master.grad if master.grad is not None else self.params[index].grad

    # ---- step ----------------------------------------------------------------------------------------
    def _grad_list(self) -> list:
        """Per parameter, in the order of `params`, the gradient the step reads (None: unused)."""
        if self._kernel_step:
            return [self._kernel_grad(i) for i in range(len(self.params))]
        return [p.grad for p in self.trained]

    def grads(self) -> list[torch.Tensor]:
        """The optimizer's gradients (the masters' under bf16/fp16); when the kernel step takes this step, the
        ones it reads, some of them still the parameters' bf16 gradients (DP = 1: no mean to take)."""
        return [g for g in self._grad_list() if g is not None]

    def sumsq(self) -> torch.Tensor:
        """This rank's share of the squared global norm; the sum over all ranks is the whole. DP replicas hold
        the same gradient after the all-reduce, so only DP rank 0 contributes."""
        device = self.params[0].device if self.params else torch.device("cpu")
        if self.groups.dp_rank != 0:
            return torch.zeros((), dtype=torch.float32, device=device)
        return sumsq_of(((grad, weight) for grad, weight in zip(self._grad_list(), self._weights)
                         if grad is not None), device)

    def step(self, grad_scale) -> None:
        if self._kernel_step and not self.master_adam.applies():  # a hook or grad_scale set since `reduce`
            self._to_masters(defer=False)
            self._kernel_step = False
        if not self._kernel_step:
            step_with_scale(self.optimizer, grad_scale)
            self.after_step()
            return
        triples = [(grad.reshape(-1), master, param.data.view(-1))
                   for grad, master, param in zip(self._grad_list(), self.masters, self.params) if grad is not None]
        self.master_adam.step(triples, 1.0, grad_scale)  # writes the weights: no copy from the masters
        self._kernel_step = False

    def after_step(self) -> None:
        if self.masters is not None:
            with torch.no_grad():
                for param, master in zip(self.params, self.masters):
                    param.copy_(master)

    def zero_grad(self) -> None:
        self._kernel_step = False
        for p in list(self.params) + list(self.masters or []):
            p.grad = None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def writes_optimizer_file(self) -> bool:
        return self.groups.dp_rank == 0  # DP replicas hold identical state

    def optimizer_slices(self) -> list[tuple]:
        """(parameter name, start in its flat shard, length, optimizer tensor, start in that tensor's flat)."""
        return [(name, 0, t.numel(), t, 0) for name, t in zip(self.names, self.trained)]

    def after_load(self) -> None:
        self.after_step()

    def load_masters_from_model(self) -> None:
        """After loading weights without optimizer state: masters start from the loaded parameters."""
        if self.masters is not None:
            with torch.no_grad():
                for param, master in zip(self.params, self.masters):
                    master.copy_(param)
