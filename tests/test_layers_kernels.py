"""TP layers with `tensor_parallel.kernels: triton` train like `torch` (CPU: Triton interpreter, gloo, TP=2).

Tolerance: both runs are fp32 with the same data and weights; the GEMMs differ only in summation order
(tests/test_kernels_gemm.py bounds that at twice torch's own error), so losses and parameters after three AdamW
steps agree to rtol 1e-5 (eps=1e-3 keeps AdamW from amplifying rounding-level gradients).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from families import engine_losses, tiny_model

pytest.importorskip("triton")


def _train(rank, world_size, family, kernels):
    import autotp

    model = tiny_model(family)
    config = {"train_micro_batch_size_per_gpu": 2, "tensor_parallel": {"autotp_size": 2, "kernels": kernels},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    from autotp.linear_mode import LinearMode

    kinds = {m.mode.kernels for m in engine.module.modules() if isinstance(getattr(m, "mode", None), LinearMode)}
    return engine_losses(engine), engine.consolidated_state_dict(), kinds


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D layers
def test_triton_kernels_train_like_torch(family):
    triton_run = run_distributed(2, _train, family, "triton")[0]
    torch_run = run_distributed(2, _train, family, "torch")[0]
    assert triton_run[2] == {"triton"} and torch_run[2] == {"torch"}
    torch.testing.assert_close(torch.tensor(triton_run[0]), torch.tensor(torch_run[0]), rtol=1e-5, atol=0)
    for name, value in torch_run[1].items():
        torch.testing.assert_close(triton_run[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
