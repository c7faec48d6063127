"""`initialize()` and the training `Engine`.

The engine owns the step; where gradients and optimizer state live is the ZeRO store's business
(`zero/replicated.py` for stage 0, `zero/partitioned.py` for stages 1 and 2). Step anatomy at a
gradient-accumulation boundary:
  1. the store finishes the DP reduction (stage 0: bucketed all-reduce; 1/2: the reduce-scatters launched
     during backward) over the DP group only, since TP ranks hold different shards;
  2. fp16: overflow check over every rank (DP x TP) so all skip together; unscale;
  3. global L2 norm over DP x TP: a TP-sharded tensor counts once per distinct shard (replicated KV pieces
     once), a replicated tensor once (from TP rank 0); clip by it;
  4. optimizer step on fp32 master weights (or fp32 parameters); the store copies or all-gathers them back.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm, resume
from .checkpoint import consolidated_state_dict, save_pretrained
from .compat import merge_tp_model_init
from .config import AutoTPConfig, ConfigError, load_config_dict, parse_config
from .groups import (ParallelGroups, build_groups, groups_from_mesh, groups_from_mpu, groups_from_tp_group,
                     init_distributed)
from .loss_scaler import LossScaler
from .optim import build_optimizer, build_scheduler, prefer_fused
from .replace import parallelize, set_kernels
from .vocab_parallel import enable_vocab_parallel_loss, vocab_parallel_wanted
from .zero.partitioned import PartitionedState
from .zero.replicated import ReplicatedState

logger = logging.getLogger("autotp")


def _device_for_run() -> torch.device:
    if torch.cuda.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if `flag` is true on any rank (one all-reduce over the default group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


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


def _cast_floating_state(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters and persistent buffers to `dtype`, as HF's from_pretrained(dtype=...) leaves a model; buffers a
    module computes at construction (RoPE's inv_freq, built in fp32 on purpose) keep their dtype. Casting
    inv_freq to bf16 too moved the first loss of the Llama-3-8B bench by 0.03 away from the dense model's."""
    with torch.no_grad():
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if param.is_floating_point() and param.dtype != dtype:
                    param.data = param.data.to(dtype)
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point() and name not in module._non_persistent_buffers_set:
                    setattr(module, name, buf.to(dtype))


def _check_fused_collectives() -> None:
    """Raise if a fused TP collective timed out on this rank since the last step (its peers time out too, so
    every rank raises). Reads host state only (the watchdog records the error): no device sync."""
    symm = sys.modules.get("autotp_kernels.symm")
    if symm is not None:
        symm.check_errors()


class Engine:
    """What `initialize` returns first: call it like the model, then `backward(loss)` and `step()`. Built without
    an optimizer (evaluation), it runs forward and saves; `backward` and `step` raise."""

    def __init__(self, model: nn.Module, optimizer, lr_scheduler, config: AutoTPConfig, groups: ParallelGroups,
                 store, device: torch.device, fp16_section: dict):
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

    def _check_same_batch(self, args, kwargs) -> None:
        """Every rank of a TP group must see the same micro-batch; a mismatch fails on all ranks at once."""
        self._batch_checked = True
        group = self.groups.tp_group
        mismatch = False
        if comm.group_size(group) > 1:
            mine = _batch_fingerprint(args, kwargs).to(self.device)
            rows = comm.all_gather_raw(mine, group, dim=0).reshape(comm.group_size(group), -1).cpu()
            mismatch = not all(torch.equal(row, rows[0]) for row in rows)
        if _any_rank(mismatch, self.device):
            raise RuntimeError(
                "autotp: ranks of a tensor-parallel group received different batches on the first step. Every "
                f"rank of a TP group (size {self.groups.tp_size}) must get the same input; shard data over the "
                "DP group only (engine.dp_rank / engine.dp_world_size, or pass training_data to initialize).")

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

    def _global_norm(self) -> torch.Tensor:
        total = self.store.sumsq()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)  # every rank's share, DP x TP: each distinct value counted once
        return total.sqrt()

    def step(self) -> None:
        self._require_optimizer("step")
        boundary = self.is_gradient_accumulation_boundary()
        self.micro_steps += 1
        if not boundary:
            return
        self.store.reduce()
        _check_fused_collectives()
        grads = self.store.grads()
        overflow = False
        if self.loss_scaler is not None:
            local_bad = any(not torch.isfinite(g).all() for g in grads)
            overflow = _any_rank(local_bad, self.device)
            if not overflow:
                inv = 1.0 / self.loss_scaler.scale
                for g in grads:
                    g.mul_(inv)
            self.loss_scaler.update(overflow)
        if overflow:
            self.skipped_steps += 1
            self._global_grad_norm = None
            logger.warning("autotp: fp16 overflow at step %d, skipped; loss scale now %g", self.global_steps,
                           self.loss_scaler.scale)
        else:
            norm = self._global_norm()
            self._global_grad_norm = norm  # a device tensor: `get_global_grad_norm` reads it when asked
            clip = self.config.gradient_clipping
            if clip > 0:
                # On the device, as torch's clip_grad_norm_: reading the norm on the host would stall the launch
                # queue once per step while the GPU drains. A non-finite norm leaves the gradients as they are.
                coef = (clip / (norm + 1e-6)).clamp(max=1.0)
                coef = torch.where(torch.isfinite(norm), coef, torch.ones_like(coef))
                if grads:
                    torch._foreach_mul_(list(grads), coef)  # one launch for all gradients
            self.optimizer.step()
            self.store.after_step()
            if self.lr_scheduler is not None:
                self.lr_scheduler.step()
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
        store = self.store
        for hook in getattr(store, "hooks", None) or []:
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
        return resume.save_checkpoint(self, save_dir, tag, client_state, save_latest)

    def load_checkpoint(self, load_dir: str, tag=None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False):
        """Returns (path, client_state); loads at any TP x DP layout and ZeRO stage. Collective."""
        self._require_optimizer("load_checkpoint")
        return resume.load_checkpoint(self, load_dir, tag, load_module_strict, load_optimizer_states,
                                      load_lr_scheduler_states, load_module_only)


