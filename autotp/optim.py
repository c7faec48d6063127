"""Optimizers and learning-rate schedules: the config's `optimizer` / `scheduler` sections, or the user's own,
pointed at the sharded model (`prepare_optimizer`, `prepare_scheduler`).

Schedules follow DeepSpeed's definitions of WarmupLR, WarmupDecayLR and WarmupCosineLR (the formulas, in
our own code). Scheduler step k gives the formula at k (torch convention); DeepSpeed applies it one
optimizer step later during warm-up.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn

from .config import ConfigError, OptimizerConfig, SchedulerConfig


def shards_by_id(unsharded: list[tuple[str, nn.Parameter]], model: nn.Module) -> dict[int, nn.Parameter]:
    """id of each parameter the model had before sharding (`unsharded`: its named_parameters then) -> the
    trainable parameter under the same name now (its TP shard). Frozen parameters are left out."""
    now = dict(model.named_parameters())
    trainable = {id(param) for param in now.values() if param.requires_grad}
    return {id(param): now[name] for name, param in unsharded if name in now and id(now[name]) in trainable}


def onto_shards(params, shards: dict[int, nn.Parameter]) -> list:
    """`params` (the model's before sharding) as the trainable parameters now under their names. Frozen ones are
    dropped: they never train, and the optimizer would keep a split weight's whole original alive (a PEFT model
    given as `AdamW(model.parameters())`: its entire base model, unsharded, on every rank)."""
    return [shards.get(id(p), p) for p in params if id(p) in shards or p.requires_grad]


def remap_optimizer(optimizer, shards: dict[int, nn.Parameter]) -> None:
    """Point an optimizer built on the unsharded parameters at their shards (or fp32 masters)."""
    for group in optimizer.param_groups:
        group["params"] = onto_shards(group["params"], shards)
    if any(optimizer.state.values()):
        raise ConfigError("the optimizer passed to autotp.initialize already holds state; build it before "
                          "training starts (its state cannot be sharded)")
    optimizer.state.clear()


def prepare_optimizer(optimizer, spec: Optional[OptimizerConfig], unsharded: list[tuple[str, nn.Parameter]],
                      model: nn.Module, model_parameters=None):
    """The optimizer over the sharded model, from what `initialize` got, as DeepSpeed takes it:
      - a callable building one (`optimizer=lambda params: ...`): called on the shards of `model_parameters`
        (default: all parameters);
      - a built torch optimizer: its param groups remapped onto the shards (`remap_optimizer`), and a plain
        Adam/AdamW switched to torch's fused kernel on CUDA (`prefer_fused`);
      - none, with the config's `optimizer` section (`spec`): built on the shards of `model_parameters` (a list
        of parameters or of param-group dicts; default: all trainable parameters);
      - none at all: None (an evaluation engine).
    `unsharded` is the model's named_parameters before sharding."""
    shards = shards_by_id(unsharded, model)
    original = [param for _, param in unsharded]
    if optimizer is not None and not callable(getattr(optimizer, "step", None)) and callable(optimizer):
        return optimizer(onto_shards(model_parameters or original, shards))
    if optimizer is not None:
        remap_optimizer(optimizer, shards)
        prefer_fused(optimizer)
        return optimizer
    if spec is None:
        return None
    source = list(model_parameters if model_parameters is not None else original)
    if source and isinstance(source[0], dict):
        source = [dict(group, params=[shards.get(id(p), p) for p in group["params"]]) for group in source]
    else:
        source = [shards.get(id(p), p) for p in source if getattr(p, "requires_grad", True)]
    return build_optimizer(spec, source)


def prepare_scheduler(lr_scheduler, spec: Optional[SchedulerConfig], optimizer):
    """The LR scheduler: a callable is called on the optimizer, a built one is kept, else the config's
    `scheduler` section (`spec`) is built, else None. Call it after the ZeRO store took over the optimizer's
    param groups."""
    if optimizer is None:
        if lr_scheduler is not None or spec is not None:
            raise ConfigError("a learning-rate scheduler needs an optimizer: pass optimizer= to autotp.initialize "
                              "or set the config key 'optimizer'")
        return None
    if lr_scheduler is not None and not hasattr(lr_scheduler, "step") and callable(lr_scheduler):
        return lr_scheduler(optimizer)
    if lr_scheduler is None and spec is not None:
        return build_scheduler(spec, optimizer)
    return lr_scheduler


def fused_by_default(tensors) -> bool:
    """torch's fused Adam/AdamW (one kernel per batch of tensors) where every tensor is a floating-point CUDA
    tensor; foreach, torch's CUDA default, makes several passes over the same memory. (The engine builds the
    optimizer on the bf16 model parameters and the ZeRO store then swaps in fp32 masters, which fused takes too.)"""
    return bool(tensors) and all(t.device.type == "cuda" and t.dtype in _FUSED_DTYPES for t in tensors)


