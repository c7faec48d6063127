"""DeepSpeed drop-in parity: plans written as DeepSpeed accepts them, tied embeddings, layer_specs that name
parameters, TP=1, and merged tp_plan sources (issue 17). Nothing may train silently wrong.

Reference: the dense model in one process. Tolerance: fp32; TP only reorders sums (partial products summed by
an all-reduce), ~1e-7 relative, so rtol 1e-5 leaves two orders of margin and still catches any wrong shard.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dist_utils import run_distributed
from families import batch, tiny_model

RTOL, ATOL = 1e-5, 1e-6  # fp32 sums in another order (module docstring)


def _sgd_config(tp: int, **tensor_parallel):
    return {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
            "optimizer": {"type": "SGD", "params": {"lr": 0.5}},
            "tensor_parallel": {"autotp_size": tp, **tensor_parallel}}


def _dense_step(model, ids):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach()), {k: v.detach().clone() for k, v in model.state_dict().items()}


def _engine_step(model, config, ids):
    import autotp

    engine, _, _, _ = autotp.initialize(model=model, config=config)
    loss = engine(input_ids=ids, labels=ids).loss
    engine.backward(loss)
    engine.step()
    split = sorted(n for n, m in engine.module.named_modules() if hasattr(m, "layout") or hasattr(m, "tp_shard"))
    return float(loss.detach()), engine.consolidated_state_dict(), split


# ---- 1. tied embeddings stay tied ---------------------------------------------------------------------------

def _tied_step(rank, world_size):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return _engine_step(model, _sgd_config(world_size, vocab_parallel_loss=False), batch(seed=3, batch_size=2, seq=8))


@pytest.mark.parametrize("tp", [2, 4])
def test_tied_embeddings_stay_tied_and_exact(tp):
    """Qwen2's HF plan splits lm_head (colwise_gather_output); its tied embedding was left whole and the
    consolidated pair differed after one step."""
    dense = tiny_model("qwen2", tie_word_embeddings=True)
    ref_loss, ref_state = _dense_step(dense, batch(seed=3, batch_size=2, seq=8))
    loss, state, split = run_distributed(tp, _tied_step)[0]
    assert "model.embed_tokens" in split and "lm_head" in split
    torch.testing.assert_close(state["lm_head.weight"], state["model.embed_tokens.weight"], rtol=0, atol=0)
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=RTOL, atol=ATOL, msg=name)


def _tie_split_differently(rank, world_size):
    import autotp
    from autotp.plan import PlanError

    model = tiny_model("qwen2", tie_word_embeddings=True)
    with pytest.raises(PlanError) as info:
        autotp.parallelize(model, tp_size=world_size, partition_config={"lm_head": "rowwise"}, verbose=False)
    return str(info.value)


def test_tie_split_another_way_is_refused():
    message = run_distributed(2, _tie_split_differently)[0]
    assert "tied" in message and "lm_head" in message and "model.embed_tokens" in message


# ---- 2. DeepSpeed-style tp_plan keys; a plan that shards nothing ----------------------------------------

DS_PLAN = {"*.q_proj": "colwise", "*.k_proj": "colwise", "*.v_proj": "colwise", "*.o_proj": "rowwise",
           "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise", "down_proj": "rowwise"}


def _deepspeed_keys(rank, world_size, plan, where):
    import autotp

    model = tiny_model("llama")
    if where == "instance":
        model._tp_plan = dict(plan)
        config = _sgd_config(world_size)
    else:
        config = _sgd_config(world_size)
        autotp.parallelize(model, tp_size=world_size, partition_config=dict(plan), verbose=False)
    return _engine_step(model, config, batch(seed=4, batch_size=2, seq=8))


@pytest.mark.parametrize("where", ["instance", "argument"])
def test_deepspeed_style_plan_keys_shard_and_train_exactly(where):
    dense = tiny_model("llama")
    ref_loss, ref_state = _dense_step(dense, batch(seed=4, batch_size=2, seq=8))
    loss, state, split = run_distributed(2, _deepspeed_keys, DS_PLAN, where)[0]
    for layer in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj", "mlp.up_proj"):
        assert f"model.layers.1.{layer}" in split, (layer, split)
    assert loss == pytest.approx(ref_loss, rel=RTOL)
    for name, value in ref_state.items():
        torch.testing.assert_close(state[name], value, rtol=RTOL, atol=ATOL, msg=name)


def _plan_matching_nothing(rank, world_size, plan):
    import autotp
    from autotp.plan import PlanError

    model = tiny_model("llama")
    model._tp_plan = dict(plan)
    model.config.base_model_tp_plan = {}
    type(model)._tp_plan, saved = {}, type(model)._tp_plan
    try:
        with pytest.raises(PlanError) as info:
            autotp.parallelize(model, tp_size=world_size, verbose=False)
    finally:
        type(model)._tp_plan = saved
    return str(info.value)


def test_plan_that_splits_nothing_raises_naming_its_keys():
    message = run_distributed(2, _plan_matching_nothing, {"*.query": "colwise", "attn_out": "rowwise"})[0]
    assert "splits no layer" in message and "*.query" in message and "attn_out" in message


# ---- 9. tp_plan sources merge per key -------------------------------------------------------------------

def test_instance_tp_plan_merges_with_class_and_config_plans():
    from autotp.plan import hf_tp_plan

    model = tiny_model("llama")
    model._tp_plan = {"model.layers.*.mlp.down_proj": "rowwise_split_input", "*.q_proj": "colwise"}
    plan, _ = hf_tp_plan(model)
    assert plan["model.layers.*.mlp.down_proj"] == "rowwise_split_input"  # the instance wins its key
    assert plan["model.layers.*.self_attn.o_proj"] == "rowwise"  # the config's base plan, prefixed
    assert plan["lm_head"] == type(model)._tp_plan["lm_head"]  # the class's plan
    assert list(plan)[:2] == ["model.layers.*.mlp.down_proj", "*.q_proj"]  # instance rules are tried first


# ---- 3. layer_specs name parameters: ModuleList Linears and linear-like modules --------------------------

class LinearLike(nn.Module):
    """Not an nn.Linear: its own weight used as x @ weight.T, plus a bias."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in ** 0.5)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        return x @ self.weight.T + self.bias


