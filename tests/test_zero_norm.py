"""`zero.norm.sumsq_of`, the squared-norm sum every ZeRO store's clipping reads, against the per-tensor sum it
replaced: scalar weights grouped through `torch._foreach_norm`, per-element (KV replica) weights, zero weights,
bf16, fp64 and empty gradients."""

import torch

from autotp.zero.norm import sumsq_of


def per_tensor(pairs) -> float:
    total = 0.0
    for grad, weight in pairs:
        squares = grad.double().reshape(-1).pow(2)
        total += float((squares * (weight.double() if torch.is_tensor(weight) else weight)).sum())
    return total


def test_sumsq_of_matches_the_per_tensor_sum_for_every_kind_of_weight():
    gen = torch.Generator().manual_seed(0)
    pairs = [
        (torch.randn(64, 32, generator=gen), 1.0),
        (torch.randn(7, generator=gen).to(torch.bfloat16), 1.0),  # bf16: normed in fp32
        (torch.randn(5, 3, generator=gen), 0.5),
        (torch.randn(9, generator=gen) * 1e3, 0.0),  # TP rank != 0's replica: must not count
        (torch.zeros(0), 1.0),  # a DP rank holding no rows of a stage-3 shard
        (torch.randn(4, 6, generator=gen), torch.tensor([0.5] * 12 + [1.0] * 12)),  # KV replicas
        (torch.randn(6, generator=gen, dtype=torch.float64), 1.0),  # an fp64 model's gradient
    ]
    got = float(sumsq_of(pairs, torch.device("cpu")))
    # fp32 accumulation over ~2,100 values of order 1 against a float64 sum: a few ulps of the total (~1e-7).
    assert abs(got - per_tensor(pairs)) <= 1e-6 * per_tensor(pairs)
    assert sumsq_of(pairs, torch.device("cpu")).dtype == torch.float32


def test_sumsq_of_nothing_is_a_zero_on_the_device_given():
    total = sumsq_of([], torch.device("cpu"))
    assert total.dtype == torch.float32 and float(total) == 0.0
    assert float(sumsq_of([(torch.ones(3), 0.0)], torch.device("cpu"))) == 0.0
