"""A DeepSpeed config in `TrainingArguments(deepspeed=...)` that asks for tensor parallelism, routed to autotp.

Importing `autotp.hf` hooks `TrainingArguments.__post_init__`: a `deepspeed` config (dict or JSON path) with a
`tensor_parallel` section is kept as `args.autotp_config` and hidden from transformers' own DeepSpeed set-up, so
no DeepSpeed installation is needed and accelerate starts a plain torch.distributed state. Any other config goes to
DeepSpeed as before. A stock `transformers.Trainer` given such arguments raises (it would train without TP).

`"auto"` values are filled from the arguments as transformers fills them for DeepSpeed (`fill_auto`), except the
batch size: DeepSpeed's rule `train_batch_size = micro x accumulation x world` counts each TP group `autotp_size`
times (DeepSpeed issue #7298); here the world is the DP size, `world / autotp_size`. The scheduler's step counts
are known only when training starts (`fill_schedule`).
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Optional

from ..config import ConfigError, load_config_dict

_TP_KEY = "tensor_parallel"


def autotp_config_of(deepspeed: Any) -> Optional[dict]:
    """The config dict when `deepspeed` (dict or JSON path) has a `tensor_parallel` section, else None."""
    if not deepspeed:
        return None
    raw = load_config_dict(deepspeed)
    return copy.deepcopy(raw) if isinstance(raw.get(_TP_KEY), dict) else None


def _node(raw: dict, dotted: str) -> tuple[Optional[dict], str]:
    *parents, leaf = dotted.split(".")
    node = raw
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return None, leaf
    return node, leaf


class _Filler:
    """transformers' `fill_match`: an `"auto"` value takes the arguments' value; any other value must equal it
    (when `must_match`), and every mismatch is reported at once."""

    def __init__(self, raw: dict):
        self.raw, self.mismatches = raw, []

    def __call__(self, dotted: str, value, source: str, must_match: bool = True) -> None:
        node, leaf = _node(self.raw, dotted)
        if node is None or leaf not in node:
            return
        if node[leaf] == "auto":
            node[leaf] = value
        elif must_match and node[leaf] != value:
            self.mismatches.append(f"  {dotted} = {node[leaf]!r} in the DeepSpeed config, but {source} = {value!r}")

    def check(self) -> None:
        if self.mismatches:
            raise ConfigError("these DeepSpeed config values disagree with TrainingArguments (set them to \"auto\" "
                              "to take the arguments' values):\n" + "\n".join(self.mismatches))


def dp_size_of(raw: dict, world_size: int) -> int:
    tp = raw[_TP_KEY].get("autotp_size", raw[_TP_KEY].get("tp_size", 1))
    if not isinstance(tp, int) or tp < 1 or world_size % tp:
        raise ConfigError(f"config key 'tensor_parallel.autotp_size' = {tp!r} must be a positive integer dividing "
                          f"the world size {world_size}")
    return world_size // tp


def fill_auto(raw: dict, args, hidden_size: Optional[int]) -> dict:
    """A copy of `raw` with the `"auto"` values that the arguments decide filled in (batch sizes with the DP size;
    optimizer, warm-up peak, clipping, bf16/fp16; `reduce_bucket_size` = hidden_size^2 and the stage-3 bucket and
    persistence sizes as transformers sets them)."""
    raw = copy.deepcopy(raw)
    fill = _Filler(raw)
    dp = dp_size_of(raw, args.world_size)
    fill("train_micro_batch_size_per_gpu", args.per_device_train_batch_size, "per_device_train_batch_size")
    fill("gradient_accumulation_steps", args.gradient_accumulation_steps, "gradient_accumulation_steps")
    fill("train_batch_size", args.per_device_train_batch_size * args.gradient_accumulation_steps * dp,
         f"per_device_train_batch_size x gradient_accumulation_steps x DP size {dp}")
    fill("gradient_clipping", args.max_grad_norm, "max_grad_norm")
    fill("optimizer.params.lr", args.learning_rate, "learning_rate")
    fill("optimizer.params.betas", [args.adam_beta1, args.adam_beta2], "[adam_beta1, adam_beta2]")
    fill("optimizer.params.eps", args.adam_epsilon, "adam_epsilon")
    fill("optimizer.params.weight_decay", args.weight_decay, "weight_decay")
    fill("scheduler.params.warmup_min_lr", 0, "", must_match=False)
    fill("scheduler.params.warmup_max_lr", args.learning_rate, "learning_rate")
    fill("fp16.enabled", bool(args.fp16 or args.fp16_full_eval), "fp16 or fp16_full_eval")
    fill("bf16.enabled", bool(args.bf16 or args.bf16_full_eval), "bf16 or bf16_full_eval")
    if hidden_size is not None:  # transformers' values for DeepSpeed, from the model's hidden size
        fill("zero_optimization.reduce_bucket_size", hidden_size * hidden_size, "", must_match=False)
        fill("zero_optimization.stage3_prefetch_bucket_size", int(0.9 * hidden_size * hidden_size), "",
             must_match=False)
        fill("zero_optimization.stage3_param_persistence_threshold", 10 * hidden_size, "", must_match=False)
    fill.check()
    leftover = sorted(_autos(raw, "", exclude=("scheduler.params.total_num_steps",
                                               "scheduler.params.warmup_num_steps")))
    if leftover:
        raise ConfigError("DeepSpeed config keys left at \"auto\" that TrainingArguments do not decide: "
                          + ", ".join(leftover) + "; give them values")
    return raw


def fill_schedule(params: dict, args, num_training_steps: int) -> dict:
    """The scheduler's `params` with `total_num_steps` and `warmup_num_steps` filled once the step count is known
    (warm-up at least 1 step, as transformers keeps it for DeepSpeed)."""
    params = dict(params)
    fill = _Filler(params)
    fill("total_num_steps", num_training_steps, "the number of training steps")
    fill("warmup_num_steps", max(1, args.get_warmup_steps(num_training_steps)), "warmup_steps / warmup_ratio")
    fill.check()
    return params


def _autos(node, prefix: str, exclude: tuple) -> list[str]:
    if isinstance(node, dict):
        return [key for name, value in node.items() for key in _autos(value, f"{prefix}{name}.", exclude)]
    key = prefix[:-1]
    return [key] if node == "auto" and key not in exclude else []


# ---- hooks into transformers ----------------------------------------------------------------------------

def install_hooks() -> None:
    """Hook `TrainingArguments.__post_init__` and guard `Trainer.__init__` (once per process)."""
    import transformers

    arguments = transformers.TrainingArguments
    if not getattr(arguments.__post_init__, "_autotp_hook", False):
        arguments.__post_init__ = _route_post_init(arguments.__post_init__)
    trainer = transformers.Trainer
    if not getattr(trainer.__init__, "_autotp_hook", False):
        trainer.__init__ = _guard_trainer_init(trainer.__init__)


def _route_post_init(original):
    @functools.wraps(original)
    def __post_init__(self):
        raw = autotp_config_of(self.deepspeed)
        if raw is None:
            return original(self)
        given, self.deepspeed = self.deepspeed, None
        try:
            original(self)  # a plain torch.distributed state: no DeepSpeed plugin
        finally:
            self.deepspeed = given
        self.autotp_config = raw

    __post_init__._autotp_hook = True
    return __post_init__


def _guard_trainer_init(original):
    @functools.wraps(original)
    def __init__(self, *args, **kwargs):
        arguments = kwargs.get("args", args[1] if len(args) > 1 else None)
        if getattr(arguments, "autotp_config", None) is not None and not getattr(self, "_autotp_trainer", False):
            tp = arguments.autotp_config[_TP_KEY].get("autotp_size")
            raise ConfigError(f"{type(self).__name__} got TrainingArguments whose DeepSpeed config asks for tensor "
                              f"parallelism (tensor_parallel.autotp_size = {tp!r}), which it would ignore: use "
                              f"autotp.hf.Trainer, or autotp.hf.with_autotp({type(self).__name__})")
        original(self, *args, **kwargs)

    __init__._autotp_hook = True
    return __init__
