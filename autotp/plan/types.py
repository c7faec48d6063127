"""What a plan talks about: the layers it can target (`Target`), the rules that match them (`Rule`), what to do with
each (`Action`), the model's attention sizes (`ModelDims`), and the error a plan raises (`PlanError`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from ..shard import ShardLayout


class PlanError(ValueError):
    """A layer cannot be sharded as asked; the message names the layer, the sizes and the fix."""


@dataclass(frozen=True)
class Target:
    """One thing a rule can apply to: a Linear / Conv1D / Embedding module, a bare parameter, or a module."""

    name: str
    kind: str  # linear | conv1d | embedding | param | linear_like | module
    """linear_like: a module of another class with its own 2-D `weight` used as `x @ weight.T` (DeepSpeed's
    layer_specs can target it by parameter name)."""
    shape: tuple = ()
    """Weight shape in storage order (Conv1D: [in, out]); empty for plain modules."""
    in_block: bool = False
    """Lives inside a repeated transformer block (strict mode only checks these)."""


@dataclass(frozen=True)
class Rule:
    pattern: str
    style: str  # column | row | skip | vocab | embed_dim | experts
    options: dict = field(default_factory=dict, hash=False, compare=False)
    source: str = ""
    match: str = "search_end"  # search_end (presets) | match (DeepSpeed layer_specs) | full (HF tp_plan)
    model_types: Optional[tuple] = None
    key: str = field(default="", compare=False)
    """The plan key or pattern as the user wrote it, for messages."""

    def names_for(self, target: "Target", param_names: tuple = ()) -> list[str]:
        """The names this rule is matched against. DeepSpeed's layer_specs match parameter names: a splittable
        layer's `<name>.weight` (and, as autotp always allowed, its own name), a bare parameter's own name, and
        (for skip rules only) the direct parameters of any other module, never a container's name; HF tp_plans
        and presets match module names."""
        splittable = target.kind in ("linear", "conv1d", "embedding", "linear_like")
        if self.match == "match":
            if splittable:
                return [target.name + ".weight", target.name]  # the layer's own name too: `.*qkv_proj$`
            if target.kind == "param":
                return [target.name]
            return [f"{target.name}.{p}" for p in param_names] if self.style == "skip" else []
        if target.kind == "param":
            return [target.name]
        return [target.name, target.name + ".weight"] if splittable else [target.name]

    def matches(self, names, model_type: Optional[str]) -> bool:
        if self.model_types and (model_type or "").lower() not in {m.lower() for m in self.model_types}:
            return False
        regex = re.compile(self.pattern)
        for name in names:
            if self.match == "full" and regex.fullmatch(name):
                return True
            if self.match == "match" and regex.match(name):
                return True
            if self.match == "search_end" and regex.search(name):
                return True
        return False


@dataclass
class Action:
    target: Target
    style: str
    source: str
    layout: Optional[ShardLayout] = None
    """How the weight's split dimension is cut (None for skip / experts modules)."""
    weight_dim: int = 0
    """Storage dimension of the weight that is split."""
    gather_output: bool = False
    split_input: bool = False
    grad_allreduce: bool = False
    kv_replicas: int = 1
    """TP ranks holding each KV head (tp // kv_heads when kv_heads < tp)."""


@dataclass(frozen=True)
class ModelDims:
    model_type: str = ""
    q_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    hidden: int = 0
    vocab: int = 0
    falcon_layout: str = ""  # grouped | multi_query | interleaved (Falcon's fused qkv variants)


def _first_attr(config, names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def model_dims(config) -> ModelDims:
    """Head counts and widths from an HF config, across the naming schemes of the supported families."""
    if config is None:
        return ModelDims()
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", "") or ""
    hidden = _first_attr(text, ["hidden_size", "n_embd", "d_model", "word_embed_proj_dim"], 0) or 0
    q_heads = _first_attr(text, ["num_attention_heads", "n_head", "num_heads", "n_heads"], 0) or 0
    falcon_layout = ""
    if model_type == "falcon":
        if getattr(text, "new_decoder_architecture", False):
            kv_heads, falcon_layout = text.num_kv_heads, "grouped"
        elif getattr(text, "multi_query", False):
            kv_heads, falcon_layout = 1, "multi_query"
        else:
            kv_heads, falcon_layout = q_heads, "interleaved"
    else:
        kv_heads = _first_attr(text, ["num_key_value_heads", "num_kv_heads", "n_head_kv"], q_heads) or q_heads
    head_dim = getattr(text, "head_dim", None) or (hidden // q_heads if q_heads else 0)
    vocab = getattr(text, "vocab_size", 0) or 0
    return ModelDims(model_type, q_heads, kv_heads, head_dim, hidden, vocab, falcon_layout)

