"""DeepSpeed's `tensor_parallel.partition_config`: custom `layer_specs` rules, parsed and validated."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from .config_keys import _PARTITION_KEYS, _SPEC_KEYS, nearest_hint
from .config_values import _fail, _get_bool

PARTITION_TYPES = ("column", "row", "skip")


@dataclass
class LayerSpec:
    """One custom partition rule (DeepSpeed's `layer_specs` entry)."""

    patterns: list[str]
    """Regexes matched (re.match) against parameter names such as `model.layers.0.self_attn.o_proj.weight`."""
    partition_type: str = "column"
    """column: split output features; row: split input features; skip: leave replicated."""
    shape: Optional[tuple] = None
    """Logical shape of the weight: at `partition_dim` an int is a count of equal sub-parameters and a list
    gives unequal sub-parameter sizes (fused QKV under GQA); -1 elsewhere means 'infer'."""
    partition_dim: Optional[int] = None
    """Dimension of `shape` (or of the weight) to split; default 0 for column, 1 for row (nn.Linear layout)."""
    model_types: Optional[list[str]] = None
    """Apply only when `model.config.model_type` is one of these."""
    gather_output: bool = False
    """Column only: all-gather the output so every rank sees the full features."""
    grad_allreduce: bool = False
    """Skip only: the parameter stays replicated but its gradient is summed over the TP group."""

    def effective_partition_dim(self) -> int:
        if self.partition_dim is not None:
            return self.partition_dim
        return 0 if self.partition_type == "column" else 1


def _normalize_shape(shape, path: str):
    if not isinstance(shape, (list, tuple)) or not shape:
        _fail(path, shape, "must be a non-empty list such as [2, -1] or [[q, kv, kv], -1]")
    out = []
    for entry in shape:
        if isinstance(entry, (list, tuple)):
            if not entry or any(isinstance(x, bool) or not isinstance(x, int) or x <= 0 for x in entry):
                _fail(path, shape, "nested sub-parameter sizes must be positive integers")
            out.append(tuple(entry))
        elif isinstance(entry, bool) or not isinstance(entry, int) or entry == 0 or entry < -1:
            _fail(path, shape, "dimensions must be positive integers or -1")
        else:
            out.append(entry)
    return tuple(out)


def _reject_unknown(raw: dict, known: set, path: str, what: str) -> None:
    """Fail on the first key of `raw` not in `known`, naming it, its value and the nearest known key."""
    unknown = sorted(set(raw) - known, key=str)
    if unknown:
        hint = nearest_hint(unknown[0], known, path + ".")
        _fail(f"{path}.{unknown[0]}", raw[unknown[0]], f"unknown {what}{hint} (known: {sorted(known)})")


def parse_layer_spec(raw: Any, path: str) -> LayerSpec:
    if not isinstance(raw, dict):
        _fail(path, raw, "each layer spec must be an object")
    _reject_unknown(raw, _SPEC_KEYS, path, "layer-spec key")
    patterns = raw.get("patterns")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not isinstance(patterns, list) or not patterns or not all(isinstance(p, str) for p in patterns):
        _fail(f"{path}.patterns", patterns, "must be a non-empty list of regex strings")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            _fail(f"{path}.patterns", pattern, f"is not a valid regex ({err})")
    ptype = raw.get("partition_type", "column")
    if not isinstance(ptype, str) or ptype.lower() not in PARTITION_TYPES:
        _fail(f"{path}.partition_type", ptype, f"must be one of {list(PARTITION_TYPES)}")
    ptype = ptype.lower()
    shape = raw.get("shape")
    if shape is not None:
        shape = _normalize_shape(shape, f"{path}.shape")
    pdim = raw.get("partition_dim")
    if pdim is not None and (isinstance(pdim, bool) or not isinstance(pdim, int) or pdim < 0):
        _fail(f"{path}.partition_dim", pdim, "must be a non-negative integer")
    model_types = raw.get("model_types")
    if model_types is not None:
        if isinstance(model_types, str):
            model_types = [model_types]
        if not isinstance(model_types, list) or not all(isinstance(m, str) for m in model_types):
            _fail(f"{path}.model_types", model_types, "must be a list of model_type strings")
    spec = LayerSpec(patterns=list(patterns), partition_type=ptype, shape=shape, partition_dim=pdim,
                     model_types=model_types, gather_output=_get_bool(raw, "gather_output", path + ".", False),
                     grad_allreduce=_get_bool(raw, "grad_allreduce", path + ".", False))
    if shape is not None:
        dim = spec.effective_partition_dim()
        if dim >= len(shape):
            _fail(f"{path}.partition_dim", dim, f"is out of range for shape {raw['shape']} of length {len(shape)}")
        nested = [i for i, entry in enumerate(shape) if isinstance(entry, tuple)]
        if nested and nested != [dim]:
            # The value as the user wrote it (lists), not the normalised tuples.
            _fail(f"{path}.shape", raw["shape"], f"a nested size list is only allowed at partition_dim {dim}")
    if spec.gather_output and ptype != "column":
        _fail(f"{path}.gather_output", True, "only applies to partition_type 'column'")
    if spec.grad_allreduce and ptype != "skip":
        _fail(f"{path}.grad_allreduce", True, "only applies to partition_type 'skip'")
    return spec


@dataclass
class PartitionConfig:
    use_default_specs: bool = True
    """Merge the preset's specs after the custom ones (custom specs win on conflicts)."""
    strict_mode: bool = False
    """Fail when an nn.Linear-like layer inside a transformer block matches no spec."""
    layer_specs: list[LayerSpec] = field(default_factory=list)


def parse_partition_config(raw: Any, path: str = "tensor_parallel.partition_config") -> Optional[PartitionConfig]:
    if raw is None:
        return None
    if isinstance(raw, PartitionConfig):
        return raw
    if not isinstance(raw, dict):
        _fail(path, raw, "must be an object")
    _reject_unknown(raw, _PARTITION_KEYS, path, "key")
    specs_raw = raw.get("layer_specs", [])
    if not isinstance(specs_raw, list):
        _fail(f"{path}.layer_specs", specs_raw, "must be a list")
    specs = [parse_layer_spec(s, f"{path}.layer_specs[{i}]") for i, s in enumerate(specs_raw)]
    return PartitionConfig(use_default_specs=_get_bool(raw, "use_default_specs", path + ".", True),
                           strict_mode=_get_bool(raw, "strict_mode", path + ".", False), layer_specs=specs)

