"""Built-in sharding plans, one entry per model family. Data only: a family is a list of rules.

A rule is (regex over module or parameter names, style, options). Regexes are matched with `re.search`
anchored at the end, so they apply to every layer index. Styles:

- column / row: split output / input features of a Linear (Conv1D in GPT-2 is handled in Linear orientation).
- packed: the split dimension holds this many equal sub-parameters (gate | up halves).
- shape: sub-parameters along the split dimension; strings are sizes read from the model config:
  "q" = heads * head_dim, "kv" = kv_heads * head_dim.
- unit: keep pieces in multiples of this width ("head" = head_dim, "head3" = 3 * head_dim for fused per-head
  q/k/v, "group" = (q_per_kv + 2) * head_dim for Falcon's grouped layout).
- grad_allreduce: replicated parameters whose gradients differ per TP rank (per-head norms of local heads).
- experts: a module whose 3-D expert weights are split on the intermediate dimension; its output is reduced.

DeepSpeed AutoTP keeps embeddings and the LM head replicated, and so do these presets; the model's own HF
tp_plan (used when no preset or partition_config is given) may split them over the vocabulary.
"""

from __future__ import annotations

_LLAMA_ATTN = [
    (r"\.self_attn\.(q|k|v)_proj$", "column", {"unit": "head"}),
    (r"\.self_attn\.o_proj$", "row", {"unit": "head"}),
]
_LLAMA_MLP = [
    (r"\.mlp\.(gate|up)_proj$", "column", {}),
    (r"\.mlp\.down_proj$", "row", {}),
]
_QK_NORM = [(r"\.self_attn\.(q|k)_norm$", "skip", {"grad_allreduce": True})]
_EXPERTS = [
    (r"\.mlp\.experts\.gate_up_proj$", "column", {"packed": 2}),
    (r"\.mlp\.experts\.down_proj$", "row", {}),
    (r"\.mlp\.experts$", "experts", {}),
    (r"\.mlp\.gate$", "skip", {}),
]
_BLOOM_LIKE_MLP = [
    (r"\.mlp\.dense_h_to_4h$", "column", {}),
    (r"\.mlp\.dense_4h_to_h$", "row", {}),
]

PRESETS: dict[str, list] = {
    "llama": _LLAMA_ATTN + _LLAMA_MLP,
    "mistral": _LLAMA_ATTN + _LLAMA_MLP,
    "qwen2": _LLAMA_ATTN + _LLAMA_MLP,
    "qwen3": _LLAMA_ATTN + _QK_NORM + _LLAMA_MLP,
    "gemma": _LLAMA_ATTN + _LLAMA_MLP,
    "gemma2": _LLAMA_ATTN + _LLAMA_MLP,
    "gemma3": _LLAMA_ATTN + _QK_NORM + _LLAMA_MLP,
    "phi3": [
        (r"\.self_attn\.qkv_proj$", "column", {"shape": (("q", "kv", "kv"), -1), "unit": "head"}),
        (r"\.self_attn\.o_proj$", "row", {"unit": "head"}),
        (r"\.mlp\.gate_up_proj$", "column", {"packed": 2}),
        (r"\.mlp\.down_proj$", "row", {}),
    ],
    # OLMo-2 normalises q and k over all heads at once (RMSNorm of width heads * head_dim), so q and k are
    # gathered before the norm and heads are split again by o_proj, as the model's HF tp_plan does.
    "olmo2": [
        (r"\.self_attn\.(q|k|v)_proj$", "column", {"unit": "head", "gather_output": True}),
        (r"\.self_attn\.o_proj$", "row", {"unit": "head", "split_input": True}),
    ] + _LLAMA_MLP,
    "starcoder2": _LLAMA_ATTN + [
        (r"\.mlp\.c_fc$", "column", {}),
        (r"\.mlp\.c_proj$", "row", {}),
    ],
    "gpt_neox": [
        (r"\.attention\.query_key_value$", "column", {"unit": "head3"}),
        (r"\.attention\.dense$", "row", {"unit": "head"}),
    ] + _BLOOM_LIKE_MLP,
    "gpt2": [
        (r"\.attn\.c_attn$", "column", {"shape": (3, -1), "unit": "head"}),
        (r"\.attn\.c_proj$", "row", {"unit": "head"}),
        (r"\.mlp\.c_fc$", "column", {}),
        (r"\.mlp\.c_proj$", "row", {}),
    ],
    "opt": [
        (r"\.self_attn\.(q|k|v)_proj$", "column", {"unit": "head"}),
        (r"\.self_attn\.out_proj$", "row", {"unit": "head"}),
        (r"\.fc1$", "column", {}),
        (r"\.fc2$", "row", {}),
    ],
    "falcon": [
        (r"\.self_attention\.query_key_value$", "column", {"falcon_qkv": True}),
        (r"\.self_attention\.dense$", "row", {"unit": "head"}),
    ] + _BLOOM_LIKE_MLP,
    "bloom": [
        (r"\.self_attention\.query_key_value$", "column", {"unit": "head3"}),
        (r"\.self_attention\.dense$", "row", {"unit": "head"}),
    ] + _BLOOM_LIKE_MLP,
    "mixtral": _LLAMA_ATTN + _EXPERTS,
    "qwen3_moe": _LLAMA_ATTN + _QK_NORM + _EXPERTS + _LLAMA_MLP,
}

# model_type values that map to a preset of another name.
PRESET_ALIASES = {
    "gemma3_text": "gemma3",
    "qwen2_moe": None,
    "RefinedWeb": "falcon",
    "RefinedWebModel": "falcon",
}

# Attention-module attributes that hold global head counts and are read in forward (checked against
# transformers 5.17 and 5.23). Localised only on modules whose q projection is split without a gather.
#   q: local query heads; kv: local KV heads (1 when replicated); groups: q / kv; q_width: q * head_dim.
ATTENTION_ATTRIBUTES = {
    "num_heads": "q",
    "num_attention_heads": "q",
    "num_key_value_heads": "kv",
    "num_kv_heads": "kv",
    "num_key_value_groups": "groups",
    "split_size": "q_width",  # GPT-2 splits c_attn's output by it
}

# Per-family extras (data): attention modules that read head counts from `self.config` in forward get a
# config view with local counts; ALiBi families get their per-head bias tensor sliced to the local heads.
# no_zero_heads: the attention forward divides by its local head count (Bloom's and Falcon's _merge_heads,
# Falcon's grouped _split_heads), so a split that leaves a rank without heads is refused for them.
# fused_qkv_unit: a fused q/k/v projection whose heads interleave [q_h k_h v_h] ("head3") when a plan names it
# without a `shape` (GPT-NeoX's and Bloom's query_key_value).
FAMILY_OPTIONS = {
    "phi3": {"config_view": True},
    "bloom": {"alibi_kwarg": "alibi", "no_zero_heads": True, "fused_qkv_unit": "head3"},
    "falcon": {"alibi_kwarg": "alibi", "no_zero_heads": True},
    "gpt_neox": {"fused_qkv_unit": "head3"},
}
