"""autotp_kernels.widen (bf16/fp16 -> fp32 for the ZeRO store's gradients) against torch's `.float()`, bit for
bit (both widenings are exact), under TRITON_INTERPRET=1 (conftest.py) on the CPU."""

import pytest
import torch

from autotp_kernels.widen import BLOCK, widen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("numel", [0, 1, BLOCK - 1, BLOCK, 2 * BLOCK + 3])
def test_widen_equals_torch_bit_for_bit(dtype, numel):
    values = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 100
    # Subnormals: fp16's (6e-8) widen exactly here; bf16's (1e-40) are flushed to zero by the interpreter's numpy
    # emulation, not by the GPU's conversion, so they are checked on the GPU (tests/gpu/widen_check.py) instead.
    subnormal = 6e-8 if dtype == torch.float16 else 0.0
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), subnormal, 65504.0])
    t_lo = torch.cat([specials, values])[:numel].to(dtype) if numel else values.to(dtype)
    out = widen(t_lo)
    assert out.dtype == torch.float32 and out.shape == t_lo.shape
    assert torch.equal(out.view(torch.int32), t_lo.float().view(torch.int32))  # NaN payloads and signs too


def test_widen_refuses_what_it_cannot_copy():
    with pytest.raises(ValueError, match="float32"):
        widen(torch.zeros(4))
    with pytest.raises(ValueError, match="contiguous=False"):
        widen(torch.zeros(4, 4, dtype=torch.bfloat16).t())
