"""Sharding plans (autotp/plan.py) resolved without processes, and the shard math they feed (autotp/shard.py).

References: the layouts are written out by hand from the head counts (4 query heads, 2 KV heads, head_dim 16
in tests/families.py); shard / unshard round trips are checked bit-exact (pure indexing, no arithmetic).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
import torch.nn as nn

from autotp.config import parse_partition_config
from autotp.plan import (ModelDims, PlanError, Target, build_rules, model_dims, preset_name_for, resolve_plan,
                         rules_from_layer_specs, rules_from_tp_plan)
from autotp.replace import collect_targets
from autotp.shard import Block, ShardLayout, shard_tensor, unshard_tensor
from families import FAMILIES, tiny_model

GQA = ModelDims(model_type="llama", q_heads=4, kv_heads=2, head_dim=16, hidden=64, vocab=103)


@functools.lru_cache(maxsize=None)
def _model(family: str, **overrides):
    return tiny_model(family, **overrides)


def _resolve(model, tp: int, preset=None, partition=None, strict=False):
    dims = model_dims(model.config)
    targets = collect_targets(model)
    rules, source = build_rules(model, targets, dims, preset, partition)
    return resolve_plan(targets, rules, dims, tp, strict=strict), source


def _blocks(action) -> list[tuple[int, int, int]]:
    return [(b.size, b.pieces, b.unit) for b in action.layout.blocks]


def _by_suffix(actions, suffix: str):
    (action,) = [a for name, a in actions.items() if name.endswith(suffix) and re.search(r"\.0\.", name)]
    return action


# ---- presets ------------------------------------------------------------------------------------------------

_LLAMA_LIKE = {"self_attn.q_proj": "column", "self_attn.k_proj": "column", "self_attn.v_proj": "column",
               "self_attn.o_proj": "row", "mlp.gate_proj": "column", "mlp.up_proj": "column", "mlp.down_proj": "row"}
_ATTN_ONLY = {k: v for k, v in _LLAMA_LIKE.items() if k.startswith("self_attn")}
_BLOOM_LIKE = {"query_key_value": "column", "dense": "row", "mlp.dense_h_to_4h": "column",
               "mlp.dense_4h_to_h": "row"}
_EXPECTED_STYLES = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE,
    "qwen3": {**_LLAMA_LIKE, "self_attn.q_norm": "skip", "self_attn.k_norm": "skip"},
    "gemma3_text": {**_LLAMA_LIKE, "self_attn.q_norm": "skip"},
    "olmo2": _LLAMA_LIKE,
    "phi3": {"self_attn.qkv_proj": "column", "self_attn.o_proj": "row", "mlp.gate_up_proj": "column",
             "mlp.down_proj": "row"},
    "starcoder2": {**_ATTN_ONLY, "mlp.c_fc": "column", "mlp.c_proj": "row"},
    "gpt_neox": _BLOOM_LIKE, "falcon": _BLOOM_LIKE, "bloom": _BLOOM_LIKE,
    "gpt2": {"attn.c_attn": "column", "attn.c_proj": "row", "mlp.c_fc": "column", "mlp.c_proj": "row"},
    "opt": {"self_attn.q_proj": "column", "self_attn.out_proj": "row", "fc1": "column", "fc2": "row"},
    "mixtral": {**_ATTN_ONLY, "mlp.experts.gate_up_proj": "column", "mlp.experts.down_proj": "row",
                "mlp.experts": "experts"},
    "qwen3_moe": {**_ATTN_ONLY, "mlp.experts.gate_up_proj": "column", "mlp.experts.down_proj": "row",
                  "mlp.experts": "experts", "self_attn.k_norm": "skip"},
}


def test_every_family_has_expectations():
    assert set(_EXPECTED_STYLES) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_preset_resolves_at_tp2(family):
    model = _model(family)
    dims = model_dims(model.config)
    preset = preset_name_for(dims.model_type)
    assert preset is not None, f"no preset for model_type {dims.model_type!r}"
    # strict: every Linear inside a block is placed by the preset.
    actions, source = _resolve(model, 2, preset=preset, strict=True)
    assert source == f"preset:{preset}"
    for suffix, style in _EXPECTED_STYLES[family].items():
        assert _by_suffix(actions, "." + suffix).style == style, suffix
    # DeepSpeed AutoTP keeps embeddings and the LM head replicated under presets.
    assert not any(a.target.kind == "embedding" for a in actions.values())
    assert not any(name.endswith(("lm_head", "embed_out")) for name in actions)
    for action in actions.values():
        if action.layout is not None:
            assert action.layout.tp_size == 2
            assert all(local > 0 for local in (action.layout.local_size(r) for r in range(2)))


@pytest.mark.parametrize("family", ["llama", "qwen3", "mixtral", "opt", "gpt2"])
def test_attention_splits_on_head_boundaries(family):
    model = _model(family)
    dims = model_dims(model.config)
    actions, _ = _resolve(model, 2, preset=preset_name_for(dims.model_type))
    for suffix in ("q_proj", "o_proj", "out_proj", "c_attn"):
        for name, action in actions.items():
            if name.endswith("." + suffix):
                assert {unit for _, _, unit in _blocks(action)} == {dims.head_dim}, name


def test_gpt2_fused_qkv_is_three_blocks_in_conv1d_storage():
    # Conv1D stores [in, out]: the output features being split are storage dimension 1.
    actions, _ = _resolve(_model("gpt2"), 2, preset="gpt2")
    c_attn = _by_suffix(actions, "attn.c_attn")
    assert (c_attn.weight_dim, _blocks(c_attn)) == (1, [(64, 2, 16)] * 3)
    assert _by_suffix(actions, "attn.c_proj").weight_dim == 0


def test_kv_heads_replicated_when_fewer_than_tp():
    # 2 KV heads over tp 4: each KV head is held by 2 ranks; query heads still split 4 ways.
    actions, _ = _resolve(_model("llama"), 4, preset="llama")
    q, k, v = (_by_suffix(actions, f"self_attn.{n}_proj") for n in "qkv")
    assert (_blocks(q), q.kv_replicas) == ([(64, 4, 16)], 1)
    for kv in (k, v):
        assert (_blocks(kv), kv.kv_replicas) == ([(32, 2, 16)], 2)
        assert [kv.layout.local_ranges(r) for r in range(4)] == [[(0, 16)], [(0, 16)], [(16, 16)], [(16, 16)]]


def test_heads_not_divisible_split_unevenly_on_head_boundaries():
    # 6 heads over tp 4: 2, 2, 1, 1 whole heads (tests/test_uneven.py runs such splits against the dense model).
    model = _model("llama", num_attention_heads=6, num_key_value_heads=6, hidden_size=96)
    actions, _ = _resolve(model, 4, preset="llama")
    q = _by_suffix(actions, "self_attn.q_proj")
    assert [q.layout.local_size(r) for r in range(4)] == [32, 32, 16, 16]


def test_kv_heads_not_replicable_split_in_whole_groups():
    # 3 KV heads over tp 2: neither divisible nor a divisor of tp, so DeepSpeed's rule: 2 groups, then 1.
    dims = ModelDims("llama", q_heads=6, kv_heads=3, head_dim=16, hidden=96)
    targets = [Target("model.layers.0.self_attn.k_proj", "linear", (48, 96), True)]
    action = resolve_plan(targets, rules_from_tp_plan({"model.layers.*.self_attn.k_proj": "colwise"}), dims, 2)
    k = action["model.layers.0.self_attn.k_proj"]
    assert (k.layout.local_ranges(0), k.layout.local_ranges(1), k.kv_replicas) == ([(0, 32)], [(32, 16)], 1)


# ---- layer_specs: DeepSpeed's sub-parameter shapes --------------------------------------------------------


def _spec_rules(*specs, **partition):
    return rules_from_layer_specs(parse_partition_config({"layer_specs": list(specs), **partition}).layer_specs)


def test_shape_two_equal_halves():
    target = Target("layers.0.mlp.gate_up", "linear", (192, 64), True)
    rules = _spec_rules({"patterns": [r".*\.gate_up\.weight$"], "partition_type": "column", "shape": [2, -1]})
    action = resolve_plan([target], rules, ModelDims(), 2)[target.name]
    assert (action.style, action.weight_dim, action.layout.view) == ("column", 0, None)
    assert _blocks(action) == [(96, 2, 1), (96, 2, 1)]
    # Each rank holds its half of gate and its half of up.
    assert action.layout.local_ranges(0) == [(0, 48), (96, 48)]
    assert action.layout.local_ranges(1) == [(48, 48), (144, 48)]


def test_shape_gqa_fused_qkv_at_tp2_and_tp4():
    target = Target("model.layers.0.self_attn.qkv_proj", "linear", (128, 64), True)
    rules = _spec_rules({"patterns": [r".*qkv_proj\.weight$"], "shape": [[64, 32, 32], -1]})
    at2 = resolve_plan([target], rules, GQA, 2)[target.name]
    assert (_blocks(at2), at2.kv_replicas) == ([(64, 2, 16), (32, 2, 16), (32, 2, 16)], 1)
    at4 = resolve_plan([target], rules, GQA, 4)[target.name]
    assert (_blocks(at4), at4.kv_replicas) == ([(64, 4, 16), (32, 2, 16), (32, 2, 16)], 2)
    assert at4.layout.local_ranges(1) == [(16, 16), (64, 16), (96, 16)]
    assert at4.layout.local_ranges(2) == [(32, 16), (80, 16), (112, 16)]


def test_shape_that_does_not_multiply_out_fails():
    target = Target("model.layers.0.self_attn.qkv_proj", "linear", (128, 64), True)
    rules = _spec_rules({"patterns": [r".*qkv_proj$"], "shape": [[64, 32, 16], -1]})
    with pytest.raises(PlanError) as info:
        resolve_plan([target], rules, GQA, 2)
    message = str(info.value)
    assert "model.layers.0.self_attn.qkv_proj" in message and "[128, 64]" in message


def test_row_spec_splits_input_features():
    target = Target("layers.0.mlp.down", "linear", (64, 96), True)
    action = resolve_plan([target], _spec_rules({"patterns": [".*down"], "partition_type": "row"}), ModelDims(), 2)
    assert (action[target.name].weight_dim, _blocks(action[target.name])) == (1, [(96, 2, 1)])


def test_reshaped_row_spec_splits_at_its_partition_dim():
    # DeepSpeed's default partition_dim for row is 1 whatever the shape's length: [64, [48, 48], -1] views the
    # [64, 96] weight as [64, 96, 1] and splits the two 48-wide input halves, as config.py validated.
    target = Target("layers.0.mlp.down", "linear", (64, 96), True)
    rules = _spec_rules({"patterns": [".*down"], "partition_type": "row", "shape": [64, [48, 48], -1]})
    action = resolve_plan([target], rules, ModelDims(), 2)[target.name]
    assert (action.weight_dim, action.layout.dim, _blocks(action)) == (1, 1, [(48, 2, 1), (48, 2, 1)])
    full = torch.randn(64, 96)
    shard = shard_tensor(full, action.layout, 1)
    assert torch.equal(shard, torch.cat([full[:, 24:48], full[:, 72:96]], dim=1))


def test_layer_spec_patterns_use_re_match_from_the_start():
    target = Target("layers.0.attn.o_proj", "linear", (64, 64), True)
    unanchored = _spec_rules({"patterns": ["o_proj"], "partition_type": "row"})
    assert resolve_plan([target], unanchored, ModelDims(), 2) == {}
    anchored = _spec_rules({"patterns": [r".*\.o_proj\.weight$"], "partition_type": "row"})
    assert resolve_plan([target], anchored, ModelDims(), 2)[target.name].style == "row"


@pytest.mark.parametrize("model_types, matched", [(["llama"], True), (["LLaMA", "mistral"], True),
                                                  (["mistral"], False)])
def test_model_types_filter(model_types, matched):
    target = Target("layers.0.attn.o_proj", "linear", (64, 64), True)
    rules = _spec_rules({"patterns": [".*o_proj"], "partition_type": "row", "model_types": model_types})
    assert (target.name in resolve_plan([target], rules, GQA, 2)) is matched


def test_custom_spec_wins_over_preset_when_merged():
    partition = parse_partition_config({"layer_specs": [{"patterns": [r".*\.mlp\.down_proj"],
                                                         "partition_type": "skip"}]})
    actions, source = _resolve(_model("llama"), 2, partition=partition)
    assert source == "partition_config"
    assert _by_suffix(actions, "mlp.down_proj").style == "skip"
    assert _by_suffix(actions, "mlp.up_proj").style == "column"  # from the llama preset


def test_strict_mode_names_unmatched_layer():
    partition = parse_partition_config({"use_default_specs": False, "strict_mode": True, "layer_specs": [
        {"patterns": [r".*self_attn\.(q|k|v)_proj"], "partition_type": "column"},
        {"patterns": [r".*self_attn\.o_proj"], "partition_type": "row"},
        {"patterns": [r".*mlp\.(gate|up)_proj"], "partition_type": "skip"}]})
    with pytest.raises(PlanError) as info:
        _resolve(_model("llama"), 2, partition=partition, strict=True)
    message = str(info.value)
    assert "strict_mode" in message and "model.layers.0.mlp.down_proj" in message
    assert "model.layers.1.mlp.down_proj" in message and "gate_proj" not in message
    # The same specs outside strict mode leave down_proj replicated.
    actions, _ = _resolve(_model("llama"), 2, partition=partition, strict=False)
    assert not any(name.endswith("down_proj") for name in actions)


# ---- HF tp_plan conversion ----------------------------------------------------------------------------------

# style -> (autotp style, options that must be set)
_HF_STYLES = {
    "colwise": ("column", {}),
    "rowwise": ("row", {}),
    "colwise_gather_output": ("column", {"gather_output": True}),
    "rowwise_split_input": ("row", {"split_input": True}),
    "packed_colwise": ("column", {"packed": 2}),
    "moe_tp_experts": ("experts", {}),
    "replicated_with_grad_allreduce": ("skip", {"grad_allreduce": True}),
    "embedding_rowwise": ("vocab", {}),
    "embedding_colwise": ("embed_dim", {}),
}


@pytest.mark.parametrize("hf_style", sorted(_HF_STYLES))
def test_tp_plan_style_converts(hf_style):
    (rule,) = rules_from_tp_plan({"layers.*.mlp.up_proj": hf_style}, prefix="model")
    style, options = _HF_STYLES[hf_style]
    assert (rule.style, rule.options, rule.source) == (style, options, f"tp_plan:{hf_style}")
    # Keys are relative to the base model, `*` stands for a layer index, and the whole name must match.
    assert rule.matches(["model.layers.11.mlp.up_proj"], "llama")
    assert not rule.matches(["model.layers.1.mlp.up_proj_extra"], "llama")
    assert not rule.matches(["model.layers.x.mlp.up_proj"], "llama")


def test_tp_plan_actions_carry_each_style():
    targets = [
        Target("model.embed_tokens", "embedding", (103, 64)),
        Target("model.embed_positions", "embedding", (64, 64)),
        Target("model.layers.0.self_attn.q_proj", "linear", (64, 64), True),
        Target("model.layers.0.self_attn.o_proj", "linear", (64, 64), True),
        Target("model.layers.0.mlp.gate_up_proj", "linear", (192, 64), True),
        Target("model.layers.0.mlp.experts", "module", (), True),
        Target("model.layers.0.self_attn.q_norm", "module", (), True),
        Target("lm_head", "linear", (103, 64)),
    ]
    plan = {"model.embed_tokens": "embedding_rowwise", "model.embed_positions": "embedding_colwise",
            "model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.self_attn.o_proj": "rowwise_split_input",
            "model.layers.*.mlp.gate_up_proj": "packed_colwise", "model.layers.*.mlp.experts": "moe_tp_experts",
            "model.layers.*.self_attn.q_norm": "replicated_with_grad_allreduce", "lm_head": "colwise_gather_output"}
    actions = resolve_plan(targets, rules_from_tp_plan(plan), GQA, 2)
    embed, positions = actions["model.embed_tokens"], actions["model.embed_positions"]
    assert (embed.style, embed.weight_dim, _blocks(embed)) == ("vocab", 0, [(103, 2, 1)])  # uneven vocab allowed
    assert [embed.layout.local_size(r) for r in range(2)] == [52, 51]
    assert (positions.style, positions.weight_dim, _blocks(positions)) == ("embed_dim", 1, [(64, 2, 1)])
    q = actions["model.layers.0.self_attn.q_proj"]
    assert (q.style, _blocks(q), q.gather_output) == ("column", [(64, 2, 16)], False)
    o = actions["model.layers.0.self_attn.o_proj"]
    assert (o.style, o.weight_dim, o.split_input) == ("row", 1, True)
    packed = actions["model.layers.0.mlp.gate_up_proj"]
    assert _blocks(packed) == [(96, 2, 1), (96, 2, 1)]
    experts = actions["model.layers.0.mlp.experts"]
    assert (experts.style, experts.layout) == ("experts", None)
    norm = actions["model.layers.0.self_attn.q_norm"]
    assert (norm.style, norm.grad_allreduce, norm.layout) == ("skip", True, None)
    head = actions["lm_head"]
    assert (head.style, head.gather_output, [head.layout.local_size(r) for r in range(2)]) == ("column", True, [52, 51])


def test_model_tp_plan_is_used_by_default():
    model = _model("llama")
    actions, source = _resolve(model, 2)
    assert source == "tp_plan"
    assert actions["model.layers.0.self_attn.o_proj"].style == "row"
    assert actions["lm_head"].gather_output
    # transformers 5.23 adds `embedding_rowwise` for embed_tokens to the merged plan; 5.17 does not.
    if "model.embed_tokens" in model._tp_plan:
        assert actions["model.embed_tokens"].style == "vocab"
    else:
        assert "model.embed_tokens" not in actions


def test_unknown_tp_plan_style_names_style_and_layer():
    with pytest.raises(PlanError) as info:
        rules_from_tp_plan({"layers.*.mlp.up_proj": "colwise", "layers.*.mlp.down_proj": "sequence_parallel"})
    message = str(info.value)
    assert "'sequence_parallel'" in message and "'layers.*.mlp.down_proj'" in message and "layer_specs" in message


def test_unknown_style_in_model_tp_plan():
    model = tiny_model("llama")
    model._tp_plan = {"model.layers.*.mlp.up_proj": "local_colwise"}
    with pytest.raises(PlanError, match=r"'local_colwise' for layer 'model\.layers\.\*\.mlp\.up_proj'"):
        _resolve(model, 2)


# ---- heuristics on models with no plan ---------------------------------------------------------------------


class _Attention(nn.Module):
    def __init__(self, width: int, fused: bool = False):
        super().__init__()
        if fused:
            self.qkv = nn.Linear(width, 3 * width)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, width) for _ in range(3))
        self.o_proj = nn.Linear(width, width)


class _FFN(nn.Module):
    def __init__(self, width: int, names=("fc1", "fc2")):
        super().__init__()
        setattr(self, names[0], nn.Linear(width, 2 * width))
        setattr(self, names[1], nn.Linear(2 * width, width))


class _Block(nn.Module):
    def __init__(self, width: int, ffn_names=("fc1", "fc2"), fused: bool = False, attention: bool = True):
        super().__init__()
        if attention:
            self.attn = _Attention(width, fused)
        self.ffn = _FFN(width, ffn_names)


class _Net(nn.Module):
    def __init__(self, width: int = 32, **block):
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.layers = nn.ModuleList(_Block(width, **block) for _ in range(2))
        self.head = nn.Linear(width, 50)


def _heuristic(model: nn.Module, tp: int = 2):
    targets = collect_targets(model)
    dims = model_dims(getattr(model, "config", None))
    rules, source = build_rules(model, targets, dims, None, None)
    return resolve_plan(targets, rules, dims, tp), source


def test_heuristics_place_a_plain_module_model():
    actions, source = _heuristic(_Net())
    assert source == "heuristics"
    styles = {name: action.style for name, action in actions.items()}
    expected = {}
    for layer in range(2):
        expected.update({f"layers.{layer}.attn.{p}_proj": "column" for p in "qkv"})
        expected.update({f"layers.{layer}.attn.o_proj": "row", f"layers.{layer}.ffn.fc1": "column",
                         f"layers.{layer}.ffn.fc2": "row"})
    assert styles == expected  # embed and head live outside the blocks and stay replicated
    assert _blocks(actions["layers.0.ffn.fc2"]) == [(64, 2, 1)]


def test_heuristics_without_a_row_layer_ask_for_layer_specs():
    with pytest.raises(PlanError) as info:
        _heuristic(_Net(ffn_names=("expand", "contract"), attention=False))
    message = str(info.value)
    assert "_Net" in message and "tensor_parallel.partition_config.layer_specs" in message


def test_heuristics_refuse_to_guess_a_fused_qkv_layout():
    with pytest.raises(PlanError) as info:
        _heuristic(_Net(fused=True))
    message = str(info.value)
    assert "layers.0.attn.qkv" in message and "96 features" in message and "layer_specs" in message


# ---- shard / unshard ----------------------------------------------------------------------------------------


def _round_trip(full: torch.Tensor, layout: ShardLayout) -> list[torch.Tensor]:
    shards = [shard_tensor(full, layout, rank) for rank in range(layout.tp_size)]
    assert torch.equal(unshard_tensor(shards, layout, full.shape), full)  # indexing only: bit-exact
    return shards


def test_round_trip_uneven_vocabulary():
    full = torch.randn(103, 8)
    shards = _round_trip(full, ShardLayout(0, (Block(103, 2, 1),), 2))
    assert torch.equal(shards[0], full[:52]) and torch.equal(shards[1], full[52:])


def test_round_trip_uneven_heads_on_conv1d_storage_dim():
    # 3 heads of 16 over 2 ranks along dim 1: rank 0 gets 2 heads, rank 1 one; heads are never cut.
    full = torch.randn(8, 48)
    shards = _round_trip(full, ShardLayout(1, (Block(48, 2, 16),), 2))
    assert torch.equal(shards[0], full[:, :32]) and torch.equal(shards[1], full[:, 32:])


def test_round_trip_replicated_kv_blocks():
    full = torch.randn(128, 8)
    layout = ShardLayout(0, (Block(64, 4, 16), Block(32, 2, 16), Block(32, 2, 16)), 4)
    shards = _round_trip(full, layout)
    assert torch.equal(shards[1], torch.cat([full[16:32], full[64:80], full[96:112]]))
    assert torch.equal(shards[0][16:], shards[1][16:])  # ranks 0 and 1 hold the same KV head
    assert not torch.equal(shards[1][16:], shards[2][16:])


def test_round_trip_through_a_view():
    # A [4, 30] weight seen as [4, 6, 5], split on the 6: every shard is [4, 15].
    full = torch.randn(4, 30)
    layout = ShardLayout(1, (Block(6, 2, 1),), 2, view=(4, 6, 5))
    shards = _round_trip(full, layout)
    assert [tuple(s.shape) for s in shards] == [(4, 15), (4, 15)]
    assert torch.equal(shards[1], full[:, 15:])
