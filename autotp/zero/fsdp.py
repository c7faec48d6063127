"""ZeRO stage 3 under TP: every TP shard is sharded again over the DP group by PyTorch's FSDP2 (`fully_shard`).

Units, each one `fully_shard` call over a 1-D mesh of this TP rank's DP group:
  - the blocks of the model's outermost `nn.ModuleList`s (decoder layers), consecutive ones merged while they hold
    at most `reduce_bucket_size` elements (one all-gather and one reduce-scatter per unit);
  - the input embedding, when no other module shares its weight (a tied LM head keeps it in the root);
  - the root: what is left (final norm, LM head). FSDP2 does not reshard the root after forward: backward starts
    with it.
FSDP2 keeps each unit's parameters as fp32 DTensors, `Shard(0)` over DP: for a TP shard with n rows, DP rank r holds
rows [r*ceil(n/dp), min((r+1)*ceil(n/dp), n)) (the last ranks may hold fewer, or none). Those sharded parameters are
the optimizer's masters. Before a unit's forward, and again before its backward, FSDP2 all-gathers it in the
bf16/fp16 compute dtype (`MixedPrecisionPolicy.param_dtype`); after its backward it reduce-scatters the gradients in
fp32 (`reduce_dtype`, or `communication_data_type`) to their DP mean, on every micro-step, adding into the sharded
gradient: accumulation is exact and no unsharded gradient outlives its unit's backward.

Persistent parameters (fewer elements than `param_persistence_threshold`, and 0-d ones, which `Shard(0)` cannot cut)
are not sharded: they stay in the model in the compute dtype, as at stage 0, with an fp32 master replicated over DP
and their gradients all-reduced over DP at the boundary. Their masters are `Replicate()` DTensors so that the
optimizer's foreach/fused kernels, which refuse a mix, see DTensors only.

TP gradient hooks (`grad_sync.py`: a replicated parameter's gradient summed over TP, KV replicas) were registered
on the parameters before sharding; FSDP2 computes with other tensors (its unsharded parameters), so the hooks move
onto those (`fsdp_units.move_tp_grad_hooks`).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from ..shard import layout_of, mark_sharded
from ..step import step_with_scale
from .dp_shards import GATHER_DTYPE_ATTR, dp_mesh, dp_rows
from .fsdp_units import move_tp_grad_hooks, plan_units
from .master_adam import MasterAdam, local_of
from .norm import count_once_weights, sumsq_of
from .replicated import all_reduce_mean


class FullyShardedState:
    """The `ZeroStore` of stage 3 (see `zero/__init__.py` and this module's docstring)."""

    stage = 3

    def __init__(self, model: nn.Module, optimizer, groups, cfg, device: torch.device):
        zero = cfg.zero
        self.groups = groups
        self.device = device
        compute_dtype = torch.bfloat16 if cfg.bf16 else torch.float16 if cfg.fp16 else None
        wire = getattr(torch, zero.communication_data_type) if zero.communication_data_type else torch.float32
        named = list(model.named_parameters())
        trainable = [(name, param) for name, param in named if param.requires_grad]
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, param in trainable if id(param) not in in_optimizer]
        if missing:  # before any collective: `build_store` raises it on every rank
            raise ValueError(f"autotp ZeRO-3: trainable parameter '{missing[0]}' is in no optimizer param group; "
                             "pass every parameter with requires_grad=True to the optimizer or freeze it")
        self.mesh = dp_mesh(groups, device)
        self.dp_size = self.mesh.size()
        self.bucket_size = zero.reduce_bucket_size
        persistent = {param for _, param in named
                      if param.ndim == 0 or param.numel() < zero.param_persistence_threshold}
        layouts = {name: layout_of(param) for name, param in named if layout_of(param) is not None}
        hooks_by_name = {name: param._backward_hooks for name, param in named
                         if param not in persistent and param._backward_hooks}
        self._weights = {name: count_once_weights(param, groups.tp_rank) for name, param in trainable}
        before = {name: param for name, param in named}

        # fp32 sharded parameters are the masters; frozen ones keep the compute dtype (FSDP2 needs one dtype only
        # among a unit's trainable parameters).
        with torch.no_grad():
            for name, param in trainable:
                if param not in persistent and param.is_floating_point():
                    param.data = param.data.float().contiguous()
            for _, param in named:
                if param not in persistent and not param.is_contiguous():
                    param.data = param.data.contiguous()
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=wire)
        self.units = plan_units(model, zero.reduce_bucket_size, persistent)
        fsdp_modules = []
        for unit in self.units:
            fully_shard(unit if len(unit) > 1 else unit[0], mesh=self.mesh, mp_policy=policy,
                        ignored_params=persistent)
            fsdp_modules.append(unit[0])
        fully_shard(model, mesh=self.mesh, mp_policy=policy, ignored_params=persistent)
        fsdp_modules.append(model)
        self._set_prefetch(zero.prefetch_bucket_size)

        now = dict(model.named_parameters())
        gather_dtype = compute_dtype if zero.gather_16bit_weights_on_model_save else None
        for name, param in now.items():
            if name in layouts:
                mark_sharded(param, *layouts[name])
            if isinstance(param, DTensor) and gather_dtype is not None and param.requires_grad:
                setattr(param, GATHER_DTYPE_ATTR, gather_dtype)
        move_tp_grad_hooks(model, fsdp_modules, hooks_by_name)

        self.names = [name for name, _ in trainable]
        self.params = [now[name] for name in self.names]
        self.hooks: list = []  # FSDP2's own hooks stay with the model, which stays sharded
        self._persistent = [i for i, p in enumerate(self.params) if not isinstance(p, DTensor)]
        self._sharded = [i for i, p in enumerate(self.params) if isinstance(p, DTensor)]
        self.masters: dict[int, nn.Parameter] = {}
        for index in self._persistent:
            local = self.params[index].detach().float().clone()
            self.masters[index] = nn.Parameter(DTensor.from_local(local, self.mesh, [Replicate()], run_check=False))
        self._accumulated: dict[int, torch.Tensor] = {}  # persistent: fp32 sum of a window's gradients

        optimized = {id(before[name]): self.masters.get(i, self.params[i]) for i, name in enumerate(self.names)}
        for group in optimizer.param_groups:
            group["params"] = [optimized[id(p)] for p in group["params"] if id(p) in optimized]
        optimizer.state.clear()
        self.optimizer = optimizer
        # The step in one kernel per tensor (`master_adam`) where it applies: on FSDP2's fp32 shards it saves the
        # fused AdamW's write-back of the clipped gradient (32 -> 28 bytes per element); a persistent parameter's
        # kernel writes its bf16 weight too. Every tensor it touches must be contiguous.
        trained = [self._trained(i) for i in range(len(self.params))]
        flat_ok = all(local_of(t).is_contiguous() for t in trained + [self.params[i] for i in self._persistent])
        self.master_adam = MasterAdam.for_masters(optimizer, trained, compute_dtype or torch.float32,
                                                  cfg.tensor_parallel.kernels) if flat_ok else None

    def _set_prefetch(self, bucket: Optional[int]) -> None:
        """`stage3_prefetch_bucket_size`: each unit prefetches the next units (forward) and the previous ones
        (backward) that fit in `bucket` elements, at least one. None or 0: FSDP2's default."""
        if not bucket or len(self.units) < 2:
            return
        sizes = [sum(p.numel() for m in unit for p in m.parameters() if isinstance(p, DTensor))
                 for unit in self.units]
        heads = [unit[0] for unit in self.units]

        def fitting(order: list[int]) -> list[FSDPModule]:
            chosen, total = [], 0
            for index in order:
                if chosen and total + sizes[index] > bucket:
                    break
                chosen.append(heads[index])
                total += sizes[index]
            return chosen

        for index, head in enumerate(heads):
            if index + 1 < len(heads):
                head.set_modules_to_forward_prefetch(fitting(list(range(index + 1, len(heads)))))
            if index > 0:
                head.set_modules_to_backward_prefetch(fitting(list(range(index - 1, -1, -1))))

    # ---- backward ------------------------------------------------------------------------------------
    def begin_backward(self, reduce_now: bool) -> None:
        """FSDP2 reduce-scatters every micro-step (summing into the sharded gradient), as stage 2 does."""

    def end_backward(self) -> None:
        """Persistent parameters: add this micro-step's gradient into the window's fp32 sum and free it."""
        for index in self._persistent:
            param = self.params[index]
            if param.grad is None:
                continue
            if index in self._accumulated:
                self._accumulated[index].add_(param.grad)
            else:
                self._accumulated[index] = param.grad.float() if param.grad.dtype != torch.float32 \
                    else param.grad.clone()
            param.grad = None

    def reduce(self) -> None:
        """FSDP2 has reduce-scattered the sharded parameters' gradients; the persistent ones are all-reduced to
        their DP mean here, in flat pieces of at most `reduce_bucket_size` elements."""
        grads = []
        for index in self._persistent:
            grad = self._accumulated.pop(index, None)
            if grad is None:  # unused on this rank: zeros, so every rank sends the same pieces
                grad = torch.zeros(self.params[index].shape, dtype=torch.float32, device=self.device)
            grads.append(grad)
        if self.dp_size > 1 and grads:
            all_reduce_mean(grads, self.mesh.get_group(), self.dp_size, self.bucket_size)
        for index, grad in zip(self._persistent, grads):
            master = self.masters[index]
            master.grad = DTensor.from_local(grad, self.mesh, [Replicate()], run_check=False)

    # ---- step ----------------------------------------------------------------------------------------
    def _trained(self, index: int) -> torch.Tensor:
        return self.masters.get(index, self.params[index])

    def grads(self) -> list[torch.Tensor]:
        """Local views: scaling them in place scales the DTensor gradients the optimizer reads."""
        trained = (self._trained(i) for i in range(len(self.params)))
        return [t.grad.to_local() for t in trained if t.grad is not None]

    def sumsq(self) -> torch.Tensor:
        """This rank's share of the squared global norm: sharded rows are disjoint over DP and counted once over
        TP (`count_once_weights`, cut to this rank's rows); a persistent gradient, the same on every DP rank
        after `reduce`, counts on DP rank 0 only."""
        pairs = []
        dp_rank = self.mesh.get_local_rank()
        for index, name in enumerate(self.names):
            trained = self._trained(index)
            if trained.grad is None:
                continue
            grad, weight = trained.grad.to_local(), self._weights[name]
            if index in self.masters:
                if dp_rank != 0:
                    continue
            elif not isinstance(weight, float):
                start, length = dp_rows(self.params[index])
                per_row = grad[0].numel() if grad.ndim else 1
                weight = weight[start * per_row:(start + length) * per_row]
            pairs.append((grad, weight))
        return sumsq_of(pairs, self.device)

    def step(self, grad_scale) -> None:
        if self.master_adam is None or not self.master_adam.applies():
            step_with_scale(self.optimizer, grad_scale)
            self.after_step()
            return
        triples = []
        for index, param in enumerate(self.params):
            trained = self._trained(index)
            if trained.grad is None:  # unused: no update, as torch's step skips it
                continue
            weight = param.detach().view(-1) if index in self.masters else None  # shards: FSDP2 casts on gather
            triples.append((local_of(trained.grad).reshape(-1), trained, weight))
        self.master_adam.step(triples, 1.0, grad_scale)

    def after_step(self) -> None:
        """The sharded parameters are the masters the optimizer updated (FSDP2 all-gathers them at the next
        forward); persistent parameters take their master's value."""
        with torch.no_grad():
            for index, master in self.masters.items():
                self.params[index].copy_(master.to_local())

    def zero_grad(self) -> None:
        for param in self.params:
            param.grad = None
        for master in self.masters.values():
            master.grad = None
        self._accumulated.clear()

    # ---- checkpoints ---------------------------------------------------------------------------------
    def writes_optimizer_file(self) -> bool:
        return True

    def optimizer_slices(self) -> list[tuple]:
        """(parameter name, start in its flat TP shard, length, optimizer tensor, start in that tensor's flat
        local shard). Persistent parameters appear whole in every DP rank's file (they are small by choice)."""
        out = []
        for index, name in enumerate(self.names):
            if index in self.masters:
                out.append((name, 0, self.params[index].numel(), self.masters[index], 0))
                continue
            param = self.params[index]
            start, length = dp_rows(param)
            per_row = param.numel() // param.shape[0] if param.shape[0] else 0
            out.append((name, start * per_row, length * per_row, param, 0))
        return out

    def after_load(self) -> None:
        self.after_step()

    def load_masters_from_model(self) -> None:
        """After loading weights without optimizer state: persistent masters start from their parameters (the
        sharded parameters are themselves the masters, written by the load)."""
        with torch.no_grad():
            for index, master in self.masters.items():
                master.to_local().copy_(self.params[index])
