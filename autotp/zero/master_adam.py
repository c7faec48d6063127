"""The optimizer step of ZeRO 0-3 on bf16 models as one kernel per bucket partition (stages 1, 2) or parameter
(stage 0; stage 3: each FSDP2 fp32 shard): `autotp_kernels.adam`.

torch's route from a reduced bf16 gradient to an updated bf16 weight is three passes (widen the gradient to fp32,
the fused Adam kernel, copy the master back to bf16): 44 bytes of traffic per element against the kernel's 28.
The kernel runs torch's own Adam/AdamW on torch's own state (`step`, `exp_avg`, `exp_avg_sq`, kept as torch's
fused implementation keeps them), so checkpoints, LR schedulers and a torch step taken later see one optimizer.

It takes the step only where that is torch's fused Adam/AdamW with nothing the kernel lacks: no amsgrad,
maximize, capturable or differentiable, no tensor hyperparameters, no step hooks, no `grad_scale` or
`found_inf` set by someone else; `tensor_parallel.kernels: torch` keeps torch's step. Elsewhere the store widens
the gradients and calls `optimizer.step()` as before.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.optim import optimizer as torch_optimizer

_OFF_OPTIONS = ("amsgrad", "maximize", "capturable", "differentiable")


def _triton_runs_on(device: torch.device) -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def local_of(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view of it), or the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _group_supported(group: dict) -> bool:
    if not group.get("fused") or any(group.get(option) for option in _OFF_OPTIONS):
        return False
    numbers = [group["lr"], group["eps"], group["weight_decay"], *group["betas"]]
    return not any(torch.is_tensor(value) for value in numbers)


class MasterAdam:
    """Runs `optimizer`'s update on (gradient, fp32 master, model-dtype weight) triples of a ZeRO store."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        # The step count of each master on the host, with the state tensor it mirrors and that tensor's version
        # counter: the kernel's bias corrections come from it (`adam_step`). A state tensor replaced (a checkpoint
        # load) or changed in place by someone else (torch's step when a step falls back to it) is read once.
        self._counts: dict[int, tuple[torch.Tensor, int, int]] = {}

    @classmethod
    def for_masters(cls, optimizer, masters: list[nn.Parameter], model_dtype: torch.dtype,
                    kernels: str) -> Optional["MasterAdam"]:
        """A `MasterAdam` when the store's step can run in the kernel (see the module docstring), else None.
        fp16 models keep torch's step: their gradients are unscaled in place before it, in fp32."""
        if kernels == "torch" or model_dtype != torch.bfloat16 or not masters:
            return None
        if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW):  # a subclass may change the update
            return None
        if not _triton_runs_on(masters[0].device):
            return None
        step = cls(optimizer)
        return step if step.applies() else None

    def applies(self) -> bool:
        """Whether this step can run in the kernel: rechecked every step, since hooks, a `grad_scale` or
        options can be set on the optimizer after the store was built."""
        opt = self.optimizer
        if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
            return False
        if (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks
                or torch_optimizer._global_optimizer_pre_hooks or torch_optimizer._global_optimizer_post_hooks):
            return False
        return all(_group_supported(group) for group in opt.param_groups)

    def _state(self, master: nn.Parameter) -> tuple[dict, int]:
        """torch's fused Adam state for `master`, created as its first step creates it, and its step count."""
        state = self.optimizer.state[master]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=master.device)
            state["exp_avg"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(master, memory_format=torch.preserve_format)
            self._counts[id(master)] = (state["step"], state["step"]._version, 0)
        elif state["step"].device != master.device or state["step"].dtype != torch.float32:
            # a state loaded for torch's non-fused step (a CPU count): kept where torch's fused step keeps it
            state["step"] = state["step"].to(device=master.device, dtype=torch.float32)
        step = state["step"]
        known = self._counts.get(id(master))
        if known is None or known[0] is not step or known[1] != step._version:  # set from outside: a sync, once
            known = (step, step._version, int(step.item()))
            self._counts[id(master)] = known
        return state, known[2]

    @torch.no_grad()
    def step(self, triples: list[tuple[torch.Tensor, nn.Parameter, Optional[torch.Tensor]]], grad_mul: float,
             grad_scale: Optional[torch.Tensor]) -> None:
        """One update of every (gradient, master, weight): the gradient, times `grad_mul` and divided by
        `grad_scale` (the folded clipping) when given, updates the master and its moments; the weight (the
        master's slice of the model's flat bucket, or the parameter itself; None for FSDP2's fp32 shards) receives
        the new master in the model's dtype. A DTensor master and its state are updated through their local
        shards. Gradient and weight are flat; shorter than the master, they cover its first elements and
        the rest is left as it is (a zero gradient's update of a zero master: nothing)."""
        if not triples:  # no gradient anywhere: torch's step does nothing either (its count included)
            self.optimizer._opt_called = True
            return
        from autotp_kernels.adam import adam_step

        # Looked up on every step: `optimizer.load_state_dict` replaces the group dicts the LR scheduler writes.
        group_of = {id(p): group for group in self.optimizer.param_groups for p in group["params"]}
        states = [self._state(master) for _, master, _ in triples]
        torch._foreach_add_([state["step"] for state, _ in states], 1.0)  # torch's count, kept for checkpoints
        for (grad, master, weight), (state, count) in zip(triples, states):
            self._counts[id(master)] = (state["step"], state["step"]._version, count + 1)
            group = group_of[id(master)]
            beta1, beta2 = group["betas"]
            decoupled = group.get("decoupled_weight_decay", isinstance(self.optimizer, torch.optim.AdamW))
            n = grad.numel()
            flat = [local_of(t.detach()).view(-1)[:n] for t in (master, state["exp_avg"], state["exp_avg_sq"])]
            adam_step(grad, *flat, weight, count + 1,
                      lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], decoupled=decoupled, grad_mul=grad_mul,
                      grad_scale=grad_scale)
        self.optimizer._opt_called = True  # what torch's LR schedulers check to know a step came before theirs
