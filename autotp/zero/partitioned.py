"""ZeRO stages 1 and 2 over the DP group, under tensor parallelism.

Every trainable parameter (a TP shard) lives as a view into a flat bucket of the model dtype; each DP rank owns
one even slice of every bucket and keeps fp32 master weights, optimizer state and the fp32 gradient for that
slice only (1/dp of the TP shard, plus padding).

Gradients reach their owner by reduce-scatter of whole buckets. A post-accumulate hook records each arrival;
when a bucket is complete its gradients are copied into a flat buffer by one fused kernel on the comm stream
(after the stream that produced them) and the buffer is reduce-scattered, strictly in bucket order (the order
is the same on every rank, so no rank can wait on a collective another rank has not reached). Stage 2 does this
on every micro-step (summing into an fp32 partition gradient when micro-steps accumulate); stage 1 adds the
gradients of a window's earlier micro-steps into bucket buffers and reduces on the boundary micro-step only. After the optimizer step the
updated slices come back by all-gather straight into the flat parameter buckets.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from ..step import step_with_scale
from .backend import make_backend
from .buckets import Bucket, make_tracker, plan
from .master_adam import MasterAdam
from .norm import count_once_weights, sumsq_of


def _widened(part: torch.Tensor) -> torch.Tensor:
    """The bf16/fp16 partition gradient as fp32 for the masters: on CUDA by `autotp_kernels.widen` (torch's
    dtype-changing copy runs at ~40% of HBM speed; the kernels package, and triton, load only here)."""
    if part.is_cuda and part.dtype in (torch.bfloat16, torch.float16) and part.is_contiguous():
        try:
            from autotp_kernels.widen import widen
        except ImportError:  # no triton on this CUDA machine: torch's copy, slower, same bits
            return part.float()
        return widen(part)
    return part.float()


class PartitionedState:
    """The `ZeroStore` of stages 1 and 2 (see `zero/__init__.py`)."""

    def __init__(self, params: list[nn.Parameter], names: list[str], optimizer, groups, zero_cfg, stage: int,
                 gradient_accumulation_steps: int, device: torch.device, kernels: str = "auto"):
        self.stage = stage
        self.params = params
        self.names = names
        self.optimizer = optimizer
        self.groups = groups
        self.cfg = zero_cfg
        self.dp, self.dp_rank = groups.dp_size, groups.dp_rank
        self.device = device
        self.backend = make_backend(zero_cfg.comm_backend, groups.dp_group, device) if self.dp > 1 else None

        group_of = {id(p): index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [n for n, p in zip(names, params) if id(p) not in group_of]
        if missing:
            raise ValueError(f"autotp ZeRO-{stage}: trainable parameter '{missing[0]}' is in no optimizer param "
                             "group; pass every parameter with requires_grad=True to the optimizer or freeze it")
        self.numels = [p.numel() for p in params]
        self.buckets: list[Bucket] = plan(
            self.numels, [(group_of[id(p)], p.dtype) for p in params], zero_cfg.reduce_bucket_size, self.dp)
        self._where = {}
        for bucket in self.buckets:
            for index, offset in zip(bucket.params, bucket.offsets):
                self._where[index] = (bucket, offset)

        self.flat_params = [self._flatten_bucket(b) for b in self.buckets]
        self.masters: list[nn.Parameter] = []
        for bucket, flat in zip(self.buckets, self.flat_params):
            part = flat[slice(*bucket.partition_range(self.dp_rank))]
            # fp32 models update the flat parameter slice in place; bf16/fp16 ones keep an fp32 master copy.
            self.masters.append(nn.Parameter(part if part.dtype == torch.float32 else part.float().clone()))
        for index, group in enumerate(optimizer.param_groups):
            group["params"] = [m for b, m in zip(self.buckets, self.masters) if b.key[0] == index]
        optimizer.state.clear()

        # Stage 1 accumulates whole gradients over micro-steps: fp32 when there is more than one.
        model_dtype = params[0].dtype if params else torch.float32
        # The step in one kernel per partition where it can run there (`master_adam`); else torch's step.
        self.master_adam = MasterAdam.for_masters(optimizer, self.masters, model_dtype, kernels)
        self._kernel_step = False  # whether this step's gradients stay in the partitions for `master_adam`
        self.accum_dtype = torch.float32 if (stage == 1 and gradient_accumulation_steps > 1) else model_dtype
        wire = zero_cfg.communication_data_type
        self.wire_dtype = getattr(torch, wire) if wire else self.accum_dtype
        # The reduced partition gradient exists from its bucket's first reduction to the end of the step, so
        # at the backward peak (early in backward) most of it is not allocated yet; DeepSpeed does the same.
        # With one reduction per bucket per step (stage 1, or no accumulation) it stays in the wire dtype and
        # the reduce-scatter writes it directly; the fp32 copy the optimizer needs is made at the step, after
        # activations are freed. Measured on Llama-3-8B x 8 layers, TP2 x DP2, ZeRO-2: a persistent fp32
        # partition gradient cost 1.5 GB of peak over a transient one. Accumulating over micro-steps needs fp32.
        self._single_reduction = stage == 1 or gradient_accumulation_steps == 1
        self._part_dtype = self.wire_dtype if self._single_reduction else torch.float32
        self.grad_parts: list[Optional[torch.Tensor]] = [None] * len(self.buckets)
        # Bucket buffers: filled by the hooks, freed once their reduce-scatter has read them (stage 1 keeps
        # them across the micro-steps of a window, stage 2 for one micro-step).
        self._buffers: list[Optional[torch.Tensor]] = [None] * len(self.buckets)
        self._tracker = make_tracker(self.buckets, len(params))  # launch order bookkeeping (C++ when built)
        self._reduce_now = False
        self._norm_weights = self._partition_norm_weights(groups.tp_rank)
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(params)]

    # ---- layout --------------------------------------------------------------------------------------
    def _flatten_bucket(self, bucket: Bucket) -> torch.Tensor:
        """One flat tensor holding the bucket's parameters; each parameter becomes a view into it."""
        first = self.params[bucket.params[0]]
        flat = torch.zeros(bucket.padded, dtype=first.dtype, device=first.device)
        with torch.no_grad():
            for index, offset in zip(bucket.params, bucket.offsets):
                param = self.params[index]
                view = flat[offset:offset + param.numel()]
                view.copy_(param.detach().reshape(-1))
                param.data = view.view_as(param)
        return flat

    def _partition_norm_weights(self, tp_rank: int) -> list[list[tuple]]:
        """Per bucket: (start, length, weight) for each parameter piece in this rank's partition."""
        out = []
        for bucket in self.buckets:
            pieces = []
            for seg in bucket.segments(self.dp_rank, self.numels):
                weight = count_once_weights(self.params[seg.param], tp_rank)
                if not isinstance(weight, float):
                    weight = weight[seg.param_start:seg.param_start + seg.length]
                pieces.append((seg.partition_start, seg.length, weight))
            out.append(pieces)
        return out

    # ---- backward ------------------------------------------------------------------------------------
    def begin_backward(self, reduce_now: bool) -> None:
        """`reduce_now`: this micro-step ends an accumulation window (stage 1) or stage 2 (always)."""
        self._reduce_now = reduce_now or self.stage == 2
        self._tracker.reset()

    def _hook(self, index: int):
        def on_grad(param: torch.Tensor) -> None:
            if param.grad is None:
                return
            bucket, offset = self._where[index]
            if not self._reduce_now:  # stage 1 inside a window: accumulate now, free the gradient
                buffer = self._buffers[bucket.index]
                if buffer is None:
                    buffer = torch.zeros(bucket.padded, dtype=self.accum_dtype, device=self.device)
                    self._buffers[bucket.index] = buffer
                with torch.no_grad():
                    buffer[offset:offset + param.numel()].add_(param.grad.reshape(-1))
                param.grad = None
                return
            # Reducing micro-step: the gradient stays in param.grad until its bucket is complete, then the whole
            # bucket is copied into its buffer at once (one fused kernel, no per-parameter work).
            if self._tracker.launched(bucket.index):
                raise RuntimeError(
                    f"autotp ZeRO-{self.stage}: parameter '{self.names[index]}' received a gradient after its "
                    f"bucket {bucket.index} was reduced (a parameter used again later in backward, e.g. across "
                    "reentrant checkpoints?); set zero_optimization.overlap_comm to false")
            if self.cfg.overlap_comm:  # without it every bucket waits for end_backward
                ready = self._tracker.arrive(index)
                if ready:
                    self._launch([self.buckets[b] for b in ready])

        return on_grad

    def end_backward(self) -> None:
        """Launch what is left (buckets with unused parameters, or all of them without overlap_comm)."""
        if not self._reduce_now:
            return
        rest = self._tracker.flush()
        if rest:
            self._launch([self.buckets[b] for b in rest])

    def _own_grad(self, bucket: Bucket) -> Optional[torch.Tensor]:
        """dp == 1, one parameter in the bucket, and the kernel step to read it: the parameter's gradient itself,
        flat, as the partition (shorter than it by the padding, whose gradient is zero and which the kernel step
        leaves alone as torch's would). `_fill`'s copy of these buckets (the 26 weights over reduce_bucket_size:
        MLP, embedding, head) was 2.4 ms of a 140 ms TP=1 step on H200 (bench/results/profile_tp1_autotp_adam*).
        None where `_fill` is needed."""
        grad = self.params[bucket.params[0]].grad if len(bucket.params) == 1 else None
        if grad is None or self._buffers[bucket.index] is not None or grad.dtype != self.wire_dtype:
            return None
        self.params[bucket.params[0]].grad = None
        return grad.reshape(-1)

    def _fill(self, bucket: Bucket) -> torch.Tensor:
        """The bucket's flat gradient, in bucket order, with zeros for padding and unused parameters."""
        grads = [self.params[i].grad for i in bucket.params]
        buffer = self._buffers[bucket.index]  # stage 1: this window's earlier micro-steps
        self._buffers[bucket.index] = None
        with torch.no_grad():
            if buffer is None and all(g is not None for g in grads):
                buffer = torch.empty(bucket.padded, dtype=grads[0].dtype, device=self.device)
                torch.cat([g.reshape(-1) for g in grads], out=buffer[:bucket.numel])
                buffer[bucket.numel:].zero_()
            else:
                if buffer is None:
                    buffer = torch.zeros(bucket.padded, dtype=self.params[bucket.params[0]].dtype,
                                         device=self.device)
                present = [(i, o, g) for i, o, g in zip(bucket.params, bucket.offsets, grads) if g is not None]
                if present:
                    torch._foreach_add_([buffer[o:o + g.numel()] for _, o, g in present],
                                        [g.reshape(-1) for _, _, g in present])
        for index in bucket.params:
            self.params[index].grad = None
        return buffer if buffer.dtype == self.wire_dtype else buffer.to(self.wire_dtype)

    def _launch(self, buckets: list[Bucket]) -> None:
        """Reduce a batch of complete buckets, in order, as one group of collectives."""
        wires, parts, accumulate = [], [], []
        if self.backend is not None:
            # The fused copies run on the comm stream too: backward's next kernels need not wait for them.
            stream = self.backend.stream
            if stream is not None:
                for bucket in buckets:
                    window = self._buffers[bucket.index]  # stage 1: earlier micro-steps of the window
                    for tensor in [self.params[i].grad for i in bucket.params] + [window]:
                        if tensor is not None:
                            tensor.record_stream(stream)  # dropped below, read on the comm stream
            with self.backend.on_comm():
                wires = [self._fill(bucket) for bucket in buckets]
        elif self._single_reduction and self.master_adam is not None:
            wires = [self._own_grad(bucket) for bucket in buckets]
            wires = [self._fill(bucket) if wire is None else wire for bucket, wire in zip(buckets, wires)]
        else:
            wires = [self._fill(bucket) for bucket in buckets]
        if self.backend is None and self._single_reduction:
            # dp == 1 and one reduction per step: the bucket `_fill` just made (private to this step) is the
            # partition itself. A copy into a fresh buffer cost 27 device copies of 5.6 GB per step at TP=2 on the
            # Llama-3-8B shape (bench/results/README.md).
            for bucket, wire in zip(buckets, wires):
                self.grad_parts[bucket.index] = wire
            return
        for bucket in buckets:
            part = self.grad_parts[bucket.index]
            first = part is None  # first reduction of this bucket in this step
            if first:
                make = torch.empty if self._single_reduction else torch.zeros
                part = make(bucket.partition_numel, dtype=self._part_dtype, device=self.device)
                self.grad_parts[bucket.index] = part
            parts.append(part)
            accumulate.append(not self._single_reduction)
        if self.backend is None:  # dp == 1 with accumulation: sum into the fp32 partition
            with torch.no_grad():
                for part, wire in zip(parts, wires):
                    part.add_(wire)
            return
        self.backend.reduce_scatter(parts, wires, accumulate)

    def reduce(self) -> None:
        """At the boundary: every bucket's reduction has finished; gradients become the DP mean (inside the
        step's kernel when `master_adam` takes this step: it reads the partition gradients as they are)."""
        if self.backend is not None:
            self.backend.join()
        self._kernel_step = self.master_adam is not None and self.master_adam.applies()
        if not self._kernel_step:
            self._widen_parts()

    def _widen_parts(self) -> None:
        """The masters' fp32 gradients, the DP mean, from the reduced partitions (which are then dropped)."""
        for index, (master, part) in enumerate(zip(self.masters, self.grad_parts)):
            if part.numel() < master.numel():  # a parameter's own gradient (`_own_grad`): the padding's zeros
                part = torch.nn.functional.pad(part, (0, master.numel() - part.numel()))
            master.grad = part if part.dtype == torch.float32 else _widened(part)
            if master.grad is not part:
                self.grad_parts[index] = None  # the wire-dtype copy is not needed past this point
            if self.dp > 1:
                master.grad.mul_(1.0 / self.dp)

    # ---- step ----------------------------------------------------------------------------------------
    def grads(self) -> list[torch.Tensor]:
        """The masters' fp32 gradients (the DP mean); when `master_adam` takes the step, the partition gradients
        it reads instead, in the wire dtype and summed over DP (bf16 only: nothing unscales them, and its clipping
        is folded into the step)."""
        if self._kernel_step:
            return list(self.grad_parts)
        return [m.grad for m in self.masters]

    def sumsq(self) -> torch.Tensor:
        """This rank's share of the squared global norm: partitions are disjoint over DP, shards counted once
        over TP, padding is zero."""
        grads = self.grads()
        total = sumsq_of(((grad[start:start + length], weight)
                          for grad, pieces in zip(grads, self._norm_weights)
                          for start, length, weight in pieces), self.device)
        if self._kernel_step and self.dp > 1:
            total = total * (1.0 / self.dp) ** 2  # the sums' norm -> the mean's (exact for a power-of-2 dp)
        return total

    def step(self, grad_scale: Optional[torch.Tensor]) -> None:
        if self._kernel_step and not self.master_adam.applies():
            # a hook or a grad_scale set since `reduce` (an HF Trainer callback between clipping and the step):
            # torch's step, which honours them, on the gradients it expects
            self._widen_parts()
            self._kernel_step = False
        if not self._kernel_step:
            step_with_scale(self.optimizer, grad_scale)
            self.after_step()
            return
        # A part shorter than its master is a parameter's own gradient (`_own_grad`): the padding after it keeps
        # a zero master and zero moments, as torch's step on a zero gradient leaves them.
        triples = [(part, master, flat[slice(*bucket.partition_range(self.dp_rank))][:part.numel()])
                   for bucket, flat, master, part in zip(self.buckets, self.flat_params, self.masters,
                                                         self.grad_parts)]
        self.master_adam.step(triples, 1.0 / self.dp, grad_scale)  # writes the weights: no copy from the masters
        self._kernel_step = False
        if self.dp > 1:
            for bucket, flat in zip(self.buckets, self.flat_params):
                self._all_gather(bucket, flat)

    def after_step(self) -> None:
        """Write updated master slices into the flat parameters and all-gather them over DP."""
        with torch.no_grad():
            for bucket, flat, master in zip(self.buckets, self.flat_params, self.masters):
                lo, hi = bucket.partition_range(self.dp_rank)
                if master.data_ptr() != flat[lo:hi].data_ptr():
                    flat[lo:hi].copy_(master)
                if self.dp > 1:
                    self._all_gather(bucket, flat)

    def _all_gather(self, bucket: Bucket, flat: torch.Tensor) -> None:
        part = bucket.partition_numel
        lo = self.dp_rank * part
        if bucket.padded <= self.cfg.allgather_bucket_size:
            self.backend.all_gather(flat, flat[lo:lo + part])
            return
        # Larger than allgather_bucket_size: gather in column pieces of the [dp, part] view.
        step = max(self.cfg.allgather_bucket_size // self.dp, 1)
        grid = flat.view(self.dp, part)
        for start in range(0, part, step):
            length = min(step, part - start)
            gathered = torch.empty(self.dp * length, dtype=flat.dtype, device=flat.device)
            self.backend.all_gather(gathered, flat[lo + start:lo + start + length].clone())
            grid[:, start:start + length].copy_(gathered.view(self.dp, length))

    def zero_grad(self) -> None:
        """Drop every gradient, including a stage-1 window accumulated but not reduced yet."""
        if self.backend is not None:
            self.backend.join()
        self._kernel_step = False
        for index, master in enumerate(self.masters):
            master.grad = None
            self.grad_parts[index] = None
            self._buffers[index] = None  # a stage-1 window accumulated but not reduced, if any
        for param in self.params:
            param.grad = None

    # ---- checkpoints ---------------------------------------------------------------------------------
    def writes_optimizer_file(self) -> bool:
        return True

    def optimizer_slices(self) -> list[tuple]:
        """(parameter name, start in its flat shard, length, optimizer tensor, start in that tensor)."""
        out = []
        for bucket, master in zip(self.buckets, self.masters):
            for seg in bucket.segments(self.dp_rank, self.numels):
                out.append((self.names[seg.param], seg.param_start, seg.length, master, seg.partition_start))
        return out

    def after_load(self) -> None:
        self.after_step()

    def load_masters_from_model(self) -> None:
        """After loading weights without optimizer state: masters start from the loaded parameters."""
        with torch.no_grad():
            for bucket, flat, master in zip(self.buckets, self.flat_params, self.masters):
                part = flat[slice(*bucket.partition_range(self.dp_rank))]
                if master.data_ptr() != part.data_ptr():
                    master.copy_(part)

    # ---- introspection -------------------------------------------------------------------------------
    def padding_numel(self) -> int:
        """Elements of this rank's partitions that hold no parameter."""
        return sum(b.partition_numel for b in self.buckets) - sum(
            seg.length for b in self.buckets for seg in b.segments(self.dp_rank, self.numels))
