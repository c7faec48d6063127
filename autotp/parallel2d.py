"""Put a Llama-style causal LM on a 2-D tensor-parallel grid (`grid.Grid`, `layers2d`): every linear of the decoder
layers and the LM head becomes a `ParallelLinear2D`, every RMSNorm an `RMSNorm2D`, the input embedding an
`Embedding2D`. Attention needs no change: its q/k/v outputs carry heads/c whole heads per rank (HF's attention
infers the head count from the projection's width) over whole sequences of the row's samples.

Rank (i, j) takes samples [i B/r, (i+1) B/r) of each batch, as a data-parallel rank would, and its loss is the
mean over those samples' tokens. Called directly, scale it by 1 / rows before backward (the grid's weight
gradients are summed over the rows); through `autotp.initialize` with `tensor_parallel.grid`, the engine does both
(`grid_forward`): every rank gets the TP group's batch, and the loss it returns is the mean over the rows.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from . import comm
from .grid import Grid
from .layers2d import Embedding2D, Head2D, ParallelLinear2D, RMSNorm2D

_NORMS = ("RMSNorm",)  # class-name suffixes of the norms this supports (LlamaRMSNorm, Qwen2RMSNorm, ...)
FAMILIES = frozenset({"llama", "mistral", "qwen2", "olmo2"})
"""model_type values whose decoder layers are only q/k/v/o and gate/up/down linears (biases allowed) and
w-scaled RMSNorms: what the 2-D layers reproduce exactly (each checked against the dense model)."""


def _is_rms_norm(module: nn.Module) -> bool:
    return type(module).__name__.endswith(_NORMS) and hasattr(module, "weight")


def unsupported_2d(model: nn.Module, grid_shape: tuple) -> Optional[str]:
    """Why `parallelize_llama_2d` cannot put `model` on a grid of `grid_shape` (rows, cols), or None. Checks the
    model's structure and sizes only: the same answer on every rank, before any group exists."""
    rows, cols = grid_shape
    config = getattr(model, "config", None)
    base = getattr(model, "model", None)
    if config is None or base is None or not hasattr(base, "layers") or not hasattr(model, "lm_head"):
        return f"2-D tensor parallelism supports Llama-style causal LMs (model.model.layers, lm_head); got " \
               f"{type(model).__name__}"
    if getattr(config, "model_type", None) not in FAMILIES:
        # Others of the same outline differ inside: per-head q/k norms (Qwen3), fused projections (Phi-3), a
        # (1 + w) RMSNorm (Gemma): each needs its own 2-D form, so they are not guessed at.
        return f"2-D tensor parallelism supports the families {sorted(FAMILIES)}; got model_type " \
               f"{getattr(config, 'model_type', None)!r}"
    if getattr(config, "tie_word_embeddings", False):
        return f"2-D tensor parallelism: tied input and output embeddings are not supported yet " \
               f"({type(model).__name__} has tie_word_embeddings=True)"
    for name, heads in (("num_attention_heads", config.num_attention_heads),
                        ("num_key_value_heads", getattr(config, "num_key_value_heads", config.num_attention_heads))):
        if heads % cols:
            return f"2-D tensor parallelism: {name}={heads} is not divisible by the grid's {cols} columns " \
                   "(attention heads are split over them)"
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            N, K = module.weight.shape
            for size, parts, what in ((N, cols, "output features"), (K, rows, "input features"),
                                      (K, cols, "input features")):
                if size % parts:
                    return f"2-D tensor parallelism: {name} has {size} {what}, not divisible by {parts}"
        elif _is_rms_norm(module) and module.weight.shape[0] % cols:
            return f"2-D tensor parallelism: {name} has {module.weight.shape[0]} features, not divisible by {cols}"
        elif name.startswith("model.layers.") and not list(module.children()) and not isinstance(module, nn.Linear) \
                and not _is_rms_norm(module) and any(True for _ in module.parameters(recurse=False)):
            return f"2-D tensor parallelism: {name} ({type(module).__name__}) has no 2-D form yet"
    return None


def parallelize_llama_2d(model: nn.Module, grid: Grid) -> nn.Module:
    """Replace the modules of a Llama-style `*ForCausalLM` in place for `grid`; returns the model, which keeps
    the grid as `model.autotp_grid`."""
    why = unsupported_2d(model, (grid.rows, grid.cols))
    if why is not None:
        raise ValueError(why)
    base = model.model
    for layer_index, layer in enumerate(base.layers):
        for name, module in list(layer.named_modules()):
            if not name:
                continue
            parent_name, _, child = name.rpartition(".")
            parent = layer.get_submodule(parent_name) if parent_name else layer
            if isinstance(module, nn.Linear):
                setattr(parent, child, ParallelLinear2D(module, grid))
            elif _is_rms_norm(module):
                setattr(parent, child, RMSNorm2D(module.weight, _eps(module), grid))
            elif isinstance(module, (nn.LayerNorm, nn.Embedding)) or (
                    not list(module.children()) and any(True for _ in module.parameters(recurse=False))):
                raise ValueError(f"2-D tensor parallelism: model.layers.{layer_index}.{name} "
                                 f"({type(module).__name__}) has no 2-D form yet")
    base.embed_tokens = Embedding2D(base.embed_tokens, grid)
    base.norm = RMSNorm2D(base.norm.weight, _eps(base.norm), grid)
    model.lm_head = Head2D(model.lm_head, grid)
    model.autotp_grid = grid
    return model