def _remap_optimizer(optimizer, mapping: dict) -> None:
    """Point an optimizer built on the unsharded parameters at their shards (or fp32 masters)."""
    for group in optimizer.param_groups:
        group["params"] = [mapping.get(id(p), p) for p in group["params"]]
    if any(optimizer.state.values()):
        raise ConfigError("the optimizer passed to autotp.initialize already holds state; build it before "
                          "training starts (its state cannot be sharded)")
    optimizer.state.clear()


def initialize(model=None, optimizer=None, model_parameters=None, lr_scheduler=None, config=None, mpu=None,
               training_data=None, collate_fn=None, device_mesh=None, config_params=None):
    """DeepSpeed-compatible entry point: returns (engine, optimizer, dataloader, lr_scheduler). Without an optimizer
    (neither `optimizer=` nor the config key) the engine runs forward and saves, as DeepSpeed's does."""
    if model is None:
        raise ConfigError("autotp.initialize needs model=")
    if config is None and config_params is not None:
        config = config_params
    init_distributed()
    raw = load_config_dict(config)
    world = dist.get_world_size()
    cfg = parse_config(raw, world)  # validates every key before any collective
    recorded = getattr(model, "autotp_tp_model_init", None)  # DeepSpeed's tp_model_init: applied here
    tp_source = "config key 'tensor_parallel.autotp_size'"
    if recorded is not None:
        if not any(k in (raw.get("tensor_parallel") or {}) for k in ("autotp_size", "tp_size")):
            tp_source = "tp_model_init(tp_size=...)"
        raw = merge_tp_model_init(recorded, raw, cfg, mpu, device_mesh)
        cfg = parse_config(raw, world)
    if cfg.unused_keys and dist.get_rank() == 0:
        warnings.warn("autotp ignores these DeepSpeed config keys: " + ", ".join(cfg.unused_keys), stacklevel=2)
    tp_size = cfg.tensor_parallel.autotp_size
    tp_given = "autotp_size" in (raw.get("tensor_parallel") or {}) or "tp_size" in (raw.get("tensor_parallel") or {})

    state = getattr(model, "autotp_state", None)
    if device_mesh is not None:
        groups = groups_from_mesh(device_mesh)
    elif mpu is not None:
        groups = groups_from_mpu(mpu)
    elif state is not None:
        groups = state.groups
    elif recorded is not None and recorded.tp_group is not None:
        groups = groups_from_tp_group(recorded.tp_group)
    else:
        groups = build_groups(tp_size)
    if tp_given and groups.tp_size != tp_size:
        source = "autotp.parallelize" if state is not None else "mpu/device_mesh"
        raise ConfigError(f"{tp_source} = {tp_size} conflicts with TP size {groups.tp_size} from {source}")
    if groups.dp_group is None and groups.tp_size < world:
        groups = build_groups(groups.tp_size) if state is None else groups
    if groups.tp_size * groups.dp_size != world:
        raise ConfigError(f"TP size {groups.tp_size} x DP size {groups.dp_size} != world size {world}")
    if groups.tp_size != tp_size:
        cfg = parse_config({**raw, "tensor_parallel": {**(raw.get("tensor_parallel") or {}),
                                                        "autotp_size": groups.tp_size}}, world)

    original = {id(p): p for p in model.parameters()}
    names_before = {id(p): n for n, p in model.named_parameters()}
    if state is None:
        tp = cfg.tensor_parallel
        partition = recorded.partition_config if recorded is not None and recorded.partition_config is not None \
            else tp.partition_config
        parallelize(model, tp_group=groups.tp_group if groups.tp_size > 1 else None, tp_size=groups.tp_size,
                    preset_model=tp.preset_model, partition_config=partition,
                    device_mesh=groups.device_mesh, kernels=tp.kernels, vocab_parallel=tp.vocab_parallel_loss,
                    sequence_parallel=tp.sequence_parallel)
        model.autotp_state.groups = groups
    elif "kernels" in (raw.get("tensor_parallel") or {}):
        set_kernels(model, cfg.tensor_parallel.kernels)  # parallelize sharded it; the config picks GEMMs
    vocab = vocab_parallel_wanted(cfg.tensor_parallel.vocab_parallel_loss, model, groups.tp_size)
    if vocab and groups.tp_size > 1 and state is not None:
        try:  # sharded by parallelize without it: works if its LM head is vocab-split
            enable_vocab_parallel_loss(model)
        except ValueError as err:  # the same model on every rank: every rank raises this
            if cfg.tensor_parallel.vocab_parallel_loss is True:  # `auto` keeps the LM head as it was sharded
                raise ConfigError(f"config key 'tensor_parallel.vocab_parallel_loss' = True: {err}; call "
                                  "autotp.parallelize(..., vocab_parallel=True)") from None
    device = _device_for_run()
    dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
    model.to(device)
    if dtype is not None:
        _cast_floating_state(model, dtype)
    _broadcast_parameters(model, groups)

    # Map unsharded parameter ids to the sharded parameters; the ZeRO store then swaps in what it updates.
    after = dict(model.named_parameters())
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    trainable = {id(p) for p in params}
    mapping = {}
    for pid, name in names_before.items():
        if name in after and id(after[name]) in trainable:
            mapping[pid] = after[name]

    if optimizer is not None and not callable(getattr(optimizer, "step", None)) and callable(optimizer):
        optimizer = optimizer([mapping.get(id(p), p) for p in (model_parameters or original.values())])
    elif optimizer is not None:
        _remap_optimizer(optimizer, mapping)
        prefer_fused(optimizer)
    elif cfg.optimizer is not None:
        source = model_parameters if model_parameters is not None else original.values()
        source = list(source)
        if source and isinstance(source[0], dict):
            source = [dict(g, params=[mapping.get(id(p), p) for p in g["params"]]) for g in source]
        else:
            source = [mapping.get(id(p), p) for p in source if getattr(p, "requires_grad", True)]
        optimizer = build_optimizer(cfg.optimizer, source)
    elif lr_scheduler is not None or cfg.scheduler is not None:
        raise ConfigError("a learning-rate scheduler needs an optimizer: pass optimizer= to autotp.initialize or "
                          "set the config key 'optimizer'")

    # No optimizer (DeepSpeed allows it: an evaluation engine): no ZeRO store; backward and step raise.
    store = None
    if optimizer is not None:
        store = _build_store(cfg, params, [n for n, _ in named], optimizer, groups, device, dtype is not None)
    if lr_scheduler is not None and not hasattr(lr_scheduler, "step") and callable(lr_scheduler):
        lr_scheduler = lr_scheduler(optimizer)
    elif lr_scheduler is None and cfg.scheduler is not None:
        lr_scheduler = build_scheduler(cfg.scheduler, optimizer)

    engine = Engine(model, optimizer, lr_scheduler, cfg, groups, store, device, raw.get("fp16") or {})
    dataloader = None
    if training_data is not None:
        dataloader = _build_dataloader(training_data, collate_fn, cfg, groups)
    return engine, optimizer, dataloader, lr_scheduler


