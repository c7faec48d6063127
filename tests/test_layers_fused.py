"""The TP layers' fused code paths train exactly like the plain ones (CPU, gloo, TP=2).

`fused.TUNING.emulate` lets the layers take the fused paths without CUDA peer memory (the fused ops then run
GEMM then gloo), so this checks the wiring: which layer calls which fused Function with which weights, biases
and layouts, with and without sequence parallelism. fp32, same data and weights: parameters after three AdamW
steps equal the plain `kernels: torch` run to rtol 1e-5 (only summation order differs; eps=1e-3 keeps AdamW
from amplifying rounding-level gradients).
"""

from __future__ import annotations

import pytest
import torch

from dist_utils import run_distributed
from families import engine_losses, tiny_model

pytest.importorskip("triton")


def _train(rank, world_size, family, kernels, sequence_parallel):
    import autotp
    from autotp_kernels import fused, tp_linear

    fused.TUNING.emulate = True
    fused.TUNING.always = True
    used = set()
    from autotp import layers

    functions = {name: getattr(tp_linear, name) for name in ("RowLinearAllReduce", "ColumnLinearGradAllReduce",
                                                              "RowLinearReduceScatter")}
    functions["_GatherMatmuls"] = layers._GatherMatmuls
    for name, function in functions.items():
        original = function.apply

        def counting(*args, _original=original, _name=name):
            used.add(_name)
            return _original(*args)

        function.apply = counting
    model = tiny_model(family)
    config = {"train_micro_batch_size_per_gpu": 2,
              "tensor_parallel": {"autotp_size": 2, "kernels": kernels, "sequence_parallel": sequence_parallel},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "eps": 1e-3}}}
    engine, _, _, _ = autotp.initialize(model=model, config=config)
    return engine_losses(engine), engine.consolidated_state_dict(), sorted(used)


@pytest.mark.parametrize("sequence_parallel", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D layers
def test_fused_paths_train_like_torch(family, sequence_parallel):
    fused_run = run_distributed(2, _train, family, "auto", sequence_parallel)[0]
    plain_run = run_distributed(2, _train, family, "torch", sequence_parallel)[0]
    # The vocab-parallel LM head (on by default) is a column layer outside the sequence-parallel stack.
    expected = (["ColumnLinearGradAllReduce", "RowLinearReduceScatter", "_GatherMatmuls"] if sequence_parallel
                else ["ColumnLinearGradAllReduce", "RowLinearAllReduce"])
    assert fused_run[2] == expected and plain_run[2] == []
    torch.testing.assert_close(torch.tensor(fused_run[0]), torch.tensor(plain_run[0]), rtol=1e-5, atol=0)
    for name, value in plain_run[1].items():
        torch.testing.assert_close(fused_run[1][name], value, rtol=1e-5, atol=1e-6, msg=name)