_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def prefer_fused(optimizer) -> bool:
    """Switch a user-built torch Adam/AdamW to torch's fused kernel where the user left `fused` and `foreach`
    unset, every parameter is a floating CUDA tensor and no step has run yet (`build_optimizer` applies it to the
    config's `optimizer` section too). On H200 at TP=2 the foreach path's passes over the fp32 masters took ~33 ms
    of a 132 ms step (issue 19's profile). Same update, same hyper-parameters; any other optimizer, or an explicit
    choice, is left alone. Returns whether it switched."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return False
    groups = optimizer.param_groups
    if any(g.get("fused") is not None or g.get("foreach") is not None or g.get("differentiable") for g in groups):
        return False
    if not fused_by_default([p for g in groups for p in g["params"]]):
        return False
    for group in groups:
        group["fused"], group["foreach"] = True, False
    optimizer.defaults.update(fused=True, foreach=False)
    optimizer._step_supports_amp_scaling = True  # what Adam.__init__ sets for fused
    return True


def build_optimizer(spec: OptimizerConfig, params) -> torch.optim.Optimizer:
    params_cfg = dict(spec.params)
    kind = spec.type.lower()
    try:
        if kind == "adam":
            # DeepSpeed's "Adam" applies decoupled weight decay (AdamW) unless adam_w_mode is false.
            adam_w_mode = params_cfg.pop("adam_w_mode", True)
            params_cfg.pop("torch_adam", None)
            cls = torch.optim.AdamW if adam_w_mode else torch.optim.Adam
            if cls is torch.optim.AdamW:
                params_cfg.setdefault("weight_decay", 0.0)
            optimizer = cls(params, **params_cfg)
        elif kind == "adamw":
            optimizer = torch.optim.AdamW(params, **params_cfg)
        else:
            optimizer = torch.optim.SGD(params, **params_cfg)
    except TypeError as err:
        raise ConfigError(f"config key 'optimizer.params' = {spec.params!r}: {err}") from None
    prefer_fused(optimizer)  # the same rule as for an optimizer the user built: fused unless params choose
    return optimizer


def _warmup_gamma(step: int, warmup_steps: int, warmup_type: str) -> float:
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    if warmup_type == "log":
        return math.log(step + 1) / math.log(warmup_steps)
    return step / warmup_steps


class WarmupLR(torch.optim.lr_scheduler.LRScheduler):
    """Warm up from warmup_min_lr to warmup_max_lr over warmup_num_steps ('log' or 'linear'), then hold."""

    def __init__(self, optimizer, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type="log", last_batch_iteration=-1):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"config key 'scheduler.params.warmup_type' = {warmup_type!r}: must be log or linear")
        self.min_lrs = self._per_group(optimizer, warmup_min_lr)
        self.max_lrs = self._per_group(optimizer, warmup_max_lr)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        super().__init__(optimizer, last_batch_iteration)

    @staticmethod
    def _per_group(optimizer, value):
        values = value if isinstance(value, (list, tuple)) else [value] * len(optimizer.param_groups)
        if len(values) != len(optimizer.param_groups):
            raise ConfigError(f"scheduler learning rates {value!r}: expected {len(optimizer.param_groups)} values")
        return [float(v) for v in values]

    def _gamma(self, step: int) -> float:
        return _warmup_gamma(step, self.warmup_num_steps, self.warmup_type)

    def get_lr(self):
        step = max(self.last_epoch, 0)
        gamma = self._gamma(step)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then linear decay to warmup_min_lr at total_num_steps."""

    def __init__(self, optimizer, total_num_steps, warmup_min_lr=0.0, warmup_max_lr=0.001, warmup_num_steps=1000,
                 warmup_type="log", last_batch_iteration=-1):
        self.total_num_steps = int(total_num_steps)
        if self.total_num_steps < warmup_num_steps:
            raise ConfigError(f"config key 'scheduler.params.total_num_steps' = {total_num_steps}: must be >= "
                              f"warmup_num_steps {warmup_num_steps}")
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)

    def _gamma(self, step: int) -> float:
        if step < self.warmup_num_steps:
            return _warmup_gamma(step, self.warmup_num_steps, self.warmup_type)
        span = max(1.0, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, (self.total_num_steps - step) / span)


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Ratio of the optimizer's own lr: warm up from warmup_min_ratio to 1, then cosine down to cos_min_ratio."""

    def __init__(self, optimizer, total_num_steps, warmup_min_ratio=0.0, warmup_num_steps=1000,
                 cos_min_ratio=0.0001, warmup_type="log", last_batch_iteration=-1):
        if warmup_type not in ("log", "linear"):
            raise ConfigError(f"config key 'scheduler.params.warmup_type' = {warmup_type!r}: must be log or linear")
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type
        if self.total_num_steps < self.warmup_num_steps:
            raise ConfigError(f"config key 'scheduler.params.total_num_steps' = {total_num_steps}: must be >= "
                              f"warmup_num_steps {warmup_num_steps}")
        super().__init__(optimizer, last_batch_iteration)

    def _ratio(self, step: int) -> float:
        if step < self.warmup_num_steps:
            gamma = _warmup_gamma(step, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * gamma
        progress = (step - self.warmup_num_steps) / max(1, self.total_num_steps - self.warmup_num_steps)
        cosine = (1.0 + math.cos(math.pi * min(progress, 1.0))) / 2.0
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * cosine)

    def get_lr(self):
        ratio = self._ratio(max(self.last_epoch, 0))
        return [base * ratio for base in self.base_lrs]


SCHEDULERS = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}


def build_scheduler(spec: SchedulerConfig, optimizer):
    try:
        return SCHEDULERS[spec.type](optimizer, **spec.params)
    except TypeError as err:
        raise ConfigError(f"config key 'scheduler.params' = {spec.params!r}: {err}") from None
