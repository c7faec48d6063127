"""The optimizer step at a gradient-accumulation boundary, in order:
  1. the ZeRO store finishes the DP reduction (stage 0: bucketed all-reduce; 1/2: the reduce-scatters launched
     during backward) over the DP group only, since TP ranks hold different shards;
  2. fp16: overflow check over every rank (DP x TP) so all skip together; unscale (`LossScaler.unscale_or_skip`);
  3. global L2 norm over DP x TP: a TP-sharded tensor counts once per distinct shard (replicated KV pieces
     once), a replicated tensor once (from TP rank 0); clip by it: inside a fused torch optimizer's step
     (`takes_grad_scale`, `step_with_scale`), else by one multi-tensor multiply;
  4. optimizer step on fp32 master weights (or fp32 parameters); the store copies or all-gathers them back;
     the LR scheduler steps.
Nothing here reads a device value on the host (the fp16 overflow flag aside), so a bf16/fp32 step never waits
for the GPU.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.distributed as dist


def check_fused_collectives() -> None:
    """Raise if a fused TP collective timed out on this rank since the last step (its peers time out too, so
    every rank raises). Reads host state only (the watchdog records the error): no device sync."""
    symm = sys.modules.get("autotp_kernels.symm")
    if symm is not None:
        symm.check_errors()


def global_grad_norm(store) -> torch.Tensor:
    """The L2 norm of the whole model's gradient over DP x TP, each distinct value counted once (a device
    tensor)."""
    total = store.sumsq()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(total)  # every rank's share, DP x TP: each distinct value counted once
    return total.sqrt()


def clip_coef(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, max_norm / norm) on the device, as torch's clip_grad_norm_ (reading the norm on the host would stall
    the launch queue once per step while the GPU drains); 1 for a non-finite norm, which leaves the gradients as
    they are."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    return torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))


def clip_scale(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """1 / `clip_coef` without its rounding, for a fused optimizer's `grad_scale`: max(1, (norm + 1e-6) /
    max_norm); 1 for a non-finite norm. (A norm within a factor max_norm of fp32's largest value gives inf here, a
    zero update instead of a ~1e-38 one: training has diverged by then either way.)"""
    scale = ((norm + 1e-6) / max_norm).clamp(min=1.0)
    return torch.where(torch.isfinite(norm), scale, torch.ones_like(scale))


def clip_grads_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale `grads` so their global norm is at most `max_norm` (0: off), one multi-tensor launch."""
    if max_norm <= 0 or not grads:
        return
    torch._foreach_mul_(list(grads), clip_coef(norm, max_norm))


def takes_grad_scale(optimizer) -> bool:
    """Whether `optimizer.step()` divides the gradients by `optimizer.grad_scale` inside its own kernel: a torch
    optimizer whose every param group runs the fused implementation (what GradScaler relies on, marked by
    `_step_supports_amp_scaling`); the fused kernels also write the divided gradients back."""
    if optimizer is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    if getattr(optimizer, "grad_scale", None) is not None:  # someone else's scale is set: leave the step alone
        return False
    groups = getattr(optimizer, "param_groups", None)
    return bool(groups) and all(group.get("fused") for group in groups)


def prepare_grads(store, loss_scaler, max_norm: float, device: torch.device,
                  optimizer=None) -> tuple[bool, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Steps 1-3 above: (whether to step, the global gradient norm before clipping, the clipping to fold into
    `optimizer`'s step). With an `optimizer` that `takes_grad_scale`, the gradients are not multiplied here: the
    third item is the `grad_scale` (1 / coefficient) for `step_with_scale`, which clips inside the fused update.
    At TP=1 on H200 the separate multiply over the fp32 gradients cost 6.1 ms of a 163 ms step
    (bench/results/profile_tp1_*). fp16 overflow on some rank: (False, None, None) on every rank."""
    store.reduce()
    check_fused_collectives()
    grads = store.grads()
    if loss_scaler is not None and loss_scaler.unscale_or_skip(grads, device):
        return False, None, None
    norm = global_grad_norm(store)
    if max_norm > 0 and grads and takes_grad_scale(optimizer):
        return True, norm, clip_scale(norm, max_norm)
    clip_grads_(grads, norm, max_norm)
    return True, norm, None


def step_with_scale(optimizer, grad_scale: Optional[torch.Tensor]) -> None:
    """`optimizer.step()`, dividing the gradients by `grad_scale` inside it when given (GradScaler's protocol:
    the attribute is read by the fused step and removed after it)."""
    if grad_scale is None:
        optimizer.step()
        return
    optimizer.grad_scale = grad_scale
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale


def boundary_step(store, optimizer, lr_scheduler, loss_scaler, max_norm: float,
                  device: torch.device) -> Optional[torch.Tensor]:
    """Steps 1-4 above. Returns the global gradient norm before clipping (a device tensor), or None when fp16
    overflowed on some rank and every rank skipped the step. The caller zeroes the gradients either way."""
    step, norm, grad_scale = prepare_grads(store, loss_scaler, max_norm, device, optimizer)
    if not step:
        return None
    store.step(grad_scale)
    if lr_scheduler is not None:
        lr_scheduler.step()
    return norm
