"""Fused RMSNorm, SwiGLU and RoPE kernels (liger-kernel, an optional dependency) for the work between the TP linear
layers, which runs unsharded on every token at every TP rank.

On CUDA, when liger-kernel is installed and the model's family has a Liger patch, `initialize` binds Liger's
forwards to this model's own norm and MLP modules (the TP linears inside the MLP stay autotp's) and Liger's RoPE
to the model's family (see `apply_fused_ops`). The loss is left alone: the vocabulary-parallel loss already avoids full
logits. Not bit-identical to transformers' eager code (fp32 statistics computed in another order), so
`AUTOTP_FUSED_OPS=off` keeps transformers' own; without liger-kernel or CUDA nothing changes.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

import torch
import torch.nn as nn

from .shard import layout_of

logger = logging.getLogger("autotp")

# model_type -> liger_kernel.transformers function (data: one line a family with the Llama-style MLP and norms).
LIGER_PATCHES = {
    "llama": "apply_liger_kernel_to_llama",
    "mistral": "apply_liger_kernel_to_mistral",
    "qwen2": "apply_liger_kernel_to_qwen2",
    "qwen3": "apply_liger_kernel_to_qwen3",
}


def _has_empty_shard(model: nn.Module) -> bool:
    """Whether any TP rank holds an empty shard of some weight (an uneven head split that leaves a rank without
    heads). Decided from the layouts, which every rank knows for every rank, so all ranks agree."""
    for param in model.parameters():
        shard = layout_of(param)
        if shard is not None and any(shard.layout.local_size(r) == 0 for r in range(shard.layout.tp_size)):
            return True
    return False


def liger_patch_for(model: nn.Module, device: torch.device) -> Optional[str]:
    """The Liger patch function's name `apply_fused_ops` would use, or None: CPU, opted out, family unknown, or a
    rank without heads (Liger kernels are not written for empty tensors: its RoPE kernel failed to compile for
    zero heads on H200)."""
    if device.type != "cuda" or os.environ.get("AUTOTP_FUSED_OPS", "auto").lower() in ("off", "0", "false"):
        return None
    config = getattr(model, "config", None)
    name = LIGER_PATCHES.get(getattr(config, "model_type", None))
    if name is not None and _has_empty_shard(model):
        logger.info("autotp: a TP rank holds no heads; liger-kernel's fused ops are not used")
        return None
    return name


_ORIGINAL_ROPE: dict = {}
"""modeling module name -> transformers' own `apply_rotary_pos_emb`, kept while Liger's replaces it."""


def _restore_rope(modeling) -> None:
    original = _ORIGINAL_ROPE.pop(getattr(modeling, "__name__", ""), None)
    if original is not None:
        modeling.apply_rotary_pos_emb = original


def apply_fused_ops(model: nn.Module, device: torch.device) -> Optional[str]:
    """Bind Liger's fused RMSNorm / SwiGLU to `model`'s own modules and its RoPE to the model's family, where
    `liger_patch_for` allows and liger-kernel imports; returns the patch applied, or None.

    Liger's patch also replaces module-level names of transformers' modeling file. The RMSNorm and MLP classes are
    put back (only this model's modules keep Liger's forwards). The RoPE function cannot be bound to one model
    (attention looks it up by module-level name), so it stays Liger's for the family in this process until a
    model of the family is initialized without Liger (opted out, or a rank without heads), which puts
    transformers' back. RoPE is the part that pays: on 2x H200 (TP=2, Llama-3-8B shape) RMSNorm + SwiGLU alone
    measured 20,178 -> 20,210 tokens/s/GPU, with RoPE 20,612 -> 23,943 (bench/results/README.md)."""
    modeling = sys.modules.get(type(model).__module__)
    name = liger_patch_for(model, device)
    if name is None:
        _restore_rope(modeling)
        return None
    try:
        import liger_kernel.transformers as liger
    except ImportError:
        return None
    patch = getattr(liger, name, None)
    if patch is None:
        return None
    before = dict(vars(modeling)) if modeling is not None else {}
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False, model=model)
    for key, value in before.items():
        if vars(modeling).get(key) is value:
            continue
        if key == "apply_rotary_pos_emb":
            _ORIGINAL_ROPE.setdefault(modeling.__name__, value)
        else:
            setattr(modeling, key, value)
    logger.info("autotp: liger-kernel %s (RMSNorm, SwiGLU, RoPE) on %s", name, type(model).__name__)
    return name
