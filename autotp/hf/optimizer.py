"""The optimizer a `Trainer` steps: the real optimizer behind autotp's ZeRO store.

The Trainer drives a step as `_clip_grad_norm` (or `_get_grad_norm`), `optimizer.step()`, `lr_scheduler.step()`,
`model.zero_grad()`. Gradients do not live in `param.grad` under autotp: the ZeRO store reduces them over DP into
fp32 buckets and masters. So the norm and the clipping run on the store (`prepare`: step.py's reduction, norm over
TP x DP, clip; a fused optimizer clips inside its step), and `step` finishes the engine's boundary step (optimizer
step, weights back to the model, gradients dropped). The learning-rate scheduler sees the real optimizer's
`param_groups`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..step import prepare_grads


class StoreOptimizer(torch.optim.Optimizer):
    """Wraps `optimizer` (whose param groups the ZeRO `store` took over). Not built through
    `torch.optim.Optimizer.__init__`: every optimizer attribute is the wrapped one's."""

    def __init__(self, optimizer: torch.optim.Optimizer, store, max_norm: float, device: torch.device,
                 loss_scaler=None):
        self.optimizer, self.store, self.max_norm, self.device = optimizer, store, max_norm, device
        self.loss_scaler = loss_scaler  # fp16: unscale, or skip the step on overflow (every rank alike)
        self.skipped = False
        self._norm: Optional[torch.Tensor] = None
        self._grad_scale: Optional[torch.Tensor] = None  # the clipping a fused optimizer applies in its step
        self._prepared = False

    # torch's Optimizer surface, forwarded (LR schedulers write `param_groups[i]["lr"]`)
    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def defaults(self):
        return self.optimizer.defaults

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"StoreOptimizer(stage={self.store.stage}, {self.optimizer!r})"

    # the step
    def prepare(self, clip: bool) -> Optional[torch.Tensor]:
        """Reduce over DP, (fp16) unscale, take the global norm, clip by `max_norm` when `clip`. Once per step;
        returns the norm before clipping (a device tensor), or None when fp16 overflowed and the step is skipped.
        With a fused torch optimizer the clipping is applied inside its `step` (`step.takes_grad_scale`), so the
        store's gradients read between the two are the unclipped ones, as under DeepSpeed, which clips in its
        engine's step."""
        if not self._prepared:
            step, self._norm, self._grad_scale = prepare_grads(
                self.store, self.loss_scaler, self.max_norm if clip else 0.0, self.device, self.optimizer)
            self.skipped, self._prepared = not step, True
        return self._norm

    def step(self, closure=None):
        if closure is not None:
            raise ValueError("autotp's Trainer optimizer takes no closure: the loss comes from the training step")
        self.prepare(clip=False)
        if not self.skipped:
            self.store.step(self._grad_scale)
        self._grad_scale = None
        self.store.zero_grad()
        self._prepared = False

    def zero_grad(self, set_to_none: bool = True):
        self.store.zero_grad()
        self._grad_scale = None
        self._prepared = False