class _WeightedSumOverRows(torch.autograd.Function):
    """forward: sum over the grid's rows of weight_i x loss_i (all-reduced over the column); backward: each rank's
    own loss gets weight_i of the gradient (every rank calls backward on the same sum)."""

    @staticmethod
    def forward(ctx, loss, weight: float, group):
        ctx.weight = weight
        return comm.all_reduce_raw((loss.detach() * weight).clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.weight, None, None


_BATCH_KEYS = ("input_ids", "inputs_embeds", "labels", "attention_mask")


def grid_forward(model: nn.Module, args: tuple, kwargs: dict):
    """Call a model on a grid with the TP group's batch: each grid row runs its 1/rows of the samples (every tensor
    argument of 2+ dimensions whose first is the batch; 1-D ones such as cache_position pass whole), and the loss
    becomes the whole batch's: the rows' token means weighted by their shares of the batch's labelled tokens (so
    padding in one row weighs as in the dense model), or their sum where the caller passes num_items_in_batch.
    Its backward trains every rank. The logits stay the row's."""
    grid: Grid = model.autotp_grid
    named = [kwargs.get(key) for key in _BATCH_KEYS] + list(args)
    first = next((v for v in named if torch.is_tensor(v) and v.dim() >= 2), None)
    batch = first.shape[0] if first is not None else 0
    if batch % grid.rows:
        raise ValueError(f"2-D tensor parallelism: the batch of {batch} samples does not split over the grid's "
                         f"{grid.rows} rows (train_micro_batch_size_per_gpu must be a multiple of them)")
    per_row = batch // grid.rows
    rows = slice(grid.i * per_row, (grid.i + 1) * per_row)

    def cut(value):
        return value[rows] if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch else value

    out = model(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
    if grid.rows == 1:
        return out
    tuple_out = isinstance(out, tuple)
    loss = (out[0] if tuple_out and kwargs.get("labels") is not None else None) if tuple_out else \
        getattr(out, "loss", None)
    if loss is None:
        return out
    labels = kwargs.get("labels")
    if "num_items_in_batch" in kwargs or labels is None:
        weight = 1.0 if "num_items_in_batch" in kwargs else 1.0 / grid.rows
    else:  # HF's causal-LM loss: the mean over labels[:, 1:] that are not -100
        valid = labels[:, 1:] != -100
        total = int(valid.sum())
        weight = int(valid[rows].sum()) / total if total else 1.0 / grid.rows
    loss = _WeightedSumOverRows.apply(loss, weight, grid.col_group)
    if tuple_out:
        return (loss,) + tuple(out[1:])
    out.loss = loss
    return out


def _eps(norm: nn.Module) -> float:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    raise ValueError(f"2-D tensor parallelism: {type(norm).__name__} has no epsilon attribute")


def _whole(module: nn.Module, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A 2-D module's parameter block gathered back to the dense parameter (collective over the grid)."""
    grid = module.grid
    tensor = tensor.detach()
    if isinstance(module, ParallelLinear2D) and name == "weight":  # block (j, i) of [N, K]
        return comm.all_gather_raw(comm.all_gather_raw(tensor, grid.col_group, dim=1), grid.row_group, dim=0)
    return comm.all_gather_raw(tensor, grid.row_group, dim=-1)  # a column block: bias, norm, embedding [V, H/c]


def consolidated_state_dict_2d(model: nn.Module) -> dict:
    """The dense model's state dict (its own names and shapes) from a model `parallelize_llama_2d` put on a grid,
    on every rank. Collective: every rank of the grid calls it. Load it into the unsharded model (or save it with
    `save_pretrained(state_dict=...)`) to go back to 1-D TP or to one device."""
    owners = {id(param): (module, name) for module in model.modules()
              if isinstance(module, (ParallelLinear2D, RMSNorm2D, Embedding2D))
              for name, param in module.named_parameters(recurse=False)}
    state = {}
    for key, tensor in model.state_dict(keep_vars=True).items():  # the persistent entries, in the model's order
        owner = owners.get(id(tensor))
        state[key] = tensor.detach() if owner is None else _whole(owner[0], owner[1], tensor)
    return state
