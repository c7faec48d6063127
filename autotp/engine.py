"""`initialize()` and the training `Engine`.

`initialize` runs named steps, each in the module it belongs to: the topology (TP size, config, groups:
`topology.py`), sharding and placement (`placement.py`), the optimizer (`optim.py`), the ZeRO store (`zero/`), the
LR scheduler (`optim.py`) and the data loader. The engine owns the micro-step bookkeeping; the step at a
gradient-accumulation boundary is `step.py`'s, and where gradients and optimizer state live is the ZeRO store's
business (`zero.ZeroStore`).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm, resume
from .checkpoint import consolidated_state_dict, save_pretrained
from .collective_errors import raise_on_every_rank
from .config import AutoTPConfig, ConfigError, load_config_dict
from .groups import ParallelGroups, init_distributed
from .loss_scaler import LossScaler
from .optim import prepare_optimizer, prepare_scheduler
from .parallel2d import grid_forward
from .placement import place_model, shard_model
from .step import boundary_step
from .topology import resolve_topology
from .zero import ZeroStore, build_store

logger = logging.getLogger("autotp")


def _batch_fingerprint(args, kwargs) -> torch.Tensor:
    """Fixed-size, order-sensitive float64 checksum of every tensor in the batch: element count, sum, and a
    position-weighted sum (so a permuted batch differs too)."""
    count, total, weighted, offset = 0.0, 0.0, 0.0, 0
    for tensor in list(args) + [kwargs[k] for k in sorted(kwargs)]:
        if torch.is_tensor(tensor):
            flat = tensor.detach().reshape(-1).to(torch.float64).cpu()
            weights = torch.arange(offset + 1, offset + flat.numel() + 1, dtype=torch.float64)
            count += flat.numel()
            total += float(flat.sum())
            weighted += float((flat * weights).sum())
            offset += flat.numel()
    return torch.tensor([count, total, weighted], dtype=torch.float64)


class Engine:
    """What `initialize` returns first: call it like the model, then `backward(loss)` and `step()`. Built without
    an optimizer (evaluation), it runs forward and saves; `backward` and `step` raise."""

    def __init__(self, model: nn.Module, optimizer, lr_scheduler, config: AutoTPConfig, groups: ParallelGroups,
                 store: Optional[ZeroStore], device: torch.device, fp16_section: dict):
        self.module = model
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.config = config
        self.groups = groups
        self.device = device
        self.global_steps = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self._global_grad_norm: Optional[torch.Tensor] = None
        self._batch_checked = False
        self.store = store
        self.params = store.params if store is not None else [p for p in model.parameters() if p.requires_grad]
        self._destroyed = False
        self.loss_scaler = LossScaler.from_config(fp16_section) if config.fp16 else None

    # ---- model-like surface --------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if not self._batch_checked and self.module.training:
            self._check_same_batch(args, kwargs)
        if getattr(self.module, "autotp_grid", None) is not None:  # 2-D TP: each grid row runs its samples
            return grid_forward(self.module, args, kwargs)
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    @property
    def tp_world_size(self) -> int:
        return self.groups.tp_size

    @property
    def tp_rank(self) -> int:
        return self.groups.tp_rank

    @property
    def dp_world_size(self) -> int:
        return self.groups.dp_size

    @property
    def dp_rank(self) -> int:
        return self.groups.dp_rank

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.train_micro_batch_size_per_gpu

    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.config.gradient_accumulation_steps == 0

    def get_global_grad_norm(self) -> Optional[float]:
        """The last step's global gradient norm (before clipping); None after a skipped step."""
        norm = self._global_grad_norm
        return float(norm) if torch.is_tensor(norm) else norm

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups] if self.optimizer is not None else []

    def autotp_size(self) -> int:
        """The TP group size (DeepSpeed's `engine.autotp_size()`)."""
        return self.groups.tp_size

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler else 1.0

    # ---- training --------------------------------------------------------------------------------------
    def _require_optimizer(self, what: str) -> None:
        if self._destroyed:
            raise RuntimeError(f"autotp: engine.{what}() after engine.destroy(); build a new engine with "
                               "autotp.initialize")
        if self.store is None:
            raise RuntimeError(f"autotp: engine.{what}() needs an optimizer, and this engine has none (initialize "
                               "got neither optimizer= nor the config key 'optimizer'); it can run forward and "
                               "save the model only")

    def _refuse_on_grid(self, what: str) -> None:
        if getattr(self.module, "autotp_grid", None) is not None:  # the same model on every rank: all raise
            raise ConfigError(f"autotp: {what} does not support 2-D tensor parallelism (tensor_parallel.grid) yet; "
                              "save_pretrained writes the consolidated model, which a 1-D or 2-D run loads")

    def _check_same_batch(self, args, kwargs) -> None:
        """Every rank of a TP group must see the same micro-batch; a mismatch fails on all ranks at once."""
        self._batch_checked = True
        group = self.groups.tp_group
        error = None
        if comm.group_size(group) > 1:
            mine = _batch_fingerprint(args, kwargs).to(self.device)
            rows = comm.all_gather_raw(mine, group, dim=0).reshape(comm.group_size(group), -1).cpu()
            if not all(torch.equal(row, rows[0]) for row in rows):
                error = RuntimeError(
                    "autotp: ranks of a tensor-parallel group received different batches on the first step. Every "
                    f"rank of a TP group (size {self.groups.tp_size}) must get the same input; shard data over the "
                    "DP group only (engine.dp_rank / engine.dp_world_size, or pass training_data to initialize).")
        raise_on_every_rank(error)  # DP replicas of a mismatched TP group raise too

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        self._require_optimizer("backward")
        scaled = loss / self.config.gradient_accumulation_steps
        if self.loss_scaler is not None:
            # In fp32, as DeepSpeed does: an fp16 loss times a 2**16 scale would overflow before backward.
            scaled = scaled.float() * self.loss_scaler.scale
        self.store.begin_backward(reduce_now=self.is_gradient_accumulation_boundary())
        scaled.backward(retain_graph=retain_graph)
        self.store.end_backward()
        return loss

    def step(self) -> None:
        """At a gradient-accumulation boundary: the optimizer step (`step.boundary_step`) and the scheduler's, then
        gradients are zeroed; between boundaries, only counts the micro-step."""
        self._require_optimizer("step")
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        norm = boundary_step(self.store, self.optimizer, self.lr_scheduler, self.loss_scaler,
                             self.config.gradient_clipping, self.device)
        self._global_grad_norm = norm  # a device tensor: `get_global_grad_norm` reads it when asked
        if norm is None:
            self.skipped_steps += 1
            logger.warning("autotp: fp16 overflow at step %d, skipped; loss scale now %g", self.global_steps,
                           self.loss_scaler.scale)
        self.store.zero_grad()
        self.global_steps += 1
        if self.config.steps_per_print and self.global_steps % self.config.steps_per_print == 0 and (
                not dist.is_initialized() or dist.get_rank() == 0):
            logger.info("autotp step %d: lr=%s grad_norm=%s", self.global_steps, self.get_lr(),
                        self.get_global_grad_norm())

    def zero_grad(self) -> None:
        if self.store is not None:
            self.store.zero_grad()
            return
        for param in self.module.parameters():
            param.grad = None

    def destroy(self) -> None:
        """Release what the engine holds so it can be dropped: the ZeRO store's gradient hooks on the model's
        parameters (they would keep the store alive as long as the model), its buckets, the gradients and the
        optimizer's state. The model stays usable (sharded, with its TP hooks); the optimizer does not.
        Idempotent; no collective."""
        if self._destroyed:
            return
        self._destroyed = True
        for hook in self.store.hooks if self.store is not None else []:
            hook.remove()
        self.zero_grad()
        if self.optimizer is not None:
            self.optimizer.state.clear()
        self.store = self.optimizer = self.lr_scheduler = self.loss_scaler = None
        self.params = []
        self._global_grad_norm = None

    # ---- saving ---------------------------------------------------------------------------------------
    def consolidated_state_dict(self) -> Optional[dict]:
        return consolidated_state_dict(self.module, self.groups.tp_group)

    def _consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> Optional[dict]:
        """DeepSpeed's name (the HF Trainer and accelerate call it to save): the full state dict in the model's
        training dtype (bf16/fp16, or fp32), on CPU, on global rank 0; None elsewhere. Collective: every rank
        must call it."""
        full = self.consolidated_state_dict()
        if full is not None and exclude_frozen_parameters:
            frozen = {name for name, param in self.module.named_parameters(remove_duplicate=False)
                      if not param.requires_grad}
            full = {name: value for name, value in full.items() if name not in frozen}
        return full

    def save_pretrained(self, save_dir: str, **kwargs) -> None:
        save_pretrained(self.module, save_dir, **kwargs)

    def save_checkpoint(self, save_dir: str, tag=None, client_state: Optional[dict] = None,
                        save_latest: bool = True) -> str:
        """Model shards, optimizer partitions, scheduler, RNG, counters and loss scaler, written atomically
        (see `autotp/resume.py`). Collective: call on every rank."""
        self._require_optimizer("save_checkpoint")
        self._refuse_on_grid("save_checkpoint")
        return resume.save_checkpoint(self, save_dir, tag, client_state, save_latest)

    def load_checkpoint(self, load_dir: str, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False):
        """Returns (path, client_state); loads at any TP x DP layout and ZeRO stage. Collective."""
        self._require_optimizer("load_checkpoint")
        self._refuse_on_grid("load_checkpoint")
        return resume.load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                      load_lr_scheduler_states, load_module_only)


