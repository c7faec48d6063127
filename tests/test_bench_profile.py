"""bench/profile_summary.py: kernel categories and the exposed-collective arithmetic on hand-made timelines."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
from profile_summary import category, summarise  # noqa: E402


def test_kernel_names_fall_into_their_categories():
    assert category("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64") == "GEMM"
    assert category("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NTN") == "GEMM"
    assert category("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "collectives"
    assert category("reduce_chunks_kernel") == "collectives"
    assert category("flash_fwd_kernel") == "attention"
    assert category("multi_tensor_apply_kernel") == "optimizer"
    assert category("vectorized_elementwise_kernel") == "other"


def test_exposed_collective_time_is_what_no_compute_kernel_covers():
    kernels = [("gemm_a", 0, 100), ("ncclDevKernel_AllReduce", 50, 180), ("gemm_b", 150, 160),
               ("elementwise", 200, 220), ("ncclDevKernel_ReduceScatter", 210, 260)]
    rows = {r["category"]: r for r in summarise(kernels, step_us=300.0)}
    # AllReduce 50-180 overlaps gemm_a (50-100) and gemm_b (150-160): 70 us exposed; ReduceScatter 210-260
    # overlaps the elementwise kernel 210-220: 40 us exposed. 110 us in all.
    assert rows["collectives"]["exposed_ms"] == 0.11
    assert rows["collectives"]["kernel_ms"] == 0.18
    assert rows["GEMM"]["kernel_ms"] == 0.11
    # Busy: 0-180 and 200-260 -> 240 us; idle 60 us of 300.
    assert rows["GPU idle"]["kernel_ms"] == 0.06


def test_top_kernels_rank_by_summed_time_and_count_calls():
    from profile_summary import top_kernels

    kernels = [("gemm_a", 0, 100), ("ncclDevKernel_AllReduce", 100, 130), ("ncclDevKernel_AllReduce", 200, 290),
               ("elementwise", 300, 310)]
    top = top_kernels(kernels, count=2)
    assert [r["kernel"] for r in top] == ["ncclDevKernel_AllReduce", "gemm_a"]
    assert top[0]["calls"] == 2 and top[0]["ms"] == 0.12 and top[0]["category"] == "collectives"