class Stack(nn.Module):
    """Linears in an nn.ModuleList (no module of its own has a weight), then a column/row pair of custom
    linear-like modules."""

    def __init__(self):
        super().__init__()
        self.linears = nn.ModuleList([nn.Linear(8, 12), nn.Linear(12, 8)])
        self.up = LinearLike(8, 16)
        self.down = nn.Linear(16, 8, bias=False)

    def forward(self, x):
        x = self.linears[1](torch.relu(self.linears[0](x)))
        return self.down(torch.tanh(self.up(x)))


STACK_SPECS = [
    {"patterns": [r"linears\.0\.weight$", r"up\.weight$"], "partition_type": "column"},
    {"patterns": [r"linears\.1\.weight$", r"down\.weight$"], "partition_type": "row"},
]


def _stack_step(rank, world_size, specs):
    import autotp

    torch.manual_seed(0)
    model = Stack()
    config = {"train_micro_batch_size_per_gpu": 4, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
              "tensor_parallel": {"autotp_size": world_size,
                                  "partition_config": {"use_default_specs": False, "layer_specs": specs}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    return float(loss.detach()), engine.consolidated_state_dict(), tuple(engine.module.up.weight.shape)


@pytest.mark.parametrize("tp", [2, 4])
def test_layer_specs_on_modulelist_and_linear_like_modules(tp):
    torch.manual_seed(0)
    dense = Stack()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(5))
    ref_loss = dense(x).square().mean()
    ref_loss.backward()
    optimizer.step()
    loss, state, up_shape = run_distributed(tp, _stack_step, STACK_SPECS)[0]
    assert up_shape == (16 // tp, 8)
    assert loss == pytest.approx(float(ref_loss.detach()), rel=RTOL)
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=RTOL, atol=ATOL, msg=name)


def _weight_suffix_everywhere(rank, world_size):
    """DeepSpeed's documented form `.*\\.weight$` matches parameter names only: the ModuleList container
    'linears' (no weight of its own) is not a candidate."""
    import autotp

    model = Stack()
    specs = [{"patterns": [r"linears\.1\.weight$", r"down\.weight$"], "partition_type": "row"},
             {"patterns": [r".*\.weight$"], "partition_type": "column"}]
    autotp.parallelize(model, tp_size=world_size, partition_config={"use_default_specs": False,
                                                                    "layer_specs": specs}, verbose=False)
    return tuple(model.linears[0].weight.shape), tuple(model.up.weight.shape)


def test_weight_suffix_pattern_skips_containers():
    assert run_distributed(2, _weight_suffix_everywhere)[0] == ((6, 8), (8, 8))


# ---- 4. TP=1 is plain data parallelism of any module ------------------------------------------------------

class Opaque(nn.Module):
    """No Linear inside a block: the heuristics cannot place it."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 6)])

    def forward(self, x):
        return self.blocks[1](self.blocks[0](x))


def _tp1_dp(rank, world_size, tensor_parallel):
    import autotp

    torch.manual_seed(0)
    model = Opaque()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2},
              "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, **tensor_parallel}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    x = torch.randn(2 * world_size, 6, generator=torch.Generator().manual_seed(1))[2 * rank: 2 * rank + 2]
    engine.backward(engine(x).square().mean())
    engine.step()
    return engine.consolidated_state_dict()


@pytest.mark.parametrize("tensor_parallel", [{}, {"tensor_parallel": {"autotp_size": 1}}])
def test_tp1_trains_any_module_with_zero(tensor_parallel):
    torch.manual_seed(0)
    dense = Opaque()
    optimizer = torch.optim.SGD(dense.parameters(), lr=0.1)
    dense(torch.randn(4, 6, generator=torch.Generator().manual_seed(1))).square().mean().backward()
    optimizer.step()
    state = run_distributed(2, _tp1_dp, tensor_parallel)[0]
    for name, value in dense.state_dict().items():
        torch.testing.assert_close(state[name], value, rtol=RTOL, atol=ATOL, msg=name)
