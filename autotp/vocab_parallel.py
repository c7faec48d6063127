"""Vocabulary-parallel LM head and cross-entropy: the loss without ever gathering the full logits.

The LM head stays a column-parallel layer over the vocabulary but no longer gathers its output: each TP rank
holds logits for its vocabulary slice [start, end). The cross-entropy needs three numbers per token from the
whole vocabulary (the max, the sum of exponentials, the target's logit); each is a local reduction followed by
one all-reduce of a [tokens] vector over TP. The backward is local: softmax - one_hot on the slice. The largest
tensor the loss builds is one fp32 [tokens, vocab / tp] softmax (Llama-3 at seq 4096, TP=4: 0.5 GB instead of
the 2.1 GB of full fp32 logits on every rank).

`enable_vocab_parallel_loss(model)` switches the model over: its own `forward(input_ids, labels=...)` keeps
returning the same `loss` (HF's label shift, ignore_index, mean over tokens or sum / num_items_in_batch), and
`outputs.logits` still means the full logits. A forward without labels (the caller computes its own loss, or
generates) gathers them in the LM head; `with full_logits(model):` gathers them always.

Logits of a call with labels: the output object holds the rank's vocabulary slice and all-gathers the full
logits (autograd-aware, cached) the first time user code reads them: `outputs.logits`, `outputs["logits"]`, an
integer index or slice that covers them, `items()`, `values()`, `to_tuple()`, pickling. A training step that
reads only the loss never builds a full-vocabulary tensor. Reading is a TP collective: every rank of the TP group
must read them, in the same order as its other collectives (SPMD, like the forward itself). Where one rank may
read alone (evaluation, prediction, generation: eval mode or `torch.no_grad()`) they are gathered eagerly in
the forward instead, and so is a `return_dict=False` tuple (a tuple cannot defer).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect

import torch
import torch.distributed as dist
import torch.nn as nn

from . import comm
from .layers import ColumnParallelLinear
from .linear_mode import LogitsGather


class VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from vocabulary-sharded logits; 0 where target == ignore_index."""

    @staticmethod
    def forward(ctx, logits_v: torch.Tensor, target: torch.Tensor, vocab_start: int, group, ignore_index: int):
        # An fp32 working copy that becomes the softmax in place (never the caller's tensor).
        x = logits_v.float() if logits_v.dtype != torch.float32 else logits_v.clone()
        local_vocab = x.shape[-1]
        row_max = x.max(dim=-1).values
        if comm.group_size(group) > 1:
            dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        x.sub_(row_max.unsqueeze(-1))
        valid = target != ignore_index
        local = target - vocab_start
        mine = valid & (local >= 0) & (local < local_vocab)
        index = torch.where(mine, local, torch.zeros_like(local))
        target_logit = x.gather(-1, index.unsqueeze(-1)).squeeze(-1) * mine
        x.exp_()
        sum_exp = x.sum(dim=-1)
        stats = torch.stack([target_logit, sum_exp])
        comm.all_reduce_raw(stats, group)  # one collective for both sums
        target_logit, sum_exp = stats[0], stats[1]
        loss = (sum_exp.log() - target_logit) * valid
        x.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(x, index, mine, valid)
        ctx.input_dtype = logits_v.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, index, mine, valid = ctx.saved_tensors
        scale = grad_loss * valid
        grad = softmax.mul_(scale.unsqueeze(-1))  # the saved softmax is not needed again
        grad.scatter_add_(-1, index.unsqueeze(-1), (-scale * mine).unsqueeze(-1))
        return grad.to(ctx.input_dtype), None, None, None, None


def vocab_parallel_cross_entropy(logits_v, target, vocab_start: int, group, ignore_index: int = -100):
    return VocabParallelCrossEntropy.apply(logits_v, target, vocab_start, group, ignore_index)


