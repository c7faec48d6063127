"""fp16 dynamic loss scaling with DeepSpeed's keys (loss_scale, initial_scale_power, loss_scale_window,
hysteresis, min_loss_scale). The overflow decision is made over every rank (DP x TP) so all ranks skip the same
steps (`unscale_or_skip`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .config import ConfigError


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank (one all-reduce over the default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class LossScaler:
    def __init__(self, loss_scale: float = 0.0, initial_scale_power: int = 16, loss_scale_window: int = 1000,
                 hysteresis: int = 2, min_loss_scale: float = 1.0):
        if loss_scale < 0:
            raise ConfigError(f"config key 'fp16.loss_scale' = {loss_scale}: must be >= 0 (0 means dynamic)")
        self.dynamic = loss_scale == 0
        self.scale = float(2 ** initial_scale_power) if self.dynamic else float(loss_scale)
        self.window = int(loss_scale_window)
        self.hysteresis = int(hysteresis)
        self.min_scale = float(min_loss_scale)
        self._hysteresis_left = self.hysteresis
        self._good_steps = 0
        self.skipped_steps = 0

    @classmethod
    def from_config(cls, section: dict) -> "LossScaler":
        keys = ("loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis", "min_loss_scale")
        return cls(**{k: section[k] for k in keys if k in section})

    def unscale_or_skip(self, grads: list[torch.Tensor], device) -> bool:
        """At a boundary, on the reduced (still scaled) gradients: whether they overflowed on any rank, agreed over
        every rank (then every rank skips the step); if not, divide them by the scale. Updates the scale either
        way. Reads one flag on the host per step."""
        overflow = _any_rank(any(not torch.isfinite(g).all() for g in grads), device)
        if not overflow:
            inv = 1.0 / self.scale
            for g in grads:
                g.mul_(inv)
        self.update(overflow)
        return overflow

    def update(self, overflow: bool) -> None:
        """After a step: halve on overflow (after `hysteresis` overflows), double after `window` clean steps."""
        if not self.dynamic:
            if overflow:
                self.skipped_steps += 1
            return
        if overflow:
            self.skipped_steps += 1
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
                self._hysteresis_left = self.hysteresis
            return
        self._good_steps += 1
        if self._good_steps % self.window == 0:
            self.scale *= 2.0
            self._hysteresis_left = self.hysteresis

    def state_dict(self) -> dict:
        return dict(scale=self.scale, good_steps=self._good_steps, hysteresis_left=self._hysteresis_left,
                    skipped_steps=self.skipped_steps)

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self._good_steps = state["good_steps"]
        self._hysteresis_left = state["hysteresis_left"]
        self.skipped_steps = state["skipped_steps"]
