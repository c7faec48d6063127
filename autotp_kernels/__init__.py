"""Triton kernels for autotp's tensor-parallel layers. Imports torch and triton only.

`matmul` is the plain GEMM the TP layers' forward, input-gradient (dgrad) and weight-gradient (wgrad) products
use; `TritonLinear` is the autograd Function over it. The fused GEMM + collective kernels build on these.
On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (tests do this in fp32 and fp16).
"""

from .gemm import matmul
from .linear import TritonLinear, triton_linear

__all__ = ["matmul", "TritonLinear", "triton_linear"]