class VocabParallelCausalLMLoss:
    """Drop-in for HF's `ForCausalLMLoss` taking the LM head's vocabulary slice of the logits."""

    def __init__(self, head: ColumnParallelLinear, vocab_size: int):
        (start, length), = head.layout.local_ranges(head.tp_rank)
        self.head, self.vocab_start, self.local_vocab, self.vocab_size = head, start, length, vocab_size

    def __call__(self, logits, labels, vocab_size: int, num_items_in_batch=None, ignore_index: int = -100,
                 shift_labels=None, **kwargs):
        if logits.shape[-1] == vocab_size and self.local_vocab != vocab_size:  # full logits (full_logits())
            from transformers.loss.loss_utils import ForCausalLMLoss

            return ForCausalLMLoss(logits, labels, vocab_size, num_items_in_batch, ignore_index, shift_labels,
                                   **kwargs)
        if logits.shape[-1] != self.local_vocab:
            raise ValueError(f"vocab-parallel loss: logits have {logits.shape[-1]} features, this rank's vocabulary "
                             f"slice has {self.local_vocab}")
        if shift_labels is None:
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)
            shift_labels = labels[..., 1:]
        target = shift_labels.reshape(-1).to(logits.device)
        losses = vocab_parallel_cross_entropy(logits.reshape(-1, self.local_vocab), target, self.vocab_start,
                                              self.head.tp_group, ignore_index)
        if num_items_in_batch is None:
            return losses.sum() / (target != ignore_index).sum()  # the mean over counted tokens, as F.cross_entropy
        if torch.is_tensor(num_items_in_batch):
            num_items_in_batch = num_items_in_batch.to(losses.device)
        return losses.sum() / num_items_in_batch


def _head(model: nn.Module) -> ColumnParallelLinear:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, ColumnParallelLinear) or len(head.layout.blocks) != 1 or \
            head.layout.blocks[0].pieces != head.layout.tp_size:
        raise ValueError(f"vocab-parallel loss needs a column-parallel LM head split over the vocabulary; this "
                         f"model's output embeddings are {type(head).__name__}")
    return head


def supports_vocab_parallel_loss(model: nn.Module) -> bool:
    """Whether `vocab_parallel_loss: auto` turns the feature on: only where it is exact by construction, an LM
    head that is a linear layer and a forward that computes its loss through `self.loss_function` (the hook this
    module replaces; a model with its own cross-entropy would compute it on a vocabulary slice), not replaced on
    the instance."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    # Looked up on the class: reading `model.loss_function` runs transformers' property, which warns once per
    # process ("`loss_type=None` ... unrecognized") on every rank for models such as GPT2LMHeadModel.
    if not isinstance(head, (nn.Linear, ColumnParallelLinear)) or not hasattr(type(model), "loss_function"):
        return False
    if "forward" in vars(model):  # replaced on the instance (TRL's fused LM head reads lm_head.weight itself)
        return False
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):  # no source (compiled or dynamic class): not provably exact
        return False
    return "self.loss_function(" in source


def vocab_parallel_wanted(setting, model: nn.Module, tp_size: int) -> bool:
    """The vocab-parallel loss setting (`tensor_parallel.vocab_parallel_loss`, `parallelize(vocab_parallel=)`)
    resolved: True and False as given, "auto" on at TP > 1 where `supports_vocab_parallel_loss(model)`."""
    if setting == "auto":
        return tp_size > 1 and supports_vocab_parallel_loss(model)
    return bool(setting)


def _labels_position(model: nn.Module) -> int | None:
    """Index of `labels` among forward's positional arguments (after self), or None."""
    try:
        names = list(inspect.signature(type(model).forward).parameters)[1:]
    except (TypeError, ValueError):
        return None
    return names.index("labels") if "labels" in names else None


def _decide_logits_gather(logits_gather: LogitsGather, position, model, args, kwargs):
    """Forward pre-hook: the LM head's output stays sliced for a call that computes its loss here (labels
    given; `_full_logits_when_read` then hands out full logits), and is gathered otherwise, or always inside
    `full_logits`."""
    labels = kwargs.get("labels")
    if labels is None and position is not None and len(args) > position:
        labels = args[position]
    logits_gather.keep_slice = labels is not None


