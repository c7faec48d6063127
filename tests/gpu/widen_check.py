"""GPU check of autotp_kernels.widen against torch's `.float()`, bit for bit, with bf16 and fp16 subnormals, signed
zeros, infinities and NaNs (not collected by CI: it needs CUDA). Prints 'widen: OK' or raises."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from autotp_kernels.widen import BLOCK, widen  # noqa: E402

specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-40, -3e-39, 6e-8, 65504.0])
for dtype in (torch.bfloat16, torch.float16):
    for numel in (1, BLOCK - 1, BLOCK + 1, 3 * 2 ** 20 + 5):
        values = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 100
        t_lo = torch.cat([specials, values])[:numel].to(dtype).cuda()
        out = widen(t_lo)
        bits, expected = out.view(torch.int32), t_lo.float().view(torch.int32)
        assert torch.equal(bits, expected), (dtype, numel, (bits != expected).nonzero()[:5].tolist())
    # every bf16/fp16 bit pattern
    every = torch.arange(-2 ** 15, 2 ** 15, dtype=torch.int32).to(torch.int16).view(dtype).cuda()
    assert torch.equal(widen(every).view(torch.int32), every.float().view(torch.int32)), dtype
print("widen: OK", flush=True)
