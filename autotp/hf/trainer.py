"""`with_autotp(TrainerClass)`: the same Trainer, trained with autotp's TP x ZeRO instead of DeepSpeed.

What changes against the stock Trainer, each at the Trainer's own extension point:
  __init__                the model is sharded and placed once the Trainer is built (after TRL/PEFT wrapped it);
                          accelerate is told it is prepared (no DDP wrapper, no autocast: the engine owns dtype and
                          gradient reduction); data loaders and metric gathers go over the DP group (`data.py`)
  create_optimizer        the config's `optimizer` (all trainable parameters, as DeepSpeed builds it) or the
                          Trainer's own, then the ZeRO store takes it over (`optimizer.StoreOptimizer`)
  create_scheduler        the config's `scheduler` with its step counts filled, or the Trainer's own
  training_step           brackets backward with the store's `begin_backward` / `end_backward`
  _clip_grad_norm, _get_grad_norm   the global norm over TP x DP, from the store
  get_tp_size             the TP size: batch sizes and loss normalisation count DP ranks, not processes
  save_model              the consolidated (unsharded) model, written by rank 0 file by file atomically
  _save_optimizer_and_scheduler / _load_optimizer_and_scheduler / _load_from_checkpoint
                          an autotp training checkpoint (`<checkpoint>/autotp`), resumable at any TP x DP layout
"""

from __future__ import annotations

import functools
import os
import shutil

import torch

from ..checkpoint import atomic_directory, consolidated_adapter_state_dict, consolidated_state_dict
from ..collective_errors import raise_on_every_rank
from ..config import ConfigError, SchedulerConfig
from ..engine import Engine
from ..groups import init_distributed
from ..optim import build_optimizer, build_scheduler, prefer_fused
from ..placement import place_model, shard_model
from ..plan import model_dims
from ..resume import CheckpointError
from ..topology import resolve_topology
from ..zero import build_store
from .args import fill_auto, fill_schedule
from .data import shard_over_dp
from .optimizer import StoreOptimizer

CHECKPOINT_TAG = "autotp"  # the engine checkpoint's directory inside a Trainer checkpoint


