"""fp16 dynamic loss scaling with DeepSpeed's keys (loss_scale, initial_scale_power, loss_scale_window,
hysteresis, min_loss_scale). The overflow decision is made by the engine over every rank (DP x TP) so all
ranks skip the same steps."""

from __future__ import annotations

from .config import ConfigError


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