def _build_store(cfg: AutoTPConfig, params, names, optimizer, groups, device, mixed_precision: bool):
    """The ZeRO store for `zero_optimization.stage`; a failure on any rank is raised on every rank."""
    store, error = None, None
    try:
        if cfg.zero.stage == 0:
            store = ReplicatedState(params, names, optimizer, groups, cfg.zero.reduce_bucket_size,
                                    mixed_precision)
        else:
            store = PartitionedState(params, names, optimizer, groups, cfg.zero, cfg.zero.stage,
                                     cfg.gradient_accumulation_steps, device)
    except (ConfigError, ValueError) as err:
        error = err
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, None if error is None else (type(error).__name__, str(error)))
    first = next((e for e in errors if e), None)
    if first is not None:
        raise (ConfigError if first[0] == "ConfigError" else ValueError)(first[1])
    return store


def _broadcast_parameters(model: nn.Module, groups: ParallelGroups) -> None:
    """Make DP replicas identical (from DP rank 0), as DeepSpeed does at start."""
    if groups.dp_group is None or groups.dp_size == 1:
        return
    src = dist.get_global_rank(groups.dp_group, 0) if hasattr(dist, "get_global_rank") else 0
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            dist.broadcast(tensor.data, src=src, group=groups.dp_group)


def _build_dataloader(dataset, collate_fn, cfg: AutoTPConfig, groups: ParallelGroups):
    """Each DP rank reads its own part; every rank of a TP group reads the same samples."""
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=groups.dp_size, rank=groups.dp_rank, shuffle=True,
                                 seed=cfg.seed or 0, drop_last=True)
    return DataLoader(dataset, batch_size=cfg.train_micro_batch_size_per_gpu, sampler=sampler,
                      collate_fn=collate_fn, drop_last=True)