class AutoTPTrainerMixin:
    """Put before a `transformers.Trainer` subclass in the bases (`with_autotp` does)."""

    _autotp_trainer = True  # the guard on `Trainer.__init__` (args.py) lets this one through

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        raw = getattr(self.args, "autotp_config", None)
        if raw is None:
            raise ConfigError(f"{type(self).__name__} needs TrainingArguments(deepspeed=<config with a "
                              "'tensor_parallel' section>) built after `import autotp.hf`")
        if self.args.load_best_model_at_end:
            raise ConfigError("TrainingArguments.load_best_model_at_end = True is not supported by autotp.hf yet: "
                              "save with save_model and reload")
        init_distributed()
        raw = fill_auto(raw, self.args, model_dims(getattr(self.model, "config", None)).hidden or None)
        cfg, groups = resolve_topology(self.model, raw)
        if self.args.fp16 and not cfg.fp16:  # accelerate's GradScaler cannot see the ZeRO store's gradients
            raise ConfigError("TrainingArguments.fp16 = True needs the DeepSpeed config's fp16.enabled (true or "
                              "\"auto\"): autotp trains fp16 as DeepSpeed does, with fp32 masters and its loss scale")
        if cfg.tensor_parallel.grid is not None:  # the Trainer calls the model itself: no per-row batch or loss
            raise ConfigError("config key 'tensor_parallel.grid' (2-D tensor parallelism) is not supported through "
                              "the HF Trainer yet; use autotp.initialize, or 1-D tensor parallelism")
        shard_model(self.model, cfg, groups, raw)
        self._autotp_device = place_model(self.model, cfg, groups)
        self.model._is_accelerate_prepared = True  # accelerate must neither DDP-wrap nor autocast it
        self.model_wrapped = self.model
        self._autotp_cfg, self._autotp_groups, self._autotp_raw = cfg, groups, raw
        self._autotp_optimizer = None
        self._autotp_engine = None
        shard_over_dp(self.accelerator, groups)
        self.gather_function = self.accelerator.gather_for_metrics
        if cfg.fp16:  # DeepSpeed's fp16: fp16 weights, fp32 masters, the config's dynamic loss scale; no autocast
            self.accelerator.scaler, self.accelerator.native_amp = None, False
            self.accelerator.backward = functools.partial(_scaled_backward, self.accelerator, self)

    # ---- sizes ---------------------------------------------------------------------------------------------
    def get_tp_size(self) -> int:
        return self._autotp_groups.tp_size

    def _track_num_input_tokens(self, inputs):
        before = self.state.num_input_tokens_seen
        super()._track_num_input_tokens(inputs)  # summed over every process: each TP group counts tp times
        self.state.num_input_tokens_seen = before + (self.state.num_input_tokens_seen - before) // self.get_tp_size()

    # ---- optimizer and schedule ---------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self._autotp_optimizer is not None:
            return self.optimizer
        cfg = self._autotp_cfg
        if cfg.optimizer is not None:  # DeepSpeed builds it on every trainable parameter, in one group
            inner = build_optimizer(cfg.optimizer, [p for p in self.model.parameters() if p.requires_grad])
        else:
            inner = super().create_optimizer(model)
            prefer_fused(inner)
        store = build_store(cfg, self.model, inner, self._autotp_groups, self._autotp_device)
        self._autotp_engine = Engine(self.model, inner, None, cfg, self._autotp_groups, store,
                                     self._autotp_device, self._autotp_raw.get("fp16") or {})
        self._autotp_optimizer = StoreOptimizer(inner, store, cfg.gradient_clipping, self._autotp_device,
                                                self._autotp_engine.loss_scaler)
        self.optimizer = self._autotp_optimizer
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        spec = self._autotp_cfg.scheduler
        if spec is None:
            scheduler = super().create_scheduler(num_training_steps, optimizer)
        else:
            if self.lr_scheduler is None:
                params = fill_schedule(spec.params, self.args, num_training_steps)
                self.lr_scheduler = build_scheduler(SchedulerConfig(spec.type, params),
                                                    self._autotp_optimizer.optimizer)
                self._created_lr_scheduler = True
            scheduler = self.lr_scheduler
        self._autotp_engine.lr_scheduler = scheduler  # saved and restored with the engine checkpoint
        return scheduler

    # ---- the step -----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        store = self._autotp_optimizer.store
        store.begin_backward(reduce_now=self.accelerator.sync_gradients)
        loss = super().training_step(model, inputs, num_items_in_batch)
        store.end_backward()
        return loss

    def _clip_grad_norm(self, model):
        return self._autotp_optimizer.prepare(clip=True)

    def _get_grad_norm(self, model, grad_norm=None):
        norm = grad_norm if grad_norm is not None else self._autotp_optimizer.prepare(clip=False)
        if hasattr(self.optimizer, "_is_overflow"):  # accelerate's wrapper: the Trainer then skips the LR step too
            self.optimizer._is_overflow = self._autotp_optimizer.skipped
        return norm

    # ---- saving and resuming ------------------------------------------------------------------------------
    def save_model(self, output_dir=None, _internal_call: bool = False):
        """The unsharded model (or PEFT adapter) as the stock Trainer writes it. Collective: every rank calls it
        (the Trainer does); rank 0 writes into a temporary directory and moves each file into place."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        # A PEFT model writes its adapter only: gathering the frozen base would cost its whole size on rank 0.
        is_peft = hasattr(self.model, "peft_config")
        full = (consolidated_adapter_state_dict if is_peft else consolidated_state_dict)(self.model)
        error = None
        if self.args.should_save:
            tmp = atomic_directory(output_dir)
            try:
                self._save(tmp, state_dict=full)
                os.makedirs(output_dir, exist_ok=True)
                for name in os.listdir(tmp):
                    os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
            except Exception as err:  # every rank raises below instead of waiting at the next collective
                error = RuntimeError(f"save_model('{output_dir}') failed on rank 0: {err!r}")
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise_on_every_rank(error)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self._autotp_engine.save_checkpoint(output_dir, tag=CHECKPOINT_TAG, save_latest=False)
        if self.args.should_save and self.lr_scheduler is not None:  # also where the stock Trainer keeps it
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, "scheduler.pt"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """The weights come back with the optimizer state (`_load_optimizer_and_scheduler`), at this run's layout;
        here only check that the checkpoint is one."""
        if not os.path.isdir(os.path.join(resume_from_checkpoint, CHECKPOINT_TAG)):
            raise CheckpointError(f"'{resume_from_checkpoint}' holds no autotp training checkpoint (no "
                                  f"'{CHECKPOINT_TAG}' directory): resume from a checkpoint that "
                                  f"{type(self).__name__} saved")

    def _load_optimizer_and_scheduler(self, checkpoint) -> None:
        if checkpoint is None:
            return
        self._autotp_engine.load_checkpoint(checkpoint, tag=CHECKPOINT_TAG, load_lr_scheduler_states=True)


def _scaled_backward(accelerator, trainer, loss, **kwargs):
    """accelerate's `backward` under fp16: the loss times the engine's loss scale, in fp32 as DeepSpeed does (an
    fp16 loss times 2**16 would overflow before backward)."""
    loss = loss / accelerator.gradient_accumulation_steps
    (loss.float() * trainer._autotp_engine.loss_scaler.scale).backward(**kwargs)


_CLASSES: dict = {}


def with_autotp(trainer_class):
    """`trainer_class` (a `transformers.Trainer` subclass, e.g. `trl.SFTTrainer`) trained by autotp when its
    `TrainingArguments(deepspeed=...)` config has a `tensor_parallel` section. Same constructor."""
    import transformers

    if not (isinstance(trainer_class, type) and issubclass(trainer_class, transformers.Trainer)):
        raise TypeError(f"with_autotp needs a transformers.Trainer subclass, got {trainer_class!r}")
    if issubclass(trainer_class, AutoTPTrainerMixin):
        return trainer_class
    if trainer_class not in _CLASSES:
        _CLASSES[trainer_class] = type(f"AutoTP{trainer_class.__name__}", (AutoTPTrainerMixin, trainer_class),
                                       {"__module__": __name__, "__doc__": trainer_class.__doc__})
    return _CLASSES[trainer_class]