def initialize(model=None, optimizer=None, model_parameters=None, lr_scheduler=None, config=None, mpu=None,
               training_data=None, collate_fn=None, device_mesh=None, config_params=None):
    """DeepSpeed-compatible entry point: returns (engine, optimizer, dataloader, lr_scheduler). Without an optimizer
    (neither `optimizer=` nor the config key) the engine runs forward and saves, as DeepSpeed's does."""
    if model is None:
        raise ConfigError("autotp.initialize needs model=")
    init_distributed()
    raw = load_config_dict(config if config is not None else config_params)
    cfg, groups = resolve_topology(model, raw, mpu=mpu, device_mesh=device_mesh)
    unsharded = list(model.named_parameters())  # what a user-built optimizer holds: remapped onto the shards
    shard_model(model, cfg, groups, raw)
    device = place_model(model, cfg, groups)
    optimizer = prepare_optimizer(optimizer, cfg.optimizer, unsharded, model, model_parameters)
    # No optimizer (DeepSpeed allows it: an evaluation engine): no ZeRO store; backward and step raise.
    store = build_store(cfg, model, optimizer, groups, device) if optimizer is not None else None
    lr_scheduler = prepare_scheduler(lr_scheduler, cfg.scheduler, optimizer)
    engine = Engine(model, optimizer, lr_scheduler, cfg, groups, store, device, raw.get("fp16") or {})
    dataloader = _build_dataloader(training_data, collate_fn, cfg, groups) if training_data is not None else None
    return engine, optimizer, dataloader, lr_scheduler


def _build_dataloader(dataset, collate_fn, cfg: AutoTPConfig, groups: ParallelGroups):
    """Each DP rank reads its own part; every rank of a TP group reads the same samples."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=groups.dp_size, rank=groups.dp_rank, shuffle=True,
                                 seed=cfg.seed or 0, drop_last=True)
    return DataLoader(dataset, batch_size=cfg.train_micro_batch_size_per_gpu, sampler=sampler,
                      collate_fn=collate_fn, drop_last=True)
