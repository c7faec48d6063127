"""Eight ranks on the CPU (gloo): the layouts of an 8-GPU node, TP=8 and TP=4 x DP=2 ZeRO-2, against the dense
model and single-process AdamW. The 8-GPU machines are rarely lent (issue 8): these are the code paths that
run there, checked where they can be.

TP=8 uses 8 query heads and 2 KV heads (each KV head replicated on 4 ranks, one query head per rank) and a
vocabulary of 103 (not divisible by 8). Tolerances are those of the TP=2/4 tests they extend, for the same
reason: partial products summed over ranks in another order than one GEMM (fp32 rounding, ~1e-7 relative).
"""

from __future__ import annotations

import torch

from dist_utils import run_distributed
from test_families import _compare_family
from test_zero import CLIP, _reference, _train

TP8_HEADS = dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8)


def _tp8(rank, world_size):
    return {family: _compare_family(family, "preset", world_size, overrides=TP8_HEADS)
            for family in ("llama", "qwen3")}


def test_tp8_matches_dense():
    results = run_distributed(8, _tp8)[0]
    for family, result in results.items():
        assert result["sharded"] > 0, (family, result)
        torch.testing.assert_close(result["loss_tp"], result["loss_dense"], rtol=1e-5, atol=0, msg=family)
        assert result["worst_excess"] <= 1.0, (family, result)


def _tp4_dp2(rank, world_size):
    engine, _, norms = _train("qwen3", 4, 2, 2, 1)
    return dict(full=engine.consolidated_state_dict(), norms=norms, ranks=(engine.tp_rank, engine.dp_rank))


def test_tp4_dp2_zero2_matches_single_process_adamw():
    results = run_distributed(8, _tp4_dp2)
    assert sorted(r["ranks"] for r in results) == [(t, d) for t in range(4) for d in range(2)]
    ref_state, ref_norms = _reference("qwen3", 2, 1)
    assert min(ref_norms) > CLIP, "clipping must be active for this test to check it"
    for result in results:  # every rank reports the same global norm
        torch.testing.assert_close(torch.tensor(result["norms"]), torch.tensor(ref_norms), rtol=1e-5, atol=0)
    for name, expected in ref_state.items():
        torch.testing.assert_close(results[0]["full"][name], expected, rtol=1e-5, atol=1e-6, msg=name)
