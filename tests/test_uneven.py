"""Uneven TP splits, cut as DeepSpeed AutoTP cuts them, against the dense model (gloo, CPU).

Heads: whole KV groups per rank, the first kv_heads % tp ranks one group more (16 q / 4 KV heads over 3 ranks:
8, 4, 4 query heads; 2 KV heads over 3: one rank holds none). Plain features: `shard.split_sizes` (129 over 2:
65, 64), the column layer and the row layer reading its output cut the same way.

Reference: the same random-init model unsharded in one process. Tolerances as tests/test_families.py and
tests/test_zero.py: fp32, and TP only reorders sums (the row layers' all-reduce of partial products, the column
layers' all-reduce of input gradients), ~1e-7 relative; rtol 1e-5 leaves two orders of margin. A checkpoint
loaded at another TP size is compared bit-exact: resharding copies values, it computes nothing.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import os
import tempfile

import pytest
import torch

from dist_utils import run_distributed
from families import batch, tiny_model
from test_families import _compare_family, sgd_step
from test_zero import CLIP, _reference, _train

SMALL = dict(hidden_size=32, intermediate_size=50, head_dim=8)  # 50 features: 17, 17, 16 over 3 ranks
# name -> (family, overrides); query heads per rank at TP=3 in the comment.
TP3_CASES = {
    "mha_4_heads": ("llama", dict(SMALL, num_attention_heads=4, num_key_value_heads=4)),  # 2, 1, 1
    "gqa_2_kv": ("llama", dict(SMALL, num_attention_heads=4, num_key_value_heads=2)),  # 2, 2, 0
    "gqa_4_kv": ("llama", dict(SMALL, num_attention_heads=8, num_key_value_heads=4, head_dim=4)),  # 4, 2, 2
    "qwen3_gqa_2_kv": ("qwen3", dict(SMALL, num_attention_heads=4, num_key_value_heads=2)),  # per-head norms
    "phi3_gqa_2_kv": ("phi3", dict(SMALL, num_attention_heads=4, num_key_value_heads=2, head_dim=None)),  # fused
    "gpt2_mha": ("gpt2", dict(n_embd=32, n_head=4, n_inner=50)),  # Conv1D, split_size
    "bloom_mha": ("bloom", dict(n_embed=32, hidden_size=32, n_head=4)),  # ALiBi sliced per rank
    "falcon_grouped": ("falcon", dict(hidden_size=32, num_attention_heads=4, num_kv_heads=4)),
}
# TP=2 x DP=2: 6 q / 3 KV heads -> 4, 2 query heads; 129 MLP features -> 65, 64.
TP2_MODEL = dict(hidden_size=48, intermediate_size=129, num_attention_heads=6, num_key_value_heads=3, head_dim=8)
# Checkpoints: a rank without heads at TP=3, MLP features uneven at TP=3 (18, 18, 17) and TP=2 (27, 26).
CKPT_MODEL = dict(SMALL, intermediate_size=53, num_attention_heads=4, num_key_value_heads=2)
CKPT_BATCH, CKPT_SEQ = 12, 10  # global batch divisible by DP 1, 2, 3 and 4


# ---- the plan: what each rank holds ---------------------------------------------------------------------------

@pytest.mark.parametrize("q_heads, kv_heads, tp, q_per_rank, kv_per_rank", [
    (16, 2, 3, [8, 8, 0], [1, 1, 0]),  # DeepSpeed's example: rank 2 holds no head
    (16, 4, 3, [8, 4, 4], [2, 1, 1]),
    (16, 16, 3, [6, 5, 5], [6, 5, 5]),  # MHA: a group is one head
    (12, 4, 3, [6, 3, 3], [2, 1, 1]),  # q divides evenly, KV does not: q follows the KV groups
    (6, 2, 4, [3, 3, 0, 0], [1, 1, 0, 0]),  # KV replication needs q % tp == 0; else whole groups
    (4, 2, 4, [1, 1, 1, 1], [1, 1, 1, 1]),  # even q, tp a multiple of KV: replicated as before
])
def test_heads_split_in_whole_kv_groups(q_heads, kv_heads, tp, q_per_rank, kv_per_rank):
    from autotp.plan import ModelDims, Target, local_heads, resolve_plan, rules_from_preset

    hd, hidden = 8, q_heads * 8
    dims = ModelDims("llama", q_heads, kv_heads, hd, hidden)
    targets = [Target("model.layers.0.self_attn.q_proj", "linear", (q_heads * hd, hidden), True),
               Target("model.layers.0.self_attn.k_proj", "linear", (kv_heads * hd, hidden), True),
               Target("model.layers.0.self_attn.o_proj", "linear", (hidden, q_heads * hd), True),
               Target("model.layers.0.mlp.up_proj", "linear", (129, hidden), True),
               Target("model.layers.0.mlp.down_proj", "linear", (hidden, 129), True)]
    actions = resolve_plan(targets, rules_from_preset("llama"), dims, tp)

    def per_rank(name, width):
        layout = actions[f"model.layers.0.{name}"].layout
        return [layout.local_size(r) // width for r in range(tp)]

    assert per_rank("self_attn.q_proj", hd) == per_rank("self_attn.o_proj", hd) == q_per_rank
    kv_held = per_rank("self_attn.k_proj", hd)
    assert [local_heads(dims, tp, r) for r in range(tp)] == list(zip(q_per_rank, kv_per_rank))
    assert kv_held == kv_per_rank
    assert per_rank("mlp.up_proj", 1) == per_rank("mlp.down_proj", 1) == [129 // tp + (r < 129 % tp)
                                                                         for r in range(tp)]


def test_heads_that_are_no_q_or_kv_block_still_fail():
    # 5 heads of a 6-head model over 4 ranks: neither the query nor the KV heads, so no group rule applies.
    from autotp.plan import ModelDims, PlanError, Target, resolve_plan, rules_from_preset

    dims = ModelDims("llama", 6, 6, 16, 96)
    target = Target("model.layers.0.self_attn.q_proj", "linear", (80, 96), True)
    with pytest.raises(PlanError, match=r"model\.layers\.0\.self_attn\.q_proj.*5 heads.*size 80.*tp_size 4"):
        resolve_plan([target], rules_from_preset("llama"), dims, 4)


# ---- TP=3 against the dense model ------------------------------------------------------------------------------

def _compare_with(family: str, overrides: dict, tp: int, seq: int, **options) -> dict:
    """Dense vs TP parallelized with `options`: loss, and the consolidated state after one SGD step."""
    import autotp

    dense = tiny_model(family, **overrides).eval()
    model = copy.deepcopy(dense)
    autotp.parallelize(model, tp_size=tp, verbose=False, **options)
    ids = batch(seed=9, batch_size=2, seq=seq)
    loss_tp, loss_dense = model(input_ids=ids, labels=ids).loss, dense(input_ids=ids, labels=ids).loss
    loss_tp.backward()
    loss_dense.backward()
    sgd_step(dense, model)
    return dict(loss_tp=float(loss_tp.detach()), loss_dense=float(loss_dense.detach()),
                full=autotp.consolidated_state_dict(model), dense=dense.state_dict())


def _ckpt_engine(tp: int, stage: int):
    import autotp

    config = {"train_batch_size": CKPT_BATCH, "gradient_clipping": 0.5, "tensor_parallel": {"autotp_size": tp},
              "zero_optimization": {"stage": stage, "reduce_bucket_size": 3000},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.01}}}
    engine, *_ = autotp.initialize(model=tiny_model("llama", **CKPT_MODEL), config=config)
    return engine


def _ckpt_train(engine, steps: int) -> dict:
    """`steps` steps on a global batch that depends only on the step (any TP x DP layout); the full state."""
    for _ in range(steps):
        ids = batch(seed=500 + engine.global_steps, batch_size=CKPT_BATCH, seq=CKPT_SEQ)
        mine = ids.view(engine.dp_world_size, -1, CKPT_SEQ)[engine.dp_rank]
        engine.backward(engine(input_ids=mine, labels=mine).loss)
        engine.step()
    return engine.consolidated_state_dict()


def _tp3(rank, world_size, ckpt_dir):
    out = {"families": {name: _compare_family(family, "preset", world_size, overrides=overrides)
                        for name, (family, overrides) in TP3_CASES.items()}}
    out["sequence_parallel"] = _compare_with("llama", TP3_CASES["gqa_2_kv"][1], world_size, 11, sequence_parallel=True)
    # Saved at TP=3 with ZeRO-1 (rank 2's q/k/v/o shards are empty), continued without stopping.
    engine = _ckpt_engine(3, 1)
    out["q_shape"] = tuple(engine.module.model.layers[0].self_attn.q_proj.weight.shape)
    out["saved"] = _ckpt_train(engine, 2)
    engine.save_checkpoint(os.path.join(ckpt_dir, "tp3"))
    out["continued"] = _ckpt_train(engine, 2)
    # Loaded at TP=1 x DP=3 (ZeRO-2), saved there, and loaded back at TP=3 (ZeRO-0 this time).
    at_tp1 = _ckpt_engine(1, 2)
    at_tp1.load_checkpoint(os.path.join(ckpt_dir, "tp3"))
    out["loaded_tp1"] = at_tp1.consolidated_state_dict()
    at_tp1.save_checkpoint(os.path.join(ckpt_dir, "tp1"))
    out["trained_tp1"] = _ckpt_train(at_tp1, 2)
    back = _ckpt_engine(3, 0)
    back.load_checkpoint(os.path.join(ckpt_dir, "tp1"))
    out["loaded_back"] = back.consolidated_state_dict()
    out["trained_back"] = _ckpt_train(back, 2)
    if importlib.util.find_spec("triton") is not None:
        # The Triton GEMM and the fused GEMM + collective Functions on empty shards (rank 2): emulated on the
        # CPU (GEMM, then gloo), last in this process because the flag is global.
        from autotp_kernels import fused

        fused.TUNING.emulate, fused.TUNING.always = True, True
        out["triton"] = {sp: _compare_with("llama", TP3_CASES["gqa_2_kv"][1], world_size, 12, kernels="triton",
                                           sequence_parallel=sp) for sp in (False, True)}
    return out


@pytest.fixture(scope="module")
def ckpt_dir():
    with tempfile.TemporaryDirectory(prefix="autotp-uneven-") as path:
        yield path


@functools.lru_cache(maxsize=None)
def _tp3_results(ckpt_dir: str) -> list:
    return run_distributed(3, _tp3, ckpt_dir)


def _assert_state_close(got: dict, expected: dict, what: str) -> None:
    assert set(got) == set(expected), set(got) ^ set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=f"{what}: {name}")


@pytest.mark.parametrize("case", list(TP3_CASES))
def test_tp3_matches_dense(case, ckpt_dir):
    result = _tp3_results(ckpt_dir)[0]["families"][case]
    assert result["sharded"] > 0, result
    torch.testing.assert_close(result["loss_tp"], result["loss_dense"], rtol=1e-5, atol=0)
    assert result["worst_excess"] <= 1.0, result  # every parameter after one SGD step, rtol 1e-5 + atol 1e-6


def test_tp3_sequence_parallel_with_a_rank_without_heads(ckpt_dir):
    result = _tp3_results(ckpt_dir)[0]["sequence_parallel"]
    torch.testing.assert_close(result["loss_tp"], result["loss_dense"], rtol=1e-5, atol=0)
    _assert_state_close(result["full"], result["dense"], "sequence parallel")


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp3_triton_and_fused_paths_with_a_rank_without_heads(sequence_parallel, ckpt_dir):
    results = _tp3_results(ckpt_dir)[0]
    if "triton" not in results:
        pytest.skip("triton is not installed")
    result = results["triton"][sequence_parallel]
    torch.testing.assert_close(result["loss_tp"], result["loss_dense"], rtol=1e-5, atol=0)
    _assert_state_close(result["full"], result["dense"], f"kernels triton, sequence_parallel {sequence_parallel}")


def test_checkpoint_saved_at_tp3_loads_at_tp1_and_back(ckpt_dir):
    results = _tp3_results(ckpt_dir)
    assert [r["q_shape"] for r in results] == [(16, 32), (16, 32), (0, 32)]  # 2, 2, 0 heads of width 8
    first = results[0]
    for name, value in first["saved"].items():
        assert torch.equal(first["loaded_tp1"][name], value), name
        assert torch.equal(first["loaded_back"][name], value), name
    # Optimizer state came along: two more steps agree with the run that never stopped.
    _assert_state_close(first["trained_tp1"], first["continued"], "TP=1 after load")
    _assert_state_close(first["trained_back"], first["continued"], "TP=3 loaded from TP=1")


# ---- TP=2 x DP=2: ZeRO-2, uneven heads and features ------------------------------------------------------------

def _tp2_dp2(rank, world_size, ckpt_dir):
    out = {"dense": _compare_family("llama", "preset", 2, overrides=TP2_MODEL)}
    engine, _, norms = _train("llama", 2, 2, 2, 1, overrides=TP2_MODEL)
    out["zero2"] = dict(full=engine.consolidated_state_dict(), norms=norms,
                        mlp=tuple(engine.module.model.layers[0].mlp.up_proj.weight.shape))
    at_tp2 = _ckpt_engine(2, 2)
    at_tp2.load_checkpoint(os.path.join(ckpt_dir, "tp3"))
    out["loaded_tp2"] = at_tp2.consolidated_state_dict()
    out["trained_tp2"] = _ckpt_train(at_tp2, 2)
    return out


def test_tp2_dp2_zero2_uneven_heads_and_features(ckpt_dir):
    tp3 = _tp3_results(ckpt_dir)[0]  # writes the TP=3 checkpoint loaded here
    results = run_distributed(4, _tp2_dp2, ckpt_dir)
    first = results[0]
    # Plain SGD step at TP=2 (4, 2 query heads; 65, 64 MLP features) against the dense model.
    torch.testing.assert_close(first["dense"]["loss_tp"], first["dense"]["loss_dense"], rtol=1e-5, atol=0)
    assert first["dense"]["worst_excess"] <= 1.0, first["dense"]
    # ZeRO-2 over DP=2 against single-process AdamW on the global batch, clipping active.
    assert sorted(r["zero2"]["mlp"][0] for r in results) == [64, 64, 65, 65]
    ref_state, ref_norms = _reference("llama", 2, 1, overrides=TP2_MODEL)
    assert min(ref_norms) > CLIP, "clipping must be active for this test to check it"
    torch.testing.assert_close(torch.tensor(first["zero2"]["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    _assert_state_close(first["zero2"]["full"], ref_state, "ZeRO-2")
    # The TP=3 checkpoint at TP=2 x DP=2.
    for name, value in tp3["saved"].items():
        assert torch.equal(first["loaded_tp2"][name], value), name
    _assert_state_close(first["trained_tp2"], tp3["continued"], "TP=2 after load")