class _VocabShardedOutput:
    """Mixin of an HF ModelOutput whose `logits` field holds this rank's vocabulary slice until user code reads
    it: then the full logits are all-gathered (a TP collective: every rank of the group must read) and cached in
    the field, after which the object is an ordinary ModelOutput. Paths that need no logits (`["loss"]`,
    `.loss`, `outputs[0]` with a loss, `keys()`) never gather."""

    __slots__ = ()
    _autotp_base: type

    def _autotp_gather(self) -> None:
        gather = self.__dict__.pop("_autotp_vocab_gather", None)  # the LM head's `gather`
        if gather is not None:
            self["logits"] = gather(self.__dict__["logits"])

    @property
    def logits(self):
        self._autotp_gather()
        return self.__dict__.get("logits")

    @logits.setter
    def logits(self, value):  # ModelOutput.__setitem__/__setattr__ end here: the value is the full logits
        self.__dict__["logits"] = value
        self.__dict__.pop("_autotp_vocab_gather", None)

    def __getitem__(self, key):
        if isinstance(key, str):
            if key == "logits":
                self._autotp_gather()
            rename = getattr(self, "_replace_old_cache_name", None)  # ModelOutput's would read items()
            return dict.__getitem__(self, rename(key) if rename else key)
        names = list(self.keys())[key]  # ModelOutput indexes to_tuple(), which would read every field
        return self[names] if isinstance(names, str) else tuple(self[name] for name in names)

    def get(self, key, default=None):
        if key == "logits":
            self._autotp_gather()
        return super().get(key, default)

    def items(self):
        self._autotp_gather()
        return super().items()

    def values(self):
        self._autotp_gather()
        return super().values()

    def __reduce__(self):  # copy / pickle: the full logits, rebuilt as the model's own output class
        self._autotp_gather()
        _, args, *remaining = super().__reduce__()
        return (self._autotp_base, args, *remaining)

    def __repr__(self):  # printing on one rank must not start a collective
        if "_autotp_vocab_gather" not in self.__dict__:
            return super().__repr__()
        shown = [f"logits=<vocabulary slice {tuple(self.__dict__['logits'].shape)}, gathered when read>"
                 if field.name == "logits" else f"{field.name}={self.__dict__.get(field.name)!r}"
                 for field in dataclasses.fields(self)]
        return f"{self._autotp_base.__qualname__}({', '.join(shown)})"


_SHARDED_OUTPUT_CLASSES: dict = {}


def _sharded_output_class(base: type) -> type:
    """`base` with `_VocabShardedOutput` mixed in; one class per output type (HF registers each as a pytree
    node by name)."""
    cls = _SHARDED_OUTPUT_CLASSES.get(base)
    if cls is None:
        cls = type(f"VocabSharded{base.__name__}", (_VocabShardedOutput, base),
                   {"__module__": __name__, "_autotp_base": base})
        _SHARDED_OUTPUT_CLASSES[base] = cls
    return cls


def _full_logits_when_read(head: ColumnParallelLinear, logits_gather: LogitsGather, model, args, output):
    """Forward hook: where the LM head kept its vocabulary slice (a call with labels), `outputs.logits` still
    reads as the full logits: gathered when first read in training, gathered now in eval mode or under
    no_grad (a single rank may read them there) and for a tuple output. Ends the call's gather decision."""
    kept_slice = not logits_gather.gather
    logits_gather.keep_slice = False
    if not kept_slice:
        return None
    if type(output) is tuple:
        return tuple(head.gather(value) if torch.is_tensor(value) and value.dim() > 1 and
                     value.shape[-1] == head.out_features else value for value in output)
    if not (isinstance(output, dict) and dataclasses.is_dataclass(output)) or output.get("logits") is None or \
            isinstance(output, _VocabShardedOutput):
        return None
    if torch.is_grad_enabled() and model.training:
        try:
            output.__class__ = _sharded_output_class(type(output))
            output.__dict__["_autotp_vocab_gather"] = head.gather
            return None
        except TypeError:  # an output class whose layout forbids the swap (__slots__): gather now
            pass
    output["logits"] = head.gather(output["logits"])
    return None


def enable_vocab_parallel_loss(model: nn.Module) -> None:
    """LM head output stays sharded over the vocabulary and the model's loss becomes vocab-parallel.

    `parallelize(vocab_parallel=...)` builds the head with its `LogitsGather`; a head sharded over the
    vocabulary without it (its output always gathered) gets a new mode here."""
    head = _head(model)
    logits_gather = head.mode.logits_gather
    if logits_gather is None:
        logits_gather = LogitsGather()
        head.set_mode(dataclasses.replace(head.mode, gather_output=False, logits_gather=logits_gather))
    if not logits_gather.model_hooks:
        logits_gather.model_hooks = [
            model.register_forward_pre_hook(functools.partial(_decide_logits_gather, logits_gather,
                                                              _labels_position(model)), with_kwargs=True),
            model.register_forward_hook(functools.partial(_full_logits_when_read, head, logits_gather))]
    vocab = model.config.get_text_config().vocab_size if hasattr(model.config, "get_text_config") else \
        model.config.vocab_size
    loss = VocabParallelCausalLMLoss(head, vocab)
    try:
        model.loss_function = loss
    except AttributeError:  # a transformers without the setter reads `_loss_function` first
        model._loss_function = loss


@contextlib.contextmanager
def full_logits(model: nn.Module):
    """Within the block the LM head gathers full logits, labels or not (evaluation); the loss still works."""
    logits_gather = _head(model).mode.logits_gather  # None: the head gathers on every call anyway
    if logits_gather is not None:
        logits_gather.forced += 1
    try:
        yield model
    finally:
        if logits_gather is not None:
            logits_gather.forced -= 1
